"""The real platform for benchmarks: `fleetflow up` as a subprocess on free ports and a
temporary data directory, as a user runs it (separate API, worker and server processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.stack import say
from fleetflow.contracts.common import TaskQueue


def _free_port(above: int = 10000) -> int:
    for candidate in range(above, 30000, 7):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
                sock2 = socket.socket()
                sock2.bind(("127.0.0.1", candidate + 10000))  # the dev server's HTTP port
                sock2.close()
                return candidate
            except OSError:
                continue
    raise RuntimeError("no free port")


def _free_range(count: int, above: int) -> int:
    """The first of count consecutive free ports (the workers' /metrics ports)."""
    for first in range(above, 30000, count + 3):
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free port range")


@dataclass
class Platform:
    """A running `fleetflow up`."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    api_url: str
    headers: dict[str, str]
    mqtt_port: int = 0

    def processes(self) -> dict[str, psutil.Process]:
        """The API and worker processes, by role (`api`, `worker-data-1`, ...)."""
        out: dict[str, psutil.Process] = {}
        apis = []
        for child in psutil.Process(self.process.pid).children():
            argv = child.cmdline()
            if "api" in argv:
                apis.append(child)
            elif "mqtt" in argv:
                out["mqtt"] = child
            elif "--queue" in argv:
                queue = argv[argv.index("--queue") + 1]
                n = sum(1 for k in out if k.startswith(f"worker-{queue}"))
                out[f"worker-{queue}-{n + 1}"] = child
        # `api`, or `api-1`, `api-2`, ... with --api-processes (each counted, none hiding another)
        out.update({"api": apis[0]} if len(apis) == 1 else {f"api-{i + 1}": a for i, a in enumerate(apis)})
        return out

    def database_url(self) -> str:
        """The DSN the supervisor gave its workers."""
        worker = next(p for name, p in self.processes().items() if name.startswith("worker-data"))
        return str(worker.environ()["DATABASE_URL"])


@asynccontextmanager
async def platform(
    workers: int = 1, extra_env: dict[str, str] | None = None, api_processes: int = 1
) -> AsyncIterator[Platform]:
    """Start `fleetflow up` (with `api_processes` API processes), wait for /health, stop it with
    SIGINT afterwards."""
    with tempfile.TemporaryDirectory(prefix="fleetflow-bench-") as tmp:
        data = Path(tmp)
        api_port, temporal_port, ui_port = _free_port(11000), _free_port(12000), _free_port(13000)
        mqtt_port = (
            int(env_port) if (env_port := (extra_env or {}).get("FLEETFLOW_MQTT_PORT")) else _free_port(15000)
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FLEETFLOW_", "TEMPORAL_", "DATABASE_URL"))
        }
        # one /metrics port per worker process, away from any other stack's defaults
        env["FLEETFLOW_WEBHOOK_ALLOW_NETWORKS"] = "127.0.0.1/32"  # the benchmark's own receiver
        env["FLEETFLOW_METRICS_PORT"] = str(_free_range(len(TaskQueue) * workers, 14000))
        env.update(extra_env or {})
        argv = [
            sys.executable,
            "-m",
            "cli.main",
            "up",
            "--data-dir",
            str(data),
            "--workers",
            str(workers),
            "--api-port",
            str(api_port),
            "--temporal-port",
            str(temporal_port),
            "--ui-port",
            str(ui_port),
            "--mqtt-port",
            str(mqtt_port),
            "--api-processes",
            str(api_processes),
        ]
        log = (data.parent / f"{data.name}.log").open("wb")
        say(f"starting fleetflow up ({workers} worker process(es) per queue) ...")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)  # noqa: ASYNC220
        api_url = f"http://127.0.0.1:{api_port}"
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                for _ in range(600):
                    token_file = data / "admin-token"  # written just before the API starts
                    try:
                        auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
                        if (await http.get(f"{api_url}/health", headers=auth)).status_code == 200:
                            break
                    except (FileNotFoundError, httpx.HTTPError):
                        pass
                    if process.poll() is not None:
                        raise RuntimeError(f"fleetflow up exited ({process.returncode}); see {log.name}")
                    await asyncio.sleep(0.2)
                else:
                    raise RuntimeError("fleetflow up did not become healthy")
            token = (data / "admin-token").read_text().strip()
            yield Platform(process, data, api_url, {"Authorization": f"Bearer {token}"}, mqtt_port)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
