"""Device commands over MQTT: a device subscribed to its `commands` topic gets each pending
command pushed when it is offered (the `device_command_offered` NOTIFY of the trigger on
device.commands) and at SUBSCRIBE, taken exactly as `GET /v1/device/commands` takes it (one
atomic take: a command goes to the HTTP poll or to the push, never both). The device answers on
`commands/{command_id}/result` as `POST /v1/device/commands/{command_id}/result` does."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING

import asyncpg
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.service import RPCError

from activities.device_commands import CAMPAIGN_SEPARATOR, CommandConflict
from activities.devices import DeviceService
from api.models.commands import CommandResultBody
from fleetflow.contracts.commands import CommandState, DeviceCommandView
from fleetflow.mqtt_topics import Published, Topic, filter_matches, topic
from gateway import codec
from workflows.device_command import DeviceCommand, command_workflow_id

if TYPE_CHECKING:
    from gateway.connection import Connection

log = logging.getLogger(__name__)
TAKE_AT_ONCE = 10  # commands taken per statement (the HTTP poll's MAX_DELIVERED)
MAX_TAKES = 10  # statements per push: a device with more pending gets the rest on the next offer
RC5_NO_MATCHING = 0x10  # "no matching subscribers": an answer to no command of this device
RC5_REFUSED = codec.RC5_UNSPECIFIED  # 0x80: the command has ended (HTTP 409: late, or answered)
_UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def offered_device(payload: object) -> tuple[str, str] | None:
    """(tenant, device id) of a `device_command_offered` NOTIFY payload; None when malformed."""
    try:
        data = json.loads(str(payload))
        return str(data["tenant"]), str(data["device_id"])
    except (ValueError, TypeError, KeyError):
        return None


class CommandPush:
    """Pushes a device's pending commands; takes its answers."""

    def __init__(self, devices: DeviceService, temporal: Client, node: str | None = None) -> None:
        self.devices = devices
        self.temporal = temporal
        self.node = node  # names this process on the commands it awaits a PUBACK for
        self._signals: set[asyncio.Future[None]] = set()  # signals and give-backs under way
        # one push of a connection at a time, so its commands go out oldest first
        self._locks: weakref.WeakKeyDictionary[Connection, asyncio.Lock] = weakref.WeakKeyDictionary()

    async def push(self, conn: Connection) -> None:
        """Take and send the device's pending commands when it subscribed to `commands`."""
        claims = conn.claims
        if claims is None:
            return
        name = topic(claims.tenant, claims.device_id, Topic.COMMANDS)
        if not any(filter_matches(f, name) for f in conn.subscriptions):
            return
        tenant, device_id = claims.tenant, claims.device_id
        lock = self._locks.setdefault(conn, asyncio.Lock())
        async with lock:
            for _ in range(MAX_TAKES):
                if conn.transport is None or conn.transport.is_closing():
                    return  # not taken: the next connection (or an HTTP poll) gets them
                qos = conn.qos_for(name)
                room = TAKE_AT_ONCE if qos == 0 else min(TAKE_AT_ONCE, conn.room())
                if not room:
                    # QoS 1 and the device has not acknowledged enough yet: the rest stay
                    # pending (an HTTP poll may take them) until a PUBACK makes room
                    conn.on_room = self._wake
                    return
                try:
                    # at QoS 1 the row names this process until the PUBACK: if it is killed
                    # before, its next start gives the command back (release_node)
                    pushed_by = self.node if qos == 1 else None
                    taken = await self.devices.take_commands(tenant, device_id, room, pushed_by)
                except _UNAVAILABLE:
                    log.warning(
                        "commands of %s/%s not pushed", claims.tenant, claims.device_id, exc_info=True
                    )
                    return  # still pending: the next offer, SUBSCRIBE or poll takes them
                if taken and (conn.transport is None or conn.transport.is_closing()):
                    # the connection ended during the take (taken over by another gateway,
                    # say): a publish to it would be lost, the commands given back
                    await self._release(tenant, device_id, taken)
                    return
                for command in taken:
                    # QoS 0: delivered once written; QoS 1: once the device's PUBACK came, and
                    # given back if the connection ends before it (the next one gets it again)
                    conn.push(
                        name,
                        command.model_dump_json().encode(),
                        on_ack=functools.partial(self._delivered, tenant, device_id, command, qos == 1),
                        on_lost=functools.partial(self._give_back, tenant, device_id, command),
                    )
                if len(taken) < room:
                    return

    def _wake(self, conn: Connection) -> None:
        self._spawn(self.push(conn))

    async def release_node(self) -> int:
        """At start: give back the commands a killed earlier run of this node pushed and did not
        see acknowledged."""
        if self.node is None:
            return 0
        count: int = await self.devices.release_node_commands(self.node)
        return count

    def _delivered(self, tenant: str, device_id: str, command: DeviceCommandView, acked: bool) -> None:
        if acked and self.node is not None:
            self._spawn(self._acknowledged(tenant, device_id, command.command_id))
        if CAMPAIGN_SEPARATOR not in command.command_id:  # a campaign's has no run
            moved = CommandState(status="delivered", delivered_at=command.delivered_at)
            self._signal(tenant, device_id, command.command_id, moved)

    async def _acknowledged(self, tenant: str, device_id: str, command_id: str) -> None:
        try:
            await self.devices.acknowledged_commands(tenant, device_id, [command_id])
        except _UNAVAILABLE:  # a restart of this node would push it once more: at least once
            log.warning("PUBACK of command %s/%s/%s not recorded", tenant, device_id, command_id)

    def _give_back(self, tenant: str, device_id: str, command: DeviceCommandView) -> None:
        self._spawn(self._release(tenant, device_id, [command]))

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(work)
        self._signals.add(task)
        task.add_done_callback(self._signals.discard)

    async def drain(self) -> None:
        """Wait for the signals and give-backs under way (the gateway stops)."""
        while self._signals:
            await asyncio.gather(*list(self._signals), return_exceptions=True)

    def delivered(
        self, tenant: str, device_id: str, command: DeviceCommandView, acknowledged: bool = False
    ) -> None:
        """Tell the command's run it was sent to the device (a bridge's push, acknowledged by the
        broker; a campaign's command has no run); acknowledged: the push no longer names this
        node (no restart of it gives the command back)."""
        self._delivered(tenant, device_id, command, acked=acknowledged)

    async def release(
        self, tenant: str, device_id: str, taken: list[DeviceCommandView], offer: bool = True
    ) -> None:
        """Give back taken commands that were not sent (pending again; offer: NOTIFY it)."""
        await self._release(tenant, device_id, taken, offer)

    async def _release(
        self, tenant: str, device_id: str, taken: list[DeviceCommandView], offer: bool = True
    ) -> None:
        try:
            await self.devices.release_commands(tenant, device_id, taken, offer)
        except _UNAVAILABLE:
            log.warning("commands of %s/%s taken and not pushed", tenant, device_id, exc_info=True)

    async def result(self, conn: Connection, target: Published, payload: bytes) -> int:
        """A `commands/{command_id}/result` publish; the PUBACK reason code."""
        claims = conn.claims
        assert claims is not None
        try:
            body = CommandResultBody.model_validate_json(payload)
        except (ValidationError, ValueError, RecursionError):
            return codec.RC5_PAYLOAD_INVALID
        tenant, device_id, command_id = claims.tenant, claims.device_id, target.command_id
        try:
            view = await self.devices.answer_command(tenant, device_id, command_id, body.status, body.result)
        except LookupError:
            return RC5_NO_MATCHING
        except CommandConflict:
            view = None
        except _UNAVAILABLE:
            # not stored: no PUBACK, so the device sends its answer again on its next connection
            conn.close(codec.RC5_SERVER_UNAVAILABLE, "storage unavailable")
            return codec.RC5_UNSPECIFIED
        if view is None:
            # the command has ended: accepted when this is the answer already stored (a
            # redelivery whose PUBACK was lost), refused otherwise
            try:
                stored = await self.devices.command(tenant, device_id, command_id)
            except _UNAVAILABLE:
                conn.close(codec.RC5_SERVER_UNAVAILABLE, "storage unavailable")
                return codec.RC5_UNSPECIFIED
            same = stored is not None and (stored.status, stored.result) == (body.status, body.result)
            return 0 if same else RC5_REFUSED
        if view.campaign_id is None:
            self._signal(tenant, device_id, command_id, CommandState(status=view.status))
        return 0

    def _signal(self, tenant: str, device_id: str, command_id: str, moved: CommandState) -> None:
        """Tell the command's run, in the background (the row already says it; a lost signal
        only ends the run at its deadline), as the HTTP routes do."""
        handle = self.temporal.get_workflow_handle(command_workflow_id(tenant, device_id, command_id))

        async def send() -> None:
            try:
                await handle.signal(DeviceCommand.moved, moved)
            except RPCError:
                pass  # the run ended: the row is the truth

        self._spawn(send())
