"""Tenant and device limits, enforced in the API process before anything is accepted.

Rates are token buckets held in this process: per tenant, requests/s and readings/s; per device,
requests/s and readings/s. With N API processes (`fleetflow api --processes N` sets
FLEETFLOW_API_PROCESSES; set it to the total behind a load balancer) each process holds 1/N of
a tenant's rates: its devices' connections spread over the processes, so together they admit
the tenant's rate, without a database round trip per request. A device's own rates stay whole
in each process: its requests on one connection all reach one process.
A bucket holds `rate * burst_s` tokens; a request that costs more
than the bucket holds (a 10,000-reading batch of a device allowed 100/s) waits for a full
bucket and then leaves it in debt, so the average rate holds for any batch size. A refused
request takes nothing from the buckets that refused it and is answered 429 with `Retry-After`.

Counts (devices, subscriptions, rules) are checked when one is created: 403 naming the quota,
as Kubernetes' ResourceQuota and ThingsBoard's tenant profiles answer; waiting does not help.

Limits are the platform defaults (`FLEETFLOW_QUOTAS`) under the tenant's profile
(fleetflow.tenant_profiles), read at most every PROFILE_TTL_S per tenant, one read a tenant at
a time (callers arriving meanwhile wait for it). A process that
listens (`listen`: the `tenant_profile_changed` NOTIFY of a trigger) drops a tenant's entry the
moment any process changes its profile, and keeps entries PROFILE_LISTENING_TTL_S meanwhile;
every entry is read again when its listener is lost or back (a notice may have been missed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg
from fastapi import HTTPException, status

from activities import analytics_facade, device_facade, notification_facade
from fleetflow.contracts.tenants import TenantLimits, TenantProfile
from fleetflow.db import Pool
from fleetflow.metrics import REQUESTS_THROTTLED
from fleetflow.pg_listener import PgListener
from fleetflow.single_flight import SingleFlight
from fleetflow.tenant_profiles import PROFILE_CHANGED_CHANNEL, read_profile, write_profile

log = logging.getLogger("fleetflow.quotas")

PROCESSES_ENV = "FLEETFLOW_API_PROCESSES"
PROFILE_TTL_S = 5.0  # while nobody listens for profile changes
PROFILE_LISTENING_TTL_S = 300.0  # while the notifications keep entries fresh (a safety net)
# device buckets past this are dropped, idle (full) ones first: a full bucket is a new one. The
# tenants' own buckets are kept apart, so no sender can evict its tenant's debt by sending for
# many made-up device ids
MAX_BUCKETS = 100_000  # about 40 MB at most

# a count quota -> (what counts what the tenant has: the owning service's facade, what it counts)
COUNTS: dict[str, tuple[Callable[[Pool, str], Awaitable[int]], str]] = {
    "max_devices": (device_facade.count_devices, "devices"),
    "max_subscriptions": (notification_facade.count_subscriptions, "subscriptions"),
    "max_rules": (analytics_facade.count_rules, "rules"),
}


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second up to `capacity`; may go into debt (see the module docstring)."""

    rate: float
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        """Add what accrued since the last look."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until `cost` may be taken (0: now); call refill first."""
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class _Charge(NamedTuple):
    reason: str
    bucket: TokenBucket
    cost: float
    limit: int


