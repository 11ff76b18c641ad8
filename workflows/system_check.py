"""SystemCheck: one `ping` activity on every service's task queue, in parallel."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import SERVICE_QUEUES, TaskQueue
    from fleetflow.contracts.system import (
        ProbeRequest,
        ServiceProbe,
        SystemCheckRequest,
        SystemCheckResult,
    )
    from fleetflow.interfaces import INTERFACES


WEBHOOK_PROBE_PATCH = "probe-webhook-queue"
# every service answers the same probe, each on its own queue
PINGS = {i.queue: i.ping for i in INTERFACES}


@workflow.defn
class SystemCheck:
    """Reports, per service, whether it answered within the timeout; never hangs."""

    @workflow.run
    async def run(self, request: SystemCheckRequest) -> SystemCheckResult:
        """Probe every service queue at once."""
        queues = SERVICE_QUEUES
        if not workflow.patched(WEBHOOK_PROBE_PATCH):  # checks started before the webhook queue
            queues = tuple(q for q in SERVICE_QUEUES if q is not TaskQueue.WEBHOOK)
        probes = await asyncio.gather(*(self._probe(q, request) for q in queues))
        return SystemCheckResult(services=list(probes))

    async def _probe(self, queue: TaskQueue, request: SystemCheckRequest) -> ServiceProbe:
        started = workflow.now()
        try:
            result = await workflow.execute_activity_method(
                PINGS[queue],
                ProbeRequest(hold_ms=request.hold_ms),
                task_queue=queue.value,
                # the overall deadline names a missing service; heartbeats notice a dead worker
                schedule_to_close_timeout=timedelta(seconds=request.timeout_s),
                start_to_close_timeout=timedelta(seconds=request.timeout_s),
                heartbeat_timeout=timedelta(seconds=2),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=200),
                    maximum_interval=timedelta(seconds=1),
                ),
            )
        except ActivityError as exc:
            cause = exc.cause
            reason = str(cause) if cause is not None else str(exc)
            return ServiceProbe(service=queue.value, answered=False, error=f"no answer: {reason}")
        latency = (workflow.now() - started).total_seconds() * 1000
        return ServiceProbe(
            service=queue.value,
            answered=True,
            latency_ms=round(latency, 1),
            worker=result.worker,
            database_ok=result.database_ok,
            error=result.database_error,
        )
