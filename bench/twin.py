"""Twin speed: `set_desired` latency through the API, and the time to rebuild a state
`as_of` a point 10,000 events back (by replay) beside reading the current state.

    python -m bench.twin [--updates N] [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

from bench.stack import Stack, percentile, say, stack
from workflows.device_twin import DeviceTwin, twin_id


async def timed(call: Awaitable[Any]) -> float:
    """Milliseconds one awaitable takes."""
    started = time.perf_counter()
    await call
    return (time.perf_counter() - started) * 1000


async def new_device(s: Stack) -> str:
    device_id = f"twin-{uuid.uuid4().hex[:8]}"
    body = {"devices": [{"device_id": device_id, "device_type": "sensor"}]}
    accepted = (await s.api.post("/v1/devices:bulk", json=body, headers=s.headers)).json()
    await s.client.get_workflow_handle(accepted["workflow_id"]).result()
    (await s.api.get(f"/v1/devices/{device_id}/twin", headers=s.headers)).raise_for_status()
    return device_id


async def set_desired_latency(s: Stack, device_id: str, count: int) -> list[float]:
    url = f"/v1/devices/{device_id}/twin/desired"
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        response = await s.api.patch(url, json={"report_interval_s": 1 + i % 60}, headers=s.headers)
        response.raise_for_status()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def taken(handle: Any, version: int) -> None:
    """Return once the twin's reported_version reached `version`."""
    for _ in range(6000):
        if (await handle.query(DeviceTwin.get)).reported_version >= version:
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"the twin did not take its reports (reported_version < {version})")


async def grow_history(s: Stack, device_id: str, events: int) -> int:
    """Send reports (signals) until the twin's runs hold at least `events` events."""
    handle = s.client.get_workflow_handle(twin_id("bench", device_id))
    total = 0
    sent = 0
    applied = (await handle.query(DeviceTwin.get)).reported_version
    while total < events:
        batch = [
            handle.signal("report", {"patch": {"seq": sent + i}, "at": "2026-01-01T00:00:00Z"})
            for i in range(200)
        ]
        await asyncio.gather(*batch)
        sent += len(batch)
        # paced as devices are: the twin takes each batch before the next (flooded without pause,
        # a loaded worker's activations passed the 2 s deadlock timeout and the twin never
        # continued as new: one run of 10,000+ events, not the 2,000-event runs a twin keeps)
        await taken(handle, applied + sent)
        total = 0
        async for run in s.client.list_workflows(f"WorkflowId = '{handle.id}'"):
            description = await s.client.get_workflow_handle(handle.id, run_id=run.run_id).describe()
            total += description.raw_description.workflow_execution_info.history_length
        say(f"  {sent} reports sent, {total} events in the twin's runs")
    return total


async def event_time_back(s: Stack, device_id: str, back: int) -> str:
    """The time of the event `back` events before the twin's latest, across its runs."""
    wid = twin_id("bench", device_id)
    runs = sorted(
        [r async for r in s.client.list_workflows(f"WorkflowId = '{wid}'")], key=lambda r: r.start_time
    )
    times: list[datetime] = []
    for run in runs:
        history = await s.client.get_workflow_handle(wid, run_id=run.run_id).fetch_history()
        times.extend(e.event_time.ToDatetime(tzinfo=UTC) for e in history.events)
    return times[-back].isoformat()


async def profiled(call: Awaitable[Any]) -> None:
    """Run one awaitable under cProfile and print where its time went (stderr)."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    await call
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    say(text.getvalue())


async def main(updates: int, events: int, profile: bool = False) -> dict[str, float]:
    """Run every measurement against a fresh stack."""
    async with stack() as s:
        device_id = await new_device(s)
        url = f"/v1/devices/{device_id}/twin"
        say(f"set_desired through the API x{updates} ...")
        await set_desired_latency(s, device_id, 5)
        desired = await set_desired_latency(s, device_id, updates)
        say(f"growing the twin's history to {events}+ events ...")
        total = await grow_history(s, device_id, events + 500)
        point = await event_time_back(s, device_id, events)
        say(f"rebuilding the state as of {point} ({events} events back) ...")
        current = [await timed(s.api.get(url, headers=s.headers)) for _ in range(20)]
        first = await timed(s.api.get(url, params={"as_of": point}, headers=s.headers))
        rebuild = [await timed(s.api.get(url, params={"as_of": point}, headers=s.headers)) for _ in range(5)]
        if profile:
            await profiled(s.api.get(url, params={"as_of": point}, headers=s.headers))
        check = (await s.api.get(url, params={"as_of": point}, headers=s.headers)).json()
        if "desired_version" not in check:
            raise SystemExit(f"as_of failed: {check}")
    figures = {
        "set_desired_p50_ms": round(percentile(desired, 50), 1),
        "set_desired_p99_ms": round(percentile(desired, 99), 1),
        "history_events": total,
        "as_of_10000_back_first_ms": round(first, 1),
        "as_of_10000_back_p50_ms": round(percentile(rebuild, 50), 1),
        "current_state_p50_ms": round(percentile(current, 50), 1),
        "ratio_as_of_vs_current": round(percentile(rebuild, 50) / percentile(current, 50), 1),
    }
    for name, value in figures.items():
        say(f"  {name:<26} {value}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=200, help="set_desired calls to time")
    parser.add_argument("--events", type=int, default=10_000, help="how far back to rebuild")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one rebuild")
    args = parser.parse_args()
    result = asyncio.run(main(args.updates, args.events, args.profile))
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)
