"""`fleetflow mqtt`: the MQTT gateway alone, stopped cleanly by SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket

from fleetflow import observability
from fleetflow.db import close_pool, create_pool
from fleetflow.embedded_pg import database_url
from fleetflow.errors import StartupError
from fleetflow.settings import Settings
from fleetflow.temporal import connect
from gateway.server import Gateway, listen
from gateway.tls import server_context

log = logging.getLogger(__name__)


async def run_gateway(settings: Settings) -> int:
    """Serve MQTT on FLEETFLOW_MQTT_HOST:FLEETFLOW_MQTT_PORT (and over TLS on
    FLEETFLOW_MQTT_TLS_PORT when a certificate is set) until a stop signal."""
    tls = server_context(settings)  # a bad certificate or key: one line, before anything starts
    if not settings.mqtt_on:
        raise StartupError("no MQTT listener: FLEETFLOW_MQTT_PORT is 0 and no TLS certificate is set")
    observability.setup("fleetflow-mqtt", settings)
    client = await connect(settings, service="mqtt")
    dsn = database_url(settings)
    pool = await create_pool(dsn, size=settings.db_pool_size)
    node = f"{socket.gethostname()}:{settings.mqtt_port or settings.mqtt_tls_port}"
    gateway = Gateway(settings, pool, client, dsn, node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    servers = []
    # what start-up allocated (modules, the Temporal client, pydantic schemas) lives as long
    # as the process: out of the collector's way, so its full collections scan only what
    # connections and publishes allocate
    gc.collect()
    gc.freeze()
    try:
        if settings.mqtt_port:
            servers.append(await listen(gateway, settings.mqtt_host, settings.mqtt_port))
            log.info("MQTT on %s:%d", settings.mqtt_host, settings.mqtt_port)
        if tls is not None:
            servers.append(await listen(gateway, settings.mqtt_host, settings.mqtt_tls_port, tls))
            log.info("MQTT over TLS on %s:%d", settings.mqtt_host, settings.mqtt_tls_port)
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        await gateway.stop()
        for server in servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        await close_pool(pool)
        observability.shutdown()
    return 0


async def run_bridge(settings: Settings) -> int:
    """Bridge an external broker (FLEETFLOW_MQTT_BROKER_URL) to fleetflow until a stop signal."""
    from gateway.bridge import Bridge, bridge_client_id

    if not settings.mqtt_broker_url or not settings.mqtt_bridge_token:
        log.error("fleetflow mqtt-bridge needs FLEETFLOW_MQTT_BROKER_URL and FLEETFLOW_MQTT_BRIDGE_TOKEN")
        return 2
    observability.setup("fleetflow-mqtt-bridge", settings)
    client = await connect(settings, service="mqtt-bridge")
    dsn = database_url(settings)
    pool = await create_pool(dsn, size=settings.db_pool_size)
    bridge = Bridge(settings, pool, client, dsn, bridge_client_id(settings), settings.mqtt_bridge_token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await bridge.start()
    log.info("bridging %s as %s", settings.mqtt_broker_url, bridge.client_id)
    try:
        await stop.wait()
    finally:
        await bridge.stop()
        await close_pool(pool)
        observability.shutdown()
    return 0
