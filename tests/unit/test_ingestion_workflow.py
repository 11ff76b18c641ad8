"""TelemetryIngestion's isolation of poison pills and of windows too slow to store, with stub
activities: the workflow's logic alone (time-skipping server; the dev server where an
activity must really run out of time)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.telemetry import (
    POISON,
    BatchesQuarantined,
    ClaimWindow,
    Evaluated,
    IngestionInput,
    QuarantineBatches,
    Stored,
    StoreWindow,
    UnreadyDevices,
    Window,
    WindowRef,
    WindowSplit,
)
from workflows import telemetry_ingestion as ingestion
from workflows.telemetry_ingestion import TelemetryIngestion, store_timeout

CALLS: list[str] = []
# window id -> its batches (names); a batch named "bad" is a poison pill, "slow" makes any
# window of more than one batch outlast its time bound, "stuck" any window at all
WINDOWS: dict[str, list[str]] = {}
CLAIMS: list[list[str]] = []


def _window(window_id: str) -> Window:
    batches = WINDOWS[window_id]
    return Window(window_id=window_id, batches=len(batches), readings=len(batches), bytes=0)


# windows stored or quarantined, and windows whose events were recorded: the run ends when
# every window it took is recorded (its analysis may still be going on after the last claim)
FINISHED: list[int] = [0]
RECORDED: list[str] = []


@activity.defn(name="data.claim_window")
async def claim(request: ClaimWindow) -> Window:
    if not CLAIMS:
        for _ in range(300):
            if len(RECORDED) >= FINISHED[0]:
                break
            activity.heartbeat()
            await asyncio.sleep(0.1)
        raise ApplicationError("no more windows: end of the test", non_retryable=True)
    WINDOWS[request.window_id] = CLAIMS.pop(0)
    return _window(request.window_id)


@activity.defn(name="device.find_unready")
async def find_unready(ref: WindowRef) -> UnreadyDevices:
    return UnreadyDevices(count=0)


@activity.defn(name="data.store_window")
async def store(request: StoreWindow) -> Stored:
    batches = WINDOWS[request.window_id]
    CALLS.append(f"store {'+'.join(batches)}")
    if "bad" in batches:
        raise ApplicationError("TypeError: can't compare", type=POISON, non_retryable=True)
    if ("slow" in batches and len(batches) > 1) or "stuck" in batches:
        while True:  # heartbeating, so only the start-to-close bound ends it
            activity.heartbeat()
            await asyncio.sleep(0.1)
    FINISHED[0] += 1
    return Stored(window_id=request.window_id, stored=1000 * len(batches), quarantined=0)


@activity.defn(name="data.split_window")
async def split(ref: WindowRef) -> WindowSplit:
    batches = WINDOWS[ref.window_id]
    cut = (len(batches) + 1) // 2
    WINDOWS[f"{ref.window_id}/a"], WINDOWS[f"{ref.window_id}/b"] = batches[:cut], batches[cut:]
    return WindowSplit(parts=[_window(f"{ref.window_id}/a"), _window(f"{ref.window_id}/b")])


@activity.defn(name="data.quarantine_batches")
async def quarantine(request: QuarantineBatches) -> BatchesQuarantined:
    CALLS.append(f"quarantine {'+'.join(WINDOWS[request.window_id])}: {request.reason}")
    FINISHED[0] += 1
    return BatchesQuarantined(window_id=request.window_id, batches=1, readings=1000)


# windows analysed, in order, each with the stores done before its analysis ended; with
# HOLD_ANALYSIS the first window's analysis waits (a while) for the next window's store
# (for HOLD_UNTIL_CALLS stores, when set)
ANALYSED: list[tuple[str, list[str]]] = []
HOLD_ANALYSIS: list[bool] = [False]
HOLD_UNTIL_CALLS: list[int] = [2]


@activity.defn(name="analytics.evaluate")
async def evaluate(ref: WindowRef) -> Evaluated:
    if HOLD_ANALYSIS[0] and not ANALYSED:
        for _ in range(100):
            if len(CALLS) >= HOLD_UNTIL_CALLS[0]:
                break
            activity.heartbeat()
            await asyncio.sleep(0.1)
    ANALYSED.append(("+".join(WINDOWS[ref.window_id]), list(CALLS)))
    return Evaluated()


@activity.defn(name="notification.record_window_events")
async def record(ref: WindowRef) -> int:
    RECORDED.append(ref.window_id)
    return 0


async def run_windows(
    env: WorkflowEnvironment,
    *windows: list[str],
    runner: WorkflowRunner | None = None,
    windows_per_run: int = 200,
) -> list[str]:
    """Run a shard over the given windows (each a list of batch names); what it stored and
    quarantined, in order."""
    CALLS.clear()
    ANALYSED.clear()
    RECORDED.clear()
    FINISHED[0] = 0
    CLAIMS[:] = [list(w) for w in windows]
    queues: dict[TaskQueue, list[Any]] = {
        TaskQueue.DATA: [claim, store, split, quarantine],
        TaskQueue.DEVICE: [find_unready],
        TaskQueue.ANALYTICS: [evaluate],
        TaskQueue.NOTIFICATION: [record],
    }
    workers = [Worker(env.client, task_queue=q.value, activities=a) for q, a in queues.items()]
    orchestration = TaskQueue.ORCHESTRATION.value
    workers.append(
        Worker(
            env.client,
            task_queue=orchestration,
            workflows=[TelemetryIngestion],
            workflow_runner=runner or SandboxedWorkflowRunner(),
        )
    )
    async with workers[0], workers[1], workers[2], workers[3], workers[4]:
        with pytest.raises(WorkflowFailureError):  # the stub's claim ends the run
            await env.client.execute_workflow(
                TelemetryIngestion.run,
                IngestionInput(shard=0, shards=1, windows_per_run=windows_per_run),
                id=f"ingest-test-{uuid.uuid4()}",
                task_queue=TaskQueue.ORCHESTRATION.value,
            )
    return list(CALLS)


async def test_a_poison_batch_is_split_off_and_quarantined_and_the_rest_is_stored(
    env: WorkflowEnvironment,
) -> None:
    calls = await run_windows(env, ["b1", "b2", "bad", "b4"], ["b5"])
    assert calls == [
        "store b1+b2+bad+b4",
        "store b1+b2",
        "store bad+b4",
        "store bad",
        "quarantine bad: TypeError: can't compare",
        "store b4",
        "store b5",
    ]


async def test_a_window_that_outgrows_its_time_bound_is_split_until_it_fits(
    dev: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a one-second bound, so the attempts really run out of time (unsandboxed: the patched
    # module is the one the workflow runs)
    monkeypatch.setattr(ingestion, "STEP_TIMEOUT", timedelta(seconds=1))
    monkeypatch.setattr(ingestion, "STORE_PER_1000_READINGS", timedelta(0))
    calls = await run_windows(dev, ["slow", "b2", "b3"], runner=UnsandboxedWorkflowRunner())
    assert calls[0] == "store slow+b2+b3"
    assert [c for c in calls if c in ("store slow", "store b2", "store b3")] == [
        "store slow",
        "store b2",
        "store b3",
    ]


def test_the_store_bound_scales_with_the_window() -> None:
    small = store_timeout(Window(window_id="w", batches=1, readings=10, bytes=1000))
    large = store_timeout(Window(window_id="w", batches=100, readings=500_000, bytes=64 * 2**20))
    assert large > small * 10


async def test_a_lone_batch_that_keeps_outliving_its_bound_is_quarantined_and_the_shard_goes_on(
    dev: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "stuck" outlives any bound, alone too: before, its shard retried it for ever and the
    # batches behind it (other tenants' as well) were never stored
    monkeypatch.setattr(ingestion, "STEP_TIMEOUT", timedelta(seconds=1))
    monkeypatch.setattr(ingestion, "STORE_PER_1000_READINGS", timedelta(0))
    calls = await asyncio.wait_for(  # only against a hang
        run_windows(dev, ["stuck"], ["b2"], runner=UnsandboxedWorkflowRunner()), 300
    )
    stores = [c for c in calls if c == "store stuck"]
    assert len(stores) == ingestion.STORE_ATTEMPTS * ingestion.LONE_STORE_ROUNDS
    assert calls[len(stores)].startswith("quarantine stuck: store timed out")
    assert calls[len(stores) + 1 :] == ["store b2"]


async def test_the_next_window_is_stored_while_the_last_one_is_analysed_in_order(
    env: WorkflowEnvironment,
) -> None:
    # an alert waits for the store in progress, not for the analysis of the window before its
    # own; the analyses still run one at a time, in window order
    HOLD_ANALYSIS[0] = True
    try:
        await run_windows(env, ["b1"], ["b2"], ["b3"])
    finally:
        HOLD_ANALYSIS[0] = False
    assert [name for name, _ in ANALYSED] == ["b1", "b2", "b3"]
    first_done_after = ANALYSED[0][1]
    assert first_done_after[:2] == ["store b1", "store b2"]


async def test_every_window_is_analysed_before_the_shard_continues_as_new(
    env: WorkflowEnvironment,
) -> None:
    # the last window of a run is stored, then the run ends: its analysis (still going on
    # beside the next claim) must not be left behind by continue-as-new
    await run_windows(env, ["b1"], ["b2"], ["b3"], windows_per_run=2)
    assert [name for name, _ in ANALYSED] == ["b1", "b2", "b3"]


async def test_an_analysis_that_lags_holds_up_the_window_after_next(
    env: WorkflowEnvironment,
) -> None:
    # one analysis beside the next window's claim and store, not a backlog: while analytics is
    # slow or away the shard waits with its batches unclaimed (the next window takes them all)
    # instead of storing window after window whose alerts all wait on the lagging analysis
    HOLD_ANALYSIS[0], HOLD_UNTIL_CALLS[0] = True, 4
    try:
        await run_windows(env, ["b1"], ["b2"], ["b3"], ["b4"], ["b5"])
    finally:
        HOLD_ANALYSIS[0], HOLD_UNTIL_CALLS[0] = False, 2
    assert [name for name, _ in ANALYSED] == ["b1", "b2", "b3", "b4", "b5"]
    assert ANALYSED[0][1] == ["store b1", "store b2"]


async def test_a_poison_window_waits_for_the_analysis_before_it_then_is_split_in_order(
    env: WorkflowEnvironment,
) -> None:
    # the first window's analysis is still going on when the next window's store fails as
    # poison: the halves are stored and analysed after it, the poison batch set aside
    HOLD_ANALYSIS[0] = True
    try:
        calls = await run_windows(env, ["b1"], ["b2", "bad"], ["b4"])
    finally:
        HOLD_ANALYSIS[0] = False
    assert [name for name, _ in ANALYSED] == ["b1", "b2", "b4"]
    assert ANALYSED[0][1] == ["store b1", "store b2+bad"]
    assert [c.split(":")[0] for c in calls] == [
        "store b1",
        "store b2+bad",
        "store b2",
        "store bad",
        "quarantine bad",
        "store b4",
    ]
