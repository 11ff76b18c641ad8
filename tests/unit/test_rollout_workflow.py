"""FirmwareRollout's continue-as-new with a lowered history limit: an operator's pause and
cancel survive it, even when accepted during the very tick after which the run continues.

Activities are stubs (ten silent devices in one wave); a tick can be held open, so the test
decides exactly when an update lands. The server is a local dev server (updates need it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from fleetflow.contracts.common import Actor, TaskQueue
from fleetflow.contracts.events import EventBatch
from fleetflow.contracts.rollouts import (
    RolloutDecision,
    RolloutInput,
    RolloutPlan,
    RolloutPolicy,
    RolloutProgress,
    RolloutRequest,
    RolloutTarget,
    RolloutTick,
    StopRollout,
    TickResult,
)
from tests.support import eventually
from workflows.firmware_rollout import FirmwareRollout, rollout_id

ADMIN = Actor(subject="op", tenant="acme", scopes=["rollouts:admin"])
DEVICES = 10


@dataclass
class Fleet:
    """Ten devices that never answer; records every tick with the run that asked for it."""

    queued: int = DEVICES
    stopped: bool = False
    succeeded: bool = False
    ticks: list[tuple[str, RolloutTick]] = field(default_factory=list)
    hold_next: bool = False
    succeed_on_release: bool = False  # the held tick returns with every device updated
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def update_ticks(self) -> list[tuple[str, RolloutTick]]:
        return [(run, t) for run, t in self.ticks if t.kind == "update"]

    def counts(self) -> dict[str, int]:
        if self.stopped:
            return {"cancelled": DEVICES}
        if self.succeeded:
            return {"succeeded": DEVICES}
        return {k: v for k, v in {"queued": self.queued, "offered": DEVICES - self.queued}.items() if v}


FLEET = Fleet()


@activity.defn(name="device.plan_rollout")
async def plan(inp: RolloutInput) -> RolloutPlan:
    return RolloutPlan(total=DEVICES, waves=[DEVICES], device_type="sensor", version="2.0.0")


@activity.defn(name="device.rollout_tick")
async def tick(t: RolloutTick) -> TickResult:
    FLEET.ticks.append((activity.info().workflow_run_id or "", t))
    offered = 0
    if t.kind == "update" and not FLEET.stopped:
        offered = min(t.offer, FLEET.queued)
        FLEET.queued -= offered
    if t.kind == "update" and FLEET.hold_next:  # the offer is made: the update lands after it
        FLEET.hold_next = False
        FLEET.entered.set()
        await FLEET.release.wait()
        FLEET.succeeded = FLEET.succeeded or FLEET.succeed_on_release
    counts = FLEET.counts() if t.kind == "update" else {}
    return TickResult(offered=offered, counts=counts, wave_counts=counts, finished=[])


@activity.defn(name="device.stop_rollout")
async def stop(s: StopRollout) -> int:
    FLEET.stopped = True
    return 0


@activity.defn(name="notification.record_events")
async def record(batch: EventBatch) -> int:
    return len(batch.events)


@pytest.fixture
async def workers(dev: WorkflowEnvironment) -> AsyncIterator[None]:
    """A fresh fleet, and workers for the workflow and the stubs."""
    FLEET.__init__()  # type: ignore[misc]
    async with (
        Worker(dev.client, task_queue=TaskQueue.ORCHESTRATION.value, workflows=[FirmwareRollout]),
        Worker(dev.client, task_queue=TaskQueue.DEVICE.value, activities=[plan, tick, stop]),
        Worker(dev.client, task_queue=TaskQueue.NOTIFICATION.value, activities=[record]),
    ):
        yield
        async for run in dev.client.list_workflows("ExecutionStatus = 'Running'"):
            try:  # no cross-talk with the next test
                await dev.client.get_workflow_handle(run.id).terminate("test over")
            except RPCError:
                pass  # completed meanwhile (the list lags behind)


Handle = WorkflowHandle[FirmwareRollout, RolloutProgress]


async def start(dev: WorkflowEnvironment, history_limit: int) -> Handle:
    """A campaign offering one device a second, continuing as new past `history_limit` events."""
    campaign = f"c-{uuid.uuid4().hex[:6]}"
    request = RolloutRequest(
        campaign_id=campaign,
        firmware_id="sensor-2.0.0",
        target=RolloutTarget(),
        policy=RolloutPolicy(canary=DEVICES, rate_per_minute=60, device_timeout_s=3600),
    )
    wid = rollout_id("acme", campaign)
    await dev.client.start_workflow(
        FirmwareRollout.run,
        RolloutInput(tenant="acme", actor=ADMIN, request=request, history_limit=history_limit),
        id=wid,
        task_queue=TaskQueue.ORCHESTRATION.value,
    )
    # without a run id: the handle follows the runs that continue as new
    return dev.client.get_workflow_handle_for(FirmwareRollout.run, wid)


async def during_a_tick(handle: Handle, update: str) -> RolloutProgress:
    """Hold the next update tick open, apply `update` meanwhile, then let the tick finish."""
    FLEET.entered.clear()
    FLEET.release.clear()
    FLEET.hold_next = True
    await asyncio.wait_for(FLEET.entered.wait(), 30)
    progress: RolloutProgress = await handle.execute_update(
        update, RolloutDecision(actor=ADMIN, reason="test"), result_type=RolloutProgress
    )
    FLEET.release.set()
    return progress


async def test_a_pause_accepted_in_the_last_tick_holds_across_continue_as_new(
    dev: WorkflowEnvironment, workers: None
) -> None:
    handle = await start(dev, history_limit=12)  # the first run continues as new after its first tick
    paused = await during_a_tick(handle, "pause")
    assert paused.status == "paused"
    first_run = FLEET.ticks[-1][0]

    def later_runs() -> set[str]:
        return {run for run, _ in FLEET.update_ticks()} - {first_run}

    await eventually(lambda: asyncio.sleep(0, later_runs()), lambda runs: len(runs) >= 3, 60)
    after = [t for run, t in FLEET.update_ticks() if run != first_run]
    assert [t.offer for t in after] == [0] * len(after)  # nothing offered while paused
    assert (await handle.query(FirmwareRollout.progress)).status == "paused"
    held = FLEET.queued

    await handle.execute_update(FirmwareRollout.resume, RolloutDecision(actor=ADMIN))
    await eventually(lambda: asyncio.sleep(0, FLEET.queued), lambda q: q < held, 30)
    await handle.execute_update(FirmwareRollout.cancel, RolloutDecision(actor=ADMIN, reason="done"))
    done = await asyncio.wait_for(handle.result(), 60)
    assert done.status == "cancelled"


async def test_a_cancel_accepted_in_the_last_tick_stops_the_next_run(
    dev: WorkflowEnvironment, workers: None
) -> None:
    handle = await start(dev, history_limit=1)  # every run continues as new after one tick
    await eventually(lambda: asyncio.sleep(0, FLEET.queued), lambda q: q < DEVICES, 30)
    await during_a_tick(handle, "cancel")
    before = FLEET.queued
    ticks = len(FLEET.ticks)

    def next_updates() -> list[RolloutTick]:
        return [t for _, t in FLEET.ticks[ticks:] if t.kind == "update"]

    following = await eventually(lambda: asyncio.sleep(0, next_updates()), bool, 30)
    assert following[0].stopped and following[0].offer == 0  # the next run stops at once
    done = await asyncio.wait_for(handle.result(), 60)
    assert done.status == "cancelled" and done.reason == "cancelled; cancelled: test"
    assert all(t.offer == 0 for t in next_updates())  # no offer after the cancel
    assert FLEET.queued == before
    assert len({run for run, _ in FLEET.ticks}) >= 3


async def test_a_cancel_accepted_in_the_tick_that_finishes_the_last_wave_still_rolls_back(
    dev: WorkflowEnvironment, workers: None
) -> None:
    """The operator's cancel is accepted (200) while the last wave's final tick runs; that tick
    finds every device updated. The campaign ended `completed`, the accepted cancel ignored and
    nothing rolled back."""
    handle = await start(dev, history_limit=4000)
    await eventually(lambda: asyncio.sleep(0, FLEET.queued), lambda q: q < DEVICES, 30)
    FLEET.succeed_on_release = True
    accepted = await during_a_tick(handle, "cancel")
    assert accepted.status == "running"
    done = await asyncio.wait_for(handle.result(), 60)
    assert done.status == "cancelled" and done.reason == "cancelled; cancelled: test"
    assert FLEET.stopped  # the rollback was queued
