"""The device's side of rollout jobs: the job a device should work on now, and the reports
that move it (a success changes the device's firmware version)."""

from __future__ import annotations

from fleetflow.contracts.rollouts import ACTIVE_STATES, JobView
from fleetflow.db import Pool

# what a device may report after each state
_NEXT = {
    "offered": {"downloading", "installing", "succeeded", "failed"},
    "downloading": {"downloading", "installing", "succeeded", "failed"},
    "installing": {"installing", "succeeded", "failed"},
}


class DeviceJobs:
    """Rollout jobs as a device sees them (a part of DeviceService, which the API asks)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

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
