"""FirmwareRollout: a campaign (id `rollout-{tenant}-{campaign_id}`) of a firmware update, or of
a command (`request.command`: each device's job is that command, answered through the device's
command route, and nothing is rolled back).

Canary wave first, then waves that grow, at a bounded rate; each wave must reach its
success percentage before the next. Per-device job state lives in the device service's
tables; the workflow drives it in batched ticks, so history stays small. On abort or
cancel, nothing new is offered, queued jobs are cancelled and every device that took the
new firmware is rolled back (saga compensation), each rollback tracked to its end; devices
that were installing when the campaign stopped are followed until they finish, and each that
succeeds late is rolled back too. Explicit target lists travel as a claim check (their id and
size), and every piece of state, the operator's pause and cancel included, goes through
continue-as-new.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from temporalio import workflow
from temporalio.exceptions import ApplicationError
from temporalio.types import MethodAsyncSingleParam

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.commands import DEVICE_COMMAND_FINISHED
    from fleetflow.contracts.common import DomainEvent, tenant_scoped_id
    from fleetflow.contracts.events import EventBatch
    from fleetflow.contracts.rollouts import (
        ACTIVE_STATES,
        FINAL_STATES,
        FIRMWARE_ROLLED_BACK,
        FIRMWARE_UPDATE_FAILED,
        FIRMWARE_UPDATED,
        JobKind,
        RolloutDecision,
        RolloutInput,
        RolloutProgress,
        RolloutTick,
        StopRollout,
        TickResult,
    )
    from fleetflow.interfaces.device import DeviceActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls
    from workflows.options import STEP_RETRY

P = TypeVar("P")
R = TypeVar("R")

TICK = timedelta(milliseconds=250)
ADMIN_SCOPE = "rollouts:admin"
# runs that completed with a cancel accepted in their last tick replay as they were
CANCEL_AFTER_LAST_WAVE = "cancel-after-last-wave"
# a tick returns up to FINISHED_PER_TICK finished jobs, whose events are recorded EVENTS_PER_RECORD
# an activity, at once (runs started before: 200 a tick, one activity): fewer ticks per device
WIDE_TICKS_PATCH = "rollout-wide-ticks"
FINISHED_PER_TICK = 1000
EVENTS_PER_RECORD = 200


def rollout_id(tenant: str, campaign_id: str) -> str:
    """The business id of a campaign's workflow."""
    return tenant_scoped_id("rollout", tenant, campaign_id)


