"""Device commands (durable RPC) of the device service: one row per command in
`device.commands`, created by the API, delivered to the device's poll, answered by the device and
settled (expired, timed out) by its DeviceCommand workflow. Every move is one conditional UPDATE,
so a late answer and a timeout cannot both win."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

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
from fleetflow.db import Pool

_VIEW = """command_id, device_id, name, params, result, timeout_s, created_at, expires_at,
           delivered_at, finished_at, campaign_id, workflow_id,
           CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired' ELSE status END AS status"""


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

    async def take_commands(self, tenant: str, device_id: str, limit: int) -> list[DeviceCommandView]:
        """Deliver the device's pending commands, oldest first: each is delivered once, and
        its answer is due within its timeout from now."""
        rows = await self.pool.fetch(
            """WITH pick AS (
                   SELECT command_id FROM device.commands
                   WHERE tenant = $1 AND device_id = $2 AND status = 'pending' AND expires_at > now()
                   ORDER BY created_at, command_id LIMIT $3 FOR UPDATE SKIP LOCKED)
               UPDATE device.commands c SET status = 'delivered', delivered_at = now()
               FROM pick WHERE c.tenant = $1 AND c.device_id = $2 AND c.command_id = pick.command_id
               RETURNING c.command_id, c.name, c.params, c.timeout_s, c.expires_at, c.created_at,
                         c.delivered_at""",
            tenant,
            device_id,
            limit,
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

    async def answer_command(
        self, tenant: str, device_id: str, command_id: str, status: str, result: dict[str, Any]
    ) -> CommandView:
        """The device's answer to a delivered command; LookupError for no such command of this
        device, CommandConflict once the command has ended (or was never delivered)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE device.commands SET status = $4, result = $5::jsonb, finished_at = now()
                   WHERE tenant = $1 AND device_id = $2 AND command_id = $3 AND status = 'delivered'
                     AND delivered_at + make_interval(secs => timeout_s) > now()
                   RETURNING """
                + _VIEW,
                tenant,
                device_id,
                command_id,
                status,
                json.dumps(result),
            )
            if row is not None:
                return _view(row)
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

    async def cancel_commands(self, tenant: str, device_id: str, reason: str) -> int:
        """End every open command of a device (it is being decommissioned)."""
        result = await self.pool.execute(
            """UPDATE device.commands SET status = 'cancelled', finished_at = now(),
                   result = jsonb_build_object('reason', $3::text)
               WHERE tenant = $1 AND device_id = $2 AND status = ANY($4)""",
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
