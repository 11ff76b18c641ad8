"""Device commands (durable RPC) of the device service: one row per command in
`device.commands`, created by the API, delivered to the device's poll, answered by the device and
settled (expired, timed out) by its DeviceCommand workflow. Every move is one conditional UPDATE,
so a late answer and a timeout cannot both win."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from fleetflow.contracts.commands import (
    OPEN_STATUSES,
    CommandSpec,
    CommandState,
    CommandView,
    DeviceCommandView,
    SettleCommand,
)
from fleetflow.contracts.devices import DeviceStatus
from fleetflow.contracts.rollouts import ACTIVE_STATES
from fleetflow.db import Pool

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# a row's status as read: one past its deadline is expired / timed out before (or without: a
# campaign's command has no run) a settle stores it
READ_STATUS = """CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired'
                WHEN status = 'delivered' AND delivered_at + make_interval(secs => timeout_s) <= now()
                THEN 'timed_out'
                ELSE status END"""
_VIEW = (
    """command_id, device_id, name, params, result, timeout_s, created_at, expires_at,
           delivered_at, finished_at, campaign_id, workflow_id, """
    + READ_STATUS
    + " AS status"
)
# a cancel (decommission, campaign stop) of an open row: one already past its deadline reads as
# expired / timed out (_VIEW), and keeps that terminal status rather than turning into another
_CANCEL_OPEN = """status = CASE
                      WHEN status = 'pending' AND expires_at <= now() THEN 'expired'
                      WHEN status = 'delivered' AND delivered_at + make_interval(secs => timeout_s) <= now()
                      THEN 'timed_out' ELSE 'cancelled' END,
                  result = CASE WHEN status = 'pending' AND expires_at <= now()
                                  OR status = 'delivered'
                                     AND delivered_at + make_interval(secs => timeout_s) <= now()
                           THEN result ELSE jsonb_build_object('reason', $3::text) END,
                  finished_at = now()"""
# a command campaign's job, offered to a device, is a command whose id names the campaign and the
# attempt ('~' is in no command id an operator may choose)
CAMPAIGN_SEPARATOR = "~"


class CommandConflict(Exception):
    """A move the command's status does not allow (an answer after its end): HTTP 409."""


def _json(value: Any) -> dict[str, Any]:
    return dict(json.loads(value)) if isinstance(value, str) else dict(value or {})


def _view(row: asyncpg.Record) -> CommandView:
    data = dict(row)
    data["params"] = _json(data["params"])
    data["result"] = _json(data["result"]) if data["result"] is not None else None
    return CommandView.model_validate(data)


