"""`POST /v1/telemetry`'s fast parse (api/telemetry_body.py) against its reference, pydantic's
TelemetryBatchDict: the same batches accepted with the same values, the same ones refused with
the reference's errors (each naming its field), and the windows' CSV payload read back exactly."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from activities.telemetry_accept import ReadingColumns, csv_payload, digests_before
from api.telemetry_body import _fast, first_errors, parse_batch
from fleetflow.contracts.telemetry import TelemetryBatchDict
from fleetflow.mqtt_topics import parse_telemetry

REFERENCE = TypeAdapter(TelemetryBatchDict)
GOOD = {"device_id": "dev-1", "ts": "2026-12-06T07:52:52.123Z", "metric": "temp", "value": 20.5}


def body(*readings: Any, batch_id: Any = "b-1", **extra: Any) -> bytes:
    return json.dumps({"batch_id": batch_id, "readings": list(readings), **extra}).encode()


def with_(**fields: Any) -> dict[str, Any]:
    return {**GOOD, **fields}


def reference(raw: bytes) -> ReadingColumns | list[Any]:
    """The reference's columns, or its error locations."""
    try:
        return ReadingColumns.of(REFERENCE.validate_json(raw))
    except ValidationError as exc:
        return [e["loc"] for e in exc.errors()]


def parsed(raw: bytes) -> ReadingColumns | list[Any]:
    try:
        return parse_batch(raw)
    except ValidationError as exc:
        return [e["loc"] for e in exc.errors()]


def same(a: ReadingColumns | list[Any], b: ReadingColumns | list[Any]) -> bool:
    """Equal columns (ts compared as instants and offsets), or the same errors."""
    if isinstance(a, list) or isinstance(b, list):
        return a == b
    return (
        a == b
        and [t.utcoffset() for t in a.ts] == [t.utcoffset() for t in b.ts]
        and [repr(v) for v in a.values] == [repr(v) for v in b.values]
    )


TIMES = [
    "2026-12-06T07:52:52Z",
    "2026-12-06T07:52:52z",
    "2026-12-06t07:52:52Z",
    "2026-12-06 07:52:52Z",
    "2026-12-06_07:52:52Z",
    "2026-12-06T07:52Z",
    "2026-12-06T07:52:52",
    "2026-12-06",
    "2026-12-06T07:52:52.1234567Z",  # msgspec rounds past microseconds, pydantic truncates
    "2026-12-06T07:52:52.123456789+01:00",
    "2026-12-06T07:52:52.9999999Z",
    "2026-12-06T07:52:52.9999995-05:00",
    "2026-12-06 07:52:52.1234567z",
    "2026-12-06T07:52:52.12345678901234567890+00:00",
    "2026-12-06T07:52:52,5Z",
    "2026-12-06T07:52:52+0100",
    "2026-12-06T07:52:52+23:59",
    "2026-12-06T07:52:52+24:00",
    "2026-12-06T07:52:52-00:00",
    "2026-12-06T07:52:60Z",
    "2026-02-29T00:00:00Z",
    "20261206T075252Z",
    "2026-12-06T07:52:52\\u002e1234567Z",  # the same, escaped
    "0001-01-01T00:00:00Z",
    1765007572,
    1765007572.5,
    -1,
    True,
    None,
    "",
]
VALUES = [0, -0.0, 4, 20.5, 1e100, -1e100, 1.0000000000000002e100, 1e-400, 5e-324, 1e16]
VALUES += [12345678901234567890123, 20.123456789012, -0.1234567]
VALUES_RAW = ["NaN", "Infinity", "-Infinity", "1e400", "true", '"4"', "null", "[]", "{}", "0x10", "01"]
IDS = ["dev-1", "d", "a" * 128, "a" * 129, "-dev", "dev 1", "dev\\n", "dev\\u0000", "dév", ""]
IDS += ["dev,1", 'dev\\"1']


def raw_body(ts: Any = None, value: str = "20.5", device: str = "dev-1", metric: str = "temp") -> bytes:
    """A one-reading body with the given raw JSON fragments (escapes as written)."""
    t = '"2026-12-06T07:52:52Z"' if ts is None else f'"{ts}"' if isinstance(ts, str) else json.dumps(ts)
    reading = f'{{"device_id": "{device}", "ts": {t}, "metric": "{metric}", "value": {value}}}'
    return f'{{"batch_id": "b-1", "readings": [{reading}]}}'.encode()


@pytest.mark.parametrize("ts", TIMES)
def test_a_timestamp_is_read_as_the_reference_reads_it(ts: Any) -> None:
    raw = raw_body(ts=ts)
    assert same(parsed(raw), reference(raw)), (parsed(raw), reference(raw))


@pytest.mark.parametrize("value", [json.dumps(v) for v in VALUES] + VALUES_RAW)
def test_a_value_is_read_as_the_reference_reads_it(value: str) -> None:
    raw = raw_body(value=value)
    assert same(parsed(raw), reference(raw)), (parsed(raw), reference(raw))


