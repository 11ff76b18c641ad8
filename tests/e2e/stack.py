"""`fleetflow up` as a subprocess: ports, start, find its processes, stop, check nothing is left."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from temporalio.client import Client

from fleetflow.settings import ENVIRONMENT, Settings
from fleetflow.temporal import connect

T = TypeVar("T")

BIN = Path(sys.executable).parent
FLEETFLOW = str(BIN / "fleetflow")
START_DEADLINE_S = 120.0
STOP_DEADLINE_S = 60.0
_taken: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port(low: int = 10000, high: int = 32000) -> int:
    """A free port that this module has not handed out before.

    Below the kernel's ephemeral range (32768 and up here), so that no outgoing connection
    takes it between this check and the moment `fleetflow up` binds it.
    """
    for _ in range(1000):
        candidate = random.randint(low, high)
        if candidate not in _taken and _bindable(candidate):
            _taken.add(candidate)
            return candidate
    raise RuntimeError("no free port found")


def temporal_port() -> int:
    """A free gRPC port P whose implied HTTP port P + 10000 is free too (see dev_server_argv)."""
    for _ in range(1000):
        candidate = port(10000, 22000)
        if candidate + 10000 not in _taken and _bindable(candidate + 10000):
            _taken.add(candidate + 10000)
            return candidate
    raise RuntimeError("no free port pair found")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any fleetflow setting, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig TERM` when available: a killed test run then still stops the stack.

    (preexec_fn is not used: it is unsafe once the Temporal client's threads run in this process.)
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def alive(process: psutil.Process) -> bool:
    """True while process (the very one, not a reused pid) runs and is not a zombie."""
    try:
        return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes of processes that still run."""
    return [p for p in processes if alive(p)]


def cmdline(process: psutil.Process) -> list[str]:
    """process's command line ([] once it is gone)."""
    try:
        return [str(a) for a in process.cmdline()]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def mentioning(*needles: str) -> list[psutil.Process]:
    """Running processes whose command line contains any of needles."""
    found = []
    for process in psutil.process_iter():
        line = " ".join(cmdline(process))
        if any(n in line for n in needles) and alive(process):
            found.append(process)
    return found