class DeviceCommands:
    """The command rows of the device service."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def create_command(
        self,
        tenant: str,
        device_id: str,
        command_id: str,
        spec: CommandSpec,
        workflow_id: str,
        actor: str,
    ) -> CommandView | None:
        """Store a new pending command of an active device (its insert NOTIFYs
        device_command_offered); the stored one when the id is taken; None for no such device."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO device.commands (tenant, device_id, command_id, name, params, timeout_s,
                       expires_at, workflow_id, actor)
                   SELECT tenant, device_id, $3, $4, $5::jsonb, $6, now() + make_interval(secs => $7), $8, $9
                   FROM device.devices WHERE tenant = $1 AND device_id = $2 AND status <> ALL($10)
                   FOR SHARE  -- a retirement committing meanwhile is waited for, and seen
                   ON CONFLICT (tenant, device_id, command_id) DO NOTHING
                   RETURNING """
                + _VIEW,
                tenant,
                device_id,
                command_id,
                spec.name,
                json.dumps(spec.params),
                spec.timeout_s,
                float(spec.expires_s),
                workflow_id,
                actor,
                [DeviceStatus.DECOMMISSIONED.value, DeviceStatus.FAILED.value],
            )
            if row is None:
                row = await conn.fetchrow(
                    f"""SELECT {_VIEW} FROM device.commands
                        WHERE tenant = $1 AND device_id = $2 AND command_id = $3""",
                    tenant,
                    device_id,
                    command_id,
                )
        return None if row is None else _view(row)

    async def drop_command(self, tenant: str, device_id: str, command_id: str) -> None:
        """Remove a command whose workflow could not be started (nothing was delivered yet)."""
        await self.pool.execute(
            """DELETE FROM device.commands WHERE tenant = $1 AND device_id = $2 AND command_id = $3
                 AND status = 'pending'""",
            tenant,
            device_id,
            command_id,
        )

    async def command(self, tenant: str, device_id: str, command_id: str) -> CommandView | None:
        """One command of one device of one tenant."""
        row = await self.pool.fetchrow(
            f"""SELECT {_VIEW} FROM device.commands
                        WHERE tenant = $1 AND device_id = $2 AND command_id = $3""",
            tenant,
            device_id,
            command_id,
        )
        return None if row is None else _view(row)

    async def list_commands(
        self, tenant: str, device_id: str, limit: int, before: tuple[datetime, str] | None
    ) -> list[CommandView]:
        """A device's commands, newest first, `limit` after the cursor (created_at, command_id)."""
        rows = await self.pool.fetch(
            f"""SELECT {_VIEW} FROM device.commands
                WHERE tenant = $1 AND device_id = $2
                  AND ($4::timestamptz IS NULL OR (created_at, command_id) < ($4, $5))
                ORDER BY created_at DESC, command_id DESC LIMIT $3""",
            tenant,
            device_id,
            limit,
            before[0] if before else None,
            before[1] if before else "",
        )
        return [_view(row) for row in rows]

    async def take_commands(
        self, tenant: str, device_id: str, limit: int, pushed_by: str | None = None
    ) -> list[DeviceCommandView]:
        """Deliver the device's pending commands, oldest first: each is delivered once, and
        its answer is due within its timeout from now. A campaign's job hears of it as the
        device's first report: its device timeout counts from the delivery, not the offer.
        pushed_by names the MQTT process that awaits the device's PUBACK for them."""
        async with self.pool.acquire() as conn, conn.transaction():
            # the device's rows past their deadline store the status they read as: a campaign's
            # command, or one whose run never started (the API died after writing it), has no
            # run to settle it
            await conn.execute(
                "UPDATE device.commands SET status = "
                + READ_STATUS
                + """, finished_at = now()
                   WHERE tenant = $1 AND device_id = $2 AND status = ANY($3) AND """
                + READ_STATUS
                + " <> status",
                tenant,
                device_id,
                list(OPEN_STATUSES),
            )
            rows = await conn.fetch(
                """WITH pick AS (
                       SELECT command_id FROM device.commands
                       WHERE tenant = $1 AND device_id = $2 AND status = 'pending' AND expires_at > now()
                       ORDER BY created_at, command_id LIMIT $3 FOR UPDATE SKIP LOCKED)
                   UPDATE device.commands c SET status = 'delivered', delivered_at = now(), pushed_by = $4
                   FROM pick WHERE c.tenant = $1 AND c.device_id = $2 AND c.command_id = pick.command_id
                   RETURNING c.command_id, c.name, c.params, c.timeout_s, c.expires_at, c.created_at,
                             c.delivered_at, c.campaign_id""",
                tenant,
                device_id,
                limit,
                pushed_by,
            )
            offers = [r["command_id"] for r in rows if r["campaign_id"] is not None]
            if offers:
                # only the job's current offer; a job a tick holds is skipped (no lock-order wait)
                await conn.execute(
                    """WITH j AS (
                           SELECT campaign_id FROM device.rollout_jobs
                           WHERE tenant = $1 AND device_id = $2 AND kind = 'update' AND state = 'offered'
                             AND campaign_id || $4 || attempts = ANY($3::text[])
                           FOR UPDATE SKIP LOCKED)
                       UPDATE device.rollout_jobs r SET updated_at = now(), detail = 'command delivered'
                       FROM j WHERE r.tenant = $1 AND r.device_id = $2 AND r.kind = 'update'
                         AND r.campaign_id = j.campaign_id""",
                    tenant,
                    device_id,
                    offers,
                    CAMPAIGN_SEPARATOR,
                )
        rows = sorted(rows, key=lambda r: (r["created_at"], r["command_id"]))
        return [
            DeviceCommandView(
                command_id=r["command_id"],
                name=r["name"],
                params=_json(r["params"]),
                timeout_s=r["timeout_s"],
                expires_at=r["expires_at"],
                delivered_at=r["delivered_at"],
            )
            for r in rows
        ]

    async def release_commands(
        self, tenant: str, device_id: str, taken: list[DeviceCommandView], offer: bool = True
    ) -> None:
        """Give back commands taken for a connection that ended before they were sent: pending
        again (unless answered or ended meanwhile), for the next connection or poll, which the
        `device_command_offered` NOTIFY wakes (a gateway holding the device's newer connection,
        a long poll). offer=False: no NOTIFY (a broker that has no subscriber for them would be
        offered them again at once, for ever; its subscription event offers them)."""
        async with self.pool.acquire() as conn, conn.transaction():
            released = await conn.fetch(
                """UPDATE device.commands c SET status = 'pending', delivered_at = NULL, pushed_by = NULL
                   FROM unnest($3::text[], $4::timestamptz[]) AS t(command_id, delivered_at)
                   WHERE c.tenant = $1 AND c.device_id = $2 AND c.command_id = t.command_id
                     AND c.status = 'delivered' AND c.delivered_at = t.delivered_at
                   RETURNING c.command_id""",
                tenant,
                device_id,
                [c.command_id for c in taken],
                [c.delivered_at for c in taken],
            )
            if released and offer:
                await _offered(conn, tenant, device_id, released[0]["command_id"])

    async def acknowledged_commands(self, tenant: str, device_id: str, command_ids: list[str]) -> None:
        """The device acknowledged these pushes (MQTT PUBACK): no restart gives them back."""
        await self.pool.execute(
            """UPDATE device.commands SET pushed_by = NULL
               WHERE tenant = $1 AND device_id = $2 AND command_id = ANY($3::text[])
                 AND pushed_by IS NOT NULL""",
            tenant,
            device_id,
            command_ids,
        )

    async def release_node_commands(self, node: str) -> int:
        """Give back the commands an MQTT process of node pushed and a kill stopped it from
        seeing acknowledged (it starts again): pending, the devices' next connection gets them."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """UPDATE device.commands SET status = 'pending', delivered_at = NULL, pushed_by = NULL
                   WHERE pushed_by = $1 AND status = 'delivered'
                   RETURNING tenant, device_id, command_id""",
                node,
            )
            first = {(r["tenant"], r["device_id"]): r["command_id"] for r in rows}
            for (tenant, device_id), command_id in first.items():
                await _offered(conn, tenant, device_id, command_id)
        return len(rows)

    async def answer_command(
        self, tenant: str, device_id: str, command_id: str, status: str, result: dict[str, Any]
    ) -> CommandView:
        """The device's answer to a delivered command; LookupError for no such command of this
        device, CommandConflict once the command has ended (or was never delivered)."""
        async with self.pool.acquire() as conn, conn.transaction():
            campaign_id = await conn.fetchval(
                """SELECT campaign_id FROM device.commands
                   WHERE tenant = $1 AND device_id = $2 AND command_id = $3""",
                tenant,
                device_id,
                command_id,
            )
            job_open = True
            if campaign_id is not None:
                # the campaign's job moves with the answer, in the order a tick locks them
                await conn.execute(
                    "SELECT 1 FROM device.rollouts WHERE tenant = $1 AND campaign_id = $2 FOR SHARE",
                    tenant,
                    campaign_id,
                )
                job = await conn.fetchrow(
                    """SELECT state, attempts FROM device.rollout_jobs WHERE tenant = $1 AND campaign_id = $2
                         AND device_id = $3 AND kind = 'update' FOR UPDATE""",
                    tenant,
                    campaign_id,
                    device_id,
                )
                # only the job's current offer may move it: an answer to an earlier offer (it went
                # silent and was offered again) must not finish the job the new one still runs
                offer_id = f"{campaign_id}{CAMPAIGN_SEPARATOR}{job['attempts']}" if job else None
                job_open = job is not None and job["state"] in ACTIVE_STATES and command_id == offer_id
            row = await conn.fetchrow(
                """UPDATE device.commands SET status = $4, result = $5::jsonb, finished_at = now()
                   WHERE tenant = $1 AND device_id = $2 AND command_id = $3 AND status = 'delivered'
                     AND delivered_at + make_interval(secs => timeout_s) > now() AND $6
                   RETURNING """
                + _VIEW,
                tenant,
                device_id,
                command_id,
                status,
                json.dumps(result),
                job_open,
            )
            if row is not None:
                if campaign_id is not None:
                    await conn.execute(
                        """UPDATE device.rollout_jobs SET state = $4, updated_at = now(),
                               detail = 'command ' || $4,
                               finished_seq = nextval('device.rollout_finished_seq')
                           WHERE tenant = $1 AND campaign_id = $2 AND device_id = $3 AND kind = 'update'""",
                        tenant,
                        campaign_id,
                        device_id,
                        status,
                    )
                return _view(row)
            if not job_open:
                raise CommandConflict(f"command {command_id!r}: its campaign's job for this device has ended")
            current = await conn.fetchrow(
                f"""SELECT {_VIEW} FROM device.commands
                        WHERE tenant = $1 AND device_id = $2 AND command_id = $3""",
                tenant,
                device_id,
                command_id,
            )
        if current is None:
            raise LookupError(f"command {command_id!r}")
        view = _view(current)
        if view.status == "delivered":
            raise CommandConflict(
                f"command {command_id!r} timed out: its answer was due {view.timeout_s}s after delivery"
            )
        raise CommandConflict(f"command {command_id!r} is {view.status}")

    async def settle_command(self, settle: SettleCommand) -> CommandState:
        """End the command with `settle.status` if it is still `settle.when`; where it stands."""
        row = await self.pool.fetchrow(
            """WITH moved AS (
                   UPDATE device.commands SET status = $4, finished_at = now()
                   WHERE tenant = $1 AND device_id = $2 AND command_id = $3 AND status = $5
                   RETURNING status, delivered_at)
               SELECT status, delivered_at FROM moved
               UNION ALL
               SELECT status, delivered_at FROM device.commands
               WHERE tenant = $1 AND device_id = $2 AND command_id = $3
               LIMIT 1""",
            settle.tenant,
            settle.device_id,
            settle.command_id,
            settle.status,
            settle.when,
        )
        if row is None:  # never stored (its start failed after a drop): nothing to deliver
            return CommandState(status="cancelled")
        return CommandState(status=row["status"], delivered_at=row["delivered_at"])

    async def cancel_commands(
        self, tenant: str, device_id: str, reason: str, conn: Conn | None = None
    ) -> int:
        """End every open command of a device (it is being decommissioned), in conn's transaction
        when given; one already past its deadline keeps the status it reads as."""
        result = await (conn or self.pool).execute(
            "UPDATE device.commands SET "
            + _CANCEL_OPEN
            + " WHERE tenant = $1 AND device_id = $2 AND status = ANY($4)",
            tenant,
            device_id,
            reason,
            list(OPEN_STATUSES),
        )
        return int(str(result).split()[-1])

    async def claim_poller(self, tenant: str, device_id: str, waiter_id: str, seconds: float) -> bool:
        """Take the device's one long-poll lease; False while another waiter holds it."""
        row = await self.pool.fetchval(
            """INSERT INTO device.command_pollers (tenant, device_id, waiter_id, until)
               VALUES ($1, $2, $3, now() + make_interval(secs => $4))
               ON CONFLICT (tenant, device_id) DO UPDATE SET waiter_id = $3, until = EXCLUDED.until
                   WHERE device.command_pollers.until < now() OR device.command_pollers.waiter_id = $3
               RETURNING waiter_id""",
            tenant,
            device_id,
            waiter_id,
            seconds,
        )
        return row is not None

    async def release_poller(self, tenant: str, device_id: str, waiter_id: str) -> None:
        """Give the lease back."""
        await self.pool.execute(
            "DELETE FROM device.command_pollers WHERE tenant = $1 AND device_id = $2 AND waiter_id = $3",
            tenant,
            device_id,
            waiter_id,
        )


