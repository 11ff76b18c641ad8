"""The FastAPI application and its lifespan (one client, one pool, one HTTP client per process)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from temporalio.client import Client

from activities.analytics import AnalyticsService
from activities.devices import DeviceService
from activities.subscriptions import Subscriptions
from api.command_notices import CommandNotices
from api.credentials import CredentialCache
from api.docs import self_hosted_docs
from api.ingestion import ensure_ingestion, watch_ingestion
from api.limits import BodyLimit
from api.observability import instrument, untraced
from api.openapi import document_problems
from api.problems import install_problem_handlers
from api.revocations import RevokedTokens, TokenRevocations
from api.routers import (
    codec,
    commands,
    consistency,
    devices,
    events,
    health,
    mqtt_hooks,
    onboardings,
    rollouts,
    telemetry,
    tenants,
    twins,
)
from api.routers import credentials as credential_routes
from api.state import AppState
from fleetflow.db import close_pool, create_pool, migrate
from fleetflow.dependency_graph import derive
from fleetflow.embedded_pg import database_url
from fleetflow.payload_codec import payload_keys
from fleetflow.pg_listener import PgListener
from fleetflow.schedules import apply_schedules
from fleetflow.settings import Settings
from fleetflow.temporal import connect

OUTBOUND_TIMEOUT = httpx.Timeout(10.0, connect=3.0)


def create_app(settings: Settings, temporal: Client | None = None) -> FastAPI:
    """The API; pass a connected client to share one (tests), else it connects at start."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = temporal or await connect(settings, service="api")
        pool = await create_pool(database_url(settings), size=settings.db_pool_size)
        await migrate(pool)
        # subscription secrets stored before they were sealed at rest (idempotent, usually none)
        await Subscriptions(pool, keys=payload_keys(settings)).seal_stored_secrets()
        await ensure_ingestion(client, settings.ingest_shards)
        await apply_schedules(client)  # fleetflow.schedules: idempotent
        # /v1/services' graph, parsed from the code (~0.1 s) here, before any request: parsing in
        # a thread beside another thread's `ast` use trips CPython 3.11's "AST constructor
        # recursion depth mismatch" (gh-106905)
        derive()
        devices = DeviceService(pool, settings)
        # images an earlier version kept on this host's disk go to the shared store (usually none)
        await devices.firmware_store.import_local_images()
        await devices.firmware_store.sweep_abandoned()
        # the process's one LISTEN connection: revocations, command notices, profile changes
        listener = PgListener(database_url(settings))
        credentials = CredentialCache(listener, devices.credential_valid_until)
        await credentials.start()
        notices = CommandNotices(listener)
        await notices.start()
        app.state.revocations = revocations = TokenRevocations(pool, listener)
        await revocations.start()
        async with httpx.AsyncClient(timeout=OUTBOUND_TIMEOUT) as http:
            app.state.fleetflow = AppState(
                settings=settings,
                temporal=client,
                pool=pool,
                http=http,
                devices=devices,
                analytics=AnalyticsService(pool),
                credentials=credentials,
                commands=notices,
            )
            await app.state.fleetflow.quotas.listen(listener)
            # the supervisor watches the shards; this watches the supervisor
            watching = asyncio.create_task(watch_ingestion(client, settings.ingest_shards))
            try:
                yield
            finally:
                watching.cancel()
                await revocations.stop()
                await notices.stop()
                await credentials.stop()
                await close_pool(pool)

    app = FastAPI(
        title="fleetflow",
        version="0.1.0",
        description="IoT device platform: every device operation is a durable Temporal workflow.",
        lifespan=lifespan,
        telemetry={"exclude": untraced},  # native OpenTelemetry: spans and HTTP metrics
        docs_url=None,  # self_hosted_docs: no CDN
        redoc_url=None,
    )
    install_problem_handlers(app)  # every error is RFC 9457 problem+json
    routers = (
        health,
        devices,
        commands,
        onboardings,
        twins,
        telemetry,
        events,
        rollouts,
        codec,
        tenants,
        credential_routes,
        consistency,
        mqtt_hooks,
    )
    for module in routers:
        app.include_router(module.router)
    instrument(app)  # /metrics and the request's log context
    self_hosted_docs(app)
    document_problems(app)
    app.add_middleware(RevokedTokens)
    app.add_middleware(BodyLimit)  # added last: outermost, before any token or body is looked at
    return app
