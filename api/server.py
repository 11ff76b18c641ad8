"""`fleetflow api`: the API under uvicorn, stopped cleanly by SIGINT/SIGTERM; with
`--processes N`, N supervised API processes sharing one port (SO_REUSEPORT: the kernel spreads
connections over them)."""

from __future__ import annotations

import os
import socket

import uvicorn

from api.app import create_app
from fleetflow import observability
from fleetflow.errors import StartupError
from fleetflow.settings import Settings
from fleetflow.temporal import connect

# "1" (set by workers/processes.py): bind with SO_REUSEPORT, one process of several
REUSE_PORT_ENV = "FLEETFLOW_API_REUSE_PORT"


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other processes may bind as well."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"the API cannot bind {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(settings: Settings) -> int:
    """Serve until a stop signal; StartupError when a dependency is unreachable."""
    observability.setup("fleetflow-api", settings)
    client = await connect(settings, service="api")  # fail fast, with one line, before binding the port
    config = uvicorn.Config(
        create_app(settings, client),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
        log_config=None,  # uvicorn's records go through the process's (JSON) handler
    )
    server = uvicorn.Server(config)
    sockets = None
    if os.environ.get(REUSE_PORT_ENV) == "1":
        sockets = [reuse_port_socket(settings.api_host, settings.api_port)]
    try:
        async with observability.temporal_metrics():
            await server.serve(sockets=sockets)
    finally:
        observability.shutdown()
    if not server.started:
        raise StartupError(f"the API could not start on {settings.api_host}:{settings.api_port}")
    return 0
