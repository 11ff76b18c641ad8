"""`fleetflow mqtt`: the MQTT gateway alone, stopped cleanly by SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket

from fleetflow import observability
from fleetflow.db import create_pool
from fleetflow.embedded_pg import database_url
from fleetflow.settings import Settings
from fleetflow.temporal import connect
from gateway.server import Gateway, serve

log = logging.getLogger(__name__)


async def run_gateway(settings: Settings) -> int:
    """Serve MQTT on FLEETFLOW_MQTT_HOST:FLEETFLOW_MQTT_PORT until a stop signal."""
    observability.setup("fleetflow-mqtt", settings)
    client = await connect(settings, service="mqtt")
    dsn = database_url(settings)
    pool = await create_pool(dsn, size=settings.db_pool_size)
    node = f"{socket.gethostname()}:{settings.mqtt_port}"
    gateway = Gateway(settings, pool, client, dsn, node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await serve(gateway, settings.mqtt_host, settings.mqtt_port)
    # what start-up allocated (modules, the Temporal client, pydantic schemas) lives as long
    # as the process: out of the collector's way, so its full collections scan only what
    # connections and publishes allocate
    gc.collect()
    gc.freeze()
    log.info("MQTT on %s:%d", settings.mqtt_host, settings.mqtt_port)
    try:
        await stop.wait()
    finally:
        server.close()
        await gateway.stop()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        await pool.close()
        observability.shutdown()
    return 0
