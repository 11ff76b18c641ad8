"""One worker process for one task queue."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from fleetflow import observability
from fleetflow.contracts.common import TaskQueue
from fleetflow.db import Pool, close_pool, create_pool, migrate
from fleetflow.embedded_pg import database_url
from fleetflow.settings import Settings
from fleetflow.temporal import connect
from fleetflow.webhook_network import AddressPolicy, webhook_client
from workers.registry import WORKFLOWS, activities_of, carried_over, service_for
from workers.workflow_code import cache_project_code

log = logging.getLogger(__name__)


def build_worker(
    client: Client,
    queue: TaskQueue,
    pool: Pool | None,
    settings: Settings,
    service: object | None = None,
    http: httpx.AsyncClient | None = None,
) -> Worker:
    """A worker for queue: workflows on `orchestration`, the owning service's activities elsewhere."""
    if queue is TaskQueue.ORCHESTRATION:
        cache_project_code()  # the sandbox imports a workflow's module for each run it starts
        return Worker(
            client,
            task_queue=queue.value,
            workflows=list(WORKFLOWS),
            graceful_shutdown_timeout=timedelta(seconds=5),
        )
    assert pool is not None
    service = service or service_for(queue, pool, settings, client, http)
    # a delivery holds the database only between POSTs: its slots are bounded by receivers
    slots = settings.webhook_slots if queue is TaskQueue.WEBHOOK else max(4, settings.db_pool_size * 2)
    return Worker(
        client,
        task_queue=queue.value,
        activities=activities_of(service) + carried_over(queue, pool, settings, http, client),
        max_concurrent_activities=slots,
        graceful_shutdown_timeout=timedelta(seconds=10),
    )


async def run_worker(queue: TaskQueue, settings: Settings) -> None:
    """Poll queue until SIGINT/SIGTERM, then finish in-flight work and close."""
    observability.setup(f"fleetflow-worker-{queue.value}", settings)
    metrics_server = observability.serve_metrics(settings.metrics_host, settings.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if settings.accept_plain_payloads:
        log.warning(
            "FLEETFLOW_ACCEPT_PLAIN_PAYLOADS is on: this worker takes unsealed payloads, from anyone who "
            "reaches Temporal; turn it off once the runs begun before payload encryption have finished"
        )
    client = await connect(settings, service=f"worker-{queue.value}")
    pool = None
    if queue is not TaskQueue.ORCHESTRATION:
        pool = await create_pool(database_url(settings), size=settings.db_pool_size)
        await migrate(pool)
    try:
        # the process's one outbound HTTP client (webhooks, every connection vetted), closed
        # with the worker
        async with (
            observability.temporal_metrics(),
            webhook_client(AddressPolicy.from_settings(settings)) as http,
            build_worker(client, queue, pool, settings, http=http),
        ):
            log.info("worker for %s started", queue.value)
            await stop.wait()
    finally:
        if pool is not None:
            await close_pool(pool)
        if metrics_server is not None:
            metrics_server.shutdown()
        observability.shutdown()
