"""`fleetflow api`: the API under uvicorn, stopped cleanly by SIGINT/SIGTERM."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from fleetflow import observability
from fleetflow.errors import StartupError
from fleetflow.settings import Settings
from fleetflow.temporal import connect


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
    try:
        async with observability.temporal_metrics():
            await server.serve()
    finally:
        observability.shutdown()
    if not server.started:
        raise StartupError(f"the API could not start on {settings.api_host}:{settings.api_port}")
    return 0
