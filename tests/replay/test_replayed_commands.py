"""Replaying a history schedules each activity as it was recorded: same name, same task queue,
same timeouts and retry policy.

The replayer itself only checks the command's kind and activity type; a step sent to another
queue (or with other timeouts) would replay and then, for a run in flight, wait on a queue no
worker serves. Workflows take the queue from the service interface, so this pins it down.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import (
    Interceptor,
    Replayer,
    StartActivityInput,
    UnsandboxedWorkflowRunner,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)
from temporalio.workflow import ActivityHandle

from fleetflow.identity_workflow import ScheduledRunProof
from fleetflow.temporal import HEADER_CODEC
from tests.replay.test_replay import CONVERTER, HISTORIES
from workers.registry import WORKFLOWS

# histories whose steps ran with other timeouts than the code's today (recorded with earlier
# constants, or short ones to provoke a timeout): only their names and queues must match
TIMEOUTS_DRIFT = {"telemetry_ingestion", "telemetry_lone_timeout"}

Scheduled = tuple[str, str | None, float | None, float | None, float | None, int | None]
SCHEDULED: list[Scheduled] = []


def _seconds(value: str | None) -> float | None:
    """A recorded duration ("30s"); none and "0s" both mean unset."""
    return float(value.rstrip("s")) or None if value else None


def _of(delta: timedelta | None) -> float | None:
    return delta.total_seconds() or None if delta else None


class _Outbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> ActivityHandle[Any]:
        retry = input.retry_policy
        SCHEDULED.append(
            (
                input.activity,
                input.task_queue,
                _of(input.start_to_close_timeout),
                _of(input.heartbeat_timeout),
                _of(retry.initial_interval) if retry else None,
                retry.maximum_attempts if retry else None,
            )
        )
        return super().start_activity(input)


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_Outbound(outbound))


class _Capture(Interceptor):
    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _Inbound


def _recorded(path: Path) -> list[Scheduled]:
    out: list[Scheduled] = []
    for event in json.loads(path.read_text())["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs is None:
            continue
        retry = attrs.get("retryPolicy") or {}
        out.append(
            (
                attrs["activityType"]["name"],
                attrs["taskQueue"]["name"],
                _seconds(attrs.get("startToCloseTimeout")),
                _seconds(attrs.get("heartbeatTimeout")),
                _seconds(retry.get("initialInterval")),
                retry.get("maximumAttempts", 0),
            )
        )
    return out


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay_schedules_every_activity_as_recorded(path: Path) -> None:
    SCHEDULED.clear()
    replayer = Replayer(
        workflows=list(WORKFLOWS),
        data_converter=CONVERTER,
        header_codec_behavior=HEADER_CODEC,
        interceptors=[ScheduledRunProof(), _Capture()],
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    await replayer.replay_workflow(WorkflowHistory.from_json(path.stem, path.read_text()))
    recorded, replayed = _recorded(path), SCHEDULED[: len(_recorded(path))]
    if path.stem in TIMEOUTS_DRIFT:
        recorded = [(*r[:2], None, None, *r[4:]) for r in recorded]
        replayed = [(*r[:2], None, None, *r[4:]) for r in replayed]
    assert replayed == recorded
