"""Onboarding speed: single-device latency (device answers at once) and a 10,000-device bulk
import, beside a bare five-activity workflow measured in the same run.

    python -m bench.onboarding [--single N] [--bulk N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

from bench.baseline import BASELINE_QUEUE, FiveActivities
from bench.stack import Stack, percentile, say, stack
from fleetflow.contracts.devices import BulkProgress, OnboardingProgress
from workflows.device_onboarding import DeviceOnboarding


async def bare_workflows(s: Stack, runs: int) -> list[float]:
    """Latency (ms) of the bare five-activity workflow, one at a time."""
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        await s.client.execute_workflow(
            FiveActivities.run, id=f"bare-{uuid.uuid4()}", task_queue=BASELINE_QUEUE
        )
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def one_onboarding(s: Stack) -> float:
    """POST /v1/devices → the device contacts as soon as its credential exists → completed (ms)."""
    device_id = f"b-{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    accepted = await s.api.post(
        "/v1/devices", json={"device_id": device_id, "device_type": "sensor"}, headers=s.headers
    )
    accepted.raise_for_status()
    handle = s.client.get_workflow_handle(accepted.json()["workflow_id"])
    while True:  # the device polls for its credential, as a real one would poll the API
        progress: OnboardingProgress = await handle.query(DeviceOnboarding.progress)
        if progress.credential:
            break
        await asyncio.sleep(0.005)
    contact = await s.api.post(
        "/v1/device-contact", json={}, headers={"Authorization": f"Bearer {progress.credential}"}
    )
    contact.raise_for_status()
    await handle.result()
    return (time.perf_counter() - started) * 1000


async def bulk(s: Stack, count: int) -> float:
    """Wall time (s) from POST /v1/devices:bulk to the workflow's end."""
    devices = [{"device_id": f"bulk-{i:05d}", "device_type": "sensor"} for i in range(count)]
    started = time.perf_counter()
    accepted = await s.api.post("/v1/devices:bulk", json={"devices": devices}, headers=s.headers)
    accepted.raise_for_status()
    handle = s.client.get_workflow_handle(accepted.json()["workflow_id"], result_type=BulkProgress)
    result: BulkProgress = await handle.result()
    wall = time.perf_counter() - started
    if result.onboarded != count:
        raise SystemExit(f"bulk onboarded {result.onboarded} of {count}")
    return wall


async def main(single: int, bulk_count: int) -> dict[str, float]:
    """Run every measurement against a fresh stack."""
    async with stack() as s:
        say("warming up ...")
        await bare_workflows(s, 5)
        await one_onboarding(s)
        say(f"bare five-activity workflow x{single} ...")
        bare = await bare_workflows(s, single)
        say(f"single-device onboarding x{single} ...")
        singles = []
        for i in range(single):
            singles.append(await one_onboarding(s))
            if (i + 1) % 10 == 0:
                say(f"  {i + 1}/{single}  p50 so far {percentile(singles, 50):.0f} ms")
        say(f"bulk onboarding of {bulk_count} devices ...")
        wall = await bulk(s, bulk_count)
    figures = {
        "onboarding_p50_ms": round(percentile(singles, 50), 1),
        "onboarding_p99_ms": round(percentile(singles, 99), 1),
        "bare_5_activity_p50_ms": round(percentile(bare, 50), 1),
        "bare_5_activity_p99_ms": round(percentile(bare, 99), 1),
        "ratio_p50_vs_bare": round(percentile(singles, 50) / percentile(bare, 50), 2),
        "bulk_devices": bulk_count,
        "bulk_wall_s": round(wall, 2),
        "bulk_devices_per_s": round(bulk_count / wall, 1),
    }
    for name, value in figures.items():
        say(f"  {name:<24} {value}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--single", type=int, default=100, help="single onboardings to time")
    parser.add_argument("--bulk", type=int, default=10_000, help="devices in the bulk import")
    args = parser.parse_args()
    result = asyncio.run(main(args.single, args.bulk))
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)  # the Temporal runtime may abort at interpreter exit otherwise
