"""A device's past, read from Temporal: its domain events across workflows, and its twin's
state at any past point, rebuilt by replaying the twin's history with the real workflow code."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    Replayer,
    UnsandboxedWorkflowRunner,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from fleetflow.contracts.common import Strict
from fleetflow.contracts.twin import TwinInput, TwinState
from fleetflow.interfaces import CATALOGUE
from fleetflow.temporal import HEADER_CODEC
from workflows.device_twin import DeviceTwin

# activity → the domain event its completion records, as its interface declares (`@records`)
ACTIVITY_EVENTS: dict[str, str] = {e.name: e.records for e in CATALOGUE if e.records is not None}
MESSAGE_EVENTS = {
    "first_contact": "FirstContact",
    "report": "ReportedStateChanged",
    "end": "TwinEnded",
    "set_desired": "DesiredStateChanged",
    "approve": "OnboardingApproved",
    "reject": "OnboardingRejected",
}
CLOSE_EVENTS = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: "Completed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: "Failed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: "Cancelled",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: "Terminated",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: "TimedOut",
}


class HistoryEntry(Strict):
    """One domain event of a device, and the workflow run it came from."""

    time: datetime
    type: str
    actor: str
    workflow_type: str
    workflow_id: str
    run_id: str
    event_id: int


async def _first(converter: DataConverter, payloads: Any) -> Any:
    # the client's converter: recorded payloads are encrypted
    values = await converter.decode(list(payloads.payloads)) if payloads.payloads else []
    return values[0] if values else None


def _actor_of(value: Any, default: str) -> str:
    if isinstance(value, dict):
        actor = value.get("actor")
        if isinstance(actor, dict) and actor.get("subject"):
            return str(actor["subject"])
        if isinstance(actor, str):
            return actor
    return default


async def _entries(
    converter: DataConverter, history: WorkflowHistory, workflow_type: str, run_id: str, device: str
) -> list[HistoryEntry]:
    scheduled: dict[int, str] = {}
    accepted: dict[str, tuple[str, str]] = {}
    actor = "system"
    out: list[HistoryEntry] = []

    def add(event: HistoryEvent, kind: str, who: str) -> None:
        entry = HistoryEntry(
            time=event.event_time.ToDatetime(tzinfo=UTC),
            type=kind,
            actor=who,
            workflow_type=workflow_type,
            workflow_id=history.workflow_id,
            run_id=run_id,
            event_id=event.event_id,
        )
        out.append(entry)

    for event in history.events:
        t = event.event_type
        if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            attrs = event.workflow_execution_started_event_attributes
            actor = _actor_of(await _first(converter, attrs.input), "system")
            if not attrs.continued_execution_run_id:
                add(event, f"{workflow_type}Started", actor)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name = scheduled.get(event.activity_task_completed_event_attributes.scheduled_event_id, "")
            if name in ACTIVITY_EVENTS:
                add(event, ACTIVITY_EVENTS[name], actor)
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signal = event.workflow_execution_signaled_event_attributes
            if signal.signal_name in MESSAGE_EVENTS:
                who = _actor_of(await _first(converter, signal.input), f"device:{device}")
                add(event, MESSAGE_EVENTS[signal.signal_name], who)
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            who = _actor_of(await _first(converter, request.input.args), "system")
            accepted[request.meta.update_id] = (request.input.name, who)
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            update_id = event.workflow_execution_update_completed_event_attributes.meta.update_id
            name, who = accepted.get(update_id, ("", "system"))
            if name in MESSAGE_EVENTS:
                add(event, MESSAGE_EVENTS[name], who)
        elif t in CLOSE_EVENTS:
            add(event, f"{workflow_type}{CLOSE_EVENTS[t]}", actor)
    return out


def _literal(value: str) -> str:
    """value as a quoted string of a Temporal list query; one that could end the quotes is refused,
    so a query can never be widened past its tenant."""
    if "'" in value or '"' in value or "\\" in value:
        raise ValueError(f"{value!r} cannot be part of a list query")
    return f"'{value}'"


async def device_history(client: Client, tenant: str, device_id: str) -> list[HistoryEntry]:
    """Every domain event of the device, oldest first, across all its workflows and runs."""
    query = f"DeviceId = {_literal(device_id)} AND TenantId = {_literal(tenant)}"
    entries: list[HistoryEntry] = []
    async for run in client.list_workflows(query):
        history = await client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history()
        entries.extend(
            await _entries(client.data_converter, history, run.workflow_type, run.run_id, device_id)
        )
    entries.sort(key=lambda e: (e.time, e.workflow_id, e.event_id))
    return entries


# --- twin state as of a past point ----------------------------------------------


class _Capture(Interceptor):
    """Keeps a reference to the twin one replay rebuilds, to read its state when replay ends.

    One per replay: concurrent requests on the same run each read their own instance.
    """

    def __init__(self) -> None:
        self.instances: list[DeviceTwin] = []

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        instances = self.instances

        class _CaptureInbound(WorkflowInboundInterceptor):
            async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
                instances.append(workflow.instance())
                return await super().execute_workflow(input)

        return _CaptureInbound


class NoTwinThen(LookupError):
    """The twin did not exist at that point."""


# a history that ends in one of these never changes again
_CLOSING = frozenset([*CLOSE_EVENTS, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW])
CLOSED_RUN_CACHE_BYTES = 32 * 1024 * 1024  # serialized; a 2,000-event twin run is ~2.5 MB
RunKey = tuple[str, str, str, str]  # namespace, tenant, workflow id, run id


class ClosedRunHistories:
    """The parsed histories of closed runs, least recently used first out past `max_bytes` (their
    serialized size). A closed run's history never changes, so an entry is never stale; each API
    process holds its own. Only reached after the tenant's own list query named the run, and the
    key names the tenant too."""

    def __init__(self, max_bytes: int = CLOSED_RUN_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._runs: OrderedDict[RunKey, tuple[Sequence[HistoryEvent], int]] = OrderedDict()

    def get(self, key: RunKey) -> Sequence[HistoryEvent] | None:
        """The cached events of a closed run, or None."""
        found = self._runs.get(key)
        if found is None:
            return None
        self._runs.move_to_end(key)
        return found[0]

    def put(self, key: RunKey, events: Sequence[HistoryEvent]) -> None:
        """Keep `events` if they are a closed run's whole history (they end in a close event)."""
        if not events or events[-1].event_type not in _CLOSING or key in self._runs:
            return
        size = sum(e.ByteSize() for e in events)
        if size > self.max_bytes:
            return
        self._runs[key] = (tuple(events), size)
        self.size += size
        while self.size > self.max_bytes:
            _, (_, dropped) = self._runs.popitem(last=False)
            self.size -= dropped

    def __len__(self) -> int:
        return len(self._runs)


