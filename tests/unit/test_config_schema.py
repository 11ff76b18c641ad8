"""Device-type schemas: JSON Schema Draft 2020-12 through jsonschema, checked before they are stored."""

from __future__ import annotations

from typing import Any

import jsonschema._keywords
import jsonschema._utils
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


class _Comparisons:
    """jsonschema's deep equality, counted; past `limit` comparisons the validation is stopped
    (the work the old code did for these documents was quadratic: millions of comparisons)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0
        self.equal = jsonschema._utils.equal

    def __call__(self, one: Any, two: Any) -> bool:
        self.count += 1
        if self.count > self.limit:
            raise AssertionError(f"more than {self.limit} comparisons")
        return bool(self.equal(one, two))


@pytest.fixture
def comparisons(monkeypatch: pytest.MonkeyPatch) -> _Comparisons:
    counted = _Comparisons(limit=100_000)
    monkeypatch.setattr(jsonschema._utils, "equal", counted)
    monkeypatch.setattr(jsonschema._keywords, "equal", counted)
    return counted


def test_unique_items_of_a_large_array_it_cannot_sort_take_one_pass(comparisons: _Comparisons) -> None:
    # numbers and a string cannot be sorted: jsonschema compared every pair (72 million for the
    # 12,000 items a 64 KiB document holds, minutes of a worker's or the API's CPU)
    schema = {"type": "object", "properties": {"l": {"type": "array", "uniqueItems": True}}}
    config_schema.check_schema(schema)
    items: list[Any] = [*range(10_000, 22_000), "x"]
    config_schema.validate({"l": items}, schema)
    with pytest.raises(config_schema.ConfigError, match="must not repeat items") as refused:
        config_schema.validate({"l": [*items, 12_345]}, schema)
    assert refused.value.loc == ["config", "l"]


@pytest.mark.parametrize(
    ("items", "unique"),
    [
        ([1, 1.0], False),
        ([True, 1], True),
        ([False, 0, None], True),
        ([{"a": 1, "b": [1, {}]}, {"b": [1.0, {}], "a": 1}], False),
        ([{"a": 1}, {"a": True}], True),
        ([[1, 2], [2, 1]], True),
        (["1", 1], True),
    ],
)
def test_unique_items_compare_as_json_schema_does(items: list[Any], unique: bool) -> None:
    schema = {"type": "array", "uniqueItems": True}
    if unique:
        config_schema.validate(items, schema)
    else:
        with pytest.raises(config_schema.ConfigError, match="must not repeat items"):
            config_schema.validate(items, schema)


def test_a_long_enum_on_every_item_of_a_long_array_counts_each_comparison(
    comparisons: _Comparisons,
) -> None:
    # 5,000 values (29 KiB of schema) for each of 10,000 items: 50 million comparisons were
    # counted as 10,000 steps; each comparison is a step now
    schema = {"type": "array", "items": {"enum": list(range(5000))}}
    config_schema.check_schema(schema)
    with pytest.raises(config_schema.ConfigError, match="schema steps"):
        config_schema.validate(list(range(100_000, 110_000)), schema)
    config_schema.validate(list(range(100)), {"type": "array", "items": {"enum": list(range(100))}})
