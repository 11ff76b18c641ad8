"""Several API processes on one database are stateless: a change made through one takes effect
on the others at once (PostgreSQL notifications through each process's one LISTEN connection,
fleetflow/pg_listener.py), and `fleetflow api --processes 2` serves one port from two
supervised processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from api.revocations import revoke
from fleetflow.db import Pool
from fleetflow.security import verify_token
from fleetflow.settings import ENVIRONMENT, Settings
from tests.e2e.stack import FLEETFLOW, clean_env, pdeathsig_prefix
from tests.support import TEST_KEYS, bearer, eventually, free_port

START_DEADLINE_S = 90.0
# well under the 300 s a listening process keeps a tenant's limits (api/quotas.py): a process
# that did not hear the change would still show the old ones at the end of the wait
HEARD_WITHIN_S = 60.0
OPS = bearer("ops", ["tenants:admin", "system:read"])


def _environment(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    values = {name: getattr(settings, field) for name, (field, _) in ENVIRONMENT.items()}
    values |= {"FLEETFLOW_API_PORT": port, "FLEETFLOW_LOG_FORMAT": "text", "FLEETFLOW_METRICS_PORT": 0}
    return clean_env(**{n: str(v) for n, v in values.items() if v is not None}, **extra)


def _start(settings: Settings, port: int, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*pdeathsig_prefix(), FLEETFLOW, "api", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_environment(settings, port),
        )


async def _ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        deadline = asyncio.get_running_loop().time() + START_DEADLINE_S
        while True:
            assert process.poll() is None, f"fleetflow api exited:\n{log.read_text(errors='replace')}"
            try:
                if (await http.get("/openapi.json")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "fleetflow api did not start"
            await asyncio.sleep(0.2)


async def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(process.wait, 60)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait)
    print(log.read_text(errors="replace")[-10000:])


@pytest.fixture(scope="module")
async def two_apis(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[str]]:
    """The URLs of two `fleetflow api` processes on the session's servers."""
    logs = Path(tmp_path_factory.mktemp("api-processes"))
    started = []
    try:
        for i in range(2):
            port = free_port()
            log = logs / f"api-{i + 1}.log"
            started.append((f"http://127.0.0.1:{port}", _start(settings, port, log), log))
        for url, process, log in started:
            await _ready(url, process, log)
        yield [url for url, _, _ in started]
    finally:
        for _, process, log in started:
            await _stop(process, log)


async def test_a_profile_changed_through_one_process_applies_on_the_other_at_once(
    two_apis: list[str],
) -> None:
    first, second = two_apis
    tenant = f"procs-{os.urandom(4).hex()}"
    async with httpx.AsyncClient(base_url=first) as one, httpx.AsyncClient(base_url=second) as two:
        before = await two.get(f"/v1/tenants/{tenant}/profile", headers=OPS)  # the second caches it
        assert before.status_code == 200, before.text
        assert before.json()["limits"]["max_devices"] != 7
        changed = await one.put(f"/v1/tenants/{tenant}/profile", json={"max_devices": 7}, headers=OPS)
        assert changed.status_code == 200, changed.text

        async def seen_by_second() -> int:
            view = (await two.get(f"/v1/tenants/{tenant}/profile", headers=OPS)).json()
            return int(view["limits"]["max_devices"])

        await eventually(seen_by_second, lambda n: n == 7, timeout_s=HEARD_WITHIN_S)
        # and back: the tenant's own view on the second process follows too
        assert (await one.put(f"/v1/tenants/{tenant}/profile", json={}, headers=OPS)).status_code == 200
        await eventually(seen_by_second, lambda n: n != 7, timeout_s=HEARD_WITHIN_S)


async def test_a_token_revoked_is_refused_by_every_process(
    two_apis: list[str], pool: Pool, settings: Settings
) -> None:
    headers = bearer("procs", ["system:read"])
    claims = verify_token(TEST_KEYS, headers["Authorization"].removeprefix("Bearer "), settings.jwt_issuer)
    async with httpx.AsyncClient() as http:
        for url in two_apis:  # each process has cached "not revoked"
            assert (await http.get(f"{url}/v1/quotas", headers=headers)).status_code == 200
        await revoke(pool, claims.tenant, claims.jti, claims.expires_at, "test")
        for url in two_apis:

            async def status(url: str = url) -> int:
                return (await http.get(f"{url}/v1/quotas", headers=headers)).status_code

            await eventually(status, lambda code: code == 401, timeout_s=HEARD_WITHIN_S)


def _listeners(parent: psutil.Process, port: int) -> set[int]:
    """The pids of parent's children that listen on port."""
    found = set()
    for child in parent.children(recursive=True):
        try:
            sockets = child.net_connections("tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


async def test_processes_2_serves_one_port_from_two_processes_and_replaces_a_dead_one(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "api.log"
    process = _start(settings, port, log, "--processes", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        await _ready(url, process, log)
        parent = psutil.Process(process.pid)
        serving = await eventually(
            lambda: asyncio.to_thread(_listeners, parent, port),
            lambda p: len(p) == 2,
            timeout_s=START_DEADLINE_S,
        )
        killed = min(serving)
        victim = psutil.Process(killed)
        os.kill(killed, signal.SIGKILL)
        # (a connection the kernel queued for it before it died is reset: SO_REUSEPORT's way)
        await asyncio.to_thread(victim.wait, 30)
        async with httpx.AsyncClient(base_url=url) as http:
            # the other process answers meanwhile; the supervisor starts a new one
            for _ in range(5):
                assert (await http.get("/openapi.json")).status_code == 200
            now = await eventually(
                lambda: asyncio.to_thread(_listeners, parent, port),
                lambda p: len(p) == 2 and killed not in p,
                timeout_s=START_DEADLINE_S,
            )
            assert now & serving  # the survivor kept serving
    finally:
        await _stop(process, log)


async def test_processes_2_refuses_a_port_another_process_shares(settings: Settings, tmp_path: Path) -> None:
    """Another stack's process listening with SO_REUSEPORT would otherwise take half the
    connections of this one's port."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        log = tmp_path / "api.log"
        process = _start(settings, port, log, "--processes", "2")
        try:
            code = await asyncio.to_thread(process.wait, START_DEADLINE_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:
                await _stop(process, log)
    assert code is not None and code != 0
    assert f"port {port} is already in use" in log.read_text()
