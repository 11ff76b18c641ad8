"""Device-type configuration schemas: JSON Schema Draft 2020-12, validated by `jsonschema`.

A tenant's schema is checked when it is PUT (`check_schema`): it must be a valid Draft
2020-12 schema, at most MAX_SCHEMA_BYTES and MAX_SCHEMA_DEPTH deep, self-contained (`$ref`
only to `#...` inside it), and every `pattern` must compile with RE2, which runs in linear
time: a tenant's pattern cannot stall an API process or a workflow worker (Python's `re`
backtracks). `patternProperties` is refused for the same reason (jsonschema matches it with
`re`); `propertyNames: {"pattern": ...}` does the same job on RE2. `format` is an
annotation only, as the dialect says.

Errors name the field (`loc`) and the reason without echoing the value back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import re2
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError, best_match
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from fleetflow.twin_state import document_breach

DIALECT = "https://json-schema.org/draft/2020-12/schema"
MAX_SCHEMA_BYTES = 32 * 1024
MAX_SCHEMA_DEPTH = 32
# subschemas once every $ref is expanded: bounds the work of one validation (schema x document)
MAX_EXPANDED_SUBSCHEMAS = 2000
# keyword evaluations of one validation (a device config needs hundreds): bounds its CPU time
MAX_VALIDATION_STEPS = 20_000
_INSTANCE_DATA = {"const", "enum", "default", "examples"}  # values in a schema that are not schemas
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


class ConfigError(ValueError):
    """A configuration that breaks its device type's schema; `loc` (and dotted `path`) name the field."""

    def __init__(self, path: str, reason: str, loc: Sequence[str | int] | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.loc: list[str | int] = list(loc) if loc is not None else list(path.split("."))


class SchemaProblem(ValueError):
    """A schema that cannot be used; `loc` is the place inside the schema."""

    def __init__(self, loc: Sequence[str | int], reason: str) -> None:
        super().__init__(f"{'/'.join(map(str, loc)) or '(root)'}: {reason}")
        self.loc = list(loc)
        self.reason = reason


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Any:
    return re2.compile(pattern, _RE2_OPTIONS)


def _pattern(validator: Any, pattern: str, instance: Any, _: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and _compile(pattern).search(instance) is None:
        yield ValidationError(f"does not match {pattern!r}")


# Draft 2020-12 with `pattern` on RE2
class _TooCostly(Exception):
    """A validation ran past MAX_VALIDATION_STEPS."""


_STEPS: ContextVar[list[int]] = ContextVar("config_schema_steps")
# [steps left] shared by the validations of one request (step_budget), on top of each one's own
_SHARED: ContextVar[list[int] | None] = ContextVar("config_schema_shared_steps", default=None)


class _SharedBudgetSpent(_TooCostly):
    """The validations of one request together ran past their shared budget."""


@contextmanager
def step_budget(steps: int) -> Iterator[None]:
    """The validations inside share `steps` on top of each one's MAX_VALIDATION_STEPS: a bulk
    import of 10,000 devices is otherwise 10,000 full budgets of one request's CPU time."""
    token = _SHARED.set([steps])
    try:
        yield
    finally:
        _SHARED.reset(token)


def _charge(steps: int) -> None:
    """Count steps against the running validation's budget (a count, not a clock: the twin's
    update validator runs it in workflow code, which must stay deterministic)."""
    budget = _STEPS.get(None)
    if budget is not None:
        budget[0] += steps
        if budget[0] > MAX_VALIDATION_STEPS:
            raise _TooCostly
        shared = _SHARED.get()
        if shared is not None:
            shared[0] -= steps
            if shared[0] < 0:
                raise _SharedBudgetSpent


# keywords whose value's entries one evaluation goes through without descending into them (a
# subschema in allOf, properties, ... is counted when it is evaluated): an `enum` of 5,000 values
# is 5,000 comparisons for every item it is applied to, not one step
_PER_ENTRY = {"enum", "const", "required", "dependentRequired", "type"}


def _entries(value: Any) -> int:
    if isinstance(value, list):
        return len(value)
    if isinstance(value, dict):  # dependentRequired: a list of names per name
        return sum(1 + (len(v) if isinstance(v, list) else 0) for v in value.values())
    return 0


def _counted(name: str, keyword: Any) -> Any:
    """keyword, each use counted as 1 step (plus the entries of its value, see _PER_ENTRY)."""
    per_entry = name in _PER_ENTRY

    def run(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        _charge(1 + _entries(value) if per_entry else 1)
        return keyword(validator, value, instance, schema)

    return run


def _key(value: Any) -> Any:
    """A hashable key equal for values JSON Schema calls equal (1 == 1.0, true != 1, objects
    regardless of member order)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(_key(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((name, _key(item)) for name, item in value.items()))
    return ("other", repr(value))


def _unique_items(validator: Any, unique: Any, instance: Any, _: dict[str, Any]) -> Iterator[ValidationError]:
    # jsonschema compares every pair of an array it cannot sort (mixed types, objects): 12,000
    # items of a 64 KiB document would be 72 million comparisons; keys make it one pass
    if unique and validator.is_type(instance, "array"):
        _charge(len(instance))
        seen: set[Any] = set()
        for item in instance:
            key = _key(item)
            if key in seen:
                yield ValidationError("has non-unique elements")
                return
            seen.add(key)


# Draft 2020-12, `pattern` on RE2, `uniqueItems` in one pass, every keyword counted
_KEYWORDS = {**Draft202012Validator.VALIDATORS, "pattern": _pattern, "uniqueItems": _unique_items}
_Validator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {name: _counted(name, fn) for name, fn in _KEYWORDS.items()}
)


def _walk(node: Any, loc: list[str | int], depth: int) -> Iterator[SchemaProblem]:
    if depth > MAX_SCHEMA_DEPTH:
        yield SchemaProblem(loc, f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
        return
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, [*loc, i], depth + 1)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = [*loc, key]
        if key in _INSTANCE_DATA:
            continue
        if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
            yield SchemaProblem(here, "only references inside the schema ('#...') are allowed")
        elif key == "patternProperties":
            yield SchemaProblem(here, "is not supported: use propertyNames with a pattern")
        elif key == "pattern" and isinstance(value, str):
            try:
                _compile(value)
            except re2.error:
                yield SchemaProblem(here, "must be an RE2 pattern (no backreferences or lookaround)")
        elif key in ("$dynamicRef", "$recursiveRef"):
            yield SchemaProblem(here, "is not supported: use $ref")
        elif key == "$schema" and isinstance(value, str) and value not in (DIALECT, DIALECT + "#"):
            yield SchemaProblem(here, f"only {DIALECT} is supported")
        else:
            yield from _walk(value, here, depth + 1)


def _text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"), sort_keys=True)


def check_schema(schema: dict[str, Any]) -> None:
    """Raise SchemaProblem unless schema is a usable Draft 2020-12 schema within the limits."""
    _validator(_text(schema))


@lru_cache(maxsize=256)
def _validator(text: str) -> Any:
    """The validator of a schema (by its canonical text: a pure function of it, so it is cached)."""
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise SchemaProblem([], f"must be at most {MAX_SCHEMA_BYTES} bytes (is {len(text.encode())})")
    schema = json.loads(text)
    problem = next(_walk(schema, [], 1), None)
    if problem is not None:
        raise problem
    try:
        _Validator.check_schema(schema)
    except SchemaError as exc:
        raise SchemaProblem(list(exc.absolute_path), f"invalid schema: {exc.message[:200]}") from None
    _check_refs(schema)
    return _Validator(schema)


def _pointer(ref: str) -> list[str | int]:
    """The place a '#/a/b' reference names, as a loc."""
    parts = ref.removeprefix("#").removeprefix("/")
    return [p.replace("~1", "/").replace("~0", "~") for p in parts.split("/")] if parts else []


def _check_refs(schema: dict[str, Any]) -> None:
    """Every `$ref` ('#...', checked by _walk) points at something inside the schema, none is
    recursive, and the schema expands to at most MAX_EXPANDED_SUBSCHEMAS subschemas (a few
    kilobytes of nested `anyOf` with `$ref`s could otherwise mean 2^30 steps per validation)."""
    base = "urn:fleetflow:config-schema"
    resolver = Registry().with_resource(base, DRAFT202012.create_resource(schema)).resolver(base_uri=base)
    expanded: dict[str, int] = {}
    expanding: set[str] = set()

    def size(node: Any, loc: list[str | int]) -> int:
        if isinstance(node, list):
            return sum(size(item, [*loc, i]) for i, item in enumerate(node))
        if not isinstance(node, dict):
            return 0
        total = 1
        for key, value in node.items():
            if key in _INSTANCE_DATA:
                continue
            if key == "$ref" and isinstance(value, str):
                if value in expanding:
                    raise SchemaProblem([*loc, key], "a recursive $ref is not supported")
                if value not in expanded:
                    try:
                        target = resolver.lookup(value).contents
                    except Unresolvable:
                        raise SchemaProblem([*loc, key], "points at nothing inside the schema") from None
                    expanding.add(value)
                    expanded[value] = size(target, _pointer(value))
                    expanding.discard(value)
                total += expanded[value]
            else:
                total += size(value, [*loc, key])
            if total > MAX_EXPANDED_SUBSCHEMAS:
                raise SchemaProblem([], f"expands to more than {MAX_EXPANDED_SUBSCHEMAS} subschemas ($ref)")
        return total

    try:
        size(schema, [])
    except RecursionError:
        raise SchemaProblem([], "its $refs nest too deep") from None


_REASONS = {
    "type": lambda v: f"must be of type {' or '.join(v) if isinstance(v, list) else v}",
    "enum": lambda v: f"must be one of {v}",
    "const": lambda v: f"must be {v!r}",
    "minimum": lambda v: f"must be >= {v}",
    "maximum": lambda v: f"must be <= {v}",
    "exclusiveMinimum": lambda v: f"must be > {v}",
    "exclusiveMaximum": lambda v: f"must be < {v}",
    "multipleOf": lambda v: f"must be a multiple of {v}",
    "minLength": lambda v: f"must be at least {v} characters",
    "maxLength": lambda v: f"must be at most {v} characters",
    "pattern": lambda v: f"must match the pattern {v!r}",
    "minItems": lambda v: f"must have at least {v} items",
    "maxItems": lambda v: f"must have at most {v} items",
    "uniqueItems": lambda v: "must not repeat items",
    "minProperties": lambda v: f"must have at least {v} fields",
    "maxProperties": lambda v: f"must have at most {v} fields",
    "required": lambda v: "is required",
    "additionalProperties": lambda v: "is not a field of this device type",
    "unevaluatedProperties": lambda v: "is not a field of this device type",
    "oneOf": lambda v: "must match exactly one of the schema's alternatives (oneOf)",
    "anyOf": lambda v: "must match one of the schema's alternatives (anyOf)",
    "not": lambda v: "matches what the schema forbids (not)",
    "format": lambda v: f"must be a {v}",
}


def _located(error: ValidationError, document: Any) -> tuple[list[str | int], str]:
    """The field an error is about, and a reason that does not repeat the value."""
    loc: list[str | int] = list(error.absolute_path)
    keyword = str(error.validator)
    value: Any = error.validator_value
    at: Any = document
    try:
        for part in loc:
            at = at[part]
    except (KeyError, IndexError, TypeError):
        at = None
    # required / additionalProperties are reported on the object: name the field instead
    if keyword == "required" and isinstance(at, dict):
        missing = [name for name in value if name not in at]
        loc += missing[:1]
    elif keyword in ("additionalProperties", "unevaluatedProperties") and isinstance(at, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extra = sorted(str(k) for k in at if k not in known)
        loc += extra[:1]
    explain: Any = _REASONS.get(keyword, lambda v: f"breaks the schema's {keyword!r} rule")
    reason: str = explain(value)
    return loc, reason


def validate(document: Any, schema: dict[str, Any], path: str = "config") -> None:
    """Raise ConfigError at the place document breaks schema (also when the schema is unusable)."""
    base: list[str | int] = list(path.split("."))
    budget = _STEPS.set([0])
    try:
        # a type stored before schemas were checked must not crash its caller
        error = best_match(_validator(_text(schema)).iter_errors(document))
    except _SharedBudgetSpent:
        reason = "the request's documents together take too many schema steps to check: send fewer at once"
        raise ConfigError(path, reason, base) from None
    except _TooCostly:
        reason = f"takes more than {MAX_VALIDATION_STEPS} schema steps to check: simplify it or its schema"
        raise ConfigError(path, reason, base) from None
    except SchemaProblem as exc:
        raise ConfigError(path, f"the device type's schema is unusable ({exc})", base) from None
    except (Unresolvable, RecursionError) as exc:
        reason = f"the device type's schema cannot be applied ({type(exc).__name__})"
        raise ConfigError(path, reason, base) from None
    finally:
        _STEPS.reset(budget)
    if error is None:
        return
    loc, reason = _located(error, document)
    full = [*base, *loc]
    dotted = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    raise ConfigError(path + dotted, reason, full)


def resolve(config: dict[str, Any] | None, default: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The type's defaults overlaid with the requested config, validated."""
    merged = {**default, **(config or {})}
    # the configuration becomes the twin's desired document: the same limits apply
    breach = document_breach(merged, "config")
    if breach is not None:
        raise ConfigError("config", breach.reason)
    validate(merged, schema)
    return merged
