"""Device-type schemas: JSON Schema Draft 2020-12 through jsonschema, checked before they are stored."""

from __future__ import annotations

from typing import Any

import pytest

from fleetflow import config_schema

PROBE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "label": {"type": ["string", "null"], "pattern": "^[a-z]+$"},
        "channels": {"type": "array", "minItems": 1, "items": {"type": "integer"}},
        "gain": {"type": "number", "exclusiveMinimum": 0},
        "mode": {"oneOf": [{"const": "auto"}, {"type": "integer", "minimum": 1}]},
    },
}


@pytest.mark.parametrize(
    "document",
    [{"label": None}, {"label": "abc"}, {"channels": [1]}, {"gain": 0.1}, {"mode": "auto"}, {"mode": 3}],
)
def test_a_draft_2020_12_schema_accepts_what_it_allows(document: dict[str, Any]) -> None:
    config_schema.check_schema(PROBE)
    config_schema.validate(document, PROBE)


@pytest.mark.parametrize(
    ("document", "loc", "reason"),
    [
        ({"label": "ABC"}, ["config", "label"], "must match the pattern '^[a-z]+$'"),
        ({"label": 5}, ["config", "label"], "must be of type string or null"),
        ({"channels": []}, ["config", "channels"], "must have at least 1 items"),
        ({"channels": [1, "x"]}, ["config", "channels", 1], "must be of type integer"),
        ({"gain": 0}, ["config", "gain"], "must be > 0"),
        ({"mode": "manual"}, ["config", "mode"], "must match exactly one of the schema's alternatives"),
        ({"fan": 1}, ["config", "fan"], "is not a field of this device type"),
    ],
)
def test_what_the_old_subset_ignored_is_enforced_and_named(
    document: dict[str, Any], loc: list[str | int], reason: str
) -> None:
    with pytest.raises(config_schema.ConfigError) as error:
        config_schema.validate(document, PROBE)
    assert error.value.loc == loc and error.value.reason.startswith(reason)


def test_a_refusal_does_not_echo_the_value() -> None:
    with pytest.raises(config_schema.ConfigError) as error:
        config_schema.validate({"token": "hunter2-secret"}, {"properties": {"token": {"maxLength": 3}}})
    assert "hunter2" not in str(error.value)


# 2^30 paths through 30 small definitions: a few hundred bytes that would take forever to apply
EXPONENTIAL: dict[str, Any] = {
    "$defs": {
        **{f"a{i}": {"anyOf": [{"$ref": f"#/$defs/a{i + 1}"}] * 2} for i in range(30)},
        "a30": {"type": "string"},
    },
    "$ref": "#/$defs/a0",
}


@pytest.mark.parametrize(
    ("schema", "loc"),
    [
        ({"type": "strin"}, ["type"]),
        ({"properties": {"n": {"minItems": -1}}}, ["properties", "n", "minItems"]),
        ({"properties": {"s": {"pattern": "(a)\\1"}}}, ["properties", "s", "pattern"]),
        ({"properties": {"s": {"pattern": "(?=a)"}}}, ["properties", "s", "pattern"]),
        ({"patternProperties": {"^a": {}}}, ["patternProperties"]),
        ({"$ref": "https://example.com/schema.json"}, ["$ref"]),
        ({"$ref": "#/$defs/missing"}, ["$ref"]),
        ({"$schema": "http://json-schema.org/draft-07/schema#"}, ["$schema"]),
        ({"description": "x" * config_schema.MAX_SCHEMA_BYTES}, []),
        ({"$defs": {"a": {"items": {"$ref": "#/$defs/a"}}}}, ["$defs", "a", "items", "$ref"]),
        ({"$dynamicRef": "#meta"}, ["$dynamicRef"]),
        (EXPONENTIAL, []),
    ],
)
def test_unusable_schemas_are_refused_with_their_place(schema: dict[str, Any], loc: list[str | int]) -> None:
    with pytest.raises(config_schema.SchemaProblem) as problem:
        config_schema.check_schema(schema)
    assert problem.value.loc == loc


def test_a_schema_that_nests_too_deep_is_refused() -> None:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(config_schema.MAX_SCHEMA_DEPTH):
        schema = {"properties": {"a": schema}}
    with pytest.raises(config_schema.SchemaProblem, match="deeper"):
        config_schema.check_schema(schema)


def test_a_backtracking_pattern_runs_in_linear_time() -> None:
    # Python's re needs ~2^n steps for this pattern on this text: the test would never end
    schema = {"type": "string", "pattern": "^(a+)+$"}
    config_schema.check_schema(schema)
    with pytest.raises(config_schema.ConfigError, match="pattern"):
        config_schema.validate("a" * 5000 + "b", schema)


def test_a_stored_schema_that_is_unusable_is_a_config_error_not_a_crash() -> None:
    # stored before schemas were checked: onboarding must refuse, not answer 500
    with pytest.raises(config_schema.ConfigError, match="unusable"):
        config_schema.validate({"a": 1}, {"properties": {"a": {"type": "strin"}}})


def test_a_validation_that_would_take_too_long_is_refused_by_its_step_count() -> None:
    # 1,900 alternatives for each of 1,000 items: 1.9 million steps, refused after the budget
    schema = {"type": "array", "items": {"anyOf": [{"const": i} for i in range(1900)]}}
    config_schema.check_schema(schema)
    with pytest.raises(config_schema.ConfigError, match="schema steps"):
        config_schema.validate([1899] * 1000, schema)
    config_schema.validate([1899] * 5, schema)  # a small document of the same type passes
