"""Pure functions on twin documents (deterministic: used inside workflow code)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fleetflow.contracts.twin import TwinState, TwinView


def merge_patch(document: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: null removes a field, objects merge, anything else replaces."""
    merged = dict(document)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_patch(merged[key], value)
        else:
            merged[key] = value
    return merged


def delta(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """The desired fields that reported does not match yet."""
    return {k: v for k, v in desired.items() if reported.get(k) != v}


def connection(state: TwinState, now: datetime) -> Literal["online", "offline", "never_seen"]:
    """Online when the device reported within its offline_after_s of now."""
    if state.last_seen is None:
        return "never_seen"
    silent = (now - state.last_seen).total_seconds()
    return "online" if silent < state.offline_after_s else "offline"


def view(
    state: TwinState, now: datetime, as_of: datetime | None = None, run_id: str | None = None
) -> TwinView:
    """The API's view of a state at time now."""
    return TwinView(
        device_id=state.device_id, desired=state.desired, desired_version=state.desired_version,
        reported=state.reported, reported_version=state.reported_version,
        delta=delta(state.desired, state.reported), last_seen=state.last_seen,
        connection=connection(state, now), ended=state.ended, as_of=as_of, run_id=run_id,
    )  # fmt: skip
