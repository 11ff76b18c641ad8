"""`fleetflow mqtt-bridge`: fleetflow behind an external MQTT broker (EMQX in the compose stack).

Devices connect to the broker, which asks the API who they are and what they may do
(`POST /v1/mqtt/auth|acl`). Each bridge process is one MQTT 5 client of that broker with a
persistent session (clean_start false, a long session expiry, a stable client id) subscribed at
QoS 1 to the devices' publishes through shared subscriptions (`$share/fleetflow/...`): the
broker spreads them over the bridges (`--scale mqtt-bridge=N`). A publish is acknowledged to the
broker only once it is durable (the gateway's group commit, gateway/ingest.py); until then the
broker keeps it in the bridge's session and delivers it again, so a killed bridge loses nothing.

The other way, the bridge publishes what the embedded gateway pushes (twin/desired retained,
twin/delta, jobs/notify, commands) on the same PostgreSQL NOTIFYs. Every bridge hears every
NOTIFY: desired, delta and job notices are versioned documents, so a copy from each bridge is
harmless; a command is taken atomically (one bridge gets it) and counts as delivered only once
the broker accepted it for a subscriber (PUBACK without 0x10 "no matching subscribers"). On a
credential revocation the bridges disconnect the device through EMQX's REST API.

Why paho-mqtt and not an asyncio client on gateway/codec.py: codec.py speaks the server's side
(it parses CONNECT and SUBSCRIBE, writes CONNACK); a client needs the other half, plus
reconnection and session resumption, which paho has, tested. Its network thread hands each
message to the asyncio loop; acknowledgements go back with `client.ack()` (manual_ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import threading
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

import asyncpg
import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from temporalio.client import Client

from activities import device_mqtt
from activities.devices import DeviceService
from activities.telemetry_publishes import quarantine_payload
from api.credentials import CHANNEL as REVOKED_CHANNEL
from api.early_alerts import EarlyAlerts
from fleetflow.contracts.commands import COMMAND_OFFERED_CHANNEL
from fleetflow.db import Pool
from fleetflow.mqtt_topics import (
    DESIRED_CHANGED_CHANNEL,
    JOB_OFFERED_CHANNEL,
    REPORTED_CHANGED_CHANNEL,
    BadPayload,
    Published,
    Refusal,
    Topic,
    parse_telemetry,
    publish_target,
    topic,
)
from fleetflow.security import DeviceClaims
from fleetflow.settings import Settings
from gateway import codec
from gateway.commands import MAX_TAKES, TAKE_AT_ONCE, CommandPush, offered_device
from gateway.ingest import GroupCommitter, Outcome, Pending
from gateway.jobs import JobPush
from gateway.twin_push import TwinPush

if TYPE_CHECKING:
    from gateway.connection import Connection

log = logging.getLogger(__name__)
BRIDGE_USERNAME = "fleetflow-bridge"  # the broker's auth hook knows a bridge by it (and its token)
SHARE_GROUP = "fleetflow"
INGESTED = (Topic.TELEMETRY, Topic.TWIN_REPORTED, Topic.JOB_PROGRESS, Topic.COMMAND_RESULT)
SUBSCRIPTIONS = tuple(
    f"$share/{SHARE_GROUP}/" + topic("+", "+", kind, campaign="+", command_id="+") for kind in INGESTED
)
PUSHED = (Topic.TWIN_DESIRED, Topic.TWIN_DELTA, Topic.JOBS_NOTIFY, Topic.COMMANDS)
SESSION_EXPIRY_S = 7 * 86400  # the broker keeps a stopped bridge's messages this long
RECEIVE_MAXIMUM = 1000  # unacknowledged publishes the broker may send at once (group commits)
RETRY_S = 1.0
RC_NO_SUBSCRIBERS = 0x10
KICK_TIMEOUT_S = 5.0
DELTAS_REMEMBERED = 10_000
PUBACK_TIMEOUT_S = 30.0
MAX_HANDLING = 5000  # device publishes in hand at once
_UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def device_topic(name: str) -> tuple[str, str, Published] | None:
    """(tenant, device id, what it is) of a device's publish topic; None for any other topic."""
    parts = name.split("/", 4)
    if len(parts) < 5 or parts[0] != "tenants" or parts[2] != "devices":
        return None
    try:
        return parts[1], parts[3], publish_target(parts[1], parts[3], name)
    except Refusal:
        return None


