"""Contracts of the system check: one probe per service, one report for the platform."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from fleetflow.contracts.common import Contract


class ProbeRequest(Contract):
    """Input of each service's `ping` activity."""

    hold_ms: Annotated[int, Field(ge=0, le=60_000)] = 0


class ProbeResult(Contract):
    """What one service says about itself."""

    service: str
    worker: str
    database_ok: bool
    database_error: str | None = None


class SystemCheckRequest(Contract):
    """Input of the SystemCheck workflow."""

    # at least 1 ms: a smaller one rounds to a zero (that is: no) activity timeout
    timeout_s: Annotated[float, Field(ge=0.001, le=300)] = 5.0
    hold_ms: Annotated[int, Field(ge=0, le=60_000)] = 0


class ServiceProbe(Contract):
    """One service's answer (or silence) as seen by the workflow."""

    service: str
    answered: bool
    latency_ms: float | None = None
    worker: str | None = None
    database_ok: bool | None = None
    error: str | None = None


class SystemCheckResult(Contract):
    """Output of the SystemCheck workflow."""

    services: list[ServiceProbe]


class ServiceStatus(ServiceProbe):
    """A service's probe plus the pollers Temporal sees on its queue."""

    pollers: int | None = None


class SystemReport(Contract):
    """The report of `fleetflow check` and `GET /health`."""

    ok: bool
    checked_at: datetime
    temporal_ok: bool
    temporal_error: str | None = None
    database_ok: bool
    services: list[ServiceStatus]
