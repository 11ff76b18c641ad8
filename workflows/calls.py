"""Calling a service's activity from a workflow: by its interface method, on that service's queue.

`await execute(DeviceActivities.register, request, start_to_close_timeout=...)` is
`workflow.execute_activity_method` with the task queue taken from the interface, so a step
cannot be sent to a queue whose workers do not serve it, and its result type is the one the
interface declares. "Go to definition" on the method lands on the service's interface; its
implementation is the method of the same name in `activities/` (`@implements(...)`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypedDict, TypeVar, Unpack

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.types import MethodAsyncSingleParam
from temporalio.workflow import ActivityCancellationType, ActivityHandle

with workflow.unsafe.imports_passed_through():
    from fleetflow.interfaces import queue_of

P = TypeVar("P")
R = TypeVar("R")


class ActivityOptions(TypedDict, total=False):
    """The options a workflow sets on an activity call (the queue is the interface's)."""

    start_to_close_timeout: timedelta
    schedule_to_close_timeout: timedelta
    heartbeat_timeout: timedelta | None
    retry_policy: RetryPolicy
    cancellation_type: ActivityCancellationType


async def execute(
    activity: MethodAsyncSingleParam[Any, P, R], arg: P, **options: Unpack[ActivityOptions]
) -> R:
    """Run an interface's activity on its service's task queue and return its result."""
    return await workflow.execute_activity_method(activity, arg, task_queue=queue_of(activity), **options)


def start(
    activity: MethodAsyncSingleParam[Any, P, R], arg: P, **options: Unpack[ActivityOptions]
) -> ActivityHandle[R]:
    """Start an interface's activity on its service's task queue; the handle is awaitable."""
    return workflow.start_activity_method(activity, arg, task_queue=queue_of(activity), **options)
