"""The gateway's pushes to a device (gateway/connection.py): the subscription's QoS, the cap on
unacknowledged QoS 1 pushes, newer twin documents replacing waiting ones, give-back at the end."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from gateway import codec
from gateway.connection import MAX_INFLIGHT, Connection

DESIRED = "tenants/acme/devices/d1/twin/desired"
COMMANDS = "tenants/acme/devices/d1/commands"


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _connection(receive_maximum: int, qos: int = 1) -> tuple[Connection, _Transport]:
    conn = Connection(None)  # type: ignore[arg-type]  # the gateway is not reached here
    transport = _Transport()
    conn.transport = transport
    conn.version = codec.V5
    conn.receive_maximum = receive_maximum
    conn.subscriptions = {"tenants/acme/devices/d1/#": qos}
    return conn, transport


def _publishes(transport: _Transport) -> list[codec.Publish]:
    found, buf = [], transport.out
    while (split := codec.split_packet(buf, 1 << 20)) is not None:
        kind, flags, start, end = split
        assert kind == codec.PUBLISH
        found.append(codec.parse_publish(flags, bytes(buf[start:end]), codec.V5))
        del buf[:end]
    return found


def test_qos_is_the_granted_one_and_nothing_without_a_subscription() -> None:
    conn, transport = _connection(5, qos=0)
    conn.push(DESIRED, b"v1", retain=True)
    conn.push("tenants/acme/devices/d2/twin/desired", b"not theirs")
    [sent] = _publishes(transport)
    assert (sent.qos, sent.packet_id, sent.retain, sent.payload) == (0, None, True, b"v1")


def test_newest_twin_document_replaces_the_waiting_one_and_goes_at_the_puback() -> None:
    conn, transport = _connection(1)
    for version in (b"v1", b"v2", b"v3"):
        conn.push(DESIRED, version, retain=True)
    [first] = _publishes(transport)
    assert first.qos == 1 and first.payload == b"v1"
    assert first.packet_id is not None
    conn._acked(first.packet_id)  # the device's PUBACK
    [second] = _publishes(transport)
    assert second.payload == b"v3" and second.packet_id != first.packet_id  # v2 superseded
    assert second.packet_id is not None
    conn._acked(second.packet_id)
    assert _publishes(transport) == []


def test_commands_are_given_back_when_the_connection_ends_or_there_is_no_room() -> None:
    conn, transport = _connection(2)
    events: list[str] = []
    for name in ("a", "b", "c"):
        conn.push(
            COMMANDS,
            name.encode(),
            on_ack=functools.partial(events.append, f"acked {name}"),
            on_lost=functools.partial(events.append, f"lost {name}"),
        )
    assert events == ["lost c"]  # past the receive maximum: given back at once
    first, second = _publishes(transport)
    assert first.packet_id is not None and second.packet_id != first.packet_id
    conn._acked(first.packet_id)
    conn._acked(first.packet_id)  # a duplicate PUBACK changes nothing
    conn.give_back()
    conn.give_back()  # once
    assert events == ["lost c", "acked a", "lost b"]


def test_receive_maximum_is_read_from_a_5_connect_and_capped() -> None:
    def connect(props: bytes) -> codec.Connect:
        body = b"\x00\x04MQTT\x05\x02\x00\x3c" + bytes([len(props)]) + props + b"\x00\x02d1"
        return codec.parse_connect(body)

    assert connect(b"").receive_maximum == 65535
    assert connect(b"\x11\x00\x00\x0e\x10" + b"\x21\x00\x03").receive_maximum == 3
    assert MAX_INFLIGHT == 20
