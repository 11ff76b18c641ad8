"""Firmware and rollout jobs of the device service: per-device job state in the `device`
schema, driven in batches by the FirmwareRollout workflow and moved by the devices' reports."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.device_commands import end_campaign_commands, offer_campaign_commands
from fleetflow import claim_checks
from fleetflow.contracts.rollouts import (
    ACTIVE_STATES,
    CampaignDeviceView,
    FirmwareView,
    JobOutcome,
    JobView,
    RolloutInput,
    RolloutPlan,
    RolloutPolicy,
    RolloutTick,
    StopRollout,
    TickResult,
)
from fleetflow.db import Pool

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# finished jobs returned per tick: their events travel as one activity input, which stays
# under 256 KiB even with 128-character device ids and the longest tenant and campaign ids
FINISHED_WINDOW = 200
# what a device may report after each state
_NEXT = {
    "offered": {"downloading", "installing", "succeeded", "failed"},
    "downloading": {"downloading", "installing", "succeeded", "failed"},
    "installing": {"installing", "succeeded", "failed"},
}


class FirmwareConflict(Exception):
    """The same version of a device type was uploaded before with other content."""


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


class RolloutJobs:
    """Firmware storage, rollout planning and the per-device jobs (a part of DeviceService,
    which serves the campaign activities through it)."""

    def __init__(self, pool: Pool, firmware_dir: Path) -> None:
        self.pool = pool
        self.firmware_dir = firmware_dir

    # --- firmware ----------------------------------------------------------------

    async def put_firmware(
        self, tenant: str, device_type: str, version: str, image: bytes
    ) -> tuple[FirmwareView, bool]:
        """Store an image (idempotent for the same content); FirmwareConflict for other content."""
        digest = hashlib.sha256(image).hexdigest()
        firmware_id = f"{device_type}-{version}"
        existing = await self.firmware(tenant, firmware_id)
        if existing is not None:
            if existing.sha256 != digest:
                raise FirmwareConflict(f"{device_type} {version} was uploaded with other content")
            return existing, False
        self.firmware_dir.mkdir(parents=True, exist_ok=True)
        path = self.firmware_dir / digest
        if not path.exists():
            tmp = path.with_suffix(".part")
            tmp.write_bytes(image)
            tmp.replace(path)
        row = await self.pool.fetchrow(
            """INSERT INTO device.firmware (tenant, firmware_id, device_type, version, sha256, size, path)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING *""",
            tenant,
            firmware_id,
            device_type,
            version,
            digest,
            len(image),
            str(path),
        )
        if row is None:  # a concurrent upload won: same rules
            return await self.put_firmware(tenant, device_type, version, image)
        return FirmwareView.model_validate({k: row[k] for k in FirmwareView.model_fields}), True

    async def firmware(self, tenant: str, firmware_id: str) -> FirmwareView | None:
        """A firmware image's metadata."""
        row = await self.pool.fetchrow(
            "SELECT * FROM device.firmware WHERE tenant = $1 AND firmware_id = $2", tenant, firmware_id
        )
        return (
            None
            if row is None
            else FirmwareView.model_validate({k: row[k] for k in FirmwareView.model_fields})
        )

    async def firmware_path(self, tenant: str, firmware_id: str) -> Path | None:
        """Where the image of a firmware is kept."""
        path = await self.pool.fetchval(
            "SELECT path FROM device.firmware WHERE tenant = $1 AND firmware_id = $2", tenant, firmware_id
        )
        return None if path is None else Path(path)

    # --- campaign activities --------------------------------------------------------

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

    async def rollout_tick(self, tick: RolloutTick) -> TickResult:
        """Expire silent devices, check the abort criteria, offer new jobs, and count.

        Retry-safe: the campaign's row keeps the key of its last tick (run id and activity id,
        the same on every attempt) and what it decided, so a retry after the offer committed
        offers nothing more and returns the same offer and abort decision.
        """
        key = (tick.tenant, tick.campaign_id, tick.kind)
        info = activity.info()
        tick_key = f"{info.workflow_run_id}/{info.activity_id}"
        await self._wait_for_news(tick)
        async with self.pool.acquire() as conn, conn.transaction():
            last = await conn.fetchrow(
                """SELECT last_tick_key, last_tick_offered, last_tick_abort_at FROM device.rollouts
                   WHERE tenant = $1 AND campaign_id = $2 FOR UPDATE""",
                tick.tenant,
                tick.campaign_id,
            )
            repeat = last is not None and last["last_tick_key"] == tick_key
            await conn.execute(
                """UPDATE device.rollout_jobs SET
                       state = CASE WHEN attempts <= $5 AND NOT $7 THEN 'queued' ELSE 'timed_out' END,
                       finished_seq = CASE WHEN attempts <= $5 AND NOT $7 THEN NULL
                                           ELSE nextval('device.rollout_finished_seq') END,
                       detail = 'no report within the device timeout', updated_at = now()
                   WHERE tenant = $1 AND campaign_id = $2 AND kind = $3 AND state = ANY($6)
                     AND updated_at < now() - make_interval(secs => $4)""",
                *key,
                tick.device_timeout_s,
                tick.retry_limit,
                list(ACTIVE_STATES),
                tick.stopped,
            )
            if tick.stopped and tick.kind == "update":
                await self._stop_jobs(conn, tick.tenant, tick.campaign_id, rollback=True)
            abort, seen_at, offered = False, None, 0
            if repeat:
                assert last is not None
                offered, seen_at = last["last_tick_offered"], last["last_tick_abort_at"]
                abort = seen_at is not None
            else:
                abort, seen_at = await self._abort_crossed(conn, tick)
                if not abort and tick.offer > 0:
                    offered = await self._offer(conn, tick)
                await conn.execute(
                    """UPDATE device.rollouts SET last_tick_key = $3, last_tick_offered = $4,
                           last_tick_abort_at = $5
                       WHERE tenant = $1 AND campaign_id = $2""",
                    tick.tenant,
                    tick.campaign_id,
                    tick_key,
                    offered,
                    seen_at,
                )
            rows = await conn.fetch(
                """SELECT state, wave = $4 AS in_wave, count(*) AS n FROM device.rollout_jobs
                   WHERE tenant = $1 AND campaign_id = $2 AND kind = $3 GROUP BY 1, 2""",
                *key,
                tick.wave,
            )
            finished_rows = await conn.fetch(
                """SELECT device_id, state, target_version AS version, finished_seq AS seq
                   FROM device.rollout_jobs
                   WHERE tenant = $1 AND campaign_id = $2 AND kind = $3 AND finished_seq > $4
                   ORDER BY finished_seq LIMIT $5""",
                *key,
                tick.finished_after,
                FINISHED_WINDOW,
            )
        counts: dict[str, int] = {}
        wave_counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + r["n"]
            if r["in_wave"]:
                wave_counts[r["state"]] = r["n"]
        return TickResult(
            offered=offered,
            counts=counts,
            wave_counts=wave_counts,
            abort=abort,
            abort_seen_at=seen_at,
            finished=[JobOutcome(**dict(r.items())) for r in finished_rows if r["state"] != "cancelled"],
            # past the cancelled rows too: a window of only cancelled jobs (a bulk decommission)
            # must not hold the cursor back
            finished_through=finished_rows[-1]["seq"] if finished_rows else tick.finished_after,
        )

    @staticmethod
    async def _abort_crossed(conn: Conn, tick: RolloutTick) -> tuple[bool, datetime | None]:
        """Whether the failures crossed the abort threshold, and when this tick saw it."""
        if tick.abort_failure_percent is None:
            return False, None
        finished = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'timed_out')) AS done,
                      count(*) FILTER (WHERE state IN ('failed', 'timed_out')) AS bad
               FROM device.rollout_jobs WHERE tenant = $1 AND campaign_id = $2 AND kind = $3""",
            tick.tenant,
            tick.campaign_id,
            tick.kind,
        )
        assert finished is not None
        done, bad = finished["done"], finished["bad"]
        if done >= tick.abort_min_finished and bad * 100 > tick.abort_failure_percent * done:
            return True, await conn.fetchval("SELECT clock_timestamp()")
        return False, None

    @staticmethod
    async def _offer(conn: Conn, tick: RolloutTick) -> int:
        """Offer up to `tick.offer` queued jobs of waves up to `tick.wave`; how many were."""
        # the pick is materialized: as a joined subquery it was rescanned per row, and each
        # rescan skipped the rows just offered and picked the next, offering the whole wave
        result = await conn.execute(
            """WITH pick AS MATERIALIZED (
                   SELECT device_id FROM device.rollout_jobs
                   WHERE tenant = $1 AND campaign_id = $2 AND kind = $3 AND state = 'queued'
                     AND wave <= $4
                   ORDER BY wave, device_id LIMIT $5 FOR UPDATE SKIP LOCKED)
               UPDATE device.rollout_jobs j SET state = 'offered', offered_at = now(),
                   updated_at = now(), attempts = attempts + 1
               FROM pick
               WHERE j.tenant = $1 AND j.campaign_id = $2 AND j.kind = $3
                 AND j.device_id = pick.device_id""",
            tick.tenant,
            tick.campaign_id,
            tick.kind,
            tick.wave,
            tick.offer,
        )
        offered = int(str(result).split()[-1])
        if offered:
            await offer_campaign_commands(conn, tick.tenant, tick.campaign_id, tick.device_timeout_s)
        return offered

    async def _wait_for_news(self, tick: RolloutTick) -> None:
        """Hold the tick until a job of the campaign finishes, or `wait_ms` passes."""
        if tick.wait_ms <= 0:
            return
        deadline = asyncio.get_running_loop().time() + tick.wait_ms / 1000
        while asyncio.get_running_loop().time() < deadline:
            news = await self.pool.fetchval(
                """SELECT 1 FROM device.rollout_jobs WHERE tenant = $1 AND campaign_id = $2 AND kind = $3
                     AND finished_seq > $4 LIMIT 1""",
                tick.tenant,
                tick.campaign_id,
                tick.kind,
                tick.finished_after,
            )
            if news:
                return
            activity.heartbeat()
            await asyncio.sleep(0.025)

    async def stop_rollout(self, stop: StopRollout) -> int:
        """Cancel the jobs not started yet; with `rollback`, queue a rollback for every device
        that took the new firmware. Returns how many rollbacks are queued."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._stop_jobs(conn, stop.tenant, stop.campaign_id, stop.rollback)
            count = await conn.fetchval(
                """SELECT count(*) FROM device.rollout_jobs
                   WHERE tenant = $1 AND campaign_id = $2 AND kind = 'rollback'""",
                stop.tenant,
                stop.campaign_id,
            )
        return int(count)

    @staticmethod
    async def _stop_jobs(conn: Conn, tenant: str, campaign_id: str, rollback: bool) -> None:
        """Cancel the update jobs not started yet; with `rollback`, queue a rollback for every
        device whose update succeeded (once each: a late success gets its rollback later)."""
        await conn.execute(
            """UPDATE device.rollout_jobs SET state = 'cancelled', updated_at = now(),
                   finished_seq = nextval('device.rollout_finished_seq')
               WHERE tenant = $1 AND campaign_id = $2 AND kind = 'update'
                 AND state IN ('queued', 'offered')""",
            tenant,
            campaign_id,
        )
        if rollback:
            await conn.execute(
                """INSERT INTO device.rollout_jobs (tenant, campaign_id, device_id, kind, wave, state,
                       target_version, previous_version)
                   SELECT tenant, campaign_id, device_id, 'rollback', 0, 'queued', previous_version,
                          target_version
                   FROM device.rollout_jobs
                   WHERE tenant = $1 AND campaign_id = $2 AND kind = 'update' AND state = 'succeeded'
                     AND NOT EXISTS (SELECT 1 FROM device.rollouts r WHERE r.tenant = $1
                                     AND r.campaign_id = $2 AND r.command IS NOT NULL)
                   ON CONFLICT DO NOTHING""",
                tenant,
                campaign_id,
            )
        await end_campaign_commands(conn, tenant, campaign_id)

    async def campaign_devices(
        self, tenant: str, campaign_id: str, limit: int, after: str | None
    ) -> list[CampaignDeviceView]:
        """Each device's outcome in a campaign, by device id, `limit` after `after`."""
        rows = await self.pool.fetch(
            """SELECT j.device_id, j.state, j.attempts, j.detail, j.updated_at,
                      c.command_id, c.status AS command_status, c.result
               FROM device.rollout_jobs j
               LEFT JOIN LATERAL (
                   SELECT command_id, status, result FROM device.commands c
                   WHERE c.tenant = j.tenant AND c.device_id = j.device_id AND c.campaign_id = j.campaign_id
                   ORDER BY c.created_at DESC LIMIT 1) c ON true
               WHERE j.tenant = $1 AND j.campaign_id = $2 AND j.kind = 'update'
                 AND ($4::text IS NULL OR j.device_id > $4)
               ORDER BY j.device_id LIMIT $3""",
            tenant,
            campaign_id,
            limit,
            after,
        )
        views = []
        for r in rows:
            data = dict(r.items())
            if isinstance(data["result"], str):
                data["result"] = json.loads(data["result"])
            views.append(CampaignDeviceView.model_validate(data))
        return views

    # --- the device's side ------------------------------------------------------------

    async def pending_job(self, tenant: str, device_id: str) -> JobView | None:
        """The job a device should work on now (offered or in progress), if any."""
        row = await self.pool.fetchrow(
            """SELECT j.campaign_id, j.kind, j.state, j.target_version AS version,
                      f.firmware_id, f.sha256, f.size
               FROM device.rollout_jobs j
               JOIN device.devices d USING (tenant, device_id)
               JOIN device.rollouts r ON r.tenant = j.tenant AND r.campaign_id = j.campaign_id
               LEFT JOIN device.firmware f ON f.tenant = j.tenant AND f.device_type = d.device_type
                    AND f.version = j.target_version
               WHERE j.tenant = $1 AND j.device_id = $2 AND j.state = ANY($3) AND r.command IS NULL
               ORDER BY j.offered_at DESC LIMIT 1""",
            tenant,
            device_id,
            list(ACTIVE_STATES),
        )
        if row is None:
            return None
        firmware_id = row["firmware_id"] or ""
        return JobView(
            campaign_id=row["campaign_id"],
            kind=row["kind"],
            state=row["state"],
            firmware_id=firmware_id,
            version=row["version"],
            sha256=row["sha256"] or "",
            size=row["size"] or 0,
            download_url=f"/v1/device/firmware/{firmware_id}" if firmware_id else "",
        )

    async def report_job(
        self, tenant: str, device_id: str, campaign_id: str, kind: str, state: str, detail: str | None
    ) -> str | None:
        """Move a device's job as it reports; on success its firmware version changes (returned)."""
        final = state in ("succeeded", "failed")
        async with self.pool.acquire() as conn, conn.transaction():
            if final:
                # a finish number is drawn before the commit: a tick (which locks this row for
                # update) must not read a later number while this one is uncommitted, or its
                # cursor passes this job and its event is never recorded. Locked first, before
                # the job's row, in the order the tick takes them
                await conn.execute(
                    "SELECT 1 FROM device.rollouts WHERE tenant = $1 AND campaign_id = $2 FOR SHARE",
                    tenant,
                    campaign_id,
                )
            job = await conn.fetchrow(
                """SELECT state, target_version FROM device.rollout_jobs j
                   WHERE tenant = $1 AND campaign_id = $2 AND device_id = $3 AND kind = $4
                     AND NOT EXISTS (SELECT 1 FROM device.rollouts r WHERE r.tenant = $1
                                     AND r.campaign_id = $2 AND r.command IS NOT NULL)
                   FOR UPDATE""",
                tenant,
                campaign_id,
                device_id,
                kind,
            )
            if job is None:
                raise LookupError(f"no {kind} job of campaign {campaign_id!r} for this device")
            if state not in _NEXT.get(job["state"], set()):
                raise ValueError(f"the job is {job['state']}: {state!r} is not a valid report now")
            await conn.execute(
                """UPDATE device.rollout_jobs SET state = $5, detail = $6, updated_at = now(),
                       finished_seq = CASE WHEN $7 THEN nextval('device.rollout_finished_seq') END
                   WHERE tenant = $1 AND campaign_id = $2 AND device_id = $3 AND kind = $4""",
                tenant,
                campaign_id,
                device_id,
                kind,
                state,
                detail,
                final,
            )
            if state == "succeeded":
                await conn.execute(
                    """UPDATE device.devices SET firmware_version = $3, updated_at = now()
                       WHERE tenant = $1 AND device_id = $2""",
                    tenant,
                    device_id,
                    job["target_version"],
                )
                return str(job["target_version"])
        return None
