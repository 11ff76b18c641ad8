"""Planning a firmware campaign: its target devices and their waves, fixed once in
`device.rollouts` and `device.rollout_jobs` (the jobs start `queued`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from temporalio.exceptions import ApplicationError

from fleetflow import claim_checks
from fleetflow.contracts.rollouts import RolloutInput, RolloutPlan, RolloutPolicy
from fleetflow.db import Pool

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    import asyncpg


def wave_sizes(total: int, policy: RolloutPolicy) -> list[int]:
    """Canary first, then waves growing by `growth` until every device has one."""
    if total == 0:
        return []
    canary = policy.canary
    if policy.canary_percent is not None:
        canary = max(1, math.ceil(total * policy.canary_percent / 100))
    sizes, left, size = [], total, min(canary, total)
    while left > 0:
        size = min(size, left)
        sizes.append(size)
        left -= size
        size = max(size + 1, math.ceil(size * policy.growth))
    return sizes


class RolloutPlanner:
    """Campaign planning (a part of DeviceService, which serves `plan_rollout` through it)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def plan_rollout(self, inp: RolloutInput) -> RolloutPlan:
        """Fix the target list and its waves (once: a retry returns the recorded plan)."""
        req, tenant = inp.request, inp.tenant
        async with self.pool.acquire() as conn, conn.transaction():
            if req.command is not None:  # a command campaign: the command's name stands for the version
                fw: dict[str, str] | asyncpg.Record | None = {
                    "device_type": req.device_type or "",
                    "version": req.command.name,
                }
            else:
                fw = await conn.fetchrow(
                    "SELECT device_type, version FROM device.firmware WHERE tenant = $1 AND firmware_id = $2",
                    tenant,
                    req.firmware_id,
                )
            if fw is None:
                raise ApplicationError(
                    f"no firmware {req.firmware_id!r}", type="NoFirmware", non_retryable=True
                )
            done = await conn.fetchval(
                "SELECT waves FROM device.rollouts WHERE tenant = $1 AND campaign_id = $2",
                tenant,
                req.campaign_id,
            )
            if done is not None:
                return RolloutPlan(
                    total=sum(done), waves=list(done), device_type=fw["device_type"], version=fw["version"]
                )
            claim_id = None if inp.targets is None else inp.targets.claim_id
            listed = None if claim_id is None else await claim_checks.texts(conn, claim_id, tenant)
            if claim_id is not None and listed is None:
                # never read a missing list as "no list", which would mean every device
                raise ApplicationError(
                    f"the target list {claim_id} is missing", type="ClaimMissing", non_retryable=True
                )
            devices = await conn.fetch(
                """SELECT device_id, firmware_version FROM device.devices
                   WHERE tenant = $1 AND device_type = $2 AND status = 'active'
                     AND ($7 OR firmware_version <> $3)
                     AND ($4::text[] IS NULL OR device_id = ANY($4)) AND tags @> $5
                     AND ($6::text[] IS NULL OR device_id IN (SELECT unnest($6::text[])))
                   ORDER BY device_id""",
                tenant,
                fw["device_type"],
                fw["version"],
                req.target.device_ids,
                req.target.tags,
                listed,
                req.command is not None,  # a command goes to every device, whatever its firmware
            )
            waves = wave_sizes(len(devices), req.policy)
            recorded = req.model_dump(mode="json")
            if inp.targets is not None:  # where the explicit list is kept
                recorded["target"]["claim"] = inp.targets.model_dump()
            numbers = [w for w, size in enumerate(waves) for _ in range(size)]
            await conn.execute(
                """INSERT INTO device.rollouts (tenant, campaign_id, firmware_id, request, waves, command)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                tenant,
                req.campaign_id,
                req.firmware_id or None,
                recorded,
                waves,
                None if req.command is None else req.command.model_dump(mode="json"),
            )
            await conn.execute(
                """INSERT INTO device.rollout_jobs (tenant, campaign_id, device_id, kind, wave, state,
                       target_version, previous_version)
                   SELECT $1, $2, d, 'update', w, 'queued', $3, p
                   FROM unnest($4::text[], $5::int[], $6::text[]) AS t(d, w, p)""",
                tenant,
                req.campaign_id,
                fw["version"],
                [d["device_id"] for d in devices],
                numbers,
                [d["firmware_version"] for d in devices],
            )
        return RolloutPlan(
            total=len(devices), waves=waves, device_type=fw["device_type"], version=fw["version"]
        )
