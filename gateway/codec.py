"""MQTT 3.1.1 and 5.0 packets: what the gateway reads and writes, nothing more (no QoS 2 as a
sender, no topic aliases, no AUTH exchange). Pure functions over bytes; no I/O.

Properties of 5.0 packets are skipped as a block (their length is in front of them), except the
few the gateway sends itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

V311, V5 = 4, 5
# CONNACK return codes of 3.1.1, and the 5.0 reason codes the gateway uses
RC_ACCEPTED = 0
RC311_BAD_PROTOCOL = 1
RC311_BAD_CLIENT_ID = 2
RC311_BAD_CREDENTIALS = 4
RC311_NOT_AUTHORIZED = 5
RC5_UNSPECIFIED = 0x80
RC5_MALFORMED = 0x81
RC5_PROTOCOL_ERROR = 0x82
RC5_UNSUPPORTED_VERSION = 0x84
RC5_BAD_CLIENT_ID = 0x85
RC5_NOT_AUTHORIZED = 0x87
RC5_SERVER_UNAVAILABLE = 0x88
RC5_KEEP_ALIVE_TIMEOUT = 0x8D
RC5_SESSION_TAKEN_OVER = 0x8E
RC5_TOPIC_NAME_INVALID = 0x90
RC5_PACKET_TOO_LARGE = 0x95
RC5_QUOTA_EXCEEDED = 0x97
RC5_ADMINISTRATIVE = 0x98
RC5_PAYLOAD_INVALID = 0x99
RC5_QOS_NOT_SUPPORTED = 0x9B
SUBACK311_FAILURE = 0x80
SUBACK5_NOT_AUTHORIZED = 0x87

MAX_REMAINING = 268_435_455  # the largest remaining length four varint bytes hold


class MalformedPacket(ValueError):
    """The bytes are not a valid MQTT packet: the connection is closed."""


@dataclass(frozen=True, slots=True)
class Connect:
    """A CONNECT packet (the will's properties are read past, not kept)."""

    version: int
    client_id: str
    username: str | None
    password: bytes | None
    clean: bool
    keep_alive: int
    has_will: bool = False
    will_topic: str = ""
    will_payload: bytes = b""
    receive_maximum: int = 65535  # 5.0: QoS 1 publishes the client takes unacknowledged at once


@dataclass(frozen=True, slots=True)
class Publish:
    """A PUBLISH packet."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    dup: bool
    retain: bool


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A SUBSCRIBE packet: (filter, requested QoS) pairs."""

    packet_id: int
    filters: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """An UNSUBSCRIBE packet."""

    packet_id: int
    filters: list[str] = field(default_factory=list)


# --- reading ----------------------------------------------------------------------


def split_packet(buf: bytes | bytearray, max_size: int) -> tuple[int, int, int, int] | None:
    """(packet type, flags, start of the body, end of the packet) of the first whole packet in
    buf, or None while it is incomplete. MalformedPacket past max_size bytes of body."""
    if len(buf) < 2:
        return None
    multiplier, length, pos = 1, 0, 1
    while True:
        if pos >= len(buf):
            return None
        byte = buf[pos]
        length += (byte & 0x7F) * multiplier
        pos += 1
        if not byte & 0x80:
            break
        multiplier *= 128
        if pos > 4:
            raise MalformedPacket("remaining length longer than four bytes")
    if length > max_size:
        raise MalformedPacket(f"packet of {length} bytes is over the limit of {max_size}")
    end = pos + length
    if len(buf) < end:
        return None
    return buf[0] >> 4, buf[0] & 0x0F, pos, end


# CONNECT's property identifiers by the size of their value (5.0, 3.1.2.11)
_BYTE_PROPS = frozenset({0x17, 0x19})  # request problem / response information
_U16_PROPS = frozenset({0x21, 0x22})  # receive maximum, topic alias maximum
_U32_PROPS = frozenset({0x11, 0x27})  # session expiry interval, maximum packet size
_BINARY_PROPS = frozenset({0x15, 0x16})  # authentication method (string) and data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedPacket("packet ends early")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket("string is not UTF-8") from None

    def varint(self) -> int:
        multiplier, value = 1, 0
        for _ in range(4):
            byte = self.byte()
            value += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                return value
            multiplier *= 128
        raise MalformedPacket("variable byte integer longer than four bytes")

    def skip_properties(self) -> None:
        self.take(self.varint())

    def receive_maximum(self) -> int:
        """The Receive Maximum among CONNECT properties (65535 when absent); the rest skipped."""
        props = _Reader(self.take(self.varint()))
        found = 65535
        while props.pos < len(props.data):
            ident = props.varint()
            if ident in _BYTE_PROPS:
                props.byte()
            elif ident in _U16_PROPS:
                value = props.u16()
                if ident == 0x21:
                    if value == 0:
                        raise MalformedPacket("receive maximum of 0")
                    found = value
            elif ident in _U32_PROPS:
                props.take(4)
            elif ident in _BINARY_PROPS:
                props.binary()
            elif ident == 0x26:  # user property: a string pair
                props.binary()
                props.binary()
            else:
                raise MalformedPacket(f"property {ident:#x} in CONNECT")
        return found

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


def parse_connect(body: bytes) -> Connect:
    """The CONNECT packet's fields. MalformedPacket for what cannot be read; the protocol
    level is returned as is (the caller refuses the ones it does not speak)."""
    r = _Reader(body)
    name = r.text()
    version = r.byte()
    if name not in ("MQTT", "MQIsdp"):
        raise MalformedPacket(f"protocol name {name!r}")
    flags = r.byte()
    if flags & 0x01:
        raise MalformedPacket("reserved connect flag set")
    keep_alive = r.u16()
    receive_maximum = r.receive_maximum() if version == V5 else 65535
    client_id = r.text()
    has_will = bool(flags & 0x04)
    will_topic, will_payload = "", b""
    if has_will:
        if version == V5:
            r.skip_properties()
        will_topic = r.text()
        will_payload = r.binary()
    username = r.text() if flags & 0x80 else None
    password = r.binary() if flags & 0x40 else None
    clean = bool(flags & 0x02)
    return Connect(
        version,
        client_id,
        username,
        password,
        clean,
        keep_alive,
        has_will,
        will_topic,
        will_payload,
        receive_maximum,
    )


def parse_publish(flags: int, body: bytes, version: int) -> Publish:
    """The PUBLISH packet's fields."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("QoS 3")
    r = _Reader(body)
    topic = r.text()
    packet_id = r.u16() if qos else None
    if version == V5:
        r.skip_properties()
    return Publish(topic, r.rest(), qos, packet_id, bool(flags & 0x08), bool(flags & 0x01))


def parse_subscribe(body: bytes, version: int) -> Subscribe:
    """The SUBSCRIBE packet's filters and requested QoS."""
    r = _Reader(body)
    packet_id = r.u16()
    if version == V5:
        r.skip_properties()
    filters = []
    while r.pos < len(body):
        topic = r.text()
        filters.append((topic, r.byte() & 0x03))
    if not filters:
        raise MalformedPacket("SUBSCRIBE without a filter")
    return Subscribe(packet_id, filters)


def parse_unsubscribe(body: bytes, version: int) -> Unsubscribe:
    """The UNSUBSCRIBE packet's filters."""
    r = _Reader(body)
    packet_id = r.u16()
    if version == V5:
        r.skip_properties()
    filters = []
    while r.pos < len(body):
        filters.append(r.text())
    return Unsubscribe(packet_id, filters)


def parse_packet_id(body: bytes) -> int:
    """The packet id at the start of PUBACK, PUBREC, PUBREL and PUBCOMP."""
    return _Reader(body).u16()


# --- writing ----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return packet(kind << 4 | flags, body)


def packet(first: int, body: bytes) -> bytes:
    """A packet from its first byte (type and flags) and its body (the length put between)."""
    return bytes([first]) + _varint(len(body)) + body


def text(value: str | bytes) -> bytes:
    """A length-prefixed UTF-8 string (or bytes) of the protocol."""
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connack(version: int, code: int, session_present: bool = False, max_packet: int = 0) -> bytes:
    """CONNACK with a 3.1.1 return code or a 5.0 reason code. A 5.0 success tells the client the
    limits it must keep: QoS 1 at most, no retained publishes, no shared subscriptions, and the
    packet size."""
    flags = 1 if session_present and code == RC_ACCEPTED else 0
    if version != V5:
        return _packet(CONNACK, 0, bytes([flags, code]))
    props = b""
    if code == RC_ACCEPTED:
        props = bytes([0x24, 1, 0x25, 0, 0x2A, 0])  # maximum QoS, retain available, shared subs
        if max_packet:
            props += bytes([0x27]) + struct.pack("!I", max_packet)
    return _packet(CONNACK, 0, bytes([flags, code]) + _varint(len(props)) + props)


def puback(version: int, packet_id: int, reason: int = 0, kind: int = PUBACK) -> bytes:
    """PUBACK (or PUBREC/PUBCOMP by kind); a 5.0 reason code only when it is not success."""
    if version == V5 and reason:
        return _packet(kind, 0, struct.pack("!HB", packet_id, reason))
    return _packet(kind, 0, struct.pack("!H", packet_id))


def pubrel(packet_id: int) -> bytes:
    """PUBREL (flags 0b0010)."""
    return _packet(PUBREL, 2, struct.pack("!H", packet_id))


def suback(version: int, packet_id: int, codes: list[int]) -> bytes:
    """SUBACK: the granted QoS or a failure code per filter."""
    props = b"\x00" if version == V5 else b""
    return _packet(SUBACK, 0, struct.pack("!H", packet_id) + props + bytes(codes))


def unsuback(version: int, packet_id: int, count: int) -> bytes:
    """UNSUBACK (5.0: success for each filter)."""
    if version == V5:
        return _packet(UNSUBACK, 0, struct.pack("!H", packet_id) + b"\x00" + bytes(count))
    return _packet(UNSUBACK, 0, struct.pack("!H", packet_id))


def pingresp() -> bytes:
    """PINGRESP."""
    return _packet(PINGRESP, 0, b"")


def disconnect(version: int, reason: int) -> bytes:
    """A server DISCONNECT with its reason: 5.0 only (3.1.1 has none; the server just closes)."""
    if version != V5:
        return b""
    return _packet(DISCONNECT, 0, bytes([reason, 0]))


def publish(
    version: int, topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False
) -> bytes:
    """A PUBLISH from the gateway to a device."""
    body = text(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if version == V5:
        body += b"\x00"
    return _packet(PUBLISH, (qos << 1) | int(retain), body + payload)
