"""A small JSON Schema subset for device-type configuration documents.

Supported keywords: type, properties, required, additionalProperties (bool),
enum, minimum, maximum, minLength, maxLength, items, maxItems. Enough for
device configuration, without another dependency.
"""

from __future__ import annotations

from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


class ConfigError(ValueError):
    """A configuration that breaks its device type's schema; `path` names the field."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def validate(document: Any, schema: dict[str, Any], path: str = "config") -> None:
    """Raise ConfigError at the first place document breaks schema."""
    kind = schema.get("type")
    if kind is not None:
        allowed = _TYPES[kind]
        is_bool = isinstance(document, bool)
        if not isinstance(document, allowed) or (is_bool and kind != "boolean"):
            raise ConfigError(path, f"must be of type {kind}")
    if "enum" in schema and document not in schema["enum"]:
        raise ConfigError(path, f"must be one of {schema['enum']}")
    if isinstance(document, int | float) and not isinstance(document, bool):
        if "minimum" in schema and document < schema["minimum"]:
            raise ConfigError(path, f"must be >= {schema['minimum']}")
        if "maximum" in schema and document > schema["maximum"]:
            raise ConfigError(path, f"must be <= {schema['maximum']}")
    if isinstance(document, str):
        if len(document) < schema.get("minLength", 0):
            raise ConfigError(path, f"must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(document) > schema["maxLength"]:
            raise ConfigError(path, f"must be at most {schema['maxLength']} characters")
    if isinstance(document, list):
        if "maxItems" in schema and len(document) > schema["maxItems"]:
            raise ConfigError(path, f"must have at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(document):
                validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(document, dict):
        properties: dict[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in document:
                raise ConfigError(f"{path}.{name}", "is required")
        for name, value in document.items():
            if name in properties:
                validate(value, properties[name], f"{path}.{name}")
            elif schema.get("additionalProperties", True) is False:
                raise ConfigError(f"{path}.{name}", "is not a field of this device type")


def resolve(config: dict[str, Any] | None, default: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The type's defaults overlaid with the requested config, validated."""
    merged = {**default, **(config or {})}
    validate(merged, schema)
    return merged
