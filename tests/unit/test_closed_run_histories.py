"""The bounded cache of closed runs' histories used by time travel."""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from api.time_travel import ClosedRunHistories


def _run(closing: EventType.ValueType, length: int = 3) -> list[HistoryEvent]:
    events = [
        HistoryEvent(event_id=i, event_type=EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
        for i in range(1, length)
    ]
    return [*events, HistoryEvent(event_id=length, event_type=closing)]


def test_only_closed_runs_are_kept() -> None:
    cache = ClosedRunHistories()
    cache.put(("default", "acme", "twin-acme-d", "r1"), _run(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED))
    cache.put(
        ("default", "acme", "twin-acme-d", "r2"),
        _run(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW),
    )
    cache.put(
        ("default", "acme", "twin-acme-d", "r3"), _run(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED)
    )
    assert cache.get(("default", "acme", "twin-acme-d", "r1")) is None  # still open: it may grow
    assert cache.get(("default", "acme", "twin-acme-d", "r2")) is not None
    assert cache.get(("default", "acme", "twin-acme-d", "r3")) is not None


def test_the_key_names_the_tenant() -> None:
    cache = ClosedRunHistories()
    cache.put(("default", "acme", "twin-x", "r1"), _run(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED))
    assert cache.get(("default", "initech", "twin-x", "r1")) is None


def test_least_recently_used_runs_leave_past_the_byte_bound() -> None:
    one = _run(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, 50)
    size = sum(e.ByteSize() for e in one)
    cache = ClosedRunHistories(max_bytes=2 * size)
    for run in ("r1", "r2"):
        cache.put(("default", "acme", "twin-acme-d", run), one)
    assert cache.get(("default", "acme", "twin-acme-d", "r1")) is not None  # r2 is now the oldest used
    cache.put(("default", "acme", "twin-acme-d", "r3"), one)
    assert len(cache) == 2 and cache.size <= cache.max_bytes
    assert cache.get(("default", "acme", "twin-acme-d", "r2")) is None
    assert cache.get(("default", "acme", "twin-acme-d", "r1")) is not None
    small = ClosedRunHistories(max_bytes=size - 1)
    small.put(("default", "acme", "w", "r"), one)  # larger than the whole cache: not kept
    assert len(small) == 0 and small.size == 0


def test_a_history_as_of_a_time_is_a_prefix_even_when_event_times_go_back() -> None:
    from datetime import UTC, datetime, timedelta

    from api.time_travel import history_until

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    kinds_and_seconds = [
        (EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, 0),
        (EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 0),
        (EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED, 1),
        (EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 5),
        # a signal that arrived while the task ran: written after its completion, stamped before it
        (EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, 3),
        (EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 5),
    ]
    events = []
    for i, (kind, seconds) in enumerate(kinds_and_seconds, start=1):
        event = HistoryEvent(event_id=i, event_type=kind)
        event.event_time.FromDatetime(t0 + timedelta(seconds=seconds))
        events.append(event)
    # at t0 + 4 s the task's completion had not happened: the history ends at its start, and the
    # signal stamped 3 s (after the completion in the history) is not in it
    assert [e.event_id for e in history_until(events, at=t0 + timedelta(seconds=4))] == [1, 2, 3]
    assert [e.event_id for e in history_until(events, at=t0 + timedelta(seconds=5))] == [1, 2, 3, 4, 5, 6]
    assert [e.event_id for e in history_until(events, event_id=4)] == [1, 2, 3, 4]
