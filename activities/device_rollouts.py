"""The running of firmware campaigns in the device service: each tick of the FirmwareRollout
workflow expires silent devices, checks the abort criteria, offers the next jobs and counts;
a stop cancels what has not started and queues rollbacks. Planning is in
`activities.device_rollout_plans`, the devices' reports in `activities.device_jobs`."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import TYPE_CHECKING

from temporalio import activity

from activities.device_commands import READ_STATUS, end_campaign_commands, offer_campaign_commands
from fleetflow.contracts.rollouts import (
    ACTIVE_STATES,
    CampaignDeviceView,
    JobOutcome,
    RolloutTick,
    StopRollout,
    TickResult,
)
from fleetflow.db import Pool

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# finished jobs returned per tick unless the tick asks for more: runs started before
# `finished_limit` record them as one activity input, which stays under 256 KiB even with
# 128-character device ids and the longest tenant and campaign ids (newer runs record them
# 200 an activity)
FINISHED_WINDOW = 200


class RolloutJobs:
    """The ticks and stops of campaigns over their per-device jobs (a part of DeviceService,
    which serves the campaign activities through it)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

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
                """UPDATE device.rollout_jobs j SET
                       state = CASE WHEN attempts <= $5 AND NOT $7 THEN 'queued' ELSE 'timed_out' END,
                       finished_seq = CASE WHEN attempts <= $5 AND NOT $7 THEN NULL
                                           ELSE nextval('device.rollout_finished_seq') END,
                       detail = 'no report within the device timeout', updated_at = now()
                   WHERE j.tenant = $1 AND j.campaign_id = $2 AND j.kind = $3 AND j.state = ANY($6)
                     AND (j.updated_at < now() - make_interval(secs => $4)
                          -- a command campaign's current offer past its own deadline: no answer
                          -- can move the job any more, so it need not wait out the device timeout
                          OR EXISTS (SELECT 1 FROM device.commands c
                                     WHERE c.tenant = j.tenant AND c.device_id = j.device_id
                                       AND c.command_id = j.campaign_id || '~' || j.attempts
                                       AND """
                + READ_STATUS
                + """ IN ('expired', 'timed_out')))""",
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
                tick.finished_limit or FINISHED_WINDOW,
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
        # rescan skipped the rows just offered and picked the next, offering the whole wave.
        # It is matched as one array (primary-key lookups): joined, the planner rescanned the
        # campaign's jobs for each picked row (21 s to offer a wave of 6,400 of 10,000)
        result = await conn.execute(
            """WITH pick AS MATERIALIZED (
                   SELECT device_id FROM device.rollout_jobs
                   WHERE tenant = $1 AND campaign_id = $2 AND kind = $3 AND state = 'queued'
                     AND wave <= $4
                   ORDER BY wave, device_id LIMIT $5 FOR UPDATE SKIP LOCKED)
               UPDATE device.rollout_jobs j SET state = 'offered', offered_at = now(),
                   updated_at = now(), attempts = attempts + 1
               WHERE j.tenant = $1 AND j.campaign_id = $2 AND j.kind = $3
                 AND j.device_id = ANY(ARRAY(SELECT device_id FROM pick))""",
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
                   SELECT command_id, """
            + READ_STATUS
            + """ AS status, result FROM device.commands c
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
