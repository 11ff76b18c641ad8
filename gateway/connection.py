"""One device's MQTT connection: reads packets, answers them in order, and hands CONNECT,
telemetry and the rest to the gateway (gateway/server.py). An asyncio Protocol, not streams:
a publish costs no task and no await of its own, only its share of a group commit."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

from fleetflow.mqtt_topics import (
    BadPayload,
    Published,
    Refusal,
    Topic,
    filter_matches,
    parse_telemetry,
    payload_digest,
    publish_target,
    subscription_allowed,
)
from fleetflow.security import DeviceClaims
from gateway import codec
from gateway.ingest import Outcome, Pending

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)
MAX_UNACKED = 1000  # publishes (of any QoS) in progress before the connection stops reading
RESUME_AT = 100
MAX_SUBSCRIPTIONS = 32  # filters of one connection (only its own few topics exist)
PRE_AUTH_MAX_BYTES = 64 * 1024  # the largest packet before CONNECT is accepted
CONNECT_TIMEOUT_S = 10.0  # a socket that has not authenticated by then is closed
MAX_INFLIGHT = 20  # QoS 1 pushes awaiting the device's PUBACK (fewer when its 5.0 CONNECT says so)


class _Push:
    """A QoS 1 push awaiting its PUBACK: on_ack when it comes, on_lost when the connection
    ends first (a command is given back)."""

    __slots__ = ("on_ack", "on_lost")

    def __init__(self, on_ack: Callable[[], None] | None, on_lost: Callable[[], None] | None) -> None:
        self.on_ack = on_ack
        self.on_lost = on_lost


class _Ack:
    """A reply slot: replies go out in the order their packets came in."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data