async def offer_campaign_commands(conn: Conn, tenant: str, campaign_id: str, expires_s: int) -> None:
    """A command campaign's newly offered jobs become the devices' commands (each insert NOTIFYs
    device_command_offered), due within the job's device timeout; a firmware campaign has none."""
    await conn.execute(
        """INSERT INTO device.commands (tenant, device_id, command_id, name, params, timeout_s,
               expires_at, campaign_id, actor)
           SELECT j.tenant, j.device_id, j.campaign_id || $4 || j.attempts, r.command->>'name',
                  coalesce(r.command->'params', '{}'::jsonb), (r.command->>'timeout_s')::int,
                  now() + make_interval(secs => $3), j.campaign_id, 'campaign:' || j.campaign_id
           FROM device.rollout_jobs j
           JOIN device.rollouts r ON r.tenant = j.tenant AND r.campaign_id = j.campaign_id
           WHERE j.tenant = $1 AND j.campaign_id = $2 AND j.kind = 'update' AND j.state = 'offered'
             AND j.offered_at = now()  -- offered by this transaction (the tick's): now() is its start
             AND r.command IS NOT NULL
           ON CONFLICT (tenant, device_id, command_id) DO NOTHING""",
        tenant,
        campaign_id,
        float(expires_s),
        CAMPAIGN_SEPARATOR,
    )


async def end_campaign_commands(conn: Conn, tenant: str, campaign_id: str) -> None:
    """The campaign stopped: its open commands are cancelled."""
    await conn.execute(
        "UPDATE device.commands SET "
        + _CANCEL_OPEN
        + " WHERE tenant = $1 AND campaign_id = $2 AND status = ANY($4)",
        tenant,
        campaign_id,
        "campaign stopped",
        list(OPEN_STATUSES),
    )


async def _offered(conn: Conn, tenant: str, device_id: str, command_id: str) -> None:
    """NOTIFY `device_command_offered` for a command pending again (as its trigger does for a new
    one): a gateway holding the device, or its long poll, takes it."""
    await conn.execute(
        """SELECT pg_notify('device_command_offered', json_build_object(
               'tenant', $1::text, 'device_id', $2::text, 'command_id', $3::text)::text)""",
        tenant,
        device_id,
        command_id,
    )
