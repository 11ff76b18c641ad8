"""The data service: telemetry acceptance, ingestion windows and storage; owns the `data` schema.

Declarations only (see `fleetflow.interfaces`): safe to import in the workflow sandbox.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from temporalio import activity

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.retention import DataRetained, RetentionRequest, ScheduledRun, ScheduledRunVerdict
from fleetflow.contracts.rollouts import DeviceStep
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import (
    BatchesQuarantined,
    ClaimWindow,
    QuarantineBatches,
    Stored,
    StoreWindow,
    Supervised,
    SuperviseIngestion,
    Window,
    WindowRef,
    WindowSplit,
)
from fleetflow.interfaces.base import ServiceInterface


class DataActivities(ServiceInterface):
    """Activities of the `data` task queue."""

    service: ClassVar[str] = "data"
    queue: ClassVar[TaskQueue] = TaskQueue.DATA

    @activity.defn(name="data.supervise_ingestion")
    @abstractmethod
    async def supervise_ingestion(self, request: SuperviseIngestion) -> Supervised:
        """(Re)start the shards that are not running; put the batches claimed by runs that are
        not running back to pending. Idempotent.
        """

    @activity.defn(name="data.split_window")
    @abstractmethod
    async def split_window(self, ref: WindowRef) -> WindowSplit:
        """Move the window's claimed batches, oldest first, into two halves; a retry after the
        commit finds the halves made and answers them again.
        """

    @activity.defn(name="data.quarantine_batches")
    @abstractmethod
    async def quarantine_batches(self, request: QuarantineBatches) -> BatchesQuarantined:
        """Set the window's claimed batches aside with the reason; their readings that can be
        read show in the quarantine view under that reason. Idempotent.
        """

    @activity.defn(name="data.ping")
    @abstractmethod
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""

    @activity.defn(name="data.retire_telemetry")
    @abstractmethod
    async def retire_telemetry(self, step: DeviceStep) -> int:
        """Archive (or, by policy, delete) a retired device's readings; idempotent."""

    @activity.defn(name="data.claim_window")
    @abstractmethod
    async def claim_window(self, request: ClaimWindow) -> Window:
        """Claim pending batches of this shard (oldest first, up to max_readings and max_bytes;
        at least one batch whatever its size).

        Waits up to max_wait_ms for a first batch, then up to fill_ms for the window to reach
        its fill target (at most watched_fill_ms, when set, once it holds a reading a rate or
        zscore rule of its tenant watches); empty after max_wait_ms; a retry returns what this window already
        claimed (and may add to it). `unready` counts the window's devices that may not send.
        """

    @activity.defn(name="data.store_window")
    @abstractmethod
    async def store_window(self, request: StoreWindow) -> Stored:
        """COPY the window's readings into data.readings, quarantine the unready devices' ones.

        Heartbeats while it runs: the attempt of a killed worker is retried within the
        heartbeat timeout, not after the whole start-to-close timeout. The window's batches
        are locked first, so a supervisor reclaiming them waits for this transaction (and then
        finds them stored) instead of handing them to another window half-way.
        """

    @activity.defn(name="data.apply_retention")
    @abstractmethod
    async def apply_retention(self, request: RetentionRequest) -> DataRetained:
        """Drop the daily partitions of data.readings that every tenant's retention lets go,
        delete the rows of tenants whose retention is shorter, and age out rollups, stored
        ingest batches, window bookkeeping and quarantine. Idempotent.
        """

    @activity.defn(name="data.verify_scheduled_run")
    @abstractmethod
    async def verify_scheduled_run(self, run: ScheduledRun) -> ScheduledRunVerdict:
        """Whether a fleetflow schedule (fleetflow.schedules) of that workflow type shows, in its
        own description, that it started that run; retried while the schedule has not yet
        recorded a run it just started.
        """