class Quotas:
    """The limits of every tenant as this API process enforces them."""

    def __init__(
        self,
        pool: Pool,
        defaults: TenantLimits,
        clock: Callable[[], float] = time.monotonic,
        processes: int = 1,
    ) -> None:
        self.pool = pool
        self.processes = max(1, processes)  # the API processes sharing each tenant's rates
        self.defaults = defaults
        self.clock = clock
        self._profiles: dict[str, tuple[float, TenantLimits]] = {}
        self._tenant_buckets: dict[tuple[str, str, str], TokenBucket] = {}
        self._buckets: dict[tuple[str, str, str], TokenBucket] = {}  # per device
        self._count_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._listener: PgListener | None = None
        self._generation = 0  # bumped by every profile change heard and every listener reset
        self._reading: SingleFlight[str, TenantLimits] = SingleFlight()  # tenant -> its limits being read

    async def listen(self, listener: PgListener) -> None:
        """Drop a tenant's limits when any process changes its profile (the listener is the
        process's shared one; its owner starts and stops it)."""
        self._listener = listener
        listener.on_reset(self._on_reset)
        await listener.subscribe(PROFILE_CHANGED_CHANNEL, self._on_changed)

    def _on_changed(self, _channel: str, tenant: str) -> None:
        self._generation += 1
        self._reading.forget(tenant)  # a read begun before the change is not joined
        cached = self._profiles.get(tenant)
        if cached is not None:
            # stale, not gone: read again on next use; until then (the MQTT gateway's publishes,
            # which cannot await) the last known limits hold, not the platform defaults
            self._profiles[tenant] = (0.0, cached[1])

    def _on_reset(self, _listening: bool) -> None:
        self._generation += 1
        self._reading.forget_all()
        # stale, not gone (as above), and still the last known if the database is away
        for tenant, (_, limits) in list(self._profiles.items()):
            self._profiles[tenant] = (0.0, limits)

    @property
    def _ttl_s(self) -> float:
        listening = self._listener is not None and self._listener.listening
        return PROFILE_LISTENING_TTL_S if listening else PROFILE_TTL_S

    # --- limits -----------------------------------------------------------------------------

    async def limits(self, tenant: str) -> TenantLimits:
        """The tenant's limits in force (cached, see the module docstring)."""
        cached = self._profiles.get(tenant)
        if cached is not None and cached[0] > self.clock():
            return cached[1]
        # one read a tenant at a time: the callers arriving meanwhile wait for it (a reconnect
        # storm of a tenant's devices, each CONNECT awaiting its limits, read them once, not
        # once a device, beside the group commit's connections)
        return await self._reading.run(tenant, lambda: self._read_limits(tenant))

    async def _read_limits(self, tenant: str) -> TenantLimits:
        now = self.clock()
        cached = self._profiles.get(tenant)
        generation = self._generation
        try:
            profile = await self.profile(tenant)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # the limits must not take the API down with the database: last known, else defaults
            log.warning("tenant profile of %s unreadable (%s); using the last known limits", tenant, exc)
            latest = self._profiles.get(tenant)
            if latest is not cached and latest is not None:
                # a read begun after a change ended first: what it read stays in force, not
                # the last known from before the change
                return latest[1]
            limits = cached[1] if cached is not None else self.defaults
            self._profiles[tenant] = (now + PROFILE_TTL_S, limits)  # tried again after the TTL
            return limits
        limits = profile.over(self.defaults)
        # a change heard during the read may postdate it: used once, read again next time
        fresh = generation == self._generation
        if fresh:
            self._profiles[tenant] = (now + self._ttl_s, limits)
        elif self._profiles.get(tenant) is cached:  # nothing newer known meanwhile
            self._profiles[tenant] = (0.0, limits)
        return limits

    def known_limits(self, tenant: str) -> tuple[TenantLimits, bool]:
        """The tenant's last known limits without awaiting (the defaults when none are known)
        and whether they are fresh; a caller that cannot await refreshes them with `limits`."""
        cached = self._profiles.get(tenant)
        if cached is None:
            return self.defaults, False
        return cached[1], cached[0] > self.clock()

    def admit_readings_now(self, tenant: str, per_device: Mapping[str, int], limits: TenantLimits) -> None:
        """`admit_readings` with the limits given (from `known_limits`): no await, for the MQTT
        gateway's per-message path; 429 (HTTPException) when over a rate."""
        now = self.clock()
        charges = self._charges("tenant_readings", tenant, {"": sum(per_device.values())}, limits, now)
        charges += self._charges("device_readings", tenant, per_device, limits, now)
        self._take(tenant, charges)

    def admit_message_now(self, tenant: str, device_id: str, readings: int, limits: TenantLimits) -> None:
        """An MQTT publish of a device, with the limits given (from `known_limits`): one request
        of the tenant and of the device (as an HTTP request is) and its readings, all or nothing;
        no await; 429 (HTTPException) when over a rate."""
        now = self.clock()
        charges = self._charges("tenant_requests", tenant, {"": 1}, limits, now)
        charges += self._charges("device_requests", tenant, {device_id: 1}, limits, now)
        if readings:
            charges += self._charges("tenant_readings", tenant, {"": readings}, limits, now)
            charges += self._charges("device_readings", tenant, {device_id: readings}, limits, now)
        self._take(tenant, charges)

    async def profile(self, tenant: str) -> TenantProfile:
        """The tenant's stored overrides (empty when it has none)."""
        return await read_profile(self.pool, tenant)

    async def set_profile(self, tenant: str, profile: TenantProfile, by: str) -> TenantLimits:
        """Store the tenant's overrides; this process applies them at once, the others when
        the NOTIFY reaches them (within PROFILE_TTL_S when they do not listen)."""
        await write_profile(self.pool, tenant, profile, by)
        self._profiles.pop(tenant, None)
        self._generation += 1  # a read begun before the write is neither joined nor kept
        self._reading.forget(tenant)
        return await self.limits(tenant)

    # --- rates ------------------------------------------------------------------------------

    async def admit_request(self, tenant: str, device_id: str | None = None) -> None:
        """One request of the tenant (of one of its devices); 429 when over a rate."""
        limits = await self.limits(tenant)
        now = self.clock()
        charges = self._charges("tenant_requests", tenant, {"": 1}, limits, now)
        if device_id is not None:
            charges += self._charges("device_requests", tenant, {device_id: 1}, limits, now)
        self._take(tenant, charges)

    async def admit_readings(self, tenant: str, per_device: Mapping[str, int]) -> None:
        """A batch's readings (count by device); 429 when over the tenant's or a device's rate."""
        limits = await self.limits(tenant)
        now = self.clock()
        charges = self._charges("tenant_readings", tenant, {"": sum(per_device.values())}, limits, now)
        charges += self._charges("device_readings", tenant, per_device, limits, now)
        self._take(tenant, charges)

    def _charges(
        self, reason: str, tenant: str, costs: Mapping[str, int], limits: TenantLimits, now: float
    ) -> list[_Charge]:
        """The buckets (refilled to now) that `costs` (by device, '' for the tenant) would take
        from; none when the rate is unlimited. (A batch may name 10,000 devices: kept lean.)"""
        rate = int(getattr(limits, RATE_OF[reason]))
        if rate <= 0:  # unlimited
            return []
        per_device = reason.startswith("device")
        # a tenant's rate is shared by the API processes: this one holds its part
        held = float(rate) if per_device else rate / self.processes
        capacity = max(1.0, held * limits.burst_s)
        buckets = self._buckets if per_device else self._tenant_buckets
        if per_device and len(buckets) + len(costs) > MAX_BUCKETS:
            # before the lookups: a sweep among them dropped the buckets already looked up for
            # this batch (full, nothing taken yet), and the batch was charged to buckets no
            # longer held
            self._sweep(now, room=len(costs))
        charges = []
        for device, cost in costs.items():
            key = (reason, tenant, device)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = TokenBucket(held, capacity, capacity, now)
            else:
                bucket.refill(now)
                if bucket.rate != held or bucket.capacity != capacity:  # the profile changed
                    bucket.rate, bucket.capacity, bucket.level = held, capacity, min(bucket.level, capacity)
            charges.append(_Charge(reason, bucket, cost, rate))
        return charges

    def _take(self, tenant: str, charges: list[_Charge]) -> None:
        """All or nothing: nothing awaits between the checks and the takes, so this is atomic."""
        wait, worst = 0.0, None
        for charge in charges:
            charge_wait = charge.bucket.wait_s(charge.cost)
            if charge_wait > wait:
                wait, worst = charge_wait, charge
        if worst is not None:
            REQUESTS_THROTTLED.add(1, {"tenant": tenant, "reason": worst.reason})
            raise too_many_requests(worst.reason, worst.limit, wait)
        for charge in charges:
            charge.bucket.level -= charge.cost

    def _sweep(self, now: float, room: int) -> None:
        """Drop full device buckets (the same as new ones); if not enough, the oldest ones, until
        there is room for `room` more."""
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.level >= bucket.capacity:
                del self._buckets[key]
        excess = len(self._buckets) - max(0, MAX_BUCKETS * 3 // 4 - room)
        for key in list(self._buckets)[: max(0, excess)]:
            del self._buckets[key]

    # --- counts -----------------------------------------------------------------------------

    def count_lock(self, tenant: str, quota: str) -> asyncio.Lock:
        """Held from the count check to the creation, so this process's concurrent creations of
        one tenant cannot all pass the check."""
        return self._count_locks.setdefault((tenant, quota), asyncio.Lock())

    async def check_count(self, tenant: str, quota: str, adding: int = 1) -> None:
        """403 when the tenant's `quota` (max_devices, max_subscriptions, max_rules) does not
        leave room for `adding` more."""
        limit = int(getattr(await self.limits(tenant), quota))
        if limit <= 0 or adding <= 0:
            return
        count, what = COUNTS[quota]
        current = await count(self.pool, tenant)
        if current + adding > limit:
            REQUESTS_THROTTLED.add(1, {"tenant": tenant, "reason": quota})
            raise quota_exceeded(quota, what, limit, current, adding)


RATE_OF = {
    "tenant_requests": "requests_per_s",
    "device_requests": "device_requests_per_s",
    "tenant_readings": "readings_per_s",
    "device_readings": "device_readings_per_s",
}
REASONS = {
    "tenant_requests": "the tenant's requests/s",
    "device_requests": "the device's requests/s",
    "tenant_readings": "the tenant's readings/s",
    "device_readings": "a device's readings/s",
}


def too_many_requests(reason: str, limit: int, wait_s: float) -> HTTPException:
    """429 naming the limit, with Retry-After in whole seconds (at least 1)."""
    retry = max(1, math.ceil(wait_s))
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail=f"over {REASONS[reason]} limit ({limit}/s, quota {reason}); retry after {retry} s",
        headers={"Retry-After": str(retry)},
    )


def quota_exceeded(quota: str, what: str, limit: int, current: int, adding: int) -> HTTPException:
    """403 naming the count quota, its limit and what the tenant has."""
    return HTTPException(
        status.HTTP_403_FORBIDDEN,
        detail=(
            f"quota {quota} exceeded: the tenant has {current} {what} of at most {limit}; "
            f"{adding} more would pass it (remove some, or ask for a larger tenant profile)"
        ),
    )


def api_processes() -> int:
    """How many API processes share the tenants' rates (FLEETFLOW_API_PROCESSES, default 1)."""
    try:
        return max(1, int(os.environ.get(PROCESSES_ENV, "1")))
    except ValueError:
        return 1
