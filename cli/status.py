"""`fleetflow status`: services, running workflows, ingestion, alerts and rollouts in one
screen, read from Temporal and PostgreSQL; `--watch` redraws it until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue as TaskQueueRef
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from activities import analytics_facade, data_facade, device_facade
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.telemetry import IngestionProgress
from fleetflow.db import Pool, create_pool
from fleetflow.embedded_pg import database_url
from fleetflow.errors import StartupError
from fleetflow.handles import handle_for
from fleetflow.settings import Settings
from fleetflow.temporal import connect
from workers.registry import WORKFLOWS
from workflows.telemetry_ingestion import TelemetryIngestion, ingestion_id

RPC_TIMEOUT = timedelta(seconds=3)
UNFINISHED = ("queued", "offered", "downloading", "installing")


@dataclass
class QueueStatus:
    """One task queue: who polls it and what waits in it."""

    queue: str
    pollers: int | None
    backlog: int | None = None
    backlog_age_s: float | None = None
    add_rate: float | None = None
    dispatch_rate: float | None = None
    error: str | None = None


@dataclass
class Status:
    """Everything `fleetflow status` shows."""

    checked_at: datetime
    queues: list[QueueStatus]
    running: dict[str, int | None]
    shards: list[tuple[int, IngestionProgress | None]]
    sections: dict[str, list[dict[str, Any]] | str] = field(default_factory=dict)


async def queue_status(client: Client, queue: TaskQueue) -> QueueStatus:
    """Pollers and backlog of queue (workflow tasks on orchestration, activity tasks elsewhere)."""
    kind = (
        TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
        if queue is TaskQueue.ORCHESTRATION
        else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    )
    try:
        described = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueueRef(name=queue.value),
                task_queue_type=kind,
                report_stats=True,
            ),
            timeout=RPC_TIMEOUT,
        )
    except Exception as exc:  # shown in its row; the rest of the screen still helps
        return QueueStatus(queue.value, None, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    status = QueueStatus(queue.value, len(described.pollers))
    if described.HasField("stats"):
        stats = described.stats
        status.backlog = stats.approximate_backlog_count
        status.backlog_age_s = stats.approximate_backlog_age.ToTimedelta().total_seconds()
        status.add_rate, status.dispatch_rate = stats.tasks_add_rate, stats.tasks_dispatch_rate
    return status


async def _running(client: Client, workflow_type: str) -> int | None:
    query = f"WorkflowType = '{workflow_type}' AND ExecutionStatus = 'Running'"
    try:
        return (await client.count_workflows(query, rpc_timeout=RPC_TIMEOUT)).count
    except Exception:  # unknown is shown as "?"
        return None


async def _shard(client: Client, shard: int) -> IngestionProgress | None:
    try:
        handle = handle_for(client, TelemetryIngestion.run, ingestion_id(shard))
        async with asyncio.timeout(RPC_TIMEOUT.total_seconds()):
            return await handle.query(TelemetryIngestion.progress, rpc_timeout=RPC_TIMEOUT)
    except Exception:  # no orchestration worker to answer, or no such shard
        return None


# each service answers for its own tables (its read facade)
_SECTIONS: dict[str, Callable[[Pool], Awaitable[list[dict[str, Any]]]]] = {
    "ingestion": data_facade.ingestion_status,
    "alerts": analytics_facade.open_alerts_status,
    "rollouts": lambda pool: device_facade.rollout_status(pool, UNFINISHED),
}


async def _section(pool: Pool, name: str) -> list[dict[str, Any]] | str:
    try:
        return await _SECTIONS[name](pool)
    except Exception as exc:  # e.g. PostgreSQL gone since the start: shown in place
        return f"unavailable: {type(exc).__name__}: {exc}".splitlines()[0]


async def gather(client: Client, pool: Pool, shards: int) -> Status:
    """Read everything at once."""
    types = [getattr(w, "__temporal_workflow_definition").name for w in WORKFLOWS]
    queues, running, progress, sections = await asyncio.gather(
        asyncio.gather(*(queue_status(client, q) for q in TaskQueue)),
        asyncio.gather(*(_running(client, t) for t in types)),
        asyncio.gather(*(_shard(client, s) for s in range(shards))),
        asyncio.gather(*(_section(pool, name) for name in _SECTIONS)),
    )
    return Status(
        checked_at=datetime.now(UTC),
        queues=list(queues),
        running=dict(zip(types, running, strict=True)),
        shards=list(enumerate(progress)),
        sections=dict(zip(_SECTIONS, sections, strict=True)),
    )


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "?" if value is None else format(value, fmt)


def render(status: Status, settings: Settings) -> str:
    """The status as text, one screen."""
    lines = [
        f"fleetflow status  {status.checked_at:%Y-%m-%d %H:%M:%S} UTC  "
        f"temporal {settings.temporal_address} ({settings.temporal_namespace})",
        "",
        f"{'service':<15}{'pollers':>8}{'backlog':>9}{'oldest':>9}{'add/s':>8}{'dispatch/s':>12}",
    ]
    for q in status.queues:
        if q.error:
            lines.append(f"{q.queue:<15}{'?':>8}  {q.error}")
            continue
        age = "-" if not q.backlog else f"{q.backlog_age_s or 0:.1f}s"
        flag = "   NO WORKER" if q.pollers == 0 else ""
        lines.append(
            f"{q.queue:<15}{_num(q.pollers):>8}{_num(q.backlog):>9}{age:>9}"
            f"{_num(q.add_rate, '.1f'):>8}{_num(q.dispatch_rate, '.1f'):>12}{flag}"
        )
    lines += ["", "running workflows"]
    lines += [f"  {name:<22}{_num(n):>8}" for name, n in status.running.items()]
    lines += ["", *_ingestion(status)]
    lines += ["", *_alerts(status.sections["alerts"])]
    lines += ["", *_rollouts(status.sections["rollouts"])]
    return "\n".join(lines)


def _ingestion(status: Status) -> list[str]:
    rows = status.sections["ingestion"]
    if isinstance(rows, str):
        return [f"ingestion: {rows}"]
    r = rows[0]
    oldest = f", oldest {r['oldest_s']:.1f} s" if r["oldest_s"] is not None else ""
    lines = [
        f"ingestion: waiting {r['pending_batches']:,} batches ({r['pending_readings']:,} readings{oldest});"
        f" last minute {r['stored_last_minute']:,} stored, {r['quarantined_last_minute']:,} quarantined"
    ]
    for shard, progress in status.shards:
        if progress is None:
            lines.append(f"  shard {shard}: no answer (is an orchestration worker running?)")
        else:
            lines.append(f"  shard {shard}: {progress.windows:,} windows, {progress.readings:,} readings")
    return lines


def _alerts(rows: list[dict[str, Any]] | str) -> list[str]:
    if isinstance(rows, str):
        return [f"open alerts: {rows}"]
    lines = [f"open alerts: {rows[0]['total'] if rows else 0}"]
    for a in rows:
        lines.append(
            f"  {a['tenant']:<12}{a['device_id']:<24}{a['rule_id']:<16}{a['metric']:<14}"
            f"{a['raised_value']:>10.2f}  since {a['raised_at']:%Y-%m-%d %H:%M:%S}"
        )
    return lines


def _rollouts(rows: list[dict[str, Any]] | str) -> list[str]:
    if isinstance(rows, str):
        return [f"rollouts in progress: {rows}"]
    lines = [f"rollouts in progress: {len(rows)}"]
    for r in rows:
        done = r["devices"] - r["unfinished"]
        lines.append(
            f"  {r['tenant']:<12}{r['campaign_id']:<24}{r['kind']:<9}{done:,}/{r['devices']:,} done"
            f" ({r['succeeded']:,} succeeded, {r['failed']:,} failed)"
        )
    return lines


def _dsn(settings: Settings) -> str:
    """DATABASE_URL, or the embedded server of a running `fleetflow up`: never started here."""
    pgdata = settings.data_dir / "postgres"
    if settings.database_url is None and not (pgdata / "postmaster.pid").exists():
        raise StartupError(
            f"PostgreSQL is not running: DATABASE_URL is unset and no embedded server runs in {pgdata}"
        )
    return database_url(settings)


async def status(settings: Settings, watch_s: float | None) -> int:
    """`fleetflow status [--watch [S]]`; StartupError (one line, exit 2) when Temporal or
    PostgreSQL cannot be reached at start."""
    client = await connect(settings, service="cli", timeout=5)
    pool = await create_pool(_dsn(settings), size=2, timeout=5)
    try:
        if watch_s is None:
            print(render(await gather(client, pool, settings.ingest_shards), settings))
            return 0
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
        while not stop.is_set():
            screen = render(await gather(client, pool, settings.ingest_shards), settings)
            print(f"{clear}{screen}\n\nevery {watch_s:g} s; Ctrl-C stops", flush=True)
            try:
                await asyncio.wait_for(stop.wait(), watch_s)
            except TimeoutError:
                pass
        return 0
    finally:
        await pool.close()
