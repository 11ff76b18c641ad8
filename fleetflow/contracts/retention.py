"""Contracts of retention (the scheduled `Retention` workflow and the services' clean-up
activities) and of scheduled starts (a run started by a Temporal Schedule proves its origin)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from fleetflow.contracts.common import Contract

# the platform defaults; a tenant's profile may override the first two
RAW_RETENTION_DAYS = 30
ROLLUP_RETENTION_DAYS = 365
# how long stored ingest batches (their ids: a batch id seen again within this is a duplicate),
# stored windows' bookkeeping, delivered events and dead letters are kept
BATCH_RETENTION_DAYS = 30
EVENT_RETENTION_DAYS = 30
DEAD_LETTER_RETENTION_DAYS = 30
RETENTION_ID = "retention"


class RetentionRequest(Contract):
    """Input of Retention and of each service's clean-up: `now` moves the retention clock
    (a benchmark or test replays a month in minutes); None: the workflow's own time."""

    now: datetime | None = None


class DataRetained(Contract):
    """What `data.apply_retention` removed (counts only)."""

    partitions_dropped: int = 0
    readings_deleted: int = 0
    rollups_deleted: int = 0
    batches_deleted: int = 0
    windows_deleted: int = 0
    quarantined_deleted: int = 0
    oldest_partition_kept: str | None = None


class NotificationRetained(Contract):
    """What `notification.apply_retention` removed (counts only)."""

    events_deleted: int = 0
    dead_letters_deleted: int = 0


class RetentionResult(Contract):
    """Result of one Retention run."""

    now: datetime
    data: DataRetained = Field(default_factory=DataRetained)
    notification: NotificationRetained = Field(default_factory=NotificationRetained)


class ScheduledRun(Contract):
    """A run that says a Temporal Schedule started it (its `TemporalScheduledById`)."""

    schedule_id: str
    workflow_id: str
    run_id: str
    workflow_type: str


class ScheduledRunVerdict(Contract):
    """Whether the schedule's own description shows it started that run."""

    accepted: bool
    reason: str = ""