class Connection(asyncio.Protocol):
    """An MQTT connection of one device."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.version = codec.V311
        self.claims: DeviceClaims | None = None
        self.session_id = uuid.uuid4().hex[:16]
        self.keep_alive = 0
        self.last_rx = time.monotonic()
        self.subscriptions: dict[str, int] = {}  # filter -> granted QoS
        self.receive_maximum = MAX_INFLIGHT
        self._inflight: dict[int, _Push] = {}  # packet id -> QoS 1 push awaiting its PUBACK
        # QoS 1 pushes waiting for room, one per topic: a newer document of a topic (the twin's
        # versioned desired and delta, the pending job) replaces the one not yet sent
        self._waiting: dict[str, tuple[bytes, bool]] = {}
        # called once when a PUBACK makes room (set by a push that found none: commands wait)
        self.on_room: Callable[[Connection], None] | None = None
        self._connecting = False
        self._closed = False
        self._ending = False  # reads nothing more; closed once the replies owed are written
        self._acks: deque[_Ack] = deque()
        self._paused = False
        self._flush_scheduled = False
        self._next_pid = 0
        self.close_reason = "connection lost"
        self.presence: asyncio.Future[object] | None = None  # the write of its online
        self.last_delta = b""  # the twin/delta document pushed last
        self.will: tuple[Published, bytes] | None = None  # published when the connection ends unclean

    # --- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport; close it unless it authenticates soon."""
        # a stream transport, but not necessarily an asyncio.Transport subclass (uvloop's TCP
        # transport is not one)
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, self._connect_deadline)

    def _connect_deadline(self) -> None:
        if self.claims is None and not self._closed:
            self.close_reason = "no CONNECT in time"
            self.close(None, "no CONNECT in time")

    def data_received(self, data: bytes) -> None:
        """Parse and handle every whole packet received."""
        self.last_rx = time.monotonic()
        self.buf += data
        self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket closed: the device is offline (when it had connected)."""
        self._closed = True
        self.give_back()
        self.gateway.forget(self, self.close_reason)

    # --- packets ----------------------------------------------------------------

    def _drain(self) -> None:
        while not self._closed and not self._connecting and not self._ending:
            try:
                limit = self.gateway.max_packet if self.claims is not None else PRE_AUTH_MAX_BYTES
                found = codec.split_packet(self.buf, limit)
            except codec.MalformedPacket as exc:
                self.close(
                    codec.RC5_PACKET_TOO_LARGE if "limit" in str(exc) else codec.RC5_MALFORMED, str(exc)
                )
                return
            if found is None:
                return
            kind, flags, start, end = found
            body = bytes(self.buf[start:end])
            del self.buf[:end]
            try:
                self._handle(kind, flags, body)
            except codec.MalformedPacket as exc:
                self.close(codec.RC5_MALFORMED, str(exc))
                return

    def _handle(self, kind: int, flags: int, body: bytes) -> None:
        if self.claims is None:
            if kind != codec.CONNECT:
                raise codec.MalformedPacket("first packet is not CONNECT")
            connect = codec.parse_connect(body)
            self.version = connect.version if connect.version == codec.V5 else codec.V311
            self.keep_alive = connect.keep_alive
            self.receive_maximum = min(MAX_INFLIGHT, connect.receive_maximum)
            self._connecting = True
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._connect(connect))
            return
        if kind == codec.PUBLISH:
            self._publish(codec.parse_publish(flags, body, self.version))
        elif kind == codec.PUBACK:
            self._acked(codec.parse_packet_id(body))
        elif kind == codec.PUBCOMP:
            pass  # the gateway sends no QoS 2: nothing to complete
        elif kind == codec.PUBREL:
            self._reply(codec.puback(self.version, codec.parse_packet_id(body), kind=codec.PUBCOMP))
        elif kind == codec.PUBREC:
            self._reply(codec.pubrel(codec.parse_packet_id(body)))
        elif kind == codec.SUBSCRIBE:
            self._subscribe(codec.parse_subscribe(body, self.version))
        elif kind == codec.UNSUBSCRIBE:
            unsub = codec.parse_unsubscribe(body, self.version)
            for name in unsub.filters:
                self.subscriptions.pop(name, None)
            self._reply(codec.unsuback(self.version, unsub.packet_id, len(unsub.filters)))
        elif kind == codec.PINGREQ:
            self._reply(codec.pingresp())
        elif kind == codec.DISCONNECT:
            self.close_reason = "disconnected"
            self.close(None, "disconnected")
        elif kind == codec.CONNECT:
            raise codec.MalformedPacket("second CONNECT")
        else:
            raise codec.MalformedPacket(f"packet type {kind} from a client")

    async def _connect(self, connect: codec.Connect) -> None:
        code, claims, present = await self.gateway.authenticate(self, connect)
        if self._closed:
            return
        if claims is not None and connect.has_will:
            try:  # a will only to the device's own topics
                self.will = (
                    publish_target(claims.tenant, claims.device_id, connect.will_topic),
                    connect.will_payload,
                )
            except Refusal:
                code, claims = (
                    (codec.RC5_NOT_AUTHORIZED if self.version == codec.V5 else codec.RC311_NOT_AUTHORIZED),
                    None,
                )
        self.write(codec.connack(self.version, code, present, self.gateway.max_packet))
        if claims is None:
            self.close_reason = "refused"
            self.close(None, "refused")
            return
        self.claims = claims
        self._connecting = False
        assert self.transport is not None
        self.transport.resume_reading()
        await self.gateway.online(self)
        self._drain()

    def _publish(self, pub: codec.Publish) -> None:
        claims = self.claims
        assert claims is not None
        if pub.qos == 2 and self.version == codec.V5:
            self.close(codec.RC5_QOS_NOT_SUPPORTED, "QoS 2")
            return
        # every publish holds a reply slot until handled (QoS 0: an empty reply), so a flood
        # of QoS 0 publishes meets the same backpressure as QoS 1
        ack = _Ack()
        self._acks.append(ack)
        if len(self._acks) > MAX_UNACKED and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        kind = codec.PUBREC if pub.qos == 2 else codec.PUBACK

        def answer(reason: int) -> None:
            if pub.qos and pub.packet_id is not None:
                ack.data = codec.puback(self.version, pub.packet_id, reason, kind)
            else:
                ack.data = b""
            self._flush_soon()

        try:
            target = publish_target(claims.tenant, claims.device_id, pub.topic)
        except Refusal as exc:
            # 3.1.1 has no refusal in PUBACK: the publish is acknowledged and dropped
            answer(codec.RC5_NOT_AUTHORIZED if exc.outside else codec.RC5_TOPIC_NAME_INVALID)
            return
        if target.kind is not Topic.TELEMETRY:
            if not self.gateway.admit_readings(claims.tenant, claims.device_id, 0):
                self._over_rate(pub.qos, answer)
                return
            task = self.gateway.other_publish(self, target, pub.payload)
            task.add_done_callback(
                lambda t: answer(t.result() if not t.cancelled() else codec.RC5_UNSPECIFIED)
            )
            return
        try:
            readings = parse_telemetry(pub.payload, claims.device_id, datetime.now(UTC))
        except BadPayload as exc:
            self.gateway.bad_payload(claims, str(exc))
            answer(codec.RC5_PAYLOAD_INVALID)
            return
        if not self.gateway.admit_readings(claims.tenant, claims.device_id, len(readings.rows)):
            self._over_rate(pub.qos, answer)
            return
        pending = Pending(
            claims.tenant,
            claims.device_id,
            readings.rows,
            readings.batch_id,
            packet_id=pub.packet_id,
            dup=pub.dup,
            payload_digest=payload_digest(pub.payload),
        )
        done = self.gateway.committer.submit(pending)

        def committed(fut: asyncio.Future[Outcome]) -> None:
            outcome = fut.result() if not fut.cancelled() else Outcome.UNAVAILABLE
            if outcome is Outcome.STORED:
                self.gateway.stored(pending)
            if not pub.qos:
                answer(0)  # at most once: nothing more to say
            elif outcome is Outcome.UNAVAILABLE:
                # not durable: no PUBACK; the client redelivers on its next connection
                self.close(codec.RC5_SERVER_UNAVAILABLE, "storage unavailable")
            elif outcome is Outcome.CONFLICT:
                self.gateway.bad_payload(claims, "batch_id reused with other readings")
                answer(codec.RC5_PAYLOAD_INVALID)
            else:
                answer(0)

        done.add_done_callback(committed)

    def _over_rate(self, qos: int, answer: Callable[[int], None]) -> None:
        # over the tenant's or the device's requests/s or readings/s: not handled; 5.0 says so
        if self.version == codec.V5 or not qos:
            answer(codec.RC5_QUOTA_EXCEEDED)
            return
        # 3.1.1 has no refusal: no PUBACK for this one (the client redelivers it after
        # reconnecting) and the connection ends, but only once the publishes before it are
        # answered: closing at once dropped the PUBACKs of stored ones, the client sent them
        # again, over the rate again, and never got further
        self._ending = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._acks[-1].data = b""  # this publish's slot: nothing to answer
        self._flush()

    def _subscribe(self, sub: codec.Subscribe) -> None:
        claims = self.claims
        assert claims is not None
        refused = codec.SUBACK5_NOT_AUTHORIZED if self.version == codec.V5 else codec.SUBACK311_FAILURE
        codes = []
        granted = []
        quota = codec.RC5_QUOTA_EXCEEDED if self.version == codec.V5 else codec.SUBACK311_FAILURE
        for topic_filter, qos in sub.filters:
            full = len(self.subscriptions) >= MAX_SUBSCRIPTIONS and topic_filter not in self.subscriptions
            if full and subscription_allowed(claims.tenant, claims.device_id, topic_filter):
                codes.append(quota)
            elif subscription_allowed(claims.tenant, claims.device_id, topic_filter):
                self.subscriptions[topic_filter] = min(qos, 1)
                granted.append(topic_filter)
                codes.append(min(qos, 1))
            else:
                codes.append(refused)
        self._reply(codec.suback(self.version, sub.packet_id, codes))
        if granted:
            self.gateway.subscribed(self, granted)

    # --- writing ----------------------------------------------------------------

    def _reply(self, data: bytes) -> None:
        self._acks.append(_Ack(data))
        self._flush()

    def _flush_soon(self) -> None:
        # the PUBACKs a group commit answers reach their connections in one loop pass: one
        # write (one send) per connection and pass rather than one per publish
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_scheduled_now)

    def _flush_scheduled_now(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        out = []
        while self._acks and self._acks[0].data is not None:
            data = self._acks.popleft().data
            assert data is not None
            out.append(data)
        if out:
            self.write(b"".join(out))
        if self._ending and not self._acks:
            self.close(None, "over the request or readings rate")
            return
        stopped = self._closed or self._ending
        if self._paused and len(self._acks) < RESUME_AT and self.transport is not None and not stopped:
            self._paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        """Send bytes unless the connection is closed."""
        if data and not self._closed and self.transport is not None:
            self.transport.write(data)

    def qos_for(self, topic: str) -> int:
        """The QoS a push to topic goes out with: the highest its matching subscriptions were
        granted (at most 1); -1 when none matches."""
        return max((q for f, q in self.subscriptions.items() if filter_matches(f, topic)), default=-1)

    def room(self) -> int:
        """QoS 1 pushes that may go out now, before a PUBACK frees room."""
        return max(0, self.receive_maximum - len(self._inflight))

    def push(
        self,
        topic: str,
        payload: bytes,
        retain: bool = False,
        *,
        on_ack: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """Publish to the device with the QoS its subscription was granted (none matching:
        nothing sent). At QoS 1 the push is kept until its PUBACK: on_ack then, on_lost if the
        connection ends first; at QoS 0 on_ack is called once it is written. Past the room for
        unacknowledged pushes a push without on_lost waits, the newest per topic; one with
        on_lost (a command: the caller asks `room()` first) is given back at once."""
        qos = self.qos_for(topic)
        if qos < 0 or self._closed or self.transport is None:
            if on_lost is not None:
                on_lost()
            return
        if qos == 0:
            self.write(codec.publish(self.version, topic, payload, 0, 0, retain))
            if on_ack is not None:
                on_ack()
            return
        if not self.room():
            if on_lost is not None:
                on_lost()
            else:
                self._waiting.pop(topic, None)  # the newest goes last, after the older topics
                self._waiting[topic] = (payload, retain)
            return
        self._send(topic, payload, retain, _Push(on_ack, on_lost))

    def _send(self, topic: str, payload: bytes, retain: bool, push: _Push) -> None:
        packet_id = self._next_pid
        while True:
            packet_id = packet_id % 65535 + 1
            if packet_id not in self._inflight:
                break
        self._next_pid = packet_id
        self._inflight[packet_id] = push
        self.write(codec.publish(self.version, topic, payload, 1, packet_id, retain))

    def _acked(self, packet_id: int) -> None:
        push = self._inflight.pop(packet_id, None)
        if push is None:
            return  # no push of ours (a duplicate PUBACK): nothing to do
        if push.on_ack is not None:
            push.on_ack()
        while self._waiting and self.room():
            topic = next(iter(self._waiting))
            payload, retain = self._waiting.pop(topic)
            if self.qos_for(topic) >= 0:  # still subscribed
                self._send(topic, payload, retain, _Push(None, None))
        if self.room() and self.on_room is not None:
            wake, self.on_room = self.on_room, None
            wake(self)

    def give_back(self) -> None:
        """The connection ended: every push not acknowledged is given back (once)."""
        lost, self._inflight = self._inflight, {}
        self._waiting.clear()
        for push in lost.values():
            if push.on_lost is not None:
                push.on_lost()

    def close(self, reason: int | None, why: str) -> None:
        """End the connection (5.0: with a DISCONNECT carrying reason, when given)."""
        if self._closed or self.transport is None:
            return
        if self.close_reason == "connection lost":
            self.close_reason = why
        if reason is not None and self.claims is not None:
            self.write(codec.disconnect(self.version, reason))
        self._closed = True
        self.transport.close()
