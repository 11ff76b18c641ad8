"""Workers for every queue and the API, in this process, on the session's real servers.

The device and notification services are the real ones, wrapped so a test can make
one step fail for one device id *after* the real work committed, which is the
hardest case for the saga: the step happened, yet the workflow sees a failure.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx
import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.devices import DeviceService
from activities.notifications import NotificationService
from activities.telemetry import DataService
from api.app import create_app
from fleetflow import claim_checks
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import (
    BulkChunk,
    BulkChunkResult,
    DeviceTransition,
    IssueCredential,
    IssuedCredential,
    ProvisionDevice,
    ProvisionedDevice,
    RegisterDevice,
    StoreConfig,
    ValidatedOnboarding,
    ValidateOnboarding,
)
from fleetflow.contracts.events import BulkOnboardedEvents, EventBatch
from fleetflow.contracts.rollouts import DeviceStep, RolloutTick, TickResult
from fleetflow.contracts.telemetry import Stored, StoreWindow
from fleetflow.db import Pool
from fleetflow.settings import Settings
from workers.registry import service_for
from workers.worker import build_worker

FAULTS: dict[str, str] = {}  # device id -> step that fails after doing its work
# device id -> columns of its (tenant "acme") device type changed right after its one-step
# provisioning committed, before the retry of its lost report (with FAULTS "provision_lost")
RETYPE: dict[str, dict[str, Any]] = {}
TICK_FAULTS: set[str] = set()  # campaign ids whose next offering tick fails after committing
# "<step>:<device id>" (bulk: "provision_batch:<claim id>:<offset>") -> the step waits for it
# before doing anything; ENTERED says which steps are waiting
HOLDS: dict[str, asyncio.Event] = {}
ENTERED: set[str] = set()
FINISHED: set[str] = set()  # held steps that have ended since (committed, failed or cancelled)
T = TypeVar("T")


async def _held(key: str, work: Awaitable[T]) -> T:
    """Do work, first waiting for HOLDS[key] if the test holds this step."""
    gate = HOLDS.get(key)
    if gate is None:
        return await work
    ENTERED.add(key)
    await gate.wait()
    try:
        return await work
    finally:
        FINISHED.add(key)


def _crash(step: str, device_id: str | None) -> None:
    if device_id is not None and FAULTS.get(device_id) == step:
        raise ApplicationError(f"injected failure at {step}", non_retryable=True)


class FaultyDevices(DeviceService):
    """The real device service; FAULTS makes a step fail after it committed."""

    @activity.defn(name="device.validate_onboarding")
    async def validate_onboarding(self, request: ValidateOnboarding) -> ValidatedOnboarding:
        result = await super().validate_onboarding(request)
        _crash("validate", request.spec.device_id)
        return result

    @activity.defn(name="device.register")
    async def register(self, request: RegisterDevice) -> None:
        await _held(f"register:{request.spec.device_id}", super().register(request))
        _crash("register", request.spec.device_id)
        if FAULTS.get(request.spec.device_id) == "register_lost":
            # committed, then the attempt is lost (a worker killed before it reported); the
            # retry's validation then refuses (the device type changed meanwhile)
            FAULTS[request.spec.device_id] = "validate"
            raise ApplicationError("attempt lost after the registration committed")

    @activity.defn(name="device.issue_credential")
    async def issue_credential(self, request: IssueCredential) -> IssuedCredential:
        result = await _held(f"issue_credential:{request.device_id}", super().issue_credential(request))
        _crash("issue_credential", request.device_id)
        return result

    @activity.defn(name="device.store_config")
    async def store_config(self, request: StoreConfig) -> None:
        await super().store_config(request)
        _crash("store_config", request.device_id)

    @activity.defn(name="device.provision_device")
    async def provision_device(self, request: ProvisionDevice) -> ProvisionedDevice:
        device_id = request.spec.device_id
        result = await _held(f"provision_device:{device_id}", super().provision_device(request))
        # its writes are one transaction: a step's fault is a commit whose report is lost
        done: tuple[str, ...] = ("register", "provision_device")
        if result.credential is not None:  # not only registered (its type needs approval)
            done += ("issue_credential", "store_config")
        for step in done:
            _crash(step, device_id)
        if FAULTS.get(device_id) in ("register_lost", "provision_lost"):
            # committed, then the attempt is lost (a worker killed before it reported); the
            # retry finds the commit ("provision_lost") or is refused at validation
            FAULTS[device_id] = "validate" if FAULTS[device_id] == "register_lost" else "done"
            for column, value in RETYPE.pop(device_id, {}).items():
                await self.pool.execute(
                    f"UPDATE device.device_types SET {column} = $1 WHERE tenant = 'acme' AND name = $2",
                    value,
                    request.spec.device_type,
                )
            raise ApplicationError("attempt lost after the provisioning committed")
        return result

    @activity.defn(name="device.mark_failed")
    async def mark_failed(self, request: DeviceTransition) -> None:
        await _held(f"mark_failed:{request.device_id}", super().mark_failed(request))

    @activity.defn(name="device.provision_batch")
    async def provision_batch(self, chunk: BulkChunk) -> BulkChunkResult:
        slice_id = f"{chunk.claim_id}:{chunk.offset}"
        result = await _held(f"provision_batch:{slice_id}", super().provision_batch(chunk))
        _crash("provision_batch", slice_id)
        return result

    @activity.defn(name="device.cancel_jobs")
    async def cancel_jobs(self, step: DeviceStep) -> int:
        # held: a decommission between revoking the credentials and marking the device
        return await _held(f"cancel_jobs:{step.device_id}", super().cancel_jobs(step))

    @activity.defn(name="device.activate")
    async def activate(self, request: DeviceTransition) -> None:
        await super().activate(request)
        _crash("activate", request.device_id)

    @activity.defn(name="device.rollout_tick")
    async def rollout_tick(self, tick: RolloutTick) -> TickResult:
        result = await super().rollout_tick(tick)
        if result.offered and tick.campaign_id in TICK_FAULTS:  # lost after the offer committed
            TICK_FAULTS.discard(tick.campaign_id)
            raise ApplicationError("injected failure after the offer committed")
        return result


@pytest.fixture
async def backlog() -> AsyncIterator[asyncio.Event]:
    """Every window's store waits (a shard backed up) until the test sets the event."""
    gate = HOLDS["store_window"] = asyncio.Event()
    ENTERED.discard("store_window")
    try:
        yield gate
    finally:
        gate.set()
        HOLDS.pop("store_window", None)
        FINISHED.discard("store_window")


