"""Activity options shared by the workflows (deterministic constants only)."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

# forward steps: transient failures retry with backoff for a while, then the saga compensates
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
)
STEP_START_TO_CLOSE = timedelta(seconds=30)
STEP_SCHEDULE_TO_CLOSE = timedelta(minutes=5)
COMPENSATION_START_TO_CLOSE = timedelta(seconds=30)