@dataclass
class _Sender:
    """Stands for the device's connection in the gateway's publish handlers: its claims, and
    `close()`, which they call when the database could not take the publish."""

    claims: DeviceClaims
    unavailable: bool = False

    def close(self, _reason: int | None, _why: str) -> None:
        self.unavailable = True


@dataclass
class _Publishes:
    """PUBACKs of the bridge's own QoS 1 publishes, by message id (paho's thread sets them)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = field(default_factory=dict)
    early: dict[int, int] = field(default_factory=dict)

    def acked(self, mid: int, code: int) -> None:
        with self.lock:
            entry = self.waiting.pop(mid, None)
            if entry is None:
                self.early[mid] = code
                return
        loop, fut = entry

        def settle() -> None:
            if not fut.done():
                fut.set_result(code)

        loop.call_soon_threadsafe(settle)

    def expect(self, mid: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = loop.create_future()
        with self.lock:
            code = self.early.pop(mid, None)
            if code is None:
                self.waiting[mid] = (loop, fut)
                return fut
        fut.set_result(code)
        return fut


class EmqxKick:
    """Disconnects a client through EMQX's REST API (`DELETE /api/v5/clients/{clientid}`, HTTP
    basic auth with an API key and its secret); 404 (not connected) counts as done.

    The client id is the device id, unique only within its tenant: before the DELETE, the
    client's `client_attrs` (set by the auth hook at its login, GET /api/v5/clients/{clientid})
    must name the revoked credential's tenant (and jti), so the revocation of one tenant's device
    never disconnects another tenant's device of that id (nor a device that logged in again
    with another credential)."""

    def __init__(self, base_url: str, key: str, secret: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(auth=(key, secret), timeout=KICK_TIMEOUT_S)

    async def kick(self, tenant: str, client_id: str, jti: str | None = None) -> bool:
        """True when the tenant's client is gone from the broker (or was never there); with jti,
        only a client logged in with that credential is kicked (the device may hold another)."""
        url = f"{self.base_url}/api/v5/clients/{quote(client_id, safe='')}"
        try:
            found = await self.http.get(url)
            if found.status_code == 404:
                return True
            if found.status_code != 200:
                log.warning("kick of %s: EMQX answered %d", client_id, found.status_code)
                return False
            attrs = found.json().get("client_attrs") or {}
            if attrs.get("tenant") != tenant:
                # another tenant's device of that id (or a client this hook never let in)
                log.info("kick of %s/%s: the client connected is not that tenant's", tenant, client_id)
                return True
            if jti is not None and attrs.get("jti") != jti:
                return True  # connected with another credential, still good
            answer = await self.http.delete(url)
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.warning("kick of %s failed: %s", client_id, exc)
            return False
        if answer.status_code in (200, 204, 404):
            return True
        log.warning("kick of %s: EMQX answered %d", client_id, answer.status_code)
        return False

    async def close(self) -> None:
        """Close the HTTP client."""
        await self.http.aclose()


class Bridge:
    """One bridge process: its MQTT client, the group committer, the NOTIFY listener."""

    def __init__(
        self, settings: Settings, pool: Pool, temporal: Client, dsn: str, client_id: str, password: str
    ) -> None:
        if not settings.mqtt_broker_url:
            raise ValueError("FLEETFLOW_MQTT_BROKER_URL is not set")
        url = urlsplit(settings.mqtt_broker_url)
        if url.scheme not in ("mqtt", "tcp") or not url.hostname:
            raise ValueError("FLEETFLOW_MQTT_BROKER_URL: must be mqtt://host[:port]")
        self.host, self.port = url.hostname, url.port or 1883
        self.pool = pool
        self.dsn = dsn
        self.client_id = client_id
        # the broker's packet ids count per session: remembered per bridge (gateway/ingest.py
        # keys redeliveries by packet id), and the digest names the session, so two bridges'
        # packets of one device never stand for each other
        self.packet_base = (zlib.crc32(client_id.encode()) % 32_000 + 1) * 65_536
        self.devices = DeviceService(pool, settings)
        self.committer = GroupCommitter(pool, settings.ingest_shards)
        self.early_alerts = EarlyAlerts(pool, temporal)
        self.twin = TwinPush(temporal, pool)
        self.jobs = JobPush(self.devices, temporal, pool)
        # the commands this bridge took name it until the broker's PUBACK: a bridge killed in
        # between gives them back when it runs again (the same client id, so the same node)
        self.node = f"bridge:{client_id}"
        self.commands = CommandPush(self.devices, temporal, self.node)
        self.kicker = (
            EmqxKick(settings.emqx_api_url, settings.emqx_api_key or "", settings.emqx_api_secret or "")
            if settings.emqx_api_url
            else None
        )
        self.handlers: dict[Topic, Callable[[Connection, Published, bytes], Awaitable[int]]] = {
            Topic.TWIN_REPORTED: self.twin.reported,
            Topic.JOB_PROGRESS: self.jobs.progress,
            Topic.COMMAND_RESULT: self.commands.result,
        }
        self.deltas: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.stored = 0  # publishes acknowledged to the broker (a figure for tests and logs)
        self._publishes = _Publishes()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._connected = asyncio.Event()
        self._handling = threading.BoundedSemaphore(MAX_HANDLING)
        self._stopping = threading.Event()  # paho's thread no longer waits for room
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True
        )
        self.client.username_pw_set(BRIDGE_USERNAME, password)
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the broker (resuming the session), subscribe, listen for NOTIFYs."""
        self._loop = asyncio.get_running_loop()
        self.committer.start()
        await self._listen()
        self._spawn(self._keep_listening())
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        self._spawn(self._release_taken())

    async def _release_taken(self) -> None:
        """Once connected (so the NOTIFY it sends finds a bridge to push them): give back the
        commands an earlier run of this bridge took and did not see the broker accept."""
        await self._connected.wait()
        while True:
            try:
                given_back = await self.commands.release_node()
            except _UNAVAILABLE as exc:
                log.warning("commands of an earlier run not given back yet: %s", exc)
                await asyncio.sleep(RETRY_S)
                continue
            if given_back:
                log.info("%d commands an earlier run of this bridge took without PUBACK: pending", given_back)
            return

    async def connected(self) -> None:
        """Wait until the broker accepted the bridge and its subscriptions were sent."""
        await self._connected.wait()

    async def stop(self) -> None:
        """Disconnect (the session stays on the broker) and stop."""
        self._stopping.set()  # before loop_stop joins paho's thread: it may wait for room
        self.client.disconnect()
        self.client.loop_stop()
        await self._end_tasks()
        await self.commands.drain()  # the PUBACKs recorded, so a restart pushes none of them again
        await self.committer.stop()
        # begun after the first round: a message paho's thread handed over before it stopped
        # (it waited on a committer that takes nothing more, retrying for ever), an early check
        await self._end_tasks()
        if self._listener is not None:
            await self._listener.close()
        if self.kicker is not None:
            await self.kicker.close()

    async def _end_tasks(self) -> None:
        while self._tasks:  # a task ending may start another
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- paho's thread -------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.warning("broker refused the bridge: %s", rc)
            return
        client.subscribe([(name, 1) for name in SUBSCRIPTIONS])

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        if any(code.is_failure for code in codes):
            log.error("broker refused the bridge's subscriptions: %s", [str(c) for c in codes])
            return
        self._loop.call_soon_threadsafe(self._connected.set)
        log.info("bridge %s connected to %s:%d", self.client_id, self.host, self.port)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._loop.call_soon_threadsafe(self._connected.clear)
        log.info("bridge %s disconnected: %s", self.client_id, rc)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        # backpressure: past MAX_HANDLING publishes in hand, paho's thread waits (QoS 0 ones
        # have no receive maximum to bound them)
        while not self._handling.acquire(timeout=RETRY_S):
            if self._stopping.is_set():
                # stop joins this thread, and the loop that would make room waits for that:
                # not handed over, not acknowledged (a QoS 1 one the broker's session keeps)
                return
        self._loop.call_soon_threadsafe(self._spawn, self._received(msg))

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._publishes.acked(mid, rc.value)

    # --- devices' publishes ----------------------------------------------------------------

    def _ack(self, msg: paho.MQTTMessage) -> None:
        if msg.qos:
            self.client.ack(msg.mid, msg.qos)
        self.stored += 1

    async def _received(self, msg: paho.MQTTMessage) -> None:
        """Handle a device's publish; acknowledge it once done (kept unacknowledged, so the
        broker keeps it for this session, while the database cannot take it)."""
        try:
            where = device_topic(msg.topic)
            if where is None:  # the broker's ACL hook let through no such topic: nothing to keep
                self._ack(msg)
                return
            tenant, device_id, target = where
            while True:
                try:
                    if await self._handle(msg, tenant, device_id, target):
                        self._ack(msg)
                        return
                except _UNAVAILABLE as exc:
                    log.warning("publish of %s/%s not handled: %s", tenant, device_id, exc)
                except Exception:
                    # not the database being away: retrying would hold it (and a slot of the
                    # broker's receive maximum) for ever
                    log.exception("publish of %s/%s to %s dropped", tenant, device_id, msg.topic)
                    self._ack(msg)
                    return
                await asyncio.sleep(RETRY_S)
        finally:
            self._handling.release()

    async def _handle(self, msg: paho.MQTTMessage, tenant: str, device_id: str, target: Published) -> bool:
        """Whether the publish is done with (stored, or refused for good)."""
        if target.kind is Topic.TELEMETRY:
            return await self._telemetry(msg, tenant, device_id)
        sender = _Sender(DeviceClaims(tenant=tenant, device_id=device_id, jti=""))
        await self.handlers[target.kind](cast("Connection", sender), target, bytes(msg.payload))
        return not sender.unavailable

    async def _telemetry(self, msg: paho.MQTTMessage, tenant: str, device_id: str) -> bool:
        try:
            readings = parse_telemetry(bytes(msg.payload), device_id, datetime.now(UTC))
        except BadPayload as exc:
            await quarantine_payload(self.pool, tenant, device_id, f"mqtt: {exc}")
            return True
        pending = Pending(
            tenant,
            device_id,
            readings.rows,
            readings.batch_id,
            packet_id=self.packet_base + msg.mid if msg.qos else None,
            dup=bool(msg.dup),
            payload_digest=hashlib.sha256(self.client_id.encode() + b"\0" + msg.payload).digest(),
        )
        outcome = await self.committer.submit(pending)
        if outcome is Outcome.STORED:
            # a threshold rule's alert is raised now, as the gateway's is (api/early_alerts.py):
            # its window does not stop filling for it
            metrics = (row.split(",", 2)[1] for row in pending.rows)
            if self.early_alerts.may_watch(tenant, metrics):
                self._spawn(self.early_alerts.check_rows(tenant, device_id, pending.rows))
        if outcome is Outcome.UNAVAILABLE:
            # the commit may have happened: the retry is checked as a redelivery
            msg.dup = True
            return False
        if outcome is Outcome.CONFLICT:
            await quarantine_payload(
                self.pool, tenant, device_id, "mqtt: batch_id reused with other readings"
            )
        return True

    # --- pushes to devices ---------------------------------------------------------------

    async def publish(self, name: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1 and wait for the broker's PUBACK; its reason code."""
        async with asyncio.timeout(PUBACK_TIMEOUT_S):
            await self._connected.wait()
            info = self.client.publish(name, payload, qos=1, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                return codec.RC5_UNSPECIFIED
            return await self._publishes.expect(info.mid, self._loop)

    async def push_twin(self, tenant: str, device_id: str, desired_changed: bool) -> None:
        """twin/desired (retained) and twin/delta after a change of desired; after a change of
        reported, twin/delta when it changed."""
        docs = await self.twin.documents(tenant, device_id)
        if docs is None:
            return
        desired, body = docs
        key = (tenant, device_id)
        if desired_changed:
            await self.publish(topic(tenant, device_id, Topic.TWIN_DESIRED), desired, retain=True)
        elif self.deltas.get(key) == body:
            return  # a report that left the delta as it was
        self.deltas[key] = body
        self.deltas.move_to_end(key)
        while len(self.deltas) > DELTAS_REMEMBERED:
            self.deltas.popitem(last=False)
        await self.publish(topic(tenant, device_id, Topic.TWIN_DELTA), body)

    async def push_job(self, tenant: str, device_id: str) -> None:
        """The device's pending job on jobs/notify."""
        job = await self.devices.pending_job(tenant, device_id)
        if job is not None:
            await self.publish(topic(tenant, device_id, Topic.JOBS_NOTIFY), job.model_dump_json().encode())

    async def push_commands(self, tenant: str, device_id: str) -> None:
        """Take the device's pending commands (atomically: one bridge gets each) and publish
        them; one the broker has no subscriber for is given back, pending."""
        name = topic(tenant, device_id, Topic.COMMANDS)
        for _ in range(MAX_TAKES):
            if not self._connected.is_set():
                return  # not taken: pending for the next offer, subscription or poll
            taken = await self.devices.take_commands(tenant, device_id, TAKE_AT_ONCE, self.node)
            for i, command in enumerate(taken):
                timed_out = False
                try:
                    code = await self.publish(name, command.model_dump_json().encode())
                except TimeoutError:
                    code, timed_out = codec.RC5_UNSPECIFIED, True
                if code >= RC_NO_SUBSCRIBERS:  # 0x10 no subscriber, 0x80+ refused: not sent
                    # offered again only after a timeout: for no subscriber or a refusal the
                    # offer's NOTIFY would bring them straight back here, round and round; the
                    # device's subscription (the broker's session.subscribed event) offers them
                    await self.commands.release(tenant, device_id, taken[i:], offer=timed_out)
                    return
                self.commands.delivered(tenant, device_id, command, acknowledged=True)
            if len(taken) < TAKE_AT_ONCE:
                return

    async def kick(self, jti: str) -> None:
        """Disconnect the device whose credential was revoked (it may connect again with
        another credential it holds)."""
        if self.kicker is None:
            return
        device = await device_mqtt.revoked_device(self.pool, jti)
        if device is not None:
            await self.kicker.kick(*device, jti=jti)

    async def _quietly(self, what: str, work: Awaitable[None]) -> None:
        try:
            await work
        except (*_UNAVAILABLE, TimeoutError, httpx.HTTPError) as exc:
            log.warning("%s not done: %s", what, exc)

    # --- NOTIFYs ---------------------------------------------------------------------------

    def _device(self, payload: object) -> tuple[str, str] | None:
        tenant, _, device_id = str(payload).partition("/")
        return (tenant, device_id) if tenant and device_id else None

    def _on_desired(self, _c: object, _p: int, _ch: str, payload: object) -> None:
        if key := self._device(payload):
            self._spawn(self._quietly("desired push", self.push_twin(*key, desired_changed=True)))

    def _on_reported(self, _c: object, _p: int, _ch: str, payload: object) -> None:
        if key := self._device(payload):
            self._spawn(self._quietly("delta push", self.push_twin(*key, desired_changed=False)))

    def _on_job(self, _c: object, _p: int, _ch: str, payload: object) -> None:
        if key := self._device(payload):
            self._spawn(self._quietly("job push", self.push_job(*key)))

    def _on_command(self, _c: object, _p: int, _ch: str, payload: object) -> None:
        if key := offered_device(payload):
            self._spawn(self._quietly("command push", self.push_commands(*key)))

    def _on_revoked(self, _c: object, _p: int, _ch: str, jti: object) -> None:
        self._spawn(self._quietly("kick", self.kick(str(jti))))

    async def _listen(self) -> None:
        listener: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(self.dsn)
        await listener.add_listener(DESIRED_CHANGED_CHANNEL, self._on_desired)
        await listener.add_listener(REPORTED_CHANGED_CHANNEL, self._on_reported)
        await listener.add_listener(JOB_OFFERED_CHANNEL, self._on_job)
        await listener.add_listener(COMMAND_OFFERED_CHANNEL, self._on_command)
        await listener.add_listener(REVOKED_CHANNEL, self._on_revoked)
        self._listener = listener

    async def _keep_listening(self) -> None:
        while True:
            await asyncio.sleep(RETRY_S)
            if self._listener is not None and not self._listener.is_closed():
                continue
            with contextlib.suppress(*_UNAVAILABLE):
                await self._listen()


def bridge_client_id(settings: Settings) -> str:
    """The bridge's MQTT client id: FLEETFLOW_MQTT_BRIDGE_ID, else from the host name (a
    compose replica's container keeps its host name across restarts)."""
    return settings.mqtt_bridge_id or f"{BRIDGE_USERNAME}-{socket.gethostname()}"
