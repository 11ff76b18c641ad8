"""Routes that answer with their workflow's outcome (acknowledge, clear, renew, rotate one
device) answer 503 with a link after `workflow_wait_s` when no orchestration worker runs,
instead of holding the request forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor

from api.app import create_app
from fleetflow.settings import Settings
from tests.integration.flows import AUTH, active_device
from tests.integration.test_telemetry import device_auth

HANG = 120  # far beyond the 1 s wait: only a request that hangs reaches it


@pytest.fixture
async def workerless(settings: Settings, client: Client) -> AsyncIterator[httpx.AsyncClient]:
    """The API on a namespace no orchestration worker polls, waiting 1 s for workflows."""
    lonely = await Client.connect(
        client.service_client.config.target_host,
        namespace="lonely",
        data_converter=client.data_converter,
        interceptors=[TracingInterceptor()],
    )
    app = create_app(settings.model_copy(update={"workflow_wait_s": 1.0}), lonely)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield http
    # nothing left for a later test's worker in this namespace (test_system_check's) to run
    async for run in lonely.list_workflows("ExecutionStatus = 'Running'"):
        await lonely.get_workflow_handle(run.id, run_id=run.run_id).terminate("test over")


async def test_routes_waiting_for_a_workflow_answer_503_without_a_worker(
    api: httpx.AsyncClient, workerless: httpx.AsyncClient
) -> None:
    device_id, credential = await active_device(api)
    calls = [
        ("/v1/device/credential:renew", device_auth(credential)),
        (f"/v1/devices/{device_id}/credential:rotate", AUTH),
        ("/v1/alerts/1/acknowledge", AUTH),
        ("/v1/alerts/1/clear", AUTH),
    ]
    for url, headers in calls:
        answer = await asyncio.wait_for(workerless.post(url, headers=headers), HANG)
        assert answer.status_code == 503, (url, answer.text)
        assert answer.headers["retry-after"] and answer.json()["workflow_id"], url
        if "rotate" in url:  # where the new credential will be
            assert answer.json()["status_url"].startswith("/v1/credential-rotations/rot-")
