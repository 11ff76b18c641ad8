"""A tenant's profile: its rate limits and count quotas (ThingsBoard's tenant profiles, AWS IoT's
account throttles). Every value 0 means unlimited."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Rate = Annotated[int, Field(ge=0, le=1_000_000_000)]
Count = Annotated[int, Field(ge=0, le=1_000_000_000)]
Burst = Annotated[float, Field(ge=0.1, le=3600)]
Days = Annotated[int, Field(ge=1, le=3650)]

RATE_LIMITS = ("readings_per_s", "requests_per_s", "device_readings_per_s", "device_requests_per_s")
COUNT_QUOTAS = ("max_devices", "max_subscriptions", "max_rules")


class TenantLimits(BaseModel):
    """The limits in force for one tenant (the platform defaults, overridden by its profile)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    readings_per_s: Rate = 50_000
    requests_per_s: Rate = 1_000
    device_readings_per_s: Rate = 5_000
    device_requests_per_s: Rate = 100
    # a bucket holds `rate * burst_s` tokens: a sender may run this many seconds ahead of its rate
    burst_s: Burst = 2.0
    max_devices: Count = 100_000
    max_subscriptions: Count = 100
    max_rules: Count = 1_000
    # how long raw readings, and their 1-minute and 1-hour rollups, are kept (the Retention
    # schedule; fleetflow.contracts.retention)
    raw_retention_days: Days = 30
    rollup_retention_days: Days = 365


class TenantProfile(BaseModel):
    """A tenant's overrides of the platform defaults; a field left out (or null) keeps the default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    readings_per_s: Rate | None = None
    requests_per_s: Rate | None = None
    device_readings_per_s: Rate | None = None
    device_requests_per_s: Rate | None = None
    burst_s: Burst | None = None
    max_devices: Count | None = None
    max_subscriptions: Count | None = None
    max_rules: Count | None = None
    raw_retention_days: Days | None = None
    rollup_retention_days: Days | None = None

    def over(self, defaults: TenantLimits) -> TenantLimits:
        """The limits in force: defaults with this profile's values on top."""
        return defaults.model_copy(update=self.model_dump(exclude_none=True))


def parse_limits(text: str) -> TenantLimits:
    """`name=value,name=value` (FLEETFLOW_QUOTAS; spaces separate too, as `str()` of the limits
    writes them) as limits over the built-in defaults; ValueError naming the bad entry."""
    values: dict[str, str] = {}
    for entry in re.split(r"[,\s]+", text):
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        name = name.strip()
        if not sep or name not in TenantLimits.model_fields:
            known = ", ".join(TenantLimits.model_fields)
            raise ValueError(f"{entry!r} must be name=value with name one of {known}")
        values[name] = value.strip()
    return TenantLimits.model_validate(values)
