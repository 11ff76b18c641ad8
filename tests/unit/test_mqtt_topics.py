"""fleetflow/mqtt_topics.py and gateway/codec.py: pure rules and packets, no servers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from fleetflow.mqtt_topics import (
    BadPayload,
    Refusal,
    Topic,
    filter_matches,
    parse_telemetry,
    publish_target,
    subscription_allowed,
    topic,
)
from gateway import codec

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OWN = "tenants/acme/devices/th-1/"


def test_publish_targets() -> None:
    assert publish_target("acme", "th-1", OWN + "telemetry").kind is Topic.TELEMETRY
    progress = publish_target("acme", "th-1", OWN + "jobs/c-1/progress")
    assert (progress.kind, progress.campaign) == (Topic.JOB_PROGRESS, "c-1")
    for outside in (
        "tenants/acme/devices/th-2/telemetry",
        "tenants/globex/devices/th-1/telemetry",
        "tenants/acme/devices/th-1x/telemetry",
        OWN + "+",
        "telemetry",
    ):
        with pytest.raises(Refusal) as refused:
            publish_target("acme", "th-1", outside)
        assert refused.value.outside or "+" in outside
    with pytest.raises(Refusal) as unknown:
        publish_target("acme", "th-1", OWN + "jobs//progress")
    assert not unknown.value.outside


def test_command_topics() -> None:
    answer = publish_target("acme", "th-1", OWN + "commands/cmd-1/result")
    assert (answer.kind, answer.command_id) == (Topic.COMMAND_RESULT, "cmd-1")
    campaign = publish_target("acme", "th-1", OWN + "commands/c-1~2/result")
    assert campaign.command_id == "c-1~2"
    assert topic("acme", "th-1", Topic.COMMANDS) == OWN + "commands"
    assert subscription_allowed("acme", "th-1", OWN + "commands")
    # another device's commands: neither its push nor its answers
    assert not subscription_allowed("acme", "th-1", "tenants/acme/devices/th-2/commands")
    assert not subscription_allowed("acme", "th-1", "tenants/acme/devices/+/commands")
    with pytest.raises(Refusal) as other:
        publish_target("acme", "th-1", "tenants/acme/devices/th-2/commands/cmd-1/result")
    assert other.value.outside
    with pytest.raises(Refusal) as other_tenant:
        publish_target("acme", "th-1", "tenants/globex/devices/th-1/commands/cmd-1/result")
    assert other_tenant.value.outside
    for bad in ("commands//result", "commands/+/result", "commands/cmd-1", "commands", "commands/-x/result"):
        with pytest.raises(Refusal):
            publish_target("acme", "th-1", OWN + bad)


def test_subscriptions_stay_under_the_own_prefix() -> None:
    assert subscription_allowed("acme", "th-1", OWN + "twin/desired")
    assert subscription_allowed("acme", "th-1", OWN + "#")
    assert subscription_allowed("acme", "th-1", OWN + "+/delta")
    for refused in (
        "#",
        "tenants/acme/#",
        "tenants/acme/devices/+/twin/delta",
        OWN,
        OWN + "tw#in",
        "$share/g/" + OWN + "twin/delta",
        "tenants/acme/devices/th-1+/x",
    ):
        assert not subscription_allowed("acme", "th-1", refused), refused


def test_filter_matching() -> None:
    assert (
        filter_matches("a/+/c", "a/b/c") and filter_matches("a/#", "a/b/c") and filter_matches("a/b", "a/b")
    )
    assert not filter_matches("a/+", "a/b/c") and not filter_matches("a/b/c", "a/b")


def test_telemetry_shapes() -> None:
    one = parse_telemetry(b'{"metric": "t", "value": 1}', "th-1", NOW)
    utc = NOW.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert one.batch_id is None and one.rows == [f"th-1,t,{utc},1.0\n"]
    ts = (NOW - timedelta(minutes=1)).isoformat()
    many = parse_telemetry(json.dumps([{"metric": "t", "value": 2, "ts": ts}]).encode(), "th-1", NOW)
    assert many.rows == [f"th-1,t,{ts.replace('+00:00', 'Z')},2.0\n"]
    batch = {"batch_id": "b-1", "readings": [{"device_id": "th-1", "metric": "t", "value": 3, "ts": ts}]}
    assert parse_telemetry(json.dumps(batch).encode(), "th-1", NOW).batch_id == "b-1"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),  # deeper than the parser goes
        (b'{"metric": "t", "value": NaN}', "not finite"),
        (b'{"metric": "t", "value": 1e101}', "out of range"),
        (b'{"metric": "t", "value": 1' + b"0" * 120 + b"}", "out of range"),  # past 64 bits
        (b'{"metric": "t", "value": true}', "not a number"),
        (b'{"metric": "1t", "value": 1}', "metric"),
        (b'{"metric": "t", "value": 1, "extra": 1}', "unknown field"),
        (b'{"metric": "t", "value": 1, "ts": "2026-12-01T12:00:00"}', "time zone"),
        (b'{"metric": "t", "value": 1, "ts": "2030-01-01T00:00:00Z"}', "future"),
        (b'{"metric": "t", "value": 1, "device_id": "th-2"}', "own readings"),
        (b'{"batch_id": "b", "readings": [{"metric": "t", "value": 1}]}', "required in a batch"),
        (b'{"batch_id": "b b", "readings": []}', "batch_id"),
        (b"[]", "at least one"),
        (b"42", "object"),
    ],
)
def test_bad_telemetry_names_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadPayload) as bad:
        parse_telemetry(payload, "th-1", NOW)
    assert reason in str(bad.value)


def test_payloads_the_fast_parser_refuses_read_as_before() -> None:
    # orjson refuses these; the json fallback reads them as the gateway always did
    assert parse_telemetry('{"metric": "t", "value": 1}'.encode("utf-16"), "th-1", NOW).rows
    with pytest.raises(BadPayload, match="metric"):  # a lone surrogate: not a metric name
        parse_telemetry(b'{"metric": "t\\ud800", "value": 1}', "th-1", NOW)


def test_packets() -> None:
    assert codec.split_packet(b"\x30", 100) is None
    assert codec.split_packet(b"\x30\x05ab", 100) is None
    assert codec.split_packet(b"\x30\x02ab", 100) == (3, 0, 2, 4)
    with pytest.raises(codec.MalformedPacket):
        codec.split_packet(b"\x30\xff\xff\xff\xff\x01", 10**9)  # a fifth length byte
    with pytest.raises(codec.MalformedPacket):
        codec.split_packet(b"\x30\x80\x80\x40", 1000)  # over the limit, refused before it arrives
    body = b"\x00\x04MQTT\x05\xc2\x00\x3c\x00" + b"\x00\x02d1" + b"\x00\x02d1" + b"\x00\x03jwt"
    connect = codec.parse_connect(body)
    assert (connect.version, connect.client_id, connect.username, connect.password) == (5, "d1", "d1", b"jwt")
    with pytest.raises(codec.MalformedPacket):
        codec.parse_connect(body[:-2])
    assert (
        codec.puback(5, 7, 0x99) == b"\x40\x03\x00\x07\x99"
        and codec.puback(4, 7, 0x99) == b"\x40\x02\x00\x07"
    )
