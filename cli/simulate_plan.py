"""How `fleetflow simulate` sends the rate it is asked for: how many readings a batch holds and
how often each device sends one, within this process's request budget, the batch limit and the
tenant's rate limits; and, when the rate asked is past what those allow, what it can reach and why."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetflow.contracts.limits import MAX_BATCH_READINGS
from fleetflow.contracts.tenants import TenantLimits

# Telemetry requests a second this process sends at most. Readings cost the platform little and
# requests much (a batch of 400 readings is stored about as fast as one of 15), so a higher rate
# means larger batches, not more requests: at 200 requests/s of 15 readings (500 devices, 3,000
# readings/s) this process spent a core in httpx's pool and reached ~220 readings/s on a loaded
# machine.
REQUESTS_PER_S = 50
# the share of a tenant's (or a device's) request rate telemetry may use: the rest is for the
# devices' job and command polls and the operator's calls
REQUEST_SHARE = 0.5
TICK_S = 0.25  # a group of devices sends every tick, so the requests are spread over the period


@dataclass(frozen=True)
class Plan:
    """Each device sends a batch every `period_s` seconds (the devices staggered over it)."""

    devices: int
    rate: float  # readings/s asked
    period_s: float
    reachable: float  # readings/s the limits below allow
    reasons: tuple[str, ...] = ()  # why `reachable` is below `rate`, one a line

    @property
    def requests_per_s(self) -> float:
        """Telemetry requests a second, all devices together."""
        return self.devices / self.period_s

    @property
    def batch(self) -> float:
        """Readings in a batch, on average."""
        return self.rate * self.period_s / self.devices if self.devices else 0.0

    def describe(self) -> str:
        """One line of what will be sent, and a line each for what keeps the rate from being reached."""
        line = (
            f"a batch of ~{self.batch:,.0f} readings per device every {self.period_s:.2g} s "
            f"({self.requests_per_s:,.0f} requests/s)"
        )
        if self.reachable >= self.rate:
            return line
        why = "".join(f"\n  - {reason}" for reason in self.reasons)
        return f"{line}\n  can reach at most {self.reachable:,.0f} of {self.rate:,.0f} readings/s:{why}"


def plan(devices: int, rate: float, limits: TenantLimits | None = None) -> Plan:
    """The batches that carry `rate` readings/s from `devices` devices within REQUESTS_PER_S, the
    batch limit and `limits` (the tenant's, when known; 0 is unlimited)."""
    budget = float(REQUESTS_PER_S)
    reasons: list[str] = []
    reachable = rate
    if limits is not None:
        if limits.requests_per_s:
            budget = min(budget, limits.requests_per_s * REQUEST_SHARE)
        if limits.device_requests_per_s:
            budget = min(budget, devices * limits.device_requests_per_s * REQUEST_SHARE)
        if limits.readings_per_s and rate > limits.readings_per_s:
            reachable = min(reachable, float(limits.readings_per_s))
            reasons.append(
                f"the tenant's readings_per_s quota is {limits.readings_per_s:,} (GET /v1/quotas; "
                "with N API processes each takes 1/N of it)"
            )
        if limits.device_readings_per_s and rate > devices * limits.device_readings_per_s:
            reachable = min(reachable, float(devices * limits.device_readings_per_s))
            reasons.append(
                f"device_readings_per_s is {limits.device_readings_per_s:,} a device: "
                f"{devices * limits.device_readings_per_s:,} for {devices:,} devices (use more devices)"
            )
    period = max(1.0, devices / budget) if devices else 1.0
    if rate > 0:
        # never more than MAX_BATCH_READINGS in a batch: past that, more requests
        period = min(period, MAX_BATCH_READINGS * devices / rate)
    period = max(period, 0.05)
    if devices / period > budget * 1.001 and rate > MAX_BATCH_READINGS * budget:
        reachable = min(reachable, MAX_BATCH_READINGS * budget)
        reasons.append(
            f"a batch holds at most {MAX_BATCH_READINGS:,} readings and this plan sends at most "
            f"{budget:,.0f} requests/s"
        )
    return Plan(devices, rate, period, reachable, tuple(reasons))


def slots(plan: Plan) -> int:
    """Groups the devices are split into, one group sending each tick of period_s / slots."""
    return max(1, min(plan.devices, math.floor(plan.period_s / TICK_S)))