@pytest.mark.parametrize("name", IDS)
def test_ids_and_metrics_follow_the_reference_patterns(name: str) -> None:
    for raw in (raw_body(device=name), raw_body(metric=name), raw_body(metric=f"m{name}")):
        assert same(parsed(raw), reference(raw)), raw
    batch = f'{{"batch_id": "{name}", "readings": [{json.dumps(GOOD)}]}}'.encode()
    assert same(parsed(batch), reference(batch)), batch


def test_a_value_with_many_decimals_takes_the_fast_path() -> None:
    # only a timestamp's long fraction is sent to the reference (a sensor's float often has
    # more than 7 decimals), and with its offset (here the next field's "-" must not count)
    raw = raw_body(value="20.123456789012", device="a.1234567")
    fast = _fast(raw)
    assert fast is not None and same(fast, reference(raw))


def test_a_trailing_newline_is_not_a_valid_id_on_either_path() -> None:
    # Python's `$` matches before a final newline; pydantic's patterns do not
    raw = raw_body(device="dev-1\\n")
    assert _fast(raw) is None
    with pytest.raises(ValidationError) as exc:
        parse_batch(raw)
    assert exc.value.errors()[0]["loc"] == ("readings", 0, "device_id")


@pytest.mark.parametrize(
    "raw",
    [
        body(GOOD, extra=1),  # unknown fields
        body(with_(unit="C")),
        body(),  # no readings
        body(GOOD, batch_id=None),
        body(GOOD, batch_id=7),
        json.dumps({"readings": [GOOD]}).encode(),
        json.dumps({"batch_id": "b-1"}).encode(),
        body({k: v for k, v in GOOD.items() if k != "metric"}),
        body(GOOD, GOOD, "not a reading"),
        b"[]",
        b"null",
        b"",
        b"{",
        b'{"batch_id": "b-1", "readings": [' + json.dumps(GOOD).encode() + b"]} trailing",
        # duplicate keys: the last one counts, on both paths
        b'{"batch_id": "a", "batch_id": "b-2", "readings": [' + json.dumps(GOOD).encode() + b"]}",
        b'{"batch_id": "b", "readings": [{"device_id": "x", "device_id": "dev-2",'
        b' "ts": "2026-12-06T07:52:52Z", "metric": "m", "metric": "temp", "value": 1, "value": 2}]}',
        b'{"batch_id": "b", "readings": [{"device_id": "x", "device_id": "-bad",'
        b' "ts": "2026-12-06T07:52:52Z", "metric": "m", "value": 1}]}',
        "\ufeff".encode() + body(GOOD),  # a byte order mark
        body(GOOD).replace(b'"device_id"', b'"device\\u005fid"'),  # an escaped key
    ],
)
def test_a_body_is_accepted_or_refused_as_the_reference_does(raw: bytes) -> None:
    assert same(parsed(raw), reference(raw)), (parsed(raw), reference(raw))


def test_every_refused_reading_is_named_with_its_field() -> None:
    raw = body(with_(ts="yesterday"), GOOD, with_(value="NaN"), with_(metric="9x"), with_(device_id=""))
    with pytest.raises(ValidationError) as exc:
        parse_batch(raw)
    assert {e["loc"] for e in exc.value.errors()} == {
        ("readings", 0, "ts"),
        ("readings", 2, "value"),
        ("readings", 3, "metric"),
        ("readings", 4, "device_id"),
    }


def test_the_largest_batch_takes_the_fast_path_and_one_more_reading_is_refused() -> None:
    start = datetime(2026, 12, 6, tzinfo=UTC)
    readings = [
        with_(device_id=f"d-{i % 500}", ts=(start + timedelta(microseconds=i)).isoformat(), value=i / 7)
        for i in range(10_000)
    ]
    raw = body(*readings)
    fast = _fast(raw)
    assert fast is not None and same(fast, reference(raw))
    too_many = body(*readings, GOOD)
    assert _fast(too_many) is None
    with pytest.raises(ValidationError) as exc:
        parse_batch(too_many)
    assert exc.value.errors()[0]["loc"] == ("readings",)


def test_the_deepest_body_is_refused_naming_where() -> None:
    deep = b'{"batch_id": "b-1", "readings": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _fast(deep) is None
    with pytest.raises(ValidationError):
        parse_batch(deep)
    deep_extra = b'{"batch_id": "b-1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "readings": []}'
    with pytest.raises(ValidationError):
        parse_batch(deep_extra)


def test_the_common_body_takes_the_fast_path() -> None:
    raw = body(GOOD, with_(device_id="dev-2", ts="2026-12-06T08:52:52.5+01:00", value=-3))
    assert _fast(raw) is not None


def columns(*rows: tuple[str, str, str, float], batch_id: str = "b-1") -> ReadingColumns:
    return ReadingColumns(
        batch_id,
        [r[0] for r in rows],
        [datetime.fromisoformat(r[2]) for r in rows],
        [r[1] for r in rows],
        [r[3] for r in rows],
    )


