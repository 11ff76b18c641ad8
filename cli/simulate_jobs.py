"""Simulated devices taking part in firmware rollouts (fetch the job, download the image,
check its sha256, report progress) and answering their commands (`GET /v1/device/commands`, then
the result); some fail and some stay silent, at configurable rates."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

POLL_S = 2.0
JOB_IN_FLIGHT = 32  # job and command polls at once
# polls a second at most (two a device: jobs, commands), so a large fleet's polls do not crowd
# out its telemetry: 500 devices polled every 2 s took more of this process than the readings
JOB_REQUESTS_PER_S = 25.0


@dataclass
class JobStats:
    """What the simulated devices did with the jobs they were offered."""

    offered: int = 0
    succeeded: int = 0
    failed: int = 0
    silent: int = 0
    bad_images: int = 0
    commands_sent: int = 0
    commands_received: int = 0
    commands_succeeded: int = 0
    commands_failed: int = 0
    commands_silent: int = 0

    def render(self) -> str:
        """One line for the summary."""
        return (
            f"  jobs          {self.offered:,} offered: {self.succeeded:,} succeeded, "
            f"{self.failed:,} failed, {self.silent:,} left silent, {self.bad_images:,} bad images"
        )

    def render_commands(self) -> str:
        """The commands' line of the summary."""
        return (
            f"  commands      {self.commands_sent:,} sent, {self.commands_received:,} received: "
            f"{self.commands_succeeded:,} succeeded, {self.commands_failed:,} failed, "
            f"{self.commands_silent:,} left silent"
        )


async def _answer_commands(
    http: httpx.AsyncClient,
    credential: str,
    rates: tuple[float, float],
    rng: random.Random,
    stats: JobStats,
) -> None:
    """Take the device's commands and answer each (or stay silent, at the timeout rate)."""
    auth = {"Authorization": f"Bearer {credential}"}
    response = await http.get("/v1/device/commands", headers=auth)
    if response.status_code != 200:
        return
    failure_rate, timeout_rate = rates
    for command in response.json()["commands"]:
        stats.commands_received += 1
        if rng.random() < timeout_rate:
            stats.commands_silent += 1
            continue
        failed = rng.random() < failure_rate
        body = {
            "status": "failed" if failed else "succeeded",
            "result": {"error": "simulated failure"} if failed else {"echo": command["params"]},
        }
        answered = await http.post(
            f"/v1/device/commands/{command['command_id']}/result", json=body, headers=auth
        )
        if answered.status_code == 200:
            if failed:
                stats.commands_failed += 1
            else:
                stats.commands_succeeded += 1


Report = Callable[[str, dict[str, Any]], Awaitable[None]]  # (campaign, progress body)


async def _work(
    http: httpx.AsyncClient,
    device_id: str,
    credential: str,
    rates: tuple[float, float],
    rng: random.Random,
    seen: set[tuple[str, str, str]],
    stats: JobStats,
) -> None:
    auth = {"Authorization": f"Bearer {credential}"}
    response = await http.get("/v1/device/jobs", headers=auth)
    if response.status_code != 200:
        return

    async def report(campaign: str, body: dict[str, Any]) -> None:
        await http.post(f"/v1/device/jobs/{campaign}/progress", json=body, headers=auth)

    await handle_job(http, device_id, credential, response.json(), report, rates, rng, seen, stats)


async def handle_job(
    http: httpx.AsyncClient,
    device_id: str,
    credential: str,
    job: dict[str, Any],
    report: Report,
    rates: tuple[float, float],
    rng: random.Random,
    seen: set[tuple[str, str, str]],
    stats: JobStats,
) -> None:
    """Work on one offered job: report downloading, fetch and check the image, report installing
    and the outcome through `report` (HTTP or MQTT); or stay silent, at the timeout rate."""
    auth = {"Authorization": f"Bearer {credential}"}
    key = (device_id, job["campaign_id"], job["kind"])
    if key in seen:
        return  # silent on purpose, or an answer already on its way
    seen.add(key)
    stats.offered += 1
    failure_rate, timeout_rate = rates
    if rng.random() < timeout_rate:
        stats.silent += 1
        return
    campaign = job["campaign_id"]
    await report(campaign, {"kind": job["kind"], "state": "downloading"})
    outcome, detail = ("failed", "simulated failure") if rng.random() < failure_rate else ("succeeded", None)
    if job["download_url"]:
        image = await http.get(job["download_url"], headers=auth)
        if image.status_code != 200 or hashlib.sha256(image.content).hexdigest() != job["sha256"]:
            stats.bad_images += 1
            outcome, detail = "failed", "image checksum mismatch"
    await report(campaign, {"kind": job["kind"], "state": "installing"})
    await report(campaign, {"kind": job["kind"], "state": outcome, "detail": detail})
    if outcome == "succeeded":
        stats.succeeded += 1
    else:
        stats.failed += 1


async def work_jobs(
    http: httpx.AsyncClient,
    devices: Iterable[tuple[str, str]],
    failure_rate: float,
    timeout_rate: float,
    rng: random.Random,
    stats: JobStats,
    stop: asyncio.Event,
    in_flight: int = JOB_IN_FLIGHT,
) -> None:
    """Poll every device's job every POLL_S seconds, or slower so that the polls stay within
    JOB_REQUESTS_PER_S, until stop; devices is (id, credential) pairs."""
    fleet = list(devices)
    gate = asyncio.Semaphore(in_flight)
    seen: set[tuple[str, str, str]] = set()

    async def one(device_id: str, credential: str) -> None:
        async with gate:
            try:
                await _work(http, device_id, credential, (failure_rate, timeout_rate), rng, seen, stats)
                await _answer_commands(http, credential, (failure_rate, timeout_rate), rng, stats)
            except httpx.HTTPError:
                pass  # the next poll tries again

    cycle_s = max(POLL_S, 2 * len(fleet) / JOB_REQUESTS_PER_S)
    while not stop.is_set():
        began = time.monotonic()
        await asyncio.gather(*(one(d, c) for d, c in fleet))
        try:
            await asyncio.wait_for(stop.wait(), max(POLL_S / 4, cycle_s - (time.monotonic() - began)))
        except TimeoutError:
            pass
