"""A throw-away stack for benchmarks: dev server (SQLite, fast pragmas), embedded PostgreSQL,
the API in-process and one in-process worker per queue."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.app import create_app
from bench.baseline import BASELINE_QUEUE, FiveActivities, StartAndUpdate, noop
from fleetflow import embedded_pg
from fleetflow.contracts.common import TaskQueue
from fleetflow.db import create_pool, migrate
from fleetflow.keys import keyring
from fleetflow.payload_codec import data_converter
from fleetflow.security import SCOPES, issue_token
from fleetflow.settings import Settings
from fleetflow.temporal import SEARCH_ATTRIBUTES, dev_server_args, interceptors, sealing_headers
from workers.worker import build_worker


def say(message: str) -> None:
    """Progress goes to stderr; stdout ends with the JSON line."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Stack:
    """What a benchmark talks to."""

    client: Client
    api: httpx.AsyncClient
    headers: dict[str, str]
    settings: Settings


@asynccontextmanager
async def stack(payload_keys: str | None = None) -> AsyncIterator[Stack]:
    """Start everything in a temporary directory; stop and remove it after. Payloads are
    encrypted with payload_keys (FLEETFLOW_PAYLOAD_KEYS' format), else with a fresh key."""
    with tempfile.TemporaryDirectory(prefix="fleetflow-bench-") as tmp:
        data = Path(tmp)
        say("starting PostgreSQL and the Temporal dev server ...")
        dsn = embedded_pg.start(data / "postgres")
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
            dev_server_database_filename=str(data / "temporal.db"),
            dev_server_extra_args=[
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
                *dev_server_args(),
            ],
            search_attributes=SEARCH_ATTRIBUTES,
            # the platform's converter and interceptors, so the bench pays for payload encryption
            # and identity checks as a user does
            data_converter=data_converter(Settings(data_dir=data, payload_keys=payload_keys)),
            interceptors=interceptors(keyring(Settings(data_dir=data)), "bench"),
        )
        client = sealing_headers(env.client)
        settings = Settings(
            data_dir=data,
            database_url=dsn,
            payload_keys=payload_keys,
            temporal_address=client.service_client.config.target_host,
            webhook_allow_networks="127.0.0.1/32",  # the recorder's and benchmarks' receivers
        )
        pool = await create_pool(dsn, size=10)
        await migrate(pool)
        workers = [
            build_worker(client, queue, None if queue is TaskQueue.ORCHESTRATION else pool, settings)
            for queue in TaskQueue
        ]
        workers.append(
            Worker(
                client,
                task_queue=BASELINE_QUEUE,
                workflows=[FiveActivities, StartAndUpdate],
                activities=[noop],
            )
        )
        tasks = [asyncio.create_task(w.run()) for w in workers]
        app = create_app(settings, client)
        token = issue_token(
            keyring(settings), subject="bench", tenant="bench", scopes=sorted(SCOPES), ttl=timedelta(hours=1)
        )
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                    yield Stack(client, http, {"Authorization": f"Bearer {token}"}, settings)
        finally:
            await asyncio.gather(*(w.shutdown() for w in workers))
            await asyncio.gather(*tasks, return_exceptions=True)
            await pool.close()
            await env.shutdown()
            embedded_pg.stop(data / "postgres")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]
