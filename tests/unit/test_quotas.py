"""The API's token buckets on a fake clock: rates, bursts, debt, all-or-nothing, eviction."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException

import api.quotas as quotas_module
from api.quotas import Quotas
from fleetflow.contracts.tenants import TenantLimits, TenantProfile, parse_limits
from fleetflow.settings import Settings, load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StoredProfiles(Quotas):
    """Quotas whose profiles come from a dict instead of PostgreSQL."""

    def __init__(self, defaults: TenantLimits, clock: Clock, profiles: dict[str, TenantProfile]) -> None:
        super().__init__(pool=None, defaults=defaults, clock=clock)  # type: ignore[arg-type]
        self.profiles = profiles

    async def profile(self, tenant: str) -> TenantProfile:
        return self.profiles.get(tenant, TenantProfile())


def make(clock: Clock, **limits: float) -> StoredProfiles:
    return StoredProfiles(TenantLimits(**limits), clock, {})


async def refused(call: object) -> HTTPException:
    with pytest.raises(HTTPException) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_requests_pass_up_to_the_burst_then_429_with_retry_after_until_refilled() -> None:
    clock = Clock()
    q = make(clock, requests_per_s=10, burst_s=2)
    for _ in range(20):
        await q.admit_request("acme")
    error = await refused(q.admit_request("acme"))
    assert error.status_code == 429 and error.headers == {"Retry-After": "1"}
    assert "requests/s" in str(error.detail)
    clock.now += 0.1  # one token back
    await q.admit_request("acme")
    await refused(q.admit_request("acme"))
    await q.admit_request("globex")  # another tenant's bucket is its own


async def test_a_batch_larger_than_the_bucket_waits_for_a_full_bucket_then_leaves_it_in_debt() -> None:
    clock = Clock()
    q = make(clock, device_readings_per_s=100, burst_s=2)  # a device bucket holds 200
    await q.admit_readings("acme", {"d1": 1000})  # full bucket: admitted, 800 in debt
    error = await refused(q.admit_readings("acme", {"d1": 1}))
    assert error.headers == {"Retry-After": "9"}  # 801 tokens at 100/s
    assert "a device's readings/s" in str(error.detail)
    clock.now += 8.0
    await refused(q.admit_readings("acme", {"d1": 1}))
    clock.now += 1.0
    await q.admit_readings("acme", {"d1": 1})
    await q.admit_readings("acme", {"d2": 150})  # the device next door was never held back


async def test_a_refused_batch_takes_nothing_from_any_bucket() -> None:
    clock = Clock()
    q = make(clock, readings_per_s=1000, device_readings_per_s=10, burst_s=1)
    await q.admit_readings("acme", {"d1": 10})  # d1 empty now, the tenant holds 990
    for _ in range(5):
        await refused(q.admit_readings("acme", {"d1": 5, "d2": 5}))
    await q.admit_readings("acme", {"d2": 10, "d3": 10, "d4": 10})  # 960 left: nothing was taken
    await q.admit_readings("acme", {f"x{i}": 10 for i in range(96)})
    assert (await refused(q.admit_readings("acme", {"d9": 1}))).status_code == 429


async def test_zero_is_unlimited_and_a_profile_overrides_the_defaults() -> None:
    clock = Clock()
    q = make(clock, readings_per_s=0, device_readings_per_s=0, requests_per_s=1, burst_s=1)
    q.profiles["big"] = TenantProfile(requests_per_s=0)
    for _ in range(100):
        await q.admit_readings("acme", {"d1": 10_000})
        await q.admit_request("big")
    await q.admit_request("acme")
    await refused(q.admit_request("acme"))
    assert (await q.limits("big")).requests_per_s == 0 and (await q.limits("acme")).requests_per_s == 1


async def test_a_profile_change_is_seen_within_the_cache_time() -> None:
    clock = Clock()
    q = make(clock, requests_per_s=1, burst_s=1)
    await q.admit_request("acme")
    await refused(q.admit_request("acme"))
    q.profiles["acme"] = TenantProfile(requests_per_s=1000)
    clock.now += quotas_module.PROFILE_TTL_S + 0.01
    await q.admit_request("acme")  # the bucket takes its new rate and size, and fills at that rate
    clock.now += 1.0
    for _ in range(1000):
        await q.admit_request("acme")
    await refused(q.admit_request("acme"))


async def test_made_up_device_ids_neither_grow_memory_nor_evict_the_tenants_debt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quotas_module, "MAX_BUCKETS", 1000)
    clock = Clock()
    q = make(clock, readings_per_s=1000, device_readings_per_s=10, burst_s=1)
    await q.admit_readings("acme", {"real": 5})
    await q.admit_readings("acme", {f"fake-{i}": 1 for i in range(990)})  # tenant bucket now empty
    for round_ in range(20):
        clock.now += 0.001
        with pytest.raises(HTTPException):
            await q.admit_readings("acme", {f"new-{round_}-{i}": 1 for i in range(50)})
    assert len(q._buckets) <= 1000
    # the tenant's bucket (about 25 tokens now) was not evicted, so not refilled to 1000
    error = await refused(q.admit_readings("acme", {"fresh": 30}))
    assert "the tenant's readings/s" in str(error.detail)


async def test_a_batch_that_fills_the_bucket_table_is_charged_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the table was swept in the middle of a batch's lookups: the buckets already looked up for
    # it (full, nothing taken yet) were dropped, and the batch charged to buckets no longer held
    monkeypatch.setattr(quotas_module, "MAX_BUCKETS", 10)
    clock = Clock()
    q = make(clock, readings_per_s=0, device_readings_per_s=10, burst_s=1)
    await q.admit_readings("acme", {"heavy": 10, **{f"d{i}": 1 for i in range(10)}})
    clock.now += 0.1  # heavy's bucket holds 1 again (the others are full: swept next)
    error = await refused(q.admit_readings("acme", {"heavy": 5}))
    assert "a device's readings/s" in str(error.detail)


def test_fleetflow_quotas_sets_the_defaults_and_names_a_bad_entry() -> None:
    assert parse_limits("readings_per_s=10,max_rules=0 burst_s=0.5") == TenantLimits(
        readings_per_s=10, max_rules=0, burst_s=0.5
    )
    assert load_settings({"FLEETFLOW_QUOTAS": str(Settings().quotas)}).quotas == TenantLimits()
    for bad, named in (("rules=3", "rules=3"), ("max_rules=-1", "max_rules")):
        with pytest.raises(Exception, match="FLEETFLOW_QUOTAS") as caught:
            load_settings({"FLEETFLOW_QUOTAS": bad})
        assert named in str(caught.value)


async def test_an_unreadable_profile_keeps_the_last_known_limits_and_is_tried_again_after_the_ttl() -> None:
    clock = Clock()
    q = make(clock, requests_per_s=5)
    q.profiles["acme"] = TenantProfile(requests_per_s=7)
    assert (await q.limits("acme")).requests_per_s == 7
    reads = 0

    async def down(tenant: str) -> TenantProfile:
        nonlocal reads
        reads += 1
        raise OSError("connection refused")

    q.profile = down  # type: ignore[method-assign]
    clock.now += quotas_module.PROFILE_TTL_S + 1
    assert (await q.limits("acme")).requests_per_s == 7  # last known
    assert (await q.limits("globex")).requests_per_s == 5  # never known: the defaults
    assert (await q.limits("acme")).requests_per_s == 7 and reads == 2  # not every request
    clock.now += quotas_module.PROFILE_TTL_S + 1
    await q.limits("acme")
    assert reads == 3


async def test_with_two_api_processes_each_holds_half_of_a_tenants_rate_and_all_of_a_devices() -> None:
    clock = Clock()
    q = StoredProfiles(TenantLimits(requests_per_s=10, device_requests_per_s=4, burst_s=2), clock, {})
    q.processes = 2  # as FLEETFLOW_API_PROCESSES=2 sets it
    for i in range(10):  # the tenant's bucket here holds 10 of its 20
        await q.admit_request("acme", f"d{i % 5}")
    error = await refused(q.admit_request("acme", "d9"))
    assert "requests/s" in str(error.detail)
    clock.now += 1000
    for _ in range(8):  # one device's bucket is whole: 4/s for 2 s
        await q.admit_request("globex", "d1")
    await refused(q.admit_request("globex", "d1"))


def test_the_process_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETFLOW_API_PROCESSES", "3")
    assert quotas_module.api_processes() == 3
    monkeypatch.setenv("FLEETFLOW_API_PROCESSES", "nonsense")
    assert quotas_module.api_processes() == 1


async def test_a_profile_change_heard_keeps_the_last_known_limits_until_they_are_read_again() -> None:
    """The MQTT gateway admits a publish with `known_limits` (no await): after a change is
    heard it must not fall back to the platform defaults (a tenant allowed more would be refused)."""
    clock = Clock()
    q = StoredProfiles(TenantLimits(readings_per_s=100), clock, {"acme": TenantProfile(readings_per_s=5000)})
    assert (await q.limits("acme")).readings_per_s == 5000
    q.profiles["acme"] = TenantProfile(readings_per_s=6000)
    q._on_changed("tenant_profile_changed", "acme")
    limits, fresh = q.known_limits("acme")
    assert limits.readings_per_s == 5000 and not fresh  # the last known, to be read again
    assert (await q.limits("acme")).readings_per_s == 6000
    assert q.known_limits("acme")[1]


class GatedProfiles(StoredProfiles):
    """StoredProfiles whose reads wait for `opened` and are counted."""

    def __init__(self, defaults: TenantLimits, clock: Clock, profiles: dict[str, TenantProfile]) -> None:
        super().__init__(defaults, clock, profiles)
        self.opened = asyncio.Event()
        self.began = asyncio.Event()
        self.reads = 0

    async def profile(self, tenant: str) -> TenantProfile:
        self.reads += 1
        self.began.set()
        stored = await super().profile(tenant)  # as the row was when the read began
        await self.opened.wait()
        return stored


async def test_a_connect_storm_of_a_tenants_devices_reads_its_limits_once() -> None:
    """Every MQTT CONNECT awaits its tenant's limits: a thousand devices of a tenant the
    gateway does not know yet (a gateway restart) read its profile once, not once a device."""
    q = GatedProfiles(TenantLimits(readings_per_s=100), Clock(), {"acme": TenantProfile(readings_per_s=7)})
    storm = [asyncio.ensure_future(q.limits("acme")) for _ in range(1000)]
    await asyncio.sleep(0)
    q.opened.set()
    assert {limits.readings_per_s for limits in await asyncio.gather(*storm)} == {7}
    assert q.reads == 1
    assert q.known_limits("acme") == (TenantLimits(readings_per_s=7), True)


async def test_a_read_begun_before_a_profile_change_is_not_what_the_change_answers() -> None:
    q = GatedProfiles(TenantLimits(readings_per_s=100), Clock(), {"acme": TenantProfile(readings_per_s=7)})
    before = asyncio.ensure_future(q.limits("acme"))
    await q.began.wait()
    q.profiles["acme"] = TenantProfile(readings_per_s=9)
    q._on_changed("tenant_profile_changed", "acme")  # heard while the first read waits
    after = asyncio.ensure_future(q.limits("acme"))
    for _ in range(10):  # its read begins (or it joins the first one)
        await asyncio.sleep(0)
    q.opened.set()
    assert (await after).readings_per_s == 9 and q.reads == 2  # not the read begun before
    assert (await before).readings_per_s == 7
    assert q.known_limits("acme") == (TenantLimits(readings_per_s=9), True)  # not overwritten


class FailingFirstRead(GatedProfiles):
    """GatedProfiles whose next read, once `fail_next` is set, fails (the database away for it)."""

    fail_next = False
    failing = asyncio.Event()  # when the failing read ends

    async def profile(self, tenant: str) -> TenantProfile:
        failing, self.fail_next = self.fail_next, False
        stored = await super().profile(tenant)
        if failing:
            await self.failing.wait()
            raise ConnectionResetError("connection lost")
        return stored


async def test_a_read_begun_before_a_profile_change_that_fails_keeps_no_older_limits() -> None:
    """The read begun before a change fails after the read begun after it succeeded: the
    limits read after the change stay in force, not the last known from before it."""
    clock = Clock()
    q = FailingFirstRead(TenantLimits(readings_per_s=100), clock, {"acme": TenantProfile(readings_per_s=7)})
    q.opened.set()
    assert (await q.limits("acme")).readings_per_s == 7  # known, then expired
    clock.now += 1000
    q.opened, q.fail_next, q.failing = asyncio.Event(), True, asyncio.Event()
    q.began.clear()
    before = asyncio.ensure_future(q.limits("acme"))
    await q.began.wait()
    q.profiles["acme"] = TenantProfile(readings_per_s=9)
    q._on_changed("tenant_profile_changed", "acme")
    after = asyncio.ensure_future(q.limits("acme"))
    for _ in range(10):
        await asyncio.sleep(0)
    q.opened.set()
    assert (await after).readings_per_s == 9  # read after the change, before the first ends
    q.failing.set()
    await before
    assert q.known_limits("acme") == (TenantLimits(readings_per_s=9), True)
