"""Pure functions on twin documents (deterministic: used inside workflow code)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fleetflow.contracts.twin import (
    MAX_DOCUMENT_BYTES,
    MAX_DOCUMENT_DEPTH,
    MAX_DOCUMENT_KEYS,
    MAX_TWIN_BYTES,
    TwinState,
    TwinView,
)


@dataclass(frozen=True)
class Breach:
    """A twin document past one of its limits: `limit` is bytes, depth or keys."""

    what: str
    limit: Literal["bytes", "depth", "keys"]
    reason: str

    @property
    def status(self) -> int:
        """413 for a document too large in bytes, 422 for one too deep or with too many keys."""
        return 413 if self.limit == "bytes" else 422


def _shape(document: Any, max_depth: int) -> tuple[int, int]:
    """(depth, keys) of a JSON value, without recursion; stops counting past max_depth."""
    depth, keys = 0, 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            depth = max(depth, level)
            if level > max_depth:
                return depth, keys
            values = node.values() if isinstance(node, dict) else node
            keys += len(node) if isinstance(node, dict) else 0
            stack.extend((v, level + 1) for v in values)
    return depth, keys


def size_of(document: Any) -> int:
    """Bytes of a document as compact UTF-8 JSON."""
    return len(json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode())


def document_breach(document: Any, what: str) -> Breach | None:
    """The first limit document breaks (depth, keys, bytes), or None."""
    depth, keys = _shape(document, MAX_DOCUMENT_DEPTH)
    if depth > MAX_DOCUMENT_DEPTH:
        return Breach(what, "depth", f"must nest at most {MAX_DOCUMENT_DEPTH} levels deep")
    if keys > MAX_DOCUMENT_KEYS:
        return Breach(what, "keys", f"must have at most {MAX_DOCUMENT_KEYS} keys (has {keys})")
    size = size_of(document)
    if size > MAX_DOCUMENT_BYTES:
        return Breach(what, "bytes", f"must be at most {MAX_DOCUMENT_BYTES} bytes of JSON (is {size})")
    return None


def twin_breach(desired: dict[str, Any], reported: dict[str, Any]) -> Breach | None:
    """The first limit a twin with these documents would break, or None."""
    breach = document_breach(desired, "desired") or document_breach(reported, "reported")
    if breach is not None:
        return breach
    total = size_of(desired) + size_of(reported)
    if total > MAX_TWIN_BYTES:
        reason = f"desired + reported must be at most {MAX_TWIN_BYTES} bytes (is {total})"
        return Breach("twin", "bytes", reason)
    return None


def change_breach(before: TwinState, desired: dict[str, Any], reported: dict[str, Any]) -> Breach | None:
    """The limit a change from `before` to these documents breaks, or None. A change that leaves a
    twin over a limit is allowed only when it shrinks the twin (so a twin that grew past the
    limits before they existed can still be repaired)."""
    breach = twin_breach(desired, reported)
    if breach is None:
        return None
    if size_of(desired) + size_of(reported) < size_of(before.desired) + size_of(before.reported):
        return None
    return breach


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
        device_id=state.device_id,
        desired=state.desired,
        desired_version=state.desired_version,
        reported=state.reported,
        reported_version=state.reported_version,
        delta=delta(state.desired, state.reported),
        last_seen=state.last_seen,
        connection=connection(state, now),
        ended=state.ended,
        as_of=as_of,
        run_id=run_id,
    )