def test_the_csv_payload_holds_every_reading_in_utc_as_copy_reads_it() -> None:
    batch = columns(
        ("dev-1", "temp", "2026-12-06T07:52:52+00:00", 20.5),
        ("a:b.c_d-e", "m.x:y_z-1", "2026-12-06T07:52:52.000001+23:59", -1e100),
        ("dev-3", "Z", "2026-12-06T07:52:52-15:30", 5e-324),
        ("dev-4", "rateZ", "2026-12-06T00:00:00Z", 1e16),
    )
    lines = list(csv.reader(io.StringIO(csv_payload("acme-1", batch).decode())))
    assert [(t, b, d, m) for t, b, d, m, _, _ in lines] == [
        ("acme-1", "b-1", d, m) for d, m in zip(batch.device_ids, batch.metrics, strict=True)
    ]
    assert [datetime.fromisoformat(line[4]) for line in lines] == batch.ts
    assert all(line[4].endswith("Z") for line in lines)  # in UTC whatever the offset sent
    assert [float(line[5]) for line in lines] == batch.values


def test_a_batch_stored_by_an_earlier_release_or_over_mqtt_is_recognised() -> None:
    # the digests of main before this change (activities/telemetry_accept.py `_lines` and
    # `_digest_as_sent`), the form MQTT still stores: a retry of such a batch is a duplicate
    batch = columns(
        ("dev-1", "temp", "2026-12-06T07:52:52.5+01:00", 1e-05),
        ("dev-2", "temp", "2026-12-06T07:00:00Z", 4.0),
    )
    prefix = "t,b-1,"
    rows = list(zip(batch.device_ids, batch.metrics, batch.ts, batch.values, strict=True))
    in_utc = "".join(f"{prefix}{d},{m},{t.astimezone(UTC).isoformat()},{v!r}\n" for d, m, t, v in rows)
    as_sent = "".join(f"{prefix}{d},{m},{t.isoformat()},{v!r}\n" for d, m, t, v in rows)
    assert digests_before("t", batch) == (
        hashlib.sha256(in_utc.encode()).digest(),
        hashlib.sha256(as_sent.encode()).digest(),
    )


@pytest.mark.parametrize("value", [20.5, 4, -0.0, 1e16, 5e-05, 1e100, 0.1 + 0.2])
def test_a_reading_sent_over_mqtt_is_stored_as_the_same_reading_over_http(value: float) -> None:
    # one digest for one batch id whichever way it came: a retry over the other is a duplicate
    now = datetime(2026, 12, 6, 8, tzinfo=UTC)
    for ts in ("2026-12-06T07:52:52.5+01:00", "2026-12-06T07:52:52Z"):
        reading = {"device_id": "th-1", "metric": "t", "value": value, "ts": ts}
        over_mqtt = parse_telemetry(
            json.dumps({"batch_id": "b-1", "readings": [reading]}).encode(), "th-1", now
        )
        over_http = csv_payload("acme", parse_batch(body(reading))).decode()
        assert over_http == f"acme,b-1,{over_mqtt.rows[0]}"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e101"])
def test_a_value_that_is_not_finite_or_out_of_bounds_is_named(value: str) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_batch(raw_body(value=value))
    assert [e["loc"] for e in exc.value.errors()] == [("readings", 0, "value")]


REFUSED = [
    body(with_(ts="yesterday"), GOOD, with_(value="NaN"), with_(metric="9x"), with_(device_id="")),
    body(*[with_(device_id=f"-{i}", metric=f"{i}") for i in range(40)], batch_id="-b"),
    # keys whose text spells an entry separator of the errors' JSON, escaped and not
    b'{"batch_id": "b-1", "readings": [{"a\\"},{\\"type\\":": 1, "},{\\"type\\":": 2, "}]": 3}]}',
    b'{"batch_id": "b-1", "x": 1, "readings": [{"\\u007d,{\\"type\\":": 1}], "y": [1, {"a": 2}]}',
    b'{"readings": [' + b", ".join([b'{"k": 0, "value": "x"}'] * 60) + b"]}",
    b"{",
]


@pytest.mark.parametrize("raw", REFUSED)
@pytest.mark.parametrize("n", [1, 3, 50])
def test_the_first_errors_are_the_references_first_errors(raw: bytes, n: int) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_batch(raw)
    want = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.value.errors()[:n]]
    assert first_errors(exc.value, n) == want


def test_a_body_of_many_unknown_keys_is_refused_without_a_dict_per_error() -> None:
    # ~150,000 errors in a 2 MiB body: errors() built every one (~120 MB, seconds of the API's
    # event loop) to show 50 of them
    raw = b'{"batch_id": "b-1", "readings": [{' + b", ".join(b'"k%d": 0' % i for i in range(150_000)) + b"}]}"
    assert len(raw) <= 2 * 1024 * 1024
    with pytest.raises(ValidationError) as exc:
        parse_batch(raw)
    tracemalloc.start()
    try:
        errors = first_errors(exc.value, 50)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(errors) == 50 and ["readings", 0, "k0"] in [e["loc"] for e in errors]
    assert peak < 48 * 1024 * 1024
