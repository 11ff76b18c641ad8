"""Rows of `notification.events` as the contract: shared by the event store, the
subscriptions' dead letters and the webhook delivery."""

from __future__ import annotations

import asyncpg

from fleetflow.contracts.events import RecordedEvent

EVENT_COLUMNS = (
    "e.seq, e.event_id, e.tenant, e.device_id, e.type, e.occurred_at, e.actor, e.source_workflow, e.data"
)


def recorded_event(row: asyncpg.Record) -> RecordedEvent:
    """An event row as the contract."""
    return RecordedEvent.model_validate({k: row[k] for k in RecordedEvent.model_fields})