def postmaster(pgdata: Path) -> psutil.Process | None:
    """The postmaster of the embedded server in pgdata, from postmaster.pid."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
        return psutil.Process(pid)
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return None


@dataclass
class Stack:
    """One `fleetflow up` on its own data directory and ports; can be stopped and started again."""

    data_dir: Path
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    api_port: int = 0
    temporal_port: int = 0
    ui_port: int = 0
    mqtt_port: int = 0
    runs: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start `fleetflow up` on fresh free ports (the data directory is kept)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.api_port, self.temporal_port, self.ui_port = port(), temporal_port(), port()
        self.mqtt_port = port()
        self.runs += 1
        out = self.log_dir / f"up-{self.runs}.out"
        err = self.log_dir / f"up-{self.runs}.err"
        self.logs += [out, err]
        argv = [
            *pdeathsig_prefix(),
            FLEETFLOW,
            "up",
            "--data-dir",
            str(self.data_dir),
            "--api-port",
            str(self.api_port),
            "--temporal-port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            "--mqtt-port",
            str(self.mqtt_port),
        ]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.process = subprocess.Popen(
                argv,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env=clean_env(),
                cwd=self.log_dir,
            )

    def output(self) -> str:
        """Everything every run printed (stdout and stderr)."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    async def temporal_client(self) -> Client:
        """A client on the stack's dev server, signed with the stack's keys as its CLI is."""
        settings = Settings(data_dir=self.data_dir, temporal_address=self.temporal_address)
        return await connect(settings, service="e2e-tests")

    def admin_headers(self) -> dict[str, str]:
        """The dev admin token that `up` wrote into the data directory."""
        token = (self.data_dir / "admin-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def supervisor(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def children(self) -> list[psutil.Process]:
        """The supervisor's direct children that run now."""
        try:
            return survivors(self.supervisor().children())
        except psutil.NoSuchProcess:
            return []

    def descendants(self) -> list[psutil.Process]:
        """Every process below the supervisor that runs now."""
        try:
            return survivors(self.supervisor().children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def workers(self, queue: str) -> list[psutil.Process]:
        """The supervisor's worker processes of queue."""
        return [c for c in self.children() if _is_worker_of(cmdline(c), queue)]

    def worker(self, queue: str) -> psutil.Process:
        """The one worker process of queue."""
        found = self.workers(queue)
        assert len(found) == 1, f"expected one {queue} worker, found {found}"
        return found[0]

    def environ_of_worker(self) -> dict[str, str]:
        """The environment the supervisor gave its workers (DATABASE_URL, TEMPORAL_ADDRESS, ...)."""
        env: dict[str, Any] = self.worker("device").environ()
        return {str(k): str(v) for k, v in env.items()}

    async def wait_healthy(self, deadline_s: float = START_DEADLINE_S) -> dict[str, Any]:
        """Poll GET /health (with the dev admin token) until 200; its report."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline_s
        last: str = "no answer yet"
        async with httpx.AsyncClient(base_url=self.api_url, timeout=30) as http:
            while loop.time() < until:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"`fleetflow up` exited with {self.process.returncode}:\n{self.output()}"
                    )
                if not (self.data_dir / "admin-token").exists():  # written just before the API starts
                    await asyncio.sleep(0.5)
                    continue
                try:
                    response = await http.get("/health", headers=self.admin_headers())
                    if response.status_code == 200:
                        report: dict[str, Any] = response.json()
                        return report
                    last = f"{response.status_code} {response.text}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                await asyncio.sleep(0.5)
        raise AssertionError(f"/health not 200 within {deadline_s}s; last: {last}\n{self.output()}")

    async def wait_exit(self, deadline_s: float = STOP_DEADLINE_S) -> int:
        """The supervisor's exit status once it ends (AssertionError after deadline_s)."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline_s
        while self.process.poll() is None:
            if loop.time() > until:
                raise AssertionError(f"`fleetflow up` still runs {deadline_s}s after SIGINT")
            await asyncio.sleep(0.2)
        return self.process.returncode

    def shutdown(self) -> None:
        """Last-resort teardown: stop whatever of this stack still runs."""
        if self.process is not None and self.process.poll() is None:
            before = self.descendants()
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for leftover in survivors(before):
                leftover.kill()
        pm = postmaster(self.pgdata)
        if pm is not None and alive(pm):
            from fleetflow import embedded_pg

            embedded_pg.stop(self.pgdata)


def _is_worker_of(argv: list[str], queue: str) -> bool:
    return (
        "cli.main" in argv
        and "worker" in argv
        and any(a == "--queue" and b == queue for a, b in itertools.pairwise(argv))
    )


def wait_gone(processes: Iterable[psutil.Process], deadline_s: float = 10.0) -> list[psutil.Process]:
    """Give processes up to deadline_s to end; the ones still running."""
    pending = list(processes)
    until = time.monotonic() + deadline_s
    while True:
        pending = survivors(pending)
        if not pending or time.monotonic() > until:
            return pending
        time.sleep(0.1)


async def wait_gone_async(
    processes: Iterable[psutil.Process], deadline_s: float = 10.0
) -> list[psutil.Process]:
    """wait_gone without blocking the event loop."""
    pending = list(processes)
    until = time.monotonic() + deadline_s
    while True:
        pending = survivors(pending)
        if not pending or time.monotonic() > until:
            return pending
        await asyncio.sleep(0.1)


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], deadline_s: float, what: str
) -> T:
    """Poll probe until done(result); fails naming what and the last result after deadline_s."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline_s
    while True:
        result = await probe()
        if done(result):
            return result
        if loop.time() > until:
            raise AssertionError(f"{what}: not reached within {deadline_s}s; last: {result!r}")
        await asyncio.sleep(0.25)


async def replaced(stack: Stack, queue: str, dead: psutil.Process) -> psutil.Process:
    """The worker of queue that the supervisor started in place of dead."""

    async def probe() -> list[psutil.Process]:
        return [w for w in stack.workers(queue) if w.pid != dead.pid]

    found = await eventually(probe, lambda ws: len(ws) == 1, 60, f"a new {queue} worker")
    return found[0]


async def json_of(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """GET path as JSON; transport errors and non-200 become {"_status": ...} so polling goes on."""
    try:
        response = await http.get(path, headers=headers)
    except httpx.HTTPError as exc:
        return {"_status": repr(exc)}
    if response.status_code != 200:
        return {"_status": response.status_code, "_body": response.text}
    body: dict[str, Any] = response.json()
    return body
