"""The MQTT gateway: fleetflow's own MQTT 3.1.1/5.0 endpoint (`fleetflow mqtt`, started by
`fleetflow up`). Devices authenticate with their credential at CONNECT, publish telemetry
that is durable before its PUBACK (gateway/ingest.py), and are disconnected within seconds
of a revocation or decommissioning (the `device_credentials_revoked` NOTIFY, and a sweep).

Why not a broker from PyPI: amqtt 0.12 sends PUBACK once a message is in its in-memory queue,
before any plugin runs, and speaks 3.1.1 only; iotcore (rumqttd) keeps messages in memory and
has no authentication hook. Either loses acknowledged readings when its process is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
from fastapi import HTTPException
from temporalio.client import Client

from activities import device_mqtt
from activities.devices import DeviceService
from activities.notifications import NotificationService
from activities.telemetry_publishes import quarantine_payload
from api.credentials import CHANNEL as REVOKED_CHANNEL
from api.early_alerts import EarlyAlerts
from api.quotas import Quotas
from fleetflow.contracts.commands import COMMAND_OFFERED_CHANNEL
from fleetflow.contracts.telemetry import MAX_BATCH_BYTES
from fleetflow.db import Pool
from fleetflow.mqtt_topics import (
    DESIRED_CHANGED_CHANNEL,
    JOB_OFFERED_CHANNEL,
    REPORTED_CHANGED_CHANNEL,
    SESSION_TAKEN_CHANNEL,
    BadPayload,
    Published,
    Topic,
    parse_telemetry,
)
from fleetflow.pg_listener import PgListener
from fleetflow.security import DeviceClaims
from fleetflow.settings import Settings
from gateway import codec
from gateway.auth import LoginUnavailable, device_login
from gateway.commands import CommandPush, offered_device
from gateway.connection import CONNECT_TIMEOUT_S, Connection
from gateway.ingest import GroupCommitter, Outcome, Pending
from gateway.jobs import JobPush
from gateway.presence import Presence
from gateway.twin_push import TwinPush

log = logging.getLogger(__name__)
SWEEP_S = 30.0  # every connection's credential is checked again this often (expiry, lost NOTIFYs)
KEEP_ALIVE_CHECK_S = 1.0
# ends after which no last will is published: the device said goodbye, or lost its right to speak
CLEAN_ENDS = frozenset({"disconnected", "refused", "credential revoked", "taken over", "gateway stopping"})
RECHECK_CHUNK = 5000  # connections whose credentials one query checks

Key = tuple[str, str]  # (tenant, device id)


class Gateway:
    """Connections of this process, keyed by device; their authentication and presence."""

    def __init__(self, settings: Settings, pool: Pool, temporal: Client, dsn: str, node: str) -> None:
        self.settings = settings
        self.pool = pool
        self.temporal = temporal
        self.dsn = dsn
        self.devices = DeviceService(pool, settings)
        self.events = NotificationService(pool, temporal)
        self.presence = Presence(pool, self.devices, self.events, temporal, node)
        self.committer = GroupCommitter(pool, settings.ingest_shards)
        self.early_alerts = EarlyAlerts(pool, temporal)
        self.quotas = Quotas(pool, settings.quotas)  # the tenants' and devices' readings/s, as over HTTP
        self.max_packet = MAX_BATCH_BYTES + 64 * 1024
        self.connections: dict[Key, Connection] = {}
        self.tokens: dict[Connection, str] = {}  # the credential each connection showed (re-checks)
        self.by_jti: dict[str, set[Connection]] = {}  # a revocation's NOTIFY names the jti
        self._tasks: set[asyncio.Task[object]] = set()
        self.listener = PgListener(dsn)  # the process's one LISTEN connection
        self._refreshing: set[str] = set()  # tenants whose limits are being read again
        self.twin = TwinPush(temporal, pool)
        self.jobs = JobPush(self.devices, temporal, pool)
        self.commands = CommandPush(self.devices, temporal, node)
        self.publish_handlers: dict[str, Callable[[Connection, Published, bytes], Awaitable[int]]] = {
            Topic.TWIN_REPORTED.value: self.twin.reported,
            Topic.JOB_PROGRESS.value: self.jobs.progress,
            Topic.COMMAND_RESULT.value: self.commands.result,
        }

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start committing, listening for revocations, watching keep-alives."""
        self.committer.start()
        gone = await self.presence.reset_node()
        if gone:
            log.info("%d devices left online by an earlier run of this node are offline", gone)
        given_back = await self.commands.release_node()
        if given_back:
            log.info("%d commands an earlier run of this node pushed without PUBACK: pending", given_back)
        await self._listen()
        self._spawn(self._watch_keep_alive())
        self._spawn(self._sweep())

    async def stop(self) -> None:
        """Close every connection and stop."""
        for conn in list(self.connections.values()):
            conn.close(codec.RC5_SERVER_UNAVAILABLE, "gateway stopping")
            conn.give_back()  # commands pushed and not acknowledged: pending again, now
        await self.commands.drain()
        await self._end_tasks()
        await self.committer.stop()
        # the groups ending while it waited started their publishes' early alert checks
        await self._end_tasks()
        await self.listener.stop()

    async def _end_tasks(self) -> None:
        while self._tasks:  # a task ending may start another (a presence write, a check)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Awaitable[object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- CONNECT ------------------------------------------------------------------

    async def authenticate(
        self, conn: Connection, connect: codec.Connect
    ) -> tuple[int, DeviceClaims | None, bool]:
        """(CONNACK code, the device's claims when accepted, session present)."""
        v5 = connect.version == codec.V5
        if connect.version not in (codec.V311, codec.V5):
            return (codec.RC5_UNSUPPORTED_VERSION if v5 else codec.RC311_BAD_PROTOCOL), None, False
        refused = codec.RC5_NOT_AUTHORIZED if v5 else codec.RC311_NOT_AUTHORIZED
        unavailable = codec.RC5_SERVER_UNAVAILABLE if v5 else 3
        try:
            login = await device_login(
                self.settings, self.devices, connect.client_id, connect.username, connect.password
            )
            if login is None:
                return refused, None, False
            claims, token = login
            # the tenant's limits known before its first publish, which cannot await them (a
            # tenant new to this gateway had its publishes admitted at the default rates)
            seen, _ = await asyncio.gather(
                device_mqtt.has_presence(self.pool, claims.tenant, claims.device_id),
                self.quotas.limits(claims.tenant),
            )
        except (LoginUnavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return unavailable, None, False
        self.tokens[conn] = token
        return codec.RC_ACCEPTED, claims, seen and not connect.clean

    async def online(self, conn: Connection) -> None:
        """A device connected: an older connection of the same device is taken over."""
        assert conn.claims is not None
        key = (conn.claims.tenant, conn.claims.device_id)
        self.by_jti.setdefault(conn.claims.jti, set()).add(conn)
        old = self.connections.get(key)
        self.connections[key] = conn
        if old is not None and old is not conn:
            old.close_reason = "taken over"
            old.close(codec.RC5_SESSION_TAKEN_OVER, "taken over")
        # kept, so the offline of a connection that ends at once is written after its online
        conn.presence = self._spawn(self._online(conn))
        await asyncio.shield(conn.presence)

    async def _online(self, conn: Connection) -> None:
        assert conn.claims is not None
        tenant, device_id = conn.claims.tenant, conn.claims.device_id
        try:
            await self.presence.connected(tenant, device_id, conn.session_id, conn.claims.jti)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("online of %s/%s not written", tenant, device_id, exc_info=True)

    async def _offline(self, conn: Connection, reason: str) -> None:
        assert conn.claims is not None
        if conn.presence is not None:
            await asyncio.gather(conn.presence, return_exceptions=True)
        await self.presence.disconnected(conn.claims.tenant, conn.claims.device_id, conn.session_id, reason)

    def forget(self, conn: Connection, reason: str) -> None:
        """A connection ended: the device is offline unless a newer connection holds it."""
        self.tokens.pop(conn, None)
        if conn.claims is None:
            return
        same = self.by_jti.get(conn.claims.jti)
        if same is not None:
            same.discard(conn)
            if not same:
                del self.by_jti[conn.claims.jti]
        key = (conn.claims.tenant, conn.claims.device_id)
        if self.connections.get(key) is conn:
            del self.connections[key]
        if conn.will is not None and reason not in CLEAN_ENDS:
            self._publish_will(conn, *conn.will)
        self._spawn(self._offline(conn, reason))

    def _publish_will(self, conn: Connection, target: Published, payload: bytes) -> None:
        """The device's last will, as if it had published it (telemetry stored, a twin report
        or job progress handled); a will that is no valid publish is counted, not stored."""
        claims = conn.claims
        assert claims is not None
        if target.kind is not Topic.TELEMETRY:
            self.other_publish(conn, target, payload)
            return
        try:
            readings = parse_telemetry(payload, claims.device_id, datetime.now(UTC))
        except BadPayload as exc:
            self.bad_payload(claims, f"last will: {exc}")
            return
        if self.admit_readings(claims.tenant, claims.device_id, len(readings.rows)):
            pending = Pending(claims.tenant, claims.device_id, readings.rows, readings.batch_id)
            done = self.committer.submit(pending)

            def committed(fut: asyncio.Future[Outcome]) -> None:
                # checked as any stored publish is: its threshold alert does not wait for its window
                if not fut.cancelled() and fut.result() is Outcome.STORED:
                    self.stored(pending)

            done.add_done_callback(committed)

    def stored(self, pending: Pending) -> None:
        """A telemetry publish is stored: a reading of it crossing a threshold rule raises its
        alert now (api/early_alerts.py), not once its window is stored."""
        # decided here while the tenant's rules are known: no task for a publish they do not watch
        metrics = (row.split(",", 2)[1] for row in pending.rows)
        if self.early_alerts.may_watch(pending.tenant, metrics):
            self._spawn(self.early_alerts.check_rows(pending.tenant, pending.device_id, pending.rows))

    # --- publishes other than telemetry, and bad payloads -------------------------

    def other_publish(self, conn: Connection, target: Published, payload: bytes) -> asyncio.Task[int]:
        """Handle a twin or job publish; the task's result is the PUBACK reason code."""
        handler = self.publish_handlers.get(target.kind.value)

        async def unsupported(_c: Connection, _t: Published, _p: bytes) -> int:
            return codec.RC5_TOPIC_NAME_INVALID

        task: asyncio.Task[int] = asyncio.ensure_future((handler or unsupported)(conn, target, payload))
        return task

    def admit_readings(self, tenant: str, device_id: str, readings: int) -> bool:
        """Whether a publish (one request, as over HTTP) and its readings fit the tenant's and
        the device's rates (taken when they do)."""
        limits, fresh = self.quotas.known_limits(tenant)
        if not fresh and tenant not in self._refreshing:
            # one read at a time: a read per publish while the limits were stale took every
            # pool connection from the group commit (a sixth of the gateway's CPU at 1,000
            # devices publishing)
            self._refreshing.add(tenant)
            refresh = self._spawn(self.quotas.limits(tenant))
            refresh.add_done_callback(lambda _t: self._refreshing.discard(tenant))
        try:
            self.quotas.admit_message_now(tenant, device_id, readings, limits)
        except HTTPException:
            return False
        return True

    def bad_payload(self, claims: DeviceClaims, reason: str) -> None:
        """Count a payload that was not stored, with its reason, in the quarantine view."""
        self._spawn(self._quarantine(claims.tenant, claims.device_id, reason))

    async def _quarantine(self, tenant: str, device_id: str, reason: str) -> None:
        try:
            await quarantine_payload(self.pool, tenant, device_id, f"mqtt: {reason}")
        except (OSError, asyncpg.PostgresError):
            log.warning("bad payload of %s/%s not counted", tenant, device_id, exc_info=True)

    def subscribed(self, conn: Connection, filters: list[str]) -> None:
        """A device subscribed to its own topics: it gets the twin's documents and its pending
        job at once."""
        self._spawn(self.twin.push(conn))
        self._spawn(self.jobs.push(conn))
        self._spawn(self.commands.push(conn))

    def _on_command_offered(self, _channel: str, payload: str) -> None:
        key = offered_device(payload)
        conn = self.connections.get(key) if key is not None else None
        if conn is not None:
            self._spawn(self.commands.push(conn))

    def _on_job_offered(self, _channel: str, payload: str) -> None:
        tenant, _, device_id = str(payload).partition("/")
        conn = self.connections.get((tenant, device_id))
        if conn is not None:
            self._spawn(self.jobs.push(conn))

    def _on_desired_changed(self, _channel: str, payload: str) -> None:
        tenant, _, device_id = str(payload).partition("/")
        conn = self.connections.get((tenant, device_id))
        if conn is not None:
            self._spawn(self.twin.push(conn))

    def _on_reported_changed(self, _channel: str, payload: str) -> None:
        tenant, _, device_id = str(payload).partition("/")
        conn = self.connections.get((tenant, device_id))
        if conn is not None:
            self._spawn(self.twin.push(conn, (Topic.TWIN_DELTA,)))

    def _on_session_taken(self, _channel: str, payload: str) -> None:
        """A connection of the device (here or on another MQTT process) took it: an older one
        held here is closed, as a second CONNECT to this process closes the first."""
        session_id, _, key = str(payload).partition(" ")
        tenant, _, device_id = key.partition("/")
        conn = self.connections.get((tenant, device_id))
        if conn is not None and conn.session_id != session_id:
            self._spawn(self._taken_over(conn))

    async def _taken_over(self, conn: Connection) -> None:
        # the presence row names the session that took the device last: two connections
        # arriving together on two processes agree on it, whatever order their NOTIFYs come in
        assert conn.claims is not None
        if conn.presence is not None:
            await asyncio.gather(conn.presence, return_exceptions=True)
        try:
            holder = await device_mqtt.session_of(self.pool, conn.claims.tenant, conn.claims.device_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return
        if holder is not None and holder != conn.session_id:
            conn.close_reason = "taken over"
            conn.close(codec.RC5_SESSION_TAKEN_OVER, "taken over")

    # --- revocation ---------------------------------------------------------------

    async def _listen(self) -> None:
        listener = self.listener
        await listener.subscribe(REVOKED_CHANNEL, self._on_revoked)
        await listener.subscribe(DESIRED_CHANGED_CHANNEL, self._on_desired_changed)
        await listener.subscribe(REPORTED_CHANGED_CHANNEL, self._on_reported_changed)
        await listener.subscribe(SESSION_TAKEN_CHANNEL, self._on_session_taken)
        await listener.subscribe(JOB_OFFERED_CHANNEL, self._on_job_offered)
        await listener.subscribe(COMMAND_OFFERED_CHANNEL, self._on_command_offered)
        await self.quotas.listen(listener)  # a tenant's changed profile applies at once
        listener.on_reset(self._on_listener_reset)
        await listener.start()

    def _on_revoked(self, _channel: str, jti: str) -> None:
        holders = self.by_jti.get(str(jti))
        if holders:
            self._spawn(self._recheck(list(holders)))

    async def _recheck(self, conns: list[Connection]) -> None:
        """Close the connections whose credential is no longer active: one query per
        RECHECK_CHUNK connections, not one per connection."""
        held = [(c, c.claims, t) for c in conns if c.claims is not None and (t := self.tokens.get(c))]
        for start in range(0, len(held), RECHECK_CHUNK):
            chunk = held[start : start + RECHECK_CHUNK]
            try:
                active = await self.devices.credentials_active(
                    [(claims.tenant, claims.device_id, claims.jti, token) for _, claims, token in chunk]
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return  # the database is away: the next sweep looks again
            for (conn, _, _), ok in zip(chunk, active, strict=True):
                if not ok:
                    conn.close_reason = "credential revoked"
                    conn.close(codec.RC5_NOT_AUTHORIZED, "credential revoked")

    def _on_listener_reset(self, listening: bool) -> None:
        if not listening or not self.connections:
            return
        # back after a loss: what was revoked, and commands offered, while nobody listened
        self._spawn(self._recheck(list(self.connections.values())))
        for conn in list(self.connections.values()):
            self._spawn(self.commands.push(conn))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            await self._recheck(list(self.connections.values()))

    # --- keep-alive -----------------------------------------------------------------

    async def _watch_keep_alive(self) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_CHECK_S)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if conn.keep_alive and now - conn.last_rx > 1.5 * conn.keep_alive:
                    conn.close_reason = "keep-alive expired"
                    conn.close(codec.RC5_KEEP_ALIVE_TIMEOUT, "keep-alive expired")


async def serve(gateway: Gateway, host: str, port: int) -> asyncio.Server:
    """Start the gateway and listen for plain MQTT connections."""
    await gateway.start()
    return await listen(gateway, host, port)


async def listen(gateway: Gateway, host: str, port: int, tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """A listener of the (started) gateway: plain MQTT, or MQTT over TLS with tls. A TLS
    handshake has the same CONNECT deadline as the rest of the login."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(gateway),
        host,
        port,
        reuse_address=True,
        ssl=tls,
        ssl_handshake_timeout=CONNECT_TIMEOUT_S if tls is not None else None,
    )
    for sock in server.sockets:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server
