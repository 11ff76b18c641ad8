"""The system check: every service answers; a missing one is named within seconds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import SystemCheckRequest
from fleetflow.db import Pool
from fleetflow.keys import keyring
from fleetflow.payload_codec import data_converter
from fleetflow.settings import Settings
from fleetflow.system_report import run_system_check
from fleetflow.temporal import interceptors
from tests.support import bearer, eventually
from workers.worker import build_worker


async def test_every_service_answers(client: Client, workers: None) -> None:
    report = await run_system_check(client)
    assert report.ok, report
    assert [s.service for s in report.services] == [q.value for q in TaskQueue]
    for service in report.services:
        assert service.answered and service.pollers is not None and service.pollers >= 1
    assert all(s.database_ok for s in report.services[1:])


async def test_health_and_services_routes_need_system_read(api: httpx.AsyncClient) -> None:
    assert (await api.get("/health")).status_code == 401
    health = await api.get("/health", headers=bearer(scopes=["system:read"]))
    assert health.status_code == 200 and health.json()["ok"] is True
    assert (await api.get("/v1/services")).status_code == 401
    services = (await api.get("/v1/services", headers=bearer())).json()
    by_queue = {s["queue"]: s for s in services}
    assert "DeviceOnboarding" in by_queue["device"]["called_by"]
    assert by_queue["data"]["called_by"] == [
        "DeviceDecommission",
        "IngestionSupervisor",
        "Reconciliation",
        "Retention",
        "SystemCheck",
        "TelemetryIngestion",
    ]
    assert "BulkOnboarding" in by_queue["notification"]["called_by"]
    assert by_queue["webhook"]["called_by"] == ["EventDelivery", "SystemCheck"]


async def _lonely(client: Client) -> Client:
    return await Client.connect(
        client.service_client.config.target_host,
        namespace="lonely",
        data_converter=client.data_converter,
        interceptors=[TracingInterceptor()],
    )


async def test_missing_services_are_named_within_the_timeout(
    client: Client, pool: Pool, settings: Settings
) -> None:
    lonely = await _lonely(client)
    # only the orchestration and device workers run in this namespace
    running = [
        build_worker(lonely, TaskQueue.ORCHESTRATION, None, settings),
        build_worker(lonely, TaskQueue.DEVICE, pool, settings),
    ]
    tasks = [asyncio.create_task(w.run()) for w in running]
    try:
        report = await run_system_check(lonely, SystemCheckRequest(timeout_s=2))
    finally:
        await asyncio.gather(*(w.shutdown() for w in running))
        await asyncio.gather(*tasks, return_exceptions=True)
    assert not report.ok
    answered = {s.service: s.answered for s in report.services}
    assert answered == {
        "orchestration": True,
        "device": True,
        "data": False,
        "analytics": False,
        "notification": False,
        "webhook": False,
    }
    missing = next(s for s in report.services if s.service == "data")
    assert missing.pollers == 0 and missing.error and "no answer" in missing.error


async def test_without_orchestration_worker_the_check_says_so_at_once(client: Client) -> None:
    lonely = await _lonely(client)
    report = await run_system_check(lonely, SystemCheckRequest(timeout_s=30))
    orchestration = report.services[0]
    assert not report.ok and not orchestration.answered
    assert orchestration.error and "orchestration" in orchestration.error
    assert all(s.error and s.error.startswith("not checked") for s in report.services[1:])
    # a stale poller or none: the quick path answered, not the 30 s probe timeout
    assert "no worker polls" in orchestration.error or "within 3 s" in orchestration.error


async def test_a_client_with_foreign_payload_keys_is_told_at_once(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    """The platform's signing keys but payload keys of its own: the workers cannot read its
    check, and the report says which keys to use instead of waiting for the deadline."""
    stranger = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=data_converter(Settings(keys_dir=tmp_path)),
        interceptors=interceptors(keyring(settings), "stranger"),
    )
    report = await run_system_check(stranger, SystemCheckRequest(timeout_s=60))
    orchestration = report.services[0]
    assert not report.ok and not orchestration.answered
    assert orchestration.error and "payload key" in orchestration.error
    assert "FLEETFLOW_KEYS_DIR" in orchestration.error
    # the run is ended, not left failing its task until its 65 s deadline
    query = "WorkflowType = 'SystemCheck' AND ExecutionStatus = 'Running'"

    async def running() -> list[str]:
        return [r.id async for r in client.list_workflows(query)]

    await eventually(running, lambda ids: ids == [], timeout_s=10)
