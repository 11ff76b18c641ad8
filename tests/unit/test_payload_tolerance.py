"""Rolling upgrades: a worker decodes a payload written by a newer release, with a field it does
not know, at any depth (the field is ignored). The API's bodies stay strict: see
test_api_bodies_refuse_unknown_fields."""

from __future__ import annotations

import json
import types
import typing
from datetime import datetime
from enum import Enum
from typing import Any

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter

from fleetflow.interfaces import CATALOGUE
from workers.registry import WORKFLOWS

FUTURE = "field_of_a_newer_release"


def _models_in(hint: Any, found: dict[str, type[BaseModel]]) -> None:
    """Every pydantic model hint names, nested ones included."""
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        if hint.__name__ not in found:
            found[hint.__name__] = hint
            for field in hint.model_fields.values():
                _models_in(field.annotation, found)
        return
    for arg in typing.get_args(hint):
        _models_in(arg, found)


def _temporal_payload_types() -> dict[str, type[BaseModel]]:
    """The models that travel through Temporal, read from the code: activity inputs and results
    (the catalogue) and every workflow's input, result, signals, updates and queries."""
    hints: list[Any] = []
    for entry in CATALOGUE:
        hints += [entry.input, entry.result]
    for cls in WORKFLOWS:
        defn = workflow._Definition.must_from_class(cls)
        hints += [*(defn.arg_types or []), defn.ret_type]
        for handlers in (defn.signals, defn.updates, defn.queries):
            for handler in handlers.values():
                hints += [*(handler.arg_types or []), getattr(handler, "ret_type", None)]
    found: dict[str, type[BaseModel]] = {}
    for hint in hints:
        _models_in(hint, found)
    return found


PAYLOAD_TYPES = _temporal_payload_types()


def _bounds(info: FieldInfo | None) -> tuple[float | None, float | None]:
    low: float | None = None
    high: float | None = None
    for m in info.metadata if info else ():
        if isinstance(m, annotated_types.Ge | annotated_types.Gt):
            low = typing.cast(float, m.ge if isinstance(m, annotated_types.Ge) else m.gt)
        if isinstance(m, annotated_types.Le | annotated_types.Lt):
            high = typing.cast(float, m.le if isinstance(m, annotated_types.Le) else m.lt)
    return low, high


def _sample(hint: Any, info: FieldInfo | None = None) -> Any:
    """A valid JSON value of hint, with FUTURE added to every object a model decodes."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _sample(typing.get_args(hint)[0], info)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return None if type(None) in args else _sample(args[0], info)
    if origin is typing.Literal:
        return typing.get_args(hint)[0]
    if origin in (list, tuple, set, frozenset, dict):
        return {} if origin is dict else []
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        fields = {
            name: _sample(field.annotation, field)
            for name, field in hint.model_fields.items()
            if field.is_required()
        }
        return fields | {FUTURE: {"any": ["shape"]}}
    if isinstance(hint, type) and issubclass(hint, Enum):
        return next(iter(hint)).value
    if hint is bool:
        return False
    if hint in (int, float):
        low, high = _bounds(info)
        number = 1.0 if low is None or low < 1 else low
        number = number if high is None else min(number, high)
        return int(number) if hint is int else number
    if hint is datetime:
        return "2026-01-01T00:00:00Z"
    if hint is str:
        return "a1"
    return {}  # dict[str, Any] and other open shapes


def test_the_payload_types_are_found_in_the_code() -> None:
    # the derivation must not come back (nearly) empty: each of these travels through Temporal
    for name in ("OnboardingInput", "DeviceSpec", "RolloutInput", "RolloutPolicy", "EventBatch", "TwinState"):
        assert name in PAYLOAD_TYPES, sorted(PAYLOAD_TYPES)
    assert len(PAYLOAD_TYPES) > 60


@pytest.mark.parametrize("model", PAYLOAD_TYPES.values(), ids=list(PAYLOAD_TYPES))
def test_a_payload_with_a_field_of_a_newer_release_decodes(model: type[BaseModel]) -> None:
    data = _sample(model)
    payload = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(data).encode())
    [decoded] = pydantic_data_converter.payload_converter.from_payloads([payload], [model])
    assert isinstance(decoded, model)
    assert FUTURE not in decoded.model_dump()  # ignored, not kept
