"""Ingestion speed end to end: HTTP acknowledged → stored → analysed, with ack latency,
reading-to-webhook alert latency, peak RSS and CPU per reading, beside the raw asyncpg COPY
rate into the same PostgreSQL measured in the same run.

    python -m bench.ingest [--seconds S] [--senders N] [--batch N] [--workers N]
    python -m bench.ingest --tracing 0.01            # traced, 1% of traces sampled
    python -m bench.ingest --tracing-overhead 0.01   # off, then on: tracing_overhead_ratio
    python -m bench.ingest --engine-work             # tasks per 1,000 readings at 500/s and --rate
    python -m bench.ingest --rate 0 --api-processes 2 --profile /tmp/prof   # py-spy profiles

With tracing on, every process exports over OTLP/HTTP to a local sink that reads and drops
each export (no collector here), so the export cost is paid as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from bench import engine_work, profile
from bench.platform import Platform, platform
from bench.stack import percentile, say

TENANT = "default"
DEVICES = 500
# the alerter's devices, in turn: each goes hot once (the alert measured), then back to normal
# (its window clears the alert); a device flapping every second would raise its next alert only
# once the window of its clearing reading is stored, which measures the backlog, not alerting
ALERT_DEVICES = 64


async def raw_copy_rate(dsn: str, rows: int = 500_000) -> float:
    """Rows/s of asyncpg COPY into a table shaped and indexed like data.readings."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """DROP TABLE IF EXISTS public.bench_copy;
               CREATE TABLE public.bench_copy (tenant text, device_id text, metric text,
                   ts timestamptz, value double precision);
               CREATE INDEX ON public.bench_copy (tenant, device_id, metric, ts)"""
        )
        now = datetime.now(UTC)
        records = [
            (TENANT, f"d{i % DEVICES}", "bench", now + timedelta(microseconds=i), float(i))
            for i in range(rows)
        ]
        started = time.perf_counter()
        for start in range(0, rows, 50_000):
            await conn.copy_records_to_table("bench_copy", records=records[start : start + 50_000])
        rate = rows / (time.perf_counter() - started)
        await conn.execute("DROP TABLE public.bench_copy")
        return rate
    finally:
        await conn.close()


def batch_body(batch_size: int, start: datetime) -> bytes:
    """One batch spread over the bench devices; BATCHID is replaced per request."""
    readings = [
        {
            "device_id": f"bench-{i % DEVICES:04d}",
            "ts": (start + timedelta(milliseconds=i)).isoformat(),
            "metric": "bench",
            "value": 20.0 + (i % 7),
        }
        for i in range(batch_size)
    ]
    return json.dumps({"batch_id": "BATCHID", "readings": readings}).encode()


class _LoopbackServer:
    """A minimal HTTP/1.1 server on 127.0.0.1: each request body goes to `receive`."""

    reply = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"

    def __init__(self) -> None:
        self.port = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    def receive(self, body: bytes) -> None:
        """Called with every request body."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.receive(await reader.readexactly(length))
                writer.write(self.reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


class OtlpSink(_LoopbackServer):
    """An OTLP/HTTP endpoint that reads every export and answers 200: the spans' whole cost
    (sampling, recording, batching, protobuf, HTTP) is paid, and nothing is kept."""

    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"

    def __init__(self) -> None:
        super().__init__()
        self.exports = 0
        self.bytes = 0

    def receive(self, body: bytes) -> None:
        self.bytes += len(body)
        self.exports += 1


class Webhooks(_LoopbackServer):
    """A tiny HTTP receiver that timestamps each event it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[float, dict[str, Any]]] = []

    def receive(self, body: bytes) -> None:
        self.received.append((time.perf_counter(), json.loads(body)))


def _cpu_s(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds each API and worker process has used so far."""
    used = {}
    for name, proc in procs.items():
        try:
            times = proc.cpu_times()
            used[name] = times.user + times.system
        except psutil.Error:
            used[name] = 0.0
    return used


async def setup(p: Platform, http: httpx.AsyncClient, hooks: Webhooks) -> None:
    devices = [{"device_id": f"bench-{i:04d}", "device_type": "sensor"} for i in range(DEVICES)]
    devices += [{"device_id": f"bench-alert-{k}", "device_type": "sensor"} for k in range(ALERT_DEVICES)]
    accepted = (await http.post("/v1/devices:bulk", json={"devices": devices}, headers=p.headers)).json()
    status = "running"
    while status == "running":
        await asyncio.sleep(0.2)
        status = (await http.get(accepted["status_url"], headers=p.headers)).json()["status"]
    rule = {
        "rule_id": "bench-hot",
        "device_type": "sensor",
        "metric": "temp",
        "kind": "threshold",
        "params": {"above": 100, "clear_above": 50},
    }
    (await http.put("/v1/rules/bench-hot", json=rule, headers=p.headers)).raise_for_status()
    hook = {
        "url": f"http://127.0.0.1:{hooks.port}/hook",
        "event_types": ["AlertRaised"],
        "secret": "bench-secret-0123456789",
    }
    (await http.post("/v1/subscriptions", json=hook, headers=p.headers)).raise_for_status()


async def run(
    seconds: float,
    senders: int,
    batch_size: int,
    workers: int,
    shards: int,
    rate: float,
    tracing: float | None = None,
    api_processes: int = 1,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Drive the platform for `seconds` and measure; `tracing` is the sample ratio (None: off);
    with `profile_dir`, the API and every worker process are sampled by py-spy while sending."""
    hooks = Webhooks()
    await hooks.start()
    env = {"FLEETFLOW_INGEST_SHARDS": str(shards)} if shards else {}
    # one tenant offers the whole load: it measures the pipeline, so the tenant rates are off
    env["FLEETFLOW_QUOTAS"] = "readings_per_s=0,requests_per_s=0,device_readings_per_s=0"
    sink = OtlpSink()
    if tracing is not None:
        await sink.start()
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.port}"
        env["FLEETFLOW_TRACE_SAMPLE_RATIO"] = str(tracing)
    running = platform(workers, env, api_processes)
    async with running as p, httpx.AsyncClient(base_url=p.api_url, timeout=30) as http:
        dsn = p.database_url()
        say("raw asyncpg COPY baseline ...")
        copy_rate = await raw_copy_rate(dsn)
        say(f"  {copy_rate:,.0f} rows/s")
        await setup(p, http, hooks)
        body = batch_body(batch_size, datetime.now(UTC) - timedelta(minutes=1))
        latencies: list[float] = []
        acked = 0
        refused = 0
        spikes: list[tuple[str, float]] = []  # (device, when its hot reading was sent)
        deadline = time.perf_counter() + seconds
        rss: dict[str, float] = {}

        interval = batch_size * senders / rate if rate else 0.0

        async def sender(k: int) -> None:
            nonlocal acked, refused
            due = time.perf_counter() + k * interval / senders
            while time.perf_counter() < deadline:
                # paced: the offered load is `rate`, so a backlog shows as drain time, not as speed
                due += interval
                await asyncio.sleep(max(0.0, due - interval - time.perf_counter()))
                content = body.replace(b"BATCHID", uuid.uuid4().hex.encode(), 1)
                started = time.perf_counter()
                response = await http.post(
                    "/v1/telemetry",
                    content=content,
                    headers={**p.headers, "Content-Type": "application/json"},
                )
                if response.status_code == 202:
                    latencies.append((time.perf_counter() - started) * 1000)
                    acked += batch_size
                else:
                    refused += 1

        async def alerter() -> None:
            value, turn = 10.0, -1
            while time.perf_counter() < deadline:
                value = 150.0 if value < 100 else 10.0
                turn += value > 100
                device = f"bench-alert-{turn % ALERT_DEVICES}"
                reading = {
                    "device_id": device,
                    "ts": datetime.now(UTC).isoformat(),
                    "metric": "temp",
                    "value": value,
                }
                sent = time.perf_counter()
                await http.post(
                    "/v1/telemetry",
                    json={"batch_id": uuid.uuid4().hex, "readings": [reading]},
                    headers=p.headers,
                )
                if value > 100:
                    spikes.append((device, sent))
                    ACKS[device] = (time.time() - time.perf_counter() + sent, time.time())
                await asyncio.sleep(1.0)

        async def sampler() -> None:
            procs = p.processes()
            while True:
                for name, proc in procs.items():
                    try:
                        rss[name] = max(rss.get(name, 0), proc.memory_info().rss / 2**20)
                    except Exception:
                        pass
                await asyncio.sleep(0.5)

        async def progress() -> None:
            while time.perf_counter() < deadline:
                await asyncio.sleep(2)
                p50 = percentile(latencies, 50) if latencies else 0
                say(f"  acked {acked:,} readings, ack p50 {p50:.0f} ms")

        say(f"sending for {seconds:.0f} s: {senders} senders, {batch_size} readings a batch ...")
        procs = p.processes()
        metrics = engine_work.metrics_urls(procs)
        await asyncio.sleep(1.5)  # the setup's tasks reach the counters (exported each second)
        tasks_before = await _tasks(http, metrics)
        windows_before = await _windows(dsn)
        cpu_before = _cpu_s(procs)
        started = time.perf_counter()
        sampling = asyncio.create_task(sampler())
        spies = [] if profile_dir is None else profile.start(procs, ("api", "worker-"), seconds, profile_dir)
        await asyncio.gather(*(sender(k) for k in range(senders)), alerter(), progress())
        for spy in spies:
            await asyncio.to_thread(spy.wait)
        say("waiting for every acknowledged reading to be stored and analysed ...")
        conn = await asyncpg.connect(dsn)
        try:
            while True:
                done = await conn.fetchval(
                    "SELECT count(*) FROM data.ingest_batches WHERE status <> 'stored'"
                )
                if done == 0:
                    break
                await asyncio.sleep(0.2)
            wall = time.perf_counter() - started
            cpu_by_process = {k: v - cpu_before.get(k, 0.0) for k, v in _cpu_s(procs).items()}
            cpu = sum(cpu_by_process.values())
            sampling.cancel()
            stored = await conn.fetchval("SELECT count(*) FROM data.readings WHERE metric = 'bench'")
        finally:
            await conn.close()
        await asyncio.sleep(2)  # last webhooks
        await trace_histories(p, hooks)
        tasks_after = await _tasks(http, metrics)
        by_workflow = None if tasks_before is None or tasks_after is None else tasks_after - tasks_before
        tasks = None if by_workflow is None else sum(by_workflow.values())
        window_tasks = None if by_workflow is None else engine_work.window_share(by_workflow)
        windows, shard_count = await _windows(dsn, windows_before[0])
    alert_latencies = []
    for received, event in hooks.received:
        if event.get("type") == "AlertRaised":
            device = event.get("device_id")
            before = [at for d, at in spikes if d == device and at <= received]
            if before:
                alert_latencies.append((received - before[-1]) * 1000)
    sustained = stored / wall
    return {
        "readings_per_s": round(sustained),
        "acked_readings_per_s": round(acked / seconds),
        "api_processes": api_processes,
        "raw_copy_rows_per_s": round(copy_rate),
        "ratio_vs_copy": round(sustained / copy_rate, 3),
        "acked_readings": acked,
        "stored_readings": stored,
        "refused_batches": refused,
        "ack_p50_ms": round(percentile(latencies, 50), 1),
        "ack_p99_ms": round(percentile(latencies, 99), 1),
        "alerts_seen": len(alert_latencies),
        "alert_p99_ms": round(percentile(alert_latencies, 99), 1) if alert_latencies else None,
        # every one (a run has a few dozen at most): a p99 of ten is their maximum
        "alert_ms": sorted(round(a) for a in alert_latencies),
        "offered_readings_per_s": round(rate),
        "tracing": "off" if tracing is None else tracing,
        # CPU of the API and worker processes from the first batch sent to the last stored
        "cpu_ms_per_1k_readings": round(cpu * 1e6 / stored, 3) if stored else None,
        **{f"cpu_s_{k}": round(v, 1) for k, v in sorted(cpu_by_process.items())},
        "otlp_exports": sink.exports,
        "otlp_export_kib": round(sink.bytes / 1024),
        # workflow tasks + activity executions of every worker, from the SDK's counters
        "temporal_tasks": tasks,
        "temporal_tasks_per_1k_readings": round(tasks * 1000 / stored, 2) if stored and tasks else None,
        # the shards' windows alone; the rest is the alerts' work (raise, record, deliver)
        "window_tasks_per_1k_readings": round(window_tasks * 1000 / stored, 2)
        if stored and window_tasks
        else None,
        "temporal_tasks_by_workflow": dict(by_workflow.most_common()) if by_workflow else None,
        "windows_per_s_per_shard": round(windows / wall / max(shard_count, 1), 2),
        "readings_per_window": round(stored / windows, 1) if windows else None,
        "drain_s": round(wall - seconds, 1),
        "wall_s": round(wall, 1),
        **{f"rss_mb_{k}": round(v) for k, v in sorted(rss.items())},
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **(
            {}
            if profile_dir is None
            else {f"profile_{f.stem}": profile.summary(f) for f in sorted(profile_dir.glob("*.txt"))}
        ),
    }


ACKS: dict[str, tuple[float, float]] = {}


async def trace_histories(p: Any, hooks: Any) -> None:
    from temporalio.client import Client
    args = list(p.process.args)
    port = args[args.index("--temporal-port") + 1]
    client = await Client.connect(f"127.0.0.1:{port}")
    off = time.time() - time.perf_counter()
    hooked = {e.get("device_id"): at + off for at, e in hooks.received if e.get("type") == "AlertRaised"}
    async for wf in client.list_workflows("WorkflowType='ThresholdAlert'"):
        device = "bench-alert-" + wf.id.rsplit("/", 1)[0].split("bench-alert-")[1]
        sent, acked = ACKS.get(device, (None, None))
        if sent is None:
            continue
        h = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        marks = []
        for e in h.events:
            t = e.event_time.ToDatetime().replace(tzinfo=UTC).timestamp()
            marks.append(f"{e.event_type.__class__.__name__ if False else e.event_type}:{(t - sent) * 1000:.0f}")
        hook = hooked.get(device)
        print(device, "ack", round((acked - sent) * 1000), "hook", round((hook - sent) * 1000) if hook else None, " ".join(marks), file=sys.stderr)
    async for wf in client.list_workflows("WorkflowType='EventDelivery'"):
        h = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        t0 = min(a for a, _ in ACKS.values())
        print("delivery", wf.id, " ".join(f"{e.event_type}:{(e.event_time.ToDatetime().replace(tzinfo=UTC).timestamp() - t0) * 1000:.0f}" for e in h.events[-60:]), file=sys.stderr)


async def _tasks(http: httpx.AsyncClient, metrics: list[str]) -> Counter[str] | None:
    """The workers' task counters; None (the other figures still count) when a worker's
    /metrics never answers (a worker that died on a machine too busy)."""
    try:
        return await engine_work.tasks(http, metrics)
    except httpx.ConnectError as exc:
        say(f"a worker's /metrics does not answer ({exc}): no task figures this run")
        return None


async def _windows(dsn: str, since: int = 0) -> tuple[int, int]:
    """Windows stored after the first `since` (by count) and the shards that stored them."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS n, count(DISTINCT split_part(window_id, '/', 1)) AS shards
               FROM (SELECT window_id FROM data.windows ORDER BY stored_at OFFSET $1) w""",
            since,
        )
        assert row is not None
        return int(row["n"]), int(row["shards"])
    finally:
        await conn.close()


def engine_work_at_two_rates(
    seconds: float, senders: int, batch_size: int, workers: int, shards: int, rate: float
) -> dict[str, Any]:
    """Tasks per 1,000 readings at a trickle (500 readings/s in batches of 25) and at `rate`."""
    low = asyncio.run(run(seconds, senders, 25, workers, shards, 500))
    high = asyncio.run(run(seconds, senders, batch_size, workers, shards, rate))

    def ratio(key: str) -> float | None:
        return round(low[key] / high[key], 1) if low[key] and high[key] else None

    return {
        "temporal_tasks_per_1k_readings_at_500": low["temporal_tasks_per_1k_readings"],
        f"temporal_tasks_per_1k_readings_at_{rate:.0f}": high["temporal_tasks_per_1k_readings"],
        "temporal_tasks_ratio_low_vs_high": ratio("temporal_tasks_per_1k_readings"),
        "window_tasks_per_1k_readings_at_500": low["window_tasks_per_1k_readings"],
        f"window_tasks_per_1k_readings_at_{rate:.0f}": high["window_tasks_per_1k_readings"],
        "window_tasks_ratio_low_vs_high": ratio("window_tasks_per_1k_readings"),
        "alerts_seen_at_500": low["alerts_seen"],
        "windows_per_s_per_shard_at_500": low["windows_per_s_per_shard"],
        "readings_per_window_at_500": low["readings_per_window"],
        f"windows_per_s_per_shard_at_{rate:.0f}": high["windows_per_s_per_shard"],
        "alert_p99_ms_at_500": low["alert_p99_ms"],
        f"alert_p99_ms_at_{rate:.0f}": high["alert_p99_ms"],
        "runs": {"low": low, "high": high},
    }


def tracing_overhead(
    common: tuple[float, int, int, int, int, float], ratio: float, repeat: int
) -> dict[str, Any]:
    """Off/on pairs, each a fresh platform; a pair compares neighbours in time, and the
    median pair resists the noise of a shared machine."""
    pairs = []
    for _ in range(repeat):
        off = asyncio.run(run(*common, tracing=None))
        on = asyncio.run(run(*common, tracing=ratio))
        pairs.append((off, on))

    def median(key: str) -> float:
        return float(statistics.median(on[key] / off[key] for off, on in pairs))

    return {
        # extra CPU per reading that tracing costs the API and workers (0.05 = 5%)
        "tracing_overhead_ratio": round(median("cpu_ms_per_1k_readings") - 1, 3),
        "tracing_overhead_ratios": [
            round(on["cpu_ms_per_1k_readings"] / off["cpu_ms_per_1k_readings"] - 1, 3) for off, on in pairs
        ],
        "throughput_ratio_on_vs_off": round(median("readings_per_s"), 3),
        "ack_p99_ms_off": [off["ack_p99_ms"] for off, _ in pairs],
        "ack_p99_ms_on": [on["ack_p99_ms"] for _, on in pairs],
        "runs": [{"off": off, "on": on} for off, on in pairs],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument(
        "--rate", type=float, default=100_000, help="offered readings/s (0: as fast as acked)"
    )
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes per queue")
    parser.add_argument("--shards", type=int, default=0, help="FLEETFLOW_INGEST_SHARDS (0: default)")
    parser.add_argument("--api-processes", type=int, default=1, help="fleetflow up --api-processes")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the API and the workers while sending, into DIR"
    )
    parser.add_argument("--tracing", type=float, metavar="RATIO", help="trace, sampling RATIO (e.g. 0.01)")
    parser.add_argument(
        "--tracing-overhead",
        type=float,
        metavar="RATIO",
        help="run with tracing off, then on at RATIO, and print tracing_overhead_ratio",
    )
    parser.add_argument("--repeat", type=int, default=1, help="off/on pairs for --tracing-overhead")
    parser.add_argument(
        "--engine-work",
        action="store_true",
        help="run at 500 readings/s, then at --rate: temporal_tasks_per_1k_readings of each, their ratio",
    )
    args = parser.parse_args()
    common = (args.seconds, args.senders, args.batch, args.workers, args.shards, args.rate)
    if args.engine_work:
        figures = engine_work_at_two_rates(*common)
    elif args.tracing_overhead is None:
        figures = asyncio.run(
            run(*common, tracing=args.tracing, api_processes=args.api_processes, profile_dir=args.profile)
        )
    else:
        figures = tracing_overhead(common, args.tracing_overhead, args.repeat)
    for name, value in figures.items():
        say(f"  {name:<24} {value}")
    print(json.dumps(figures), flush=True)
    sys.stderr.flush()
    os._exit(0)
