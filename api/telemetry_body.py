"""The body of `POST /v1/telemetry`, parsed straight into columns.

The reference is pydantic's `TelemetryBatchDict` (fleetflow.contracts.telemetry): its rules and
its errors (each naming the field). It costs ~3 µs a reading, most of the API's time at
saturation, so a body goes through msgspec first, typed like it but without the id and metric
patterns, which are then matched once per distinct value (a batch names few devices and
metrics) instead of once per reading. Whatever msgspec refuses, or whenever its answer could
differ from the reference's, the reference parses the body: it accepts what it always accepted
(`"value": "4"`, a number of seconds as `ts`, ...) and names the field of what it refuses. So the
fast path accepts a subset of what the reference accepts, with the same values.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from operator import attrgetter
from typing import Annotated, Any, get_args

import msgspec
from pydantic import StringConstraints, TypeAdapter, ValidationError

from activities.telemetry_accept import ReadingColumns
from fleetflow.contracts.limits import MAX_ABS_VALUE, MAX_BATCH_READINGS, BatchId, DeviceId, Metric
from fleetflow.contracts.telemetry import TelemetryBatchDict

_REFERENCE = TypeAdapter(TelemetryBatchDict)


def _pattern(annotated: Any) -> re.Pattern[str]:
    """The pattern of a constrained str type of the contracts (one definition for both paths)."""
    (constraints,) = (c for c in get_args(annotated)[1:] if isinstance(c, StringConstraints))
    assert isinstance(constraints.pattern, str)
    return re.compile(constraints.pattern)


# used with fullmatch: `$` alone also matches before a trailing newline, which pydantic refuses
_DEVICE_ID, _BATCH_ID, _METRIC = _pattern(DeviceId), _pattern(BatchId), _pattern(Metric)
# a ts with 7 or more fraction digits (followed by its offset): msgspec rounds them to
# microseconds where pydantic truncates. msgspec reads a fraction only after a ".", and the
# literal "." lets re skip to each candidate in C (a digit class would test every byte). (An id
# or value spelling the same only takes the reference path.)
_SUBMICRO = re.compile(rb"\.[0-9]{7,}[Zz+-]")


# gc=False: nothing but a str, a datetime and a float, so no cycle; 10,000 of them a batch
# tracked by the collector cost it several collections a request
class _Reading(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    device_id: str
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    metric: str
    value: Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    batch_id: str
    readings: Annotated[list[_Reading], msgspec.Meta(min_length=1, max_length=MAX_BATCH_READINGS)]


_DECODER = msgspec.json.Decoder(_Batch)


def parse_batch(raw: bytes) -> ReadingColumns:
    """The batch in `raw`, as columns; pydantic's ValidationError (every error, each with its
    field) when the reference refuses it."""
    fast = _fast(raw)
    if fast is not None:
        return fast
    return ReadingColumns.of(_REFERENCE.validate_json(raw))


def _fast(raw: bytes) -> ReadingColumns | None:
    """The columns when msgspec takes the body and its values are the reference's, else None."""
    if b"\\" in raw:  # an escape could spell anything the checks below look for
        return None
    if _SUBMICRO.search(raw) is not None:
        return None
    try:
        batch = _DECODER.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    readings = batch.readings
    device_ids = list(map(attrgetter("device_id"), readings))
    metrics = list(map(attrgetter("metric"), readings))
    if (
        _BATCH_ID.fullmatch(batch.batch_id) is None
        or not all(map(_DEVICE_ID.fullmatch, set(device_ids)))
        or not all(map(_METRIC.fullmatch, set(metrics)))
    ):
        return None
    return ReadingColumns(
        batch.batch_id,
        device_ids,
        list(map(attrgetter("ts"), readings)),
        metrics,
        list(map(attrgetter("value"), readings)),
    )


# between two entries of ValidationError.json(): inside its strings every quote is escaped, so
# this cannot occur within a loc or msg
_NEXT_ERROR = '},{"type":'


def first_errors(exc: ValidationError, n: int) -> list[dict[str, Any]]:
    """exc.errors()[:n] (type, loc, msg): a 2 MiB body can hold ~300,000 errors (unknown keys),
    whose dicts errors() builds all, seconds of the API's event loop; its JSON is written in
    Rust in a tenth of that, and only the first n entries are read back."""
    text = exc.json(include_url=False, include_context=False, include_input=False)
    end = -1
    for _ in range(n):
        end = text.find(_NEXT_ERROR, end + 1)
        if end < 0:
            break
    errors: list[dict[str, Any]] = json.loads(text if end < 0 else text[: end + 1] + "]")
    return errors