class HeldData(DataService):
    """The real data service; HOLDS["store_window"] holds every window's store (a backlog)."""

    @activity.defn(name="data.store_window")
    async def store_window(self, request: StoreWindow) -> Stored:
        return await _held("store_window", super().store_window(request))


class FaultyNotifications(NotificationService):
    """The real notification service; FAULTS makes recording fail after it committed."""

    @activity.defn(name="notification.record_events")
    async def record_events(self, batch: EventBatch) -> int:
        count = await super().record_events(batch)
        for event in batch.events:
            _crash("record_event", event.device_id)
        return count

    @activity.defn(name="notification.record_bulk_onboarded")
    async def record_bulk_onboarded(self, ref: BulkOnboardedEvents) -> int:
        count = await super().record_bulk_onboarded(ref)
        rows = await claim_checks.array_slice(self.pool, ref.claim_id, ref.tenant, ref.offset, ref.limit)
        for row in rows or []:
            _crash("record_event", row["device_id"])
        return count


WORKERS_STOP_S = 60.0


@pytest.fixture(scope="session")
async def workers(client: Client, pool: Pool, settings: Settings) -> AsyncIterator[None]:
    """One worker per queue, running for the whole session."""
    services: dict[TaskQueue, object] = {
        TaskQueue.DEVICE: FaultyDevices(pool, settings, client),
        TaskQueue.NOTIFICATION: FaultyNotifications(pool, client),
        TaskQueue.DATA: HeldData(pool, client),
    }
    running = []
    for queue in TaskQueue:
        service = None
        if queue is not TaskQueue.ORCHESTRATION:
            service = services.get(queue) or service_for(queue, pool, settings, client)
        running.append(build_worker(client, queue, pool, settings, service))
    tasks = [asyncio.create_task(w.run()) for w in running]
    yield
    try:
        await asyncio.wait_for(asyncio.gather(*(w.shutdown() for w in running)), WORKERS_STOP_S)
    except TimeoutError:
        # seen in CI, about one session in three: the orchestration worker's workflow poll
        # (the SDK's Rust core) never returns its shutdown, with nothing of ours running; the
        # dev server's stop, next, ends that poll
        warnings.warn(f"a session worker did not stop within {WORKERS_STOP_S:g} s", stacklevel=1)
        for task in tasks:
            task.cancel()
    await asyncio.wait(tasks, timeout=WORKERS_STOP_S)


@pytest.fixture(scope="session")
async def api(settings: Settings, client: Client, workers: None) -> AsyncIterator[httpx.AsyncClient]:
    """The API app (with its lifespan) behind an in-process HTTP client."""
    app = create_app(settings, client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield http


# Reconciliation pages through every device of the session's database and asks each active
# device's twin for its firmware: after the bulk tests (10,000s of devices) a run takes minutes
# on a 2-core machine. Its tests run first, against the fresh database, where a run takes well
# under a second; how it scales is the bench's and the README's to say, not each test's.
FIRST = ("tests/integration/test_reconciliation.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules of FIRST before the other integration tests (stable otherwise)."""
    first = [i for i in items if i.nodeid.startswith(FIRST)]
    if not first:
        return
    rest = [i for i in items if not i.nodeid.startswith(FIRST)]
    cut = next((n for n, i in enumerate(rest) if i.nodeid.startswith("tests/integration/")), len(rest))
    items[:] = rest[:cut] + first + rest[cut:]
