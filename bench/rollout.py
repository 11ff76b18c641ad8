"""Rollout speed: wall time of a 10,000-device campaign whose devices succeed at once, and
the abort reaction (threshold crossed → last new offer) of a campaign whose devices fail.

Devices are simulated in the database (they answer the moment a job is offered), so the
figures measure the orchestration, not 10,000 HTTP clients.

    python -m bench.rollout [--devices N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import datetime
from typing import Any

from bench.stack import Stack, say, stack
from fleetflow.db import Pool


async def onboard(s: Stack, count: int) -> None:
    devices = [
        {"device_id": f"fleet-{i:05d}", "device_type": "sensor", "firmware_version": "1.0.0"}
        for i in range(count)
    ]
    accepted = (await s.api.post("/v1/devices:bulk", json={"devices": devices}, headers=s.headers)).json()
    await s.client.get_workflow_handle(accepted["workflow_id"]).result()


async def upload(s: Stack, version: str) -> str:
    response = await s.api.post(
        "/v1/firmware",
        params={"device_type": "sensor", "version": version},
        content=b"image-" + version.encode(),
        headers={**s.headers, "Content-Type": "application/octet-stream"},
    )
    response.raise_for_status()
    return str(response.json()["firmware_id"])


async def respond(pool: Pool, campaign: str, outcome: str, done: asyncio.Event) -> list[datetime]:
    """Every offered job of the campaign answers `outcome` at once; returns when each batch answered."""
    answered: list[datetime] = []
    while not done.is_set():
        row = await pool.fetchrow(
            """WITH moved AS (
                   UPDATE device.rollout_jobs SET state = $2, updated_at = now(),
                          finished_seq = nextval('device.rollout_finished_seq')
                   WHERE campaign_id = $1 AND kind = 'update' AND state = 'offered'
                   RETURNING device_id, target_version),
               fw AS (
                   UPDATE device.devices d SET firmware_version = m.target_version
                   FROM moved m WHERE $2 = 'succeeded' AND d.tenant = 'bench' AND d.device_id = m.device_id)
               SELECT count(*) AS n, clock_timestamp() AS at FROM moved""",
            campaign,
            outcome,
        )
        if row and row["n"]:
            answered.append(row["at"])
        await asyncio.sleep(0.02)
    return answered


async def campaign(
    s: Stack, pool: Pool, name: str, firmware_id: str, policy: dict[str, Any], outcome: str
) -> tuple[float, dict[str, Any], list[datetime]]:
    body = {"campaign_id": name, "firmware_id": firmware_id, "policy": policy}
    started = time.perf_counter()
    (await s.api.post("/v1/rollouts", json=body, headers=s.headers)).raise_for_status()
    done = asyncio.Event()
    responder = asyncio.create_task(respond(pool, name, outcome, done))
    while True:
        progress = (await s.api.get(f"/v1/rollouts/{name}", headers=s.headers)).json()
        if progress["status"] in ("completed", "aborted", "cancelled"):
            break
        await asyncio.sleep(0.1)
    wall = time.perf_counter() - started
    done.set()
    return wall, progress, await responder


async def main(devices: int) -> dict[str, Any]:
    async with stack() as s:
        import asyncpg

        pool = await asyncpg.create_pool(s.settings.database_url, min_size=1, max_size=2)
        say(f"onboarding {devices} devices ...")
        await onboard(s, devices)
        firmware = await upload(s, "2.0.0")
        say(f"campaign over {devices} devices that succeed at once ...")
        policy = {"canary": 100, "growth": 4, "rate_per_minute": 1_000_000, "abort_min_finished": devices}
        wall, progress, _ = await campaign(s, pool, "bench-all", firmware, policy, "succeeded")
        say(f"  {progress['status']} in {wall:.1f} s: {progress['counts']}")
        failing = await upload(s, "2.0.1")
        say("campaign whose devices all fail, to time the abort ...")
        abort_policy = {
            "canary": 500,
            "growth": 4,
            "rate_per_minute": 1_000_000,
            "abort_failure_percent": 10,
            "abort_min_finished": 50,
            "device_timeout_s": 600,
        }
        _, aborted, answered = await campaign(s, pool, "bench-abort", failing, abort_policy, "failed")
        last_offer = await pool.fetchval(
            """SELECT max(offered_at) FROM device.rollout_jobs
               WHERE campaign_id = 'bench-abort' AND kind = 'update'"""
        )
        await pool.close()
    crossed = answered[0]  # every device fails: the first answers already cross the threshold
    reaction = max(0.0, (last_offer - crossed).total_seconds())
    detected = datetime.fromisoformat(aborted["abort_crossed_at"])
    figures = {
        "devices": devices,
        "campaign_wall_s": round(wall, 1),
        "devices_per_minute": round(devices / wall * 60),
        "abort_status": aborted["status"],
        "abort_last_offer_after_crossing_s": round(reaction, 3),
        "abort_reaction_s": round((detected - crossed).total_seconds(), 3),
        "abort_offered_total": sum(
            v for k, v in aborted["counts"].items() if k != "queued" and k != "cancelled"
        ),
    }
    for name, value in figures.items():
        say(f"  {name:<30} {value}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()
    result = asyncio.run(main(args.devices))
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)
