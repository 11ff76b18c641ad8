"""Retention (schedule `retention`, hourly): each service cleans its own tables.

The data service drops the daily partitions of raw readings past every tenant's retention and
ages out rollups, stored batches and window bookkeeping; the notification service ages out
delivered events and dead letters. Both steps are idempotent, so a retried or overlapping run
does no harm; only counts travel through history. `now` in the input moves the retention clock
(benchmarks and tests); a scheduled run uses the workflow's time.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.retention import RetentionRequest, RetentionResult
    from fleetflow.interfaces.data import DataActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls

STEP_TIMEOUT = timedelta(minutes=30)
STEP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=5))


@workflow.defn
class Retention:
    """Applies every retention once."""

    @workflow.run
    async def run(self, request: RetentionRequest) -> RetentionResult:
        """Run the data step, then the notification step, at `request.now` or now."""
        step = RetentionRequest(now=request.now or workflow.now())
        data = await calls.execute(
            DataActivities.apply_retention,
            step,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=STEP_RETRY,
        )
        notification = await calls.execute(
            NotificationActivities.apply_retention,
            step,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=STEP_RETRY,
        )
        assert step.now is not None
        return RetentionResult(now=step.now, data=data, notification=notification)