@workflow.defn
class FirmwareRollout:
    """A campaign; query `progress`, updates `pause`, `resume`, `cancel`."""

    @workflow.init
    def __init__(self, inp: RolloutInput) -> None:
        self._inp = inp
        self._p = inp.state or RolloutProgress(
            campaign_id=inp.request.campaign_id, status="planning", wave=0, waves=[], total=0, counts={}
        )
        # an operator's pause and cancel are state too: they go through continue-as-new
        self._paused = inp.paused
        self._stop: str | None = inp.stop  # the reason, once an operator cancels

    @workflow.run
    async def run(self, inp: RolloutInput) -> RolloutProgress:
        """Plan, roll out wave by wave, and roll back if the campaign stops early."""
        p = self._p
        if p.status == "planning":
            plan = await self._act(DeviceActivities.plan_rollout, inp)
            p.waves, p.total, p.status = plan.waves, plan.total, "running"
        if p.status in ("running", "paused"):
            await self._roll_out()
        if p.status in ("aborting", "cancelling", "rolling_back"):
            await self._roll_back()
        return p

    async def _roll_out(self) -> None:
        p, policy = self._p, self._inp.request.policy
        while p.wave < len(p.waves):
            if self._stop is not None:
                self._begin_stop("cancelling", f"cancelled: {self._stop}")
                return
            paused = self._paused
            offer = 0
            if paused:  # still ticking: counts stay current and silent devices still expire
                p.status, p.last_tick = "paused", None
            else:
                p.status = "running"
                now = workflow.now()
                if p.last_tick is not None:  # pace: rate_per_minute, carried as a fractional budget
                    p.offered_budget += (now - p.last_tick).total_seconds() * policy.rate_per_minute / 60
                else:
                    p.offered_budget = max(1.0, policy.rate_per_minute * TICK.total_seconds() / 60)
                p.last_tick = now
                offer = int(p.offered_budget)
            # new runs pace themselves inside the tick activity (sub-second timers fire late)
            waits = workflow.patched("tick-waits-in-activity")
            tick: TickResult = await self._tick(
                "update", offer, p.finished_seq, abort=True, wait=TICK if waits and not paused else None
            )
            p.offered_budget -= tick.offered
            if tick.offered:
                p.last_offer_at = workflow.now()
            p.counts = tick.counts
            # stop before recording the finished devices' events: the stop is what must be fast
            if tick.abort and workflow.patched("abort-before-record"):
                return self._abort(tick)
            p.finished_seq = await self._record(tick, "update", p.finished_seq)
            if tick.abort:
                return self._abort(tick)
            wave_size = p.waves[p.wave]
            done = sum(tick.wave_counts.get(s, 0) for s in FINAL_STATES)
            if done >= wave_size and not paused:
                ok = tick.wave_counts.get("succeeded", 0)
                if ok * 100 < policy.wave_success_percent * wave_size:
                    self._begin_stop("aborting", f"aborted: wave {p.wave} reached {ok} of {wave_size}")
                    return
                p.wave += 1
                continue
            if self._history_full():
                await self._continue_as_new()
            if paused or not waits:
                await self._nap(paused)
        # a cancel accepted while the last wave's final tick ran is honoured, not dropped
        if self._stop is not None and workflow.patched(CANCEL_AFTER_LAST_WAVE):
            self._begin_stop("cancelling", f"cancelled: {self._stop}")
            return
        p.status = "completed"

    def _abort(self, tick: TickResult) -> None:
        """The tick found the abort threshold crossed and offered nothing: no offer follows."""
        self._p.abort_crossed_at = tick.abort_seen_at
        self._begin_stop("aborting", "aborted: failures over the threshold")

    async def _nap(self, paused: bool) -> None:
        """Wait one tick (longer while paused), or less if an operator pauses, resumes or cancels."""
        try:
            await workflow.wait_condition(
                lambda: self._stop is not None or self._paused != paused, timeout=TICK * (4 if paused else 1)
            )
        except TimeoutError:
            pass

    def _begin_stop(self, status: Any, reason: str) -> None:
        self._p.status, self._p.reason = status, reason

    async def _roll_back(self) -> None:
        p = self._p
        if p.status != "rolling_back":
            await self._act(
                DeviceActivities.stop_rollout,
                StopRollout(tenant=self._inp.tenant, campaign_id=p.campaign_id, rollback=True),
            )
            final = "cancelled" if p.status == "cancelling" else "aborted"
            p.status, p.reason = "rolling_back", f"{final}; {p.reason}"
            # the counts after the stop
            stopped = await self._tick("update", 0, p.finished_seq, abort=False, stopped=True)
            p.counts = stopped.counts
            p.finished_seq = await self._record(stopped, "update", p.finished_seq)
        # new runs follow the update jobs still in progress at the stop: a late success is
        # recorded and rolled back, and the campaign ends once none is left in progress
        following = workflow.patched("rollback-follows-updates")
        while True:
            updates_settled = True
            if following:
                late = await self._tick("update", 0, p.finished_seq, abort=False, stopped=True)
                p.counts = late.counts
                p.finished_seq = await self._record(late, "update", p.finished_seq)
                updates_settled = not any(state in ACTIVE_STATES for state in late.counts)
            tick = await self._tick("rollback", 1_000_000, p.rollback_seq, abort=False)
            p.rollback_counts = tick.counts
            p.rollback_seq = await self._record(tick, "rollback", p.rollback_seq)
            if updates_settled and all(state in FINAL_STATES for state in tick.counts):
                break
            if self._history_full():
                await self._continue_as_new()
            await workflow.sleep(TICK)
        p.status = "cancelled" if (p.reason or "").startswith("cancelled") else "aborted"

    async def _tick(
        self,
        kind: JobKind,
        offer: int,
        after: int,
        abort: bool,
        wait: timedelta | None = None,
        stopped: bool = False,
    ) -> TickResult:
        policy = self._inp.request.policy
        wide = workflow.patched(WIDE_TICKS_PATCH)
        return await self._act(
            DeviceActivities.rollout_tick,
            RolloutTick(
                tenant=self._inp.tenant,
                campaign_id=self._p.campaign_id,
                kind=kind,
                wave=self._p.wave,
                offer=offer,
                device_timeout_s=policy.device_timeout_s,
                retry_limit=policy.retry_limit,
                finished_after=after,
                abort_failure_percent=policy.abort_failure_percent if abort else None,
                abort_min_finished=policy.abort_min_finished,
                wait_ms=int(wait.total_seconds() * 1000) if wait else 0,
                stopped=stopped,
                finished_limit=FINISHED_PER_TICK if wide else None,
            ),
        )

    async def _record(self, tick: TickResult, kind: JobKind, seq: int) -> int:
        """Record the newly finished devices' events; returns the new cursor."""
        # the cursor moves past every row the tick read, cancelled ones included (results
        # recorded before `finished_through` existed move it to the last event only)
        through = tick.finished_through
        if through is None:
            through = tick.finished[-1].seq if tick.finished else seq
        if not tick.finished:
            return max(seq, through)
        events = []
        command = self._inp.request.command  # a command campaign (new runs only: None before)
        for job in tick.finished:
            if command is not None:
                name = DEVICE_COMMAND_FINISHED
            elif kind == "rollback":
                name = FIRMWARE_ROLLED_BACK if job.state == "succeeded" else FIRMWARE_UPDATE_FAILED
            else:
                name = FIRMWARE_UPDATED if job.state == "succeeded" else FIRMWARE_UPDATE_FAILED
            events.append(
                DomainEvent(
                    event_id=f"{workflow.info().workflow_id}/{kind}/{job.device_id}/{job.seq}",
                    tenant=self._inp.tenant,
                    device_id=job.device_id,
                    type=name,
                    occurred_at=workflow.now(),
                    actor=self._inp.actor.subject,
                    source_workflow=workflow.info().workflow_id,
                    data={"campaign_id": self._p.campaign_id, "version": job.version, "state": job.state},
                )
            )
        # one activity per EVENTS_PER_RECORD events, all at once (a tick of runs started before
        # WIDE_TICKS_PATCH returns at most 200: one activity, as they recorded it)
        await asyncio.gather(
            *(
                self._act(
                    NotificationActivities.record_events, EventBatch(events=events[i : i + EVENTS_PER_RECORD])
                )
                for i in range(0, len(events), EVENTS_PER_RECORD)
            )
        )
        return max(seq, through)

    async def _act(self, activity: MethodAsyncSingleParam[Any, P, R], arg: P) -> R:
        """Run one step of the campaign on its service's queue."""
        return await calls.execute(
            activity,
            arg,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=STEP_RETRY,
        )

    def _history_full(self) -> bool:
        info = workflow.info()
        limit = self._inp.history_limit
        return info.get_current_history_length() > limit or info.is_continue_as_new_suggested()

    async def _continue_as_new(self) -> NoReturn:
        """Continue as new with all of the state: progress, the pause and the cancel request."""
        if not workflow.all_handlers_finished():  # an update in progress finishes in this run
            await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            self._inp.model_copy(update={"state": self._p, "paused": self._paused, "stop": self._stop})
        )

    # --- operators ----------------------------------------------------------------

    @workflow.query
    def progress(self) -> RolloutProgress:
        """Counts per state, the current wave, and why it stopped if it did."""
        return self._p

    @workflow.update
    def pause(self, decision: RolloutDecision) -> RolloutProgress:
        """No new device is offered the update until `resume`."""
        self._paused = True
        self._p.status = "paused"
        return self._p

    @workflow.update
    def resume(self, decision: RolloutDecision) -> RolloutProgress:
        """Go on offering after a pause."""
        self._paused = False
        self._p.status, self._p.last_tick = "running", None  # no burst for the time paused
        return self._p

    @workflow.update
    def cancel(self, decision: RolloutDecision) -> RolloutProgress:
        """Stop the campaign and roll back every device that took the new firmware."""
        self._stop = decision.reason or f"by {decision.actor.subject}"
        return self._p

    @pause.validator
    def _check_pause(self, decision: RolloutDecision) -> None:
        self._check(decision, ("running",))

    @resume.validator
    def _check_resume(self, decision: RolloutDecision) -> None:
        self._check(decision, ("paused",))

    @cancel.validator
    def _check_cancel(self, decision: RolloutDecision) -> None:
        self._check(decision, ("planning", "running", "paused"))

    def _check(self, decision: RolloutDecision, allowed: tuple[str, ...]) -> None:
        if decision.actor.tenant != self._inp.tenant or not decision.actor.can(ADMIN_SCOPE):
            raise ApplicationError(f"the {ADMIN_SCOPE} scope of this tenant is required", type="Forbidden")
        if self._p.status not in allowed or self._stop is not None:
            raise ApplicationError(f"the campaign is {self._p.status}", type="BadState")
