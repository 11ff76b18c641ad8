"""The MQTT topics a device may use, and what its publishes mean. Pure: no I/O, no clock (the
caller passes `now`); the embedded gateway uses it, and so can a broker's auth/ACL hooks.

Every topic of a device is under `tenants/{tenant}/devices/{device_id}/`, with the tenant and
device id of its credential; nothing outside that prefix is allowed, for publish or subscribe.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec
import orjson
from pydantic import TypeAdapter, ValidationError

from fleetflow.contracts.telemetry import (
    FUTURE_TOLERANCE_S,
    MAX_ABS_VALUE,
    MAX_AGE_DAYS,
    MAX_BATCH_BYTES,
    MAX_BATCH_READINGS,
    BatchId,
)

WILDCARDS = frozenset("+#")
# NOTIFY channel: the API tells MQTT gateways that a device's desired document changed
# (payload `tenant/device_id`), so they push it to the device
DESIRED_CHANGED_CHANNEL = "twin_desired_changed"
# NOTIFY channel: a device's reported document changed (its delta may have), payload as above
REPORTED_CHANGED_CHANNEL = "twin_reported_changed"
# NOTIFY channel: a session took a device (payload `session_id tenant/device_id`): any other
# connection of the device, on any MQTT process, is closed (taken over)
SESSION_TAKEN_CHANNEL = "mqtt_session_taken"
# NOTIFY channel of the trigger on device.rollout_jobs: a job was offered to `tenant/device_id`
JOB_OFFERED_CHANNEL = "device_job_offered"
# a command id in a result topic: the API's CommandId characters, and '~' of a campaign's commands
_COMMAND_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:~-]{0,255}$")


class Topic(StrEnum):
    """What a device topic is for (the part after the device's prefix)."""

    TELEMETRY = "telemetry"
    TWIN_REPORTED = "twin/reported"
    TWIN_DESIRED = "twin/desired"
    TWIN_DELTA = "twin/delta"
    JOBS_NOTIFY = "jobs/notify"
    JOB_PROGRESS = "jobs/{campaign}/progress"
    COMMANDS = "commands"
    COMMAND_RESULT = "commands/{command_id}/result"


PUBLISHABLE = (Topic.TELEMETRY, Topic.TWIN_REPORTED, Topic.JOB_PROGRESS, Topic.COMMAND_RESULT)
SUBSCRIBABLE = (Topic.TWIN_DESIRED, Topic.TWIN_DELTA, Topic.JOBS_NOTIFY, Topic.COMMANDS)


def prefix(tenant: str, device_id: str) -> str:
    """The topic prefix of one device (ends with `/`)."""
    return f"tenants/{tenant}/devices/{device_id}/"


def topic(tenant: str, device_id: str, kind: Topic, campaign: str = "", command_id: str = "") -> str:
    """The full topic of kind for one device."""
    name = kind.value.replace("{campaign}", campaign).replace("{command_id}", command_id)
    return prefix(tenant, device_id) + name


@dataclass(frozen=True, slots=True)
class Published:
    """What a publish topic names: its kind, the campaign of a job progress, the command of a
    command result."""

    kind: Topic
    campaign: str = ""
    command_id: str = ""


# plain strings: an enum member's `.value` is a descriptor call, on every publish
_TELEMETRY = str(Topic.TELEMETRY.value)
_TWIN_REPORTED = str(Topic.TWIN_REPORTED.value)
_TELEMETRY_TARGET = Published(Topic.TELEMETRY)


class Refusal(Exception):
    """A topic the device may not use; `outside` when it is not under the device's prefix."""

    def __init__(self, reason: str, outside: bool) -> None:
        super().__init__(reason)
        self.outside = outside


def publish_target(tenant: str, device_id: str, name: str) -> Published:
    """What a device's publish to topic `name` is; Refusal when it may not publish there."""
    own = prefix(tenant, device_id)
    if not name.startswith(own) or "+" in name or "#" in name:
        raise Refusal(f"a device publishes under {own} only", outside=True)
    rest = name[len(own) :]
    if rest == _TELEMETRY:
        return _TELEMETRY_TARGET
    if rest == _TWIN_REPORTED:
        return Published(Topic.TWIN_REPORTED)
    parts = rest.split("/")
    if len(parts) == 3 and parts[0] == "jobs" and parts[2] == "progress" and parts[1]:
        return Published(Topic.JOB_PROGRESS, parts[1])
    if len(parts) == 3 and parts[0] == "commands" and parts[2] == "result":
        if _COMMAND_ID.fullmatch(parts[1]) is None:
            raise Refusal(f"not a command id: {parts[1][:64]!r}", outside=False)
        return Published(Topic.COMMAND_RESULT, command_id=parts[1])
    raise Refusal(f"no such device topic: {rest!r}", outside=False)


def subscription_allowed(tenant: str, device_id: str, topic_filter: str) -> bool:
    """Whether a device may subscribe to topic_filter: its own prefix, with wildcards only past
    it (so a `+` or `#` can never reach another device's topics)."""
    own = prefix(tenant, device_id)
    if not topic_filter.startswith(own):
        return False
    rest = topic_filter[len(own) :]
    if topic_filter.startswith("$share/"):
        return False
    return rest != "" and all(
        not (WILDCARDS & set(level)) or level in ("+", "#") for level in rest.split("/")
    )


def filter_matches(topic_filter: str, name: str) -> bool:
    """MQTT topic filter matching (`+` one level, `#` the rest)."""
    want, have = topic_filter.split("/"), name.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


# --- telemetry payloads -----------------------------------------------------------


class BadPayload(ValueError):
    """A telemetry payload that is not stored; the message is its reason (for the quarantine
    view: short, no payload echoed)."""


# the contracts' Metric pattern, matched directly (a TypeAdapter call costs more per reading)
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")
_BATCH_ID: TypeAdapter[str] = TypeAdapter(BatchId)
_TS: TypeAdapter[datetime] = TypeAdapter(datetime)
_READING_KEYS = frozenset({"metric", "value", "ts", "device_id"})


@dataclass(frozen=True, slots=True)
class Readings:
    """A telemetry publish, checked: its batch id when the device gave one, and the readings as
    the ingestion pipeline's CSV lines without their `tenant,batch_id,` prefix."""

    batch_id: str | None
    rows: list[str]


def _reading(item: Any, device_id: str, now: datetime, now_text: str, ts_required: bool, where: str) -> str:
    if not isinstance(item, dict):
        raise BadPayload(f"{where}: a reading is an object with metric and value")
    if not _READING_KEYS.issuperset(item):
        raise BadPayload(f"{where}: unknown field {sorted(set(item) - _READING_KEYS)[0]!r}")
    if item.get("device_id", device_id) != device_id:
        raise BadPayload(f"{where}.device_id: a device sends its own readings only")
    metric = item.get("metric")
    if not isinstance(metric, str) or _METRIC_NAME.fullmatch(metric) is None:
        raise BadPayload(f"{where}.metric: missing or not a metric name")
    raw_value = item.get("value")
    if isinstance(raw_value, bool) or not isinstance(raw_value, int | float):
        raise BadPayload(f"{where}.value: missing or not a number")
    if isinstance(raw_value, float) and not math.isfinite(raw_value):
        raise BadPayload(f"{where}.value: not finite")
    try:
        value = float(raw_value)
    except OverflowError:
        raise BadPayload(f"{where}.value: out of range") from None
    if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
        raise BadPayload(f"{where}.value: out of range")
    if "ts" in item:
        try:
            ts = _TS.validate_python(item["ts"])
        except ValidationError:
            raise BadPayload(f"{where}.ts: not a date-time") from None
        if ts.tzinfo is None:
            raise BadPayload(f"{where}.ts: needs a time zone")
        if ts > now + timedelta(seconds=FUTURE_TOLERANCE_S):
            raise BadPayload(f"{where}.ts: more than 5 minutes in the future")
        if ts < now - timedelta(days=MAX_AGE_DAYS):
            raise BadPayload(f"{where}.ts: more than {MAX_AGE_DAYS} days old")
    elif ts_required:
        raise BadPayload(f"{where}.ts: required in a batch")
    else:
        return f"{device_id},{metric},{now_text},{_number(value)}\n"
    return f"{device_id},{metric},{_utc_text(ts)},{_number(value)}\n"


# the rows are written as the HTTP path writes its batches' (activities/telemetry_accept.py,
# msgspec's JSON forms), so a batch id sent over both with the same readings has one digest
_JSON = msgspec.json.Encoder()


def _number(value: float) -> str:
    """value as msgspec writes it (the shortest repr; `1e16` where repr writes `1e+16`)."""
    return _JSON.encode(value).decode()


def _utc_text(ts: datetime) -> str:
    """ts in UTC as msgspec writes it: isoformat with `Z` for `+00:00`."""
    return ts.astimezone(UTC).isoformat().removesuffix("+00:00") + "Z"


def parse_telemetry(payload: bytes, device_id: str, now: datetime) -> Readings:
    """A telemetry payload: one reading `{"metric", "value", "ts"?}` (no ts: now), an array of
    them, or the HTTP batch shape `{"batch_id", "readings": [...]}` (ts required, as over HTTP).
    BadPayload with the reason otherwise."""
    if len(payload) > MAX_BATCH_BYTES:
        raise BadPayload(f"payload over {MAX_BATCH_BYTES} bytes")
    try:
        # orjson for the common payload (a tenth of json's cost); what it refuses (NaN,
        # integers past 64 bits, other encodings, deep nesting) goes to json, so each payload
        # gets the reason it always got
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            raise BadPayload("invalid JSON") from None
    batch_id = None
    if isinstance(doc, dict) and "readings" in doc:
        if set(doc) - {"batch_id", "readings"}:
            raise BadPayload("a batch has batch_id and readings only")
        try:
            batch_id = _BATCH_ID.validate_python(doc.get("batch_id"))
        except ValidationError:
            raise BadPayload("batch_id: missing or not a batch id") from None
        items, ts_required, where = doc["readings"], True, "readings"
    elif isinstance(doc, list):
        items, ts_required, where = doc, False, ""
    else:
        items, ts_required, where = [doc], False, "reading"
    if not isinstance(items, list) or not items:
        raise BadPayload(f"{where or 'readings'}: at least one reading")
    if len(items) > MAX_BATCH_READINGS:
        raise BadPayload(f"more than {MAX_BATCH_READINGS} readings")
    now_text = _utc_text(now)  # once per payload, not per reading
    rows = [
        _reading(
            item, device_id, now, now_text, ts_required, f"{where}[{i}]" if where != "reading" else where
        )
        for i, item in enumerate(items)
    ]
    return Readings(batch_id, rows)


def payload_digest(payload: bytes) -> bytes:
    """The digest that recognises a redelivered publish (with its packet id)."""
    return hashlib.sha256(payload).digest()
