"""Request body schemas written into the OpenAPI document by hand (`openapi_extra`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_DEFS = "#/$defs/"


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """model's JSON schema with its `$defs` inlined: a `#/$defs/...` reference inside the OpenAPI
    document would point at its root, where nothing is, so clients and fuzzers could not resolve it.
    (The body models are not recursive.)"""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(_DEFS):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**defs[ref.removeprefix(_DEFS)], **rest})
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result
