"""EventDelivery: the delivery loop of one webhook subscription, an entity workflow for the
subscription's life (id `deliveries-{tenant}-{subscription_id}`).

It calls `notification.deliver_pending` (on the `webhook` task queue, so slow receivers never
hold the notification service's own slots) until nothing is pending, then sleeps until a
`nudge` (sent when events are enqueued or a dead letter is redelivered) or a fallback
timer, and continues as new before its history grows large. One loop per subscription
is what keeps its deliveries in `seq` order; the activity's retry policy is the backoff
of a failing webhook, and the activity dead-letters an event after the subscription's
`max_attempts`. While the subscription's circuit is open (activities/circuit_breaker.py) the
activity posts nothing and the loop sleeps on a timer until the probe is due, nudges or not.
Deleting the subscription cancels the workflow, which then completes.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import TaskQueue
    from fleetflow.contracts.events import (
        EVENT_DELIVERY_WORKFLOW,
        MIN_BACKOFF_S,
        DeliverPending,
        DeliveryInput,
        DeliverySummary,
        delivery_workflow_id,
    )
    from fleetflow.interfaces import queue_of
    from fleetflow.interfaces.webhook import WebhookActivities

__all__ = ["EventDelivery", "delivery_workflow_id"]

# above the activity's own budget (60 s of deliveries plus one POST of at most 15 s)
DELIVER_START_TO_CLOSE = timedelta(minutes=2)
# the activity heartbeats before every POST: a dead worker is noticed within this
DELIVER_HEARTBEAT = timedelta(seconds=30)
# runs started before deliveries had their own queue keep theirs (the recorded commands)
WEBHOOK_QUEUE_PATCH = "deliveries-on-webhook-queue"
# runs that saw an open circuit before the loop knew circuits idled as usual (the recorded commands)
CIRCUIT_PATCH = "circuit-open-waits-for-probe"


@workflow.defn(name=EVENT_DELIVERY_WORKFLOW)
class EventDelivery:
    """The delivery loop; signal `nudge` wakes it."""

    @workflow.init
    def __init__(self, inp: DeliveryInput) -> None:
        self._subscription_id = inp.subscription_id
        self._nudged = False
        self._delivered, self._dead_lettered = inp.delivered, inp.dead_lettered

    @workflow.run
    async def run(self, inp: DeliveryInput) -> DeliverySummary:
        """Deliver until the subscription is gone; continue as new when the history is long."""
        # a failing webhook holds its queue (order) while Temporal retries with backoff;
        # there is no attempt limit here: the activity dead-letters by the delivery's own count,
        # so a database outage never turns into dead letters
        # runs from before the webhook queue deliver on the notification queue (recorded commands)
        queue, floor = TaskQueue.NOTIFICATION.value, 0.0
        if workflow.patched(WEBHOOK_QUEUE_PATCH):
            queue, floor = queue_of(WebhookActivities.deliver_pending), MIN_BACKOFF_S
        retry = RetryPolicy(
            initial_interval=timedelta(seconds=max(inp.backoff_s, floor)),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=max(inp.max_backoff_s, floor)),
            maximum_attempts=0,
        )
        try:
            while not self._history_full(inp):
                self._nudged = False  # a nudge from now on means "look again"
                progress = await workflow.execute_activity_method(
                    WebhookActivities.deliver_pending,
                    DeliverPending(subscription_id=inp.subscription_id),
                    task_queue=queue,
                    start_to_close_timeout=DELIVER_START_TO_CLOSE,
                    heartbeat_timeout=DELIVER_HEARTBEAT,
                    retry_policy=retry,
                )
                self._delivered += progress.delivered
                self._dead_lettered += progress.dead_lettered
                if progress.gone:
                    return self.summary()
                if progress.probe_in_s > 0 and workflow.patched(CIRCUIT_PATCH):
                    await self._await_probe(inp, progress.probe_in_s)
                elif not progress.more:
                    await self._idle(inp)
        except asyncio.CancelledError:
            return self.summary()  # the subscription was deleted
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            inp.model_copy(update={"delivered": self._delivered, "dead_lettered": self._dead_lettered})
        )

    async def _idle(self, inp: DeliveryInput) -> None:
        """Until nudged; the timer covers a lost nudge."""
        try:
            await workflow.wait_condition(lambda: self._nudged, timeout=timedelta(seconds=inp.idle_poll_s))
        except TimeoutError:
            pass

    async def _await_probe(self, inp: DeliveryInput, seconds: float) -> None:
        """Until the circuit's probe is due; nudges do not wake it (nothing may be posted before),
        a history grown long with them does (the loop continues as new, the circuit stays in
        its table)."""
        try:
            await workflow.wait_condition(lambda: self._history_full(inp), timeout=timedelta(seconds=seconds))
        except TimeoutError:
            pass

    def _history_full(self, inp: DeliveryInput) -> bool:
        info = workflow.info()
        return info.get_current_history_length() >= inp.history_limit or info.is_continue_as_new_suggested()

    @workflow.query
    def summary(self) -> DeliverySummary:
        """Deliveries made and events dead-lettered so far, across continue-as-new."""
        return DeliverySummary(
            subscription_id=self._subscription_id,
            delivered=self._delivered,
            dead_lettered=self._dead_lettered,
        )

    @workflow.signal
    def nudge(self) -> None:
        """Deliveries are waiting (sent with every enqueue; several nudges are one)."""
        self._nudged = True
