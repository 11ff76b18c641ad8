"""Device command round trip: a caller sends a command and waits for its result while the device
holds a long-poll (`GET /v1/device/commands?wait=`) and answers at once; beside a bare workflow
start + update round trip measured in the same run.

    python -m bench.commands [--commands N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

from bench.baseline import BASELINE_QUEUE, StartAndUpdate
from bench.stack import Stack, percentile, say, stack


async def bare_round_trips(s: Stack, runs: int) -> list[float]:
    """Latency (ms) of starting a bare workflow, answering it by an update and reading its result."""
    latencies = []
    for i in range(runs):
        started = time.perf_counter()
        handle = await s.client.start_workflow(
            StartAndUpdate.run, id=f"bare-update-{uuid.uuid4()}", task_queue=BASELINE_QUEUE
        )
        await handle.execute_update(StartAndUpdate.answer, i)
        await handle.result()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def connected_device(s: Stack) -> tuple[str, dict[str, str]]:
    """A device of the bench tenant and its credential's header."""
    device_id = f"cmd-{uuid.uuid4().hex[:8]}"
    body = {"devices": [{"device_id": device_id, "device_type": "sensor"}]}
    accepted = (await s.api.post("/v1/devices:bulk", json=body, headers=s.headers)).json()
    await s.client.get_workflow_handle(accepted["workflow_id"]).result()
    url = f"/v1/bulk-onboardings/{accepted['bulk_id']}/credentials"
    rows = (await s.api.get(url, headers=s.headers)).text.splitlines()
    credential = rows[1].split(",")[1]
    return device_id, {"Authorization": f"Bearer {credential}"}


async def device_loop(s: Stack, auth: dict[str, str], stop: asyncio.Event) -> int:
    """Long-poll, answer every command at once, poll again; how many it answered."""
    answered = 0
    while not stop.is_set():
        polled = await s.api.get("/v1/device/commands", params={"wait": 5}, headers=auth)
        if polled.status_code != 200:
            await asyncio.sleep(0.05)
            continue
        for command in polled.json()["commands"]:
            url = f"/v1/device/commands/{command['command_id']}/result"
            answer = await s.api.post(url, json={"status": "succeeded", "result": {"ok": 1}}, headers=auth)
            answer.raise_for_status()
            answered += 1
    return answered


async def command_round_trips(s: Stack, device_id: str, runs: int) -> list[float]:
    """Latency (ms) of POST command → GET ?wait= returns it succeeded."""
    latencies = []
    for i in range(runs):
        started = time.perf_counter()
        sent = await s.api.post(
            f"/v1/devices/{device_id}/commands", json={"name": "ping", "params": {"n": i}}, headers=s.headers
        )
        sent.raise_for_status()
        url = f"/v1/devices/{device_id}/commands/{sent.json()['command_id']}"
        done = (await s.api.get(url, params={"wait": 30}, headers=s.headers)).json()
        if done["status"] != "succeeded":
            raise SystemExit(f"command ended {done['status']}")
        latencies.append((time.perf_counter() - started) * 1000)
        if (i + 1) % 20 == 0:
            say(f"  {i + 1}/{runs}  p50 so far {percentile(latencies, 50):.0f} ms")
    return latencies


async def main(runs: int) -> dict[str, float]:
    """Run every measurement against a fresh stack."""
    async with stack() as s:
        device_id, auth = await connected_device(s)
        stop = asyncio.Event()
        device = asyncio.create_task(device_loop(s, auth, stop))
        say("warming up ...")
        await bare_round_trips(s, 5)
        await command_round_trips(s, device_id, 5)
        say(f"bare workflow start + update x{runs} ...")
        bare = await bare_round_trips(s, runs)
        say(f"command round trip to a long-polling device x{runs} ...")
        commands = await command_round_trips(s, device_id, runs)
        stop.set()
        await device
    figures = {
        "commands": runs,
        "command_round_trip_p50_ms": round(percentile(commands, 50), 1),
        "command_round_trip_p99_ms": round(percentile(commands, 99), 1),
        "bare_start_update_p50_ms": round(percentile(bare, 50), 1),
        "bare_start_update_p99_ms": round(percentile(bare, 99), 1),
        "ratio_p50_vs_bare": round(percentile(commands, 50) / percentile(bare, 50), 2),
    }
    for name, value in figures.items():
        say(f"  {name:<28} {value}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=200, help="round trips to time")
    args = parser.parse_args()
    result = asyncio.run(main(args.commands))
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)  # the Temporal runtime may abort at interpreter exit otherwise
