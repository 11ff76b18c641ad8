"""What the API process holds open: one Temporal client, one pool, one HTTP client."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from fastapi import Request
from temporalio.client import Client

from activities.analytics import AnalyticsService
from activities.devices import DeviceService
from api.command_notices import CommandNotices
from api.credentials import CredentialCache
from api.early_alerts import EarlyAlerts
from api.quotas import Quotas, api_processes
from fleetflow.db import Pool
from fleetflow.keys import KeyRing, keyring
from fleetflow.settings import Settings


@dataclass
class AppState:
    """Resources shared by every request of the process."""

    settings: Settings
    temporal: Client
    pool: Pool
    http: httpx.AsyncClient
    devices: DeviceService
    analytics: AnalyticsService
    credentials: CredentialCache
    commands: CommandNotices
    # (tenant, device id) of the twin long-polls this process holds: one per device
    twin_waiters: set[tuple[str, str]] = field(default_factory=set)
    # (tenant, device id) of the command long-polls this process holds: one per device
    command_waiters: set[tuple[str, str]] = field(default_factory=set)
    quotas: Quotas = field(init=False)
    early_alerts: EarlyAlerts = field(init=False)

    def __post_init__(self) -> None:
        self.quotas = Quotas(self.pool, self.settings.quotas, processes=api_processes())
        self.early_alerts = EarlyAlerts(self.pool, self.temporal)

    @property
    def keys(self) -> KeyRing:
        """The platform's signing key set (a rotation shows on the next request)."""
        return keyring(self.settings)

    def ui_url(self, workflow_id: str, run_id: str | None = None) -> str:
        """The Temporal Web UI page of a workflow run."""
        base = f"{self.settings.temporal_ui_url}/namespaces/{self.temporal.namespace}/workflows"
        return f"{base}/{workflow_id}/{run_id}/history" if run_id else f"{base}/{workflow_id}"


async def get_state(request: Request) -> AppState:
    """FastAPI dependency: the process's AppState (async: a sync dependency costs each request a
    hop through the thread pool)."""
    state: AppState = request.app.state.fleetflow
    return state
