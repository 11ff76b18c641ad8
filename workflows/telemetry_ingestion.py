"""TelemetryIngestion: drains one shard of acknowledged batches, a window at a time
(id `ingest-{shard}`): claim → device check → store → analyse → record the window's events.
The device check is skipped when the claim saw every device of the window allowed to send.
A stored window is analysed and its events recorded while the next one is claimed and
stored; analyses run one at a time, in window order, and all are done before continue-as-new.
At a trickle a window waits up to IDLE_FILL_MS to fill, unless it holds a reading a rate or
zscore rule watches: an alert may wait on that one, so it goes at once (a threshold rule's
alert is raised as its reading is accepted, api/early_alerts.py).

One workflow per shard runs for ever, continuing as new every few hundred windows (or
when the server suggests it). A window is capped in readings and bytes and the workflow
carries only its id and counts: the unready devices, the alerts and the events live in
tables keyed by the window id, so no event of the history grows with the traffic.

A step that fails the same way on every retry (`PoisonWindow`, see activities/poison.py)
splits its window in two and processes each half; a lone batch that still fails is
quarantined with the error as its reason, and the shard goes on. A store that outgrows
its time bound (which scales with the window's bytes) is split the same way; a lone batch
that keeps outliving its bound, doubled each round, is quarantined after LONE_STORE_ROUNDS
rounds (a timeout is its reason) instead of holding up its shard for ever.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError, TimeoutType
from temporalio.types import MethodAsyncSingleParam

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import DomainEvent
    from fleetflow.contracts.events import EventBatch
    from fleetflow.contracts.telemetry import (
        IDLE_FILL_MS,
        POISON,
        TELEMETRY_STORED,
        ClaimWindow,
        IngestionInput,
        IngestionProgress,
        QuarantineBatches,
        Stored,
        StoreWindow,
        Window,
        WindowRef,
        ingestion_id,
    )
    from fleetflow.interfaces.analytics import AnalyticsActivities
    from fleetflow.interfaces.data import DataActivities
    from fleetflow.interfaces.device import DeviceActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls

P = TypeVar("P")
R = TypeVar("R")

# storage must not give up: an acknowledged batch is retried until it is stored
RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
)
# short: a killed worker's activity is retried elsewhere after this long (store_window heartbeats)
STEP_TIMEOUT = timedelta(seconds=30)
# storing heartbeats: the attempt of a killed data worker is retried after this, not STEP_TIMEOUT
STORE_HEARTBEAT = timedelta(seconds=10)
# a store's start-to-close grows with its window (generous: the heartbeat catches a dead worker)
STORE_PER_MIB = timedelta(seconds=10)
STORE_PER_1000_READINGS = timedelta(seconds=1)
# attempts of a store before the workflow looks at why it fails (a timeout splits the window)
STORE_ATTEMPTS = 4
# patch: window lists in tables, counts in history, poison pills isolated
WINDOW_TABLES = "window-tables"
# patch: a lone batch that keeps outliving its (doubling) store bound is quarantined, not retried
# for ever while its shard, and every tenant on it, waits
LONE_STORE_TIMEOUT = "lone-store-timeout"
# patch: a window waits up to IDLE_FILL_MS to fill at a trickle (fewer windows, fewer tasks per
# reading) unless it holds a reading a rule watches: that one is processed at once (alerts;
# which rules is the claim's to say, activities/analytics_facade.py watches_any)
ADAPTIVE_FILL = "adaptive-fill"
# patch: a window whose claim saw every device of it allowed to send skips find_unready (the
# store has nothing to quarantine for it): two tasks fewer a window
SKIP_READY_CHECK = "skip-ready-check"
# patch: a stored window is analysed and its events recorded while the next window is claimed
# and stored (analyses still one at a time, in window order): an alert waits for the store in
# progress, not for the analysis and recording of the window before its own
PIPELINED = "pipelined-analysis"
# patch: at most one analysis beside the next window's claim and store: a window stored while
# the analysis before it still runs waits for it before the next claim, so a slow or absent
# analytics service holds the shard up (its batches wait unclaimed, the next window takes them
# all) instead of a backlog of up to windows_per_run stored windows whose alerts all wait
PIPELINE_DEPTH_ONE = "pipelined-analysis-depth-one"
# rounds of STORE_ATTEMPTS a lone batch gets, its bound doubling each round, before quarantine
LONE_STORE_ROUNDS = 3

__all__ = ["TelemetryIngestion", "ingestion_id"]


def store_timeout(window: Window, factor: int = 1) -> timedelta:
    """start-to-close of storing window: STEP_TIMEOUT plus a share per MiB and per reading
    (times factor: a lone batch's bound doubles each round it runs out of time)."""
    by_size = STORE_PER_MIB * (window.bytes / 2**20)
    return (STEP_TIMEOUT + by_size + STORE_PER_1000_READINGS * (window.readings / 1000)) * factor


def poison_reason(err: ActivityError) -> str | None:
    """The error of a step that failed the same way on every retry; None for any other failure."""
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type == POISON:
        return cause.message
    return None


def timed_out(err: ActivityError) -> bool:
    """True when the step ran out of its start-to-close time (not a worker that vanished)."""
    cause = err.cause
    return isinstance(cause, TimeoutError) and cause.type == TimeoutType.START_TO_CLOSE


@workflow.defn
class TelemetryIngestion:
    """A shard's durable consumer; query `progress`."""

    def __init__(self) -> None:
        self._progress: IngestionProgress | None = None
        self._tail: asyncio.Task[None] | None = None  # the last stored window's analysis

    @workflow.run
    async def run(self, inp: IngestionInput) -> None:
        """Process windows until it is time to continue as new."""
        self._progress = IngestionProgress(
            shard=inp.shard,
            windows=inp.windows_done,
            readings=inp.readings_done,
            last_window=None,
            last_window_readings=0,
            batches_quarantined=inp.batches_quarantined,
        )
        run_id = workflow.info().run_id
        for i in range(inp.windows_per_run):
            window_id = f"{workflow.info().workflow_id}/{run_id}/{i}"
            claim = ClaimWindow(
                window_id=window_id,
                shard=inp.shard,
                shards=inp.shards,
                max_readings=inp.max_window_readings,
                max_wait_ms=inp.max_wait_ms,
                max_bytes=inp.max_window_bytes,
            )
            if workflow.patched(ADAPTIVE_FILL):
                claim = claim.model_copy(update={"fill_ms": IDLE_FILL_MS, "watched_fill_ms": 0})
            window = await calls.execute(
                DataActivities.claim_window,
                claim,
                start_to_close_timeout=timedelta(milliseconds=inp.max_wait_ms) + timedelta(seconds=30),
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=RETRY_FOREVER,
            )
            if window.batches:
                if not workflow.patched(WINDOW_TABLES):
                    await self._process(window)
                elif workflow.patched(PIPELINED):
                    stored = await self._checked_and_stored(window)
                    if stored is not None:
                        if workflow.patched(PIPELINE_DEPTH_ONE):
                            await self._drain()
                        self._tail = asyncio.create_task(self._analyse_after(self._tail, window, stored))
                else:
                    await self._window(window)
            if workflow.info().is_continue_as_new_suggested():
                break
        await self._drain()  # every window analysed and counted before the state moves on
        workflow.continue_as_new(
            inp.model_copy(
                update={
                    "windows_done": self._progress.windows,
                    "readings_done": self._progress.readings,
                    "batches_quarantined": self._progress.batches_quarantined,
                }
            )
        )

    async def _window(self, window: Window) -> None:
        """Check, store, analyse a window and record its events; isolate a poison pill in it."""
        stored = await self._checked_and_stored(window)
        if stored is not None:
            await self._analyse(window, stored)

    async def _checked_and_stored(self, window: Window) -> Stored | None:
        """Check the window's devices and store it; None when it was isolated instead (split,
        each part processed whole, or its lone batch quarantined)."""
        ref = WindowRef(window_id=window.window_id, counts_only=True)
        try:
            if not (window.unready == 0 and workflow.patched(SKIP_READY_CHECK)):
                await self._step(DeviceActivities.find_unready, ref)
            stored: Stored | str | None = await self._store(window)
        except ActivityError as err:
            reason = poison_reason(err)
            if reason is None:
                raise
            await self._isolate(window, reason)
            return None
        if stored is None:  # too slow as a whole: split, each half with its own time bound
            await self._isolate(window, None)
            return None
        if isinstance(stored, str):  # a lone batch too slow whatever its bound: set aside
            await self._isolate(window, stored)
            return None
        return stored

    async def _analyse_after(
        self, previous: asyncio.Task[None] | None, window: Window, stored: Stored
    ) -> None:
        """Analyse the stored window once the window before it is analysed (series state and
        alerts move in window order)."""
        if previous is not None:
            await previous
        await self._analyse(window, stored)

    async def _drain(self) -> None:
        """Wait for the analysis of the last stored window, if any is going on."""
        if self._tail is not None:
            await self._tail

    async def _analyse(self, window: Window, stored: Stored) -> None:
        """Evaluate the rules over the stored window and record its events; count it."""
        ref = WindowRef(window_id=window.window_id, counts_only=True)
        try:
            await self._step(AnalyticsActivities.evaluate, ref)
        except ActivityError as err:
            # the readings are stored; the window goes without analysis rather than stop the shard
            if poison_reason(err) is None:
                raise
            workflow.logger.warning("window %s not analysed: %s", window.window_id, poison_reason(err))
        await self._record(window.window_id)
        assert self._progress is not None
        self._progress.windows += 1
        self._progress.readings += stored.stored
        self._progress.last_window, self._progress.last_window_readings = window.window_id, window.readings

    async def _store(self, window: Window) -> Stored | str | None:
        """Store the window; None when it keeps running out of time (the caller splits it); for
        a lone batch that does, the reason to quarantine it (after LONE_STORE_ROUNDS rounds)."""
        request = StoreWindow(window_id=window.window_id, counts_only=True)
        rounds = 0
        while True:
            factor = 2**rounds if rounds and workflow.patched(LONE_STORE_TIMEOUT) else 1
            try:
                return await calls.execute(
                    DataActivities.store_window,
                    request,
                    start_to_close_timeout=store_timeout(window, factor),
                    heartbeat_timeout=STORE_HEARTBEAT,
                    retry_policy=RetryPolicy(
                        initial_interval=RETRY_FOREVER.initial_interval,
                        backoff_coefficient=2.0,
                        maximum_interval=RETRY_FOREVER.maximum_interval,
                        maximum_attempts=STORE_ATTEMPTS,
                    ),
                )
            except ActivityError as err:
                cause = err.cause
                final = isinstance(cause, ApplicationError) and cause.non_retryable
                if final or poison_reason(err) is not None:
                    raise
                if timed_out(err) and window.batches > 1:
                    return None
                if timed_out(err) and workflow.patched(LONE_STORE_TIMEOUT):
                    rounds += 1
                    if rounds >= LONE_STORE_ROUNDS:
                        bound = store_timeout(window, factor).total_seconds()
                        return f"store timed out {rounds * STORE_ATTEMPTS} times (last bound {bound:g} s)"
                    continue  # at once, with twice the bound: the attempts took their time
            # anything else (the database away, workers killed): try again, for ever
            await workflow.sleep(RETRY_FOREVER.maximum_interval or STEP_TIMEOUT)

    async def _isolate(self, window: Window, reason: str | None) -> None:
        """Split window in two and process each half; quarantine a lone batch that is poison."""
        await self._drain()  # the halves are analysed after the windows stored before them
        if window.batches <= 1 and reason is not None:
            quarantined = await self._step(
                DataActivities.quarantine_batches,
                QuarantineBatches(window_id=window.window_id, reason=reason),
            )
            await self._record(window.window_id)
            assert self._progress is not None
            self._progress.batches_quarantined += quarantined.batches
            return
        split = await self._step(DataActivities.split_window, WindowRef(window_id=window.window_id))
        for part in split.parts:
            await self._window(part)

    async def _record(self, window_id: str) -> None:
        """Record the window's events; events that cannot be recorded do not stop the shard."""
        try:
            await self._step(
                NotificationActivities.record_window_events,
                WindowRef(window_id=window_id),
                heartbeat_timeout=STORE_HEARTBEAT,
            )
        except ActivityError as err:
            if poison_reason(err) is None:
                raise
            workflow.logger.warning("events of window %s not recorded: %s", window_id, poison_reason(err))

    async def _process(self, window: Window) -> None:
        """The window as runs recorded before WINDOW_TABLES processed it (replay only)."""
        ref = WindowRef(window_id=window.window_id)
        unready = await self._step(DeviceActivities.find_unready, ref)
        stored = await self._step(
            DataActivities.store_window,
            StoreWindow(window_id=window.window_id, quarantine=unready.devices),
            heartbeat_timeout=STORE_HEARTBEAT,
        )
        now = workflow.now()
        events = [
            DomainEvent(
                event_id=f"{window.window_id}/{tenant}/{TELEMETRY_STORED}",
                tenant=tenant,
                type=TELEMETRY_STORED,
                occurred_at=now,
                actor="ingestion",
                source_workflow=workflow.info().workflow_id,
                data={"window_id": window.window_id, **counts},
            )
            for tenant, counts in sorted(stored.by_tenant.items())
        ]
        evaluated = await self._step(AnalyticsActivities.evaluate, ref)
        events.extend(evaluated.events)
        for start in range(0, len(events), 1000):
            await self._step(
                NotificationActivities.record_events, EventBatch(events=events[start : start + 1000])
            )
        assert self._progress is not None
        self._progress.windows += 1
        self._progress.readings += stored.stored
        self._progress.last_window, self._progress.last_window_readings = window.window_id, window.readings

    async def _step(
        self,
        activity: MethodAsyncSingleParam[Any, P, R],
        arg: P,
        heartbeat_timeout: timedelta | None = None,
    ) -> R:
        """Run one step of the window on its service's queue, retried for ever."""
        return await calls.execute(
            activity,
            arg,
            start_to_close_timeout=STEP_TIMEOUT,
            heartbeat_timeout=heartbeat_timeout,
            retry_policy=RETRY_FOREVER,
        )

    @workflow.query
    def progress(self) -> IngestionProgress | None:
        """Windows and readings processed by this shard, across its runs."""
        return self._progress
