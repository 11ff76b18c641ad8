"""The API's share of observability: request-scoped log context and the /metrics route.

HTTP metrics and server spans come from FastAPI's native OpenTelemetry support, which uses
the process's providers (fleetflow/observability.py): `http.server.request.duration` by
method, route template and status (`http_server_request_duration_seconds` in Prometheus),
`http.server.active_requests`, and, while tracing is on, one server span per request with
spans for dependency resolution, the endpoint and serialization beneath it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from activities import analytics_facade, data_facade, device_facade, notification_facade
from fleetflow import logs
from fleetflow.metrics import StateGauges

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_state_gauges: StateGauges | None = None  # one per process: its gauges are registered once

router = APIRouter()


def untraced(scope: Scope) -> bool:
    """FastAPI telemetry's `exclude`: Prometheus's scrapes are neither traced nor counted."""
    return scope.get("path") == "/metrics"


class RequestLogContext:
    """ASGI middleware: the request's scope is bound for the logs, so a record logged while
    serving `/v1/devices/{device_id}/...` carries that device_id (routing fills it in)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request with its scope bound."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = logs.bind_request(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            logs.unbind_request(token)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format: this process's metrics and the platform's state gauges."""
    app_state = getattr(request.app.state, "fleetflow", None)
    if _state_gauges is not None and app_state is not None:
        await _state_gauges.refresh(app_state.pool)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


# every service's figures of state, each declared beside the tables it reads
STATE_GAUGES = (
    device_facade.GAUGES + analytics_facade.GAUGES + data_facade.GAUGES + notification_facade.GAUGES
)


def instrument(app: FastAPI) -> None:
    """Add the log context and /metrics (with the state gauges) to app."""
    global _state_gauges
    if _state_gauges is None:
        _state_gauges = StateGauges(STATE_GAUGES)
    app.add_middleware(RequestLogContext)
    app.include_router(router)