CLOSED_RUNS = ClosedRunHistories()


async def run_events(
    client: Client, tenant: str, workflow_id: str, run_id: str, histories: ClosedRunHistories
) -> Sequence[HistoryEvent]:
    """A run's events: from `histories` when it is a closed run fetched before, else from Temporal
    (and kept there when the run is closed)."""
    key = (client.namespace, tenant, workflow_id, run_id)
    cached = histories.get(key)
    if cached is not None:
        return cached
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    histories.put(key, history.events)
    return history.events


def history_until(
    events: Sequence[HistoryEvent], at: datetime | None = None, event_id: int | None = None
) -> list[HistoryEvent]:
    """The run's history up to a time or an event: a prefix, cut at the first event past it.

    Not a filter by time: signals that arrive while a workflow task runs are written after its
    completion with their earlier arrival time, and a history that keeps them but not the
    completion is one the replayer refuses (its poller died and the request hung).
    """
    prefix: list[HistoryEvent] = []
    for e in events:
        if event_id is not None and e.event_id > event_id:
            break
        if at is not None and e.event_time.ToDatetime(tzinfo=UTC) > at:
            break
        prefix.append(e)
    return prefix


async def twin_as_of(
    client: Client,
    tenant: str,
    workflow_id: str,
    *,
    at: datetime | None = None,
    run_id: str | None = None,
    event_id: int | None = None,
    histories: ClosedRunHistories = CLOSED_RUNS,
) -> tuple[TwinState, str, datetime]:
    """The twin's state as of a time, or an event of a run (default: the latest run).

    Returns the state, the run it came from and the time of the last event applied; only runs
    of `tenant` are considered. Closed runs' histories are fetched once per process (`histories`).
    """
    query = f"WorkflowId = {_literal(workflow_id)} AND TenantId = {_literal(tenant)}"
    runs = sorted(
        [r async for r in client.list_workflows(query)],
        key=lambda r: r.start_time,
    )
    if run_id is not None:
        runs = [r for r in runs if r.run_id == run_id]
    elif at is not None:
        runs = [r for r in runs if r.start_time <= at]
    if not runs:
        raise NoTwinThen(f"no run of {workflow_id} at that point")
    run = runs[-1]
    events = history_until(await run_events(client, tenant, workflow_id, run.run_id, histories), at, event_id)
    if not events:  # event 0, or a time before the run's first event
        raise NoTwinThen(f"no event of {workflow_id} at that point")
    last_time = events[-1].event_time.ToDatetime(tzinfo=run.start_time.tzinfo)
    if not any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED for e in events):
        # before the first workflow task the state is the input's: nothing to replay yet
        inp = await _first(client.data_converter, events[0].workflow_execution_started_event_attributes.input)
        twin = DeviceTwin(TwinInput.model_validate(inp))
        return twin.get(), run.run_id, last_time
    capture = _Capture()
    replayer = Replayer(
        workflows=[DeviceTwin],
        data_converter=client.data_converter,
        interceptors=[capture],
        header_codec_behavior=HEADER_CODEC,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    await replayer.replay_workflow(WorkflowHistory(workflow_id, events), raise_on_replay_failure=True)
    (instance,) = capture.instances
    return instance.get().model_copy(deep=True), run.run_id, last_time
