"""A window waits briefly to fill: at a trickle, one claim gathers the batches that arrive
while it waits (fewer windows, fewer Temporal tasks per reading); at its fill target, or when
the window's store has begun, it returns at once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from pydantic import TypeAdapter

from activities.analytics import AnalyticsService
from activities.telemetry import _WINDOW_LOCK, DataService
from activities.telemetry_accept import ReadingColumns, csv_payload
from fleetflow.contracts.telemetry import ClaimWindow, Rule, TelemetryBatchDict
from fleetflow.contracts.tenants import TenantLimits
from fleetflow.db import Pool
from tests.support import eventually

# each test a bucket of its own: -p % n is never a running shard's (p is prime, larger than any
# n), -p % (p + 1) = -p is the shard the test claims, and no other test uses it
LONG = 10_000  # fill_ms no test waits out: the window returns on reaching its target


async def _pending(pool: Pool, tag: str, n: int, bucket: int, readings: int = 10) -> None:
    ts = datetime.now(UTC).isoformat()
    payload = "".join(f"acme,{tag}-{n},fill-device,m,{ts},{i}.0\n" for i in range(readings)).encode()
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload)
           VALUES ('acme', $1, $2, $3, ARRAY['fill-device'], $4)""",
        f"{tag}-{n}",
        bucket,
        readings,
        payload,
    )


def _claim(window_id: str, bucket: int, fill_readings: int, fill_ms: int = LONG) -> ClaimWindow:
    return ClaimWindow(
        window_id=window_id,
        shard=bucket,
        shards=-bucket + 1,
        max_readings=50_000,
        max_wait_ms=LONG,
        fill_readings=fill_readings,
        fill_ms=fill_ms,
    )


async def _claimed(pool: Pool, window_id: str) -> int:
    query = "SELECT count(*) FROM data.ingest_batches WHERE window_id = $1"
    return int(await pool.fetchval(query, window_id))


async def _until_claimed(pool: Pool, window_id: str, batches: int) -> None:
    await eventually(lambda: _claimed(pool, window_id), lambda c: c == batches)


async def _cleanup(pool: Pool, tag: str) -> None:
    await pool.execute("DELETE FROM data.ingest_batches WHERE batch_id LIKE $1", f"{tag}-%")


async def test_a_trickle_of_batches_is_gathered_into_one_window(pool: Pool) -> None:
    tag, bucket = uuid.uuid4().hex[:8], -1_000_033
    service = DataService(pool)
    window_id = f"{tag}/0"
    await _pending(pool, tag, 0, bucket)
    # five batches of 10 readings fill the window: it waits for the four that trickle in
    claim = asyncio.create_task(service.claim_window(_claim(window_id, bucket, fill_readings=50)))
    try:
        for n in range(1, 5):
            await _until_claimed(pool, window_id, n)
            await asyncio.sleep(0.1)
            await _pending(pool, tag, n, bucket)
        window = await claim
        assert (window.batches, window.readings) == (5, 50)
        # a retry returns what the window holds, and may add to it the same way
        retry = asyncio.create_task(service.claim_window(_claim(window_id, bucket, fill_readings=60)))
        await _pending(pool, tag, 5, bucket)
        assert (await retry).batches == 6
        assert await _claimed(pool, window_id) == 6
    finally:
        claim.cancel()
        await _cleanup(pool, tag)


async def test_a_window_at_its_fill_target_returns_at_once(pool: Pool) -> None:
    tag, bucket = uuid.uuid4().hex[:8], -1_000_037
    service = DataService(pool)
    window_id = f"{tag}/0"
    for n in range(3):
        await _pending(pool, tag, n, bucket)
    claim = asyncio.create_task(service.claim_window(_claim(window_id, bucket, fill_readings=30)))
    try:
        await _until_claimed(pool, window_id, 3)
        # a window that waited to fill would take this batch too
        await _pending(pool, tag, 3, bucket)
        window = await claim
        assert (window.batches, window.readings) == (3, 30)
        assert await _claimed(pool, window_id) == 3
    finally:
        claim.cancel()
        await _cleanup(pool, tag)


async def test_no_batch_joins_a_window_whose_store_has_begun(pool: Pool) -> None:
    # a late attempt of claim_window (its worker slow, the activity retried elsewhere and the
    # window already storing) must not add batches the store does not copy
    tag, bucket = uuid.uuid4().hex[:8], -1_000_039
    service = DataService(pool)
    window_id = f"{tag}/0"
    await _pending(pool, tag, 0, bucket)
    first = await service.claim_window(_claim(window_id, bucket, fill_readings=10))
    assert first.batches == 1
    await _pending(pool, tag, 1, bucket)
    async with pool.acquire() as store:
        storing = store.transaction()
        await storing.start()
        # what store_window takes first, to its commit
        await store.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _WINDOW_LOCK, window_id)
        try:
            late = await service.claim_window(_claim(window_id, bucket, fill_readings=100))
        finally:
            await storing.rollback()
    try:
        assert late.batches == 1
        assert await _claimed(pool, window_id) == 1
    finally:
        await _cleanup(pool, tag)


async def _watched_claim(window_id: str, bucket: int, fill_readings: int) -> ClaimWindow:
    return _claim(window_id, bucket, fill_readings).model_copy(update={"watched_fill_ms": 0})


async def _pending_as(
    pool: Pool, tenant: str, tag: str, n: int, bucket: int, metric: str, device_id: str = "fill-device"
) -> None:
    # the payload as the accept path writes it: a change of its format must keep watched
    # readings found (or this test fails)
    ts = datetime.now(UTC)
    rows = [{"device_id": device_id, "ts": ts, "metric": metric, "value": float(i)} for i in range(10)]
    batch = TypeAdapter(TelemetryBatchDict).validate_python({"batch_id": f"{tag}-{n}", "readings": rows})
    payload = csv_payload(tenant, ReadingColumns.of(batch))
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload)
           VALUES ($1, $2, $3, 10, ARRAY[$5], $4)""",
        tenant,
        f"{tag}-{n}",
        bucket,
        payload,
        device_id,
    )


async def _rule(pool: Pool, tenant: str, metric: str, kind: str = "rate") -> None:
    """A rule on `metric`: a rate rule (only a window raises it) unless told otherwise."""
    params = {"above": 100} if kind == "threshold" else {"max_per_s": 100}
    fields = {"rule_id": f"hot-{metric}", "device_type": "sensor", "metric": metric, "kind": kind}
    rule = Rule.model_validate({**fields, "params": params})
    await AnalyticsService(pool).put_rule(tenant, rule)


async def _fill_past_unwatched(
    pool: Pool, tenant: str, tag: str, bucket: int, metric: str, device_id: str = "fill-device"
) -> tuple[int, int]:
    """(batches, readings) of a window whose three batches of 10 all arrive while it fills (fill
    target 30): what a window gathers when nothing in it closes it early."""
    window_id = f"{tag}/0"
    await _pending_as(pool, tenant, tag, 0, bucket, metric, device_id=device_id)
    claim = asyncio.create_task(DataService(pool).claim_window(await _watched_claim(window_id, bucket, 30)))
    try:
        for n in (1, 2):
            await _until_claimed(pool, window_id, n)
            await asyncio.sleep(0.1)
            await _pending_as(pool, tenant, tag, n, bucket, metric, device_id=device_id)
        window = await claim
        return window.batches, window.readings
    finally:
        claim.cancel()


async def test_a_window_holding_a_watched_reading_stops_filling(pool: Pool) -> None:
    # an alert waits on a reading a rule looks at: its window is processed at once, not after
    # the fill wait a trickle of readings nobody watches gets
    tag, bucket = uuid.uuid4().hex[:8], -1_000_081
    tenant = f"watch-{tag}"
    await _rule(pool, tenant, "temp")
    service = DataService(pool)
    window_id = f"{tag}/0"
    await _pending_as(pool, tenant, tag, 0, bucket, "humidity")
    claim = asyncio.create_task(service.claim_window(await _watched_claim(window_id, bucket, 1000)))
    try:
        await _until_claimed(pool, window_id, 1)
        await asyncio.sleep(0.1)
        await _pending_as(pool, tenant, tag, 1, bucket, "temp")
        await _until_claimed(pool, window_id, 2)
        # a window still filling would take this one too
        await _pending_as(pool, tenant, tag, 2, bucket, "humidity")
        window = await claim
        assert (window.batches, window.readings) == (2, 20)
        assert await _claimed(pool, window_id) == 2
    finally:
        claim.cancel()
        await _cleanup(pool, tag)
        await pool.execute("DELETE FROM analytics.rules WHERE tenant = $1", tenant)


async def test_a_threshold_rules_reading_does_not_stop_a_window_filling(pool: Pool) -> None:
    # its alert is raised as the reading is accepted (api/early_alerts.py): nothing waits on
    # the window, which fills as if no rule looked at it (one window, not one per hot reading)
    tag, bucket = uuid.uuid4().hex[:8], -1_000_133
    tenant = f"watch-{tag}"
    await _rule(pool, tenant, "temp", kind="threshold")
    try:
        assert await _fill_past_unwatched(pool, tenant, tag, bucket, "temp") == (3, 30)
    finally:
        await _cleanup(pool, tag)
        await pool.execute("DELETE FROM analytics.rules WHERE tenant = $1", tenant)


async def test_another_tenants_rule_does_not_stop_a_window_filling(pool: Pool) -> None:
    tag, bucket = uuid.uuid4().hex[:8], -1_000_099
    tenant, other = f"watch-{tag}", f"other-{tag}"
    await _rule(pool, other, "temp")
    try:
        # at its fill target, as without any rule
        assert await _fill_past_unwatched(pool, tenant, tag, bucket, "temp") == (3, 30)
    finally:
        await _cleanup(pool, tag)
        await pool.execute("DELETE FROM analytics.rules WHERE tenant = $1", other)


async def test_a_device_named_like_a_watched_metric_does_not_stop_a_window_filling(pool: Pool) -> None:
    # only a reading of the metric closes the window early: a device (or batch) id that spells
    # a watched metric is no reading of it (the check reads the metric field, not any `,m,`)
    tag, bucket = uuid.uuid4().hex[:8], -1_000_121
    tenant = f"watch-{tag}"
    await _rule(pool, tenant, "temp")
    try:
        # at its fill target, as without any rule
        assert await _fill_past_unwatched(pool, tenant, tag, bucket, "humidity", device_id="temp") == (3, 30)
    finally:
        await _cleanup(pool, tag)
        await pool.execute("DELETE FROM analytics.rules WHERE tenant = $1", tenant)


async def test_a_watched_reading_is_found_among_a_tenants_rule_quota(pool: Pool) -> None:
    # a tenant at its rule quota (1,000 metrics watched): the window still closes on the one
    # reading of a watched metric among readings nobody watches
    tag, bucket = uuid.uuid4().hex[:8], -1_000_127
    tenant = f"watch-{tag}"
    metrics = [f"m{i:04d}-" + "x" * 58 for i in range(TenantLimits().max_rules)]
    await pool.executemany(
        """INSERT INTO analytics.rules (tenant, rule_id, device_type, metric, kind, params)
           VALUES ($1, $2, 'sensor', $3, 'rate', '{"max_per_s": 100}')""",
        [(tenant, f"r{i}", m) for i, m in enumerate(metrics)],
    )
    service = DataService(pool)
    window_id = f"{tag}/0"
    await _pending_as(pool, tenant, tag, 0, bucket, "humidity")
    claim = asyncio.create_task(service.claim_window(await _watched_claim(window_id, bucket, 1000)))
    try:
        await _until_claimed(pool, window_id, 1)
        await asyncio.sleep(0.1)
        await _pending_as(pool, tenant, tag, 1, bucket, metrics[-1])
        await _until_claimed(pool, window_id, 2)
        window = await claim
        assert (window.batches, window.readings) == (2, 20)
    finally:
        claim.cancel()
        await _cleanup(pool, tag)
        await pool.execute("DELETE FROM analytics.rules WHERE tenant = $1", tenant)


async def test_a_claim_counts_the_devices_of_its_window_that_may_not_send(pool: Pool) -> None:
    # 0 lets the workflow skip the device check; a device unknown, or known but not active (in
    # the tenant that sent, whatever another tenant holds under the same id), must count
    tag, bucket = uuid.uuid4().hex[:8], -1_000_117
    tenant, other = f"ready-{tag}", f"other-{tag}"
    service = DataService(pool)
    await pool.execute(
        """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version, status,
               onboarding_id)
           VALUES ($1, 'fill-device', 'sensor', '1.0', 'active', $3),
                  ($2, 'fill-device', 'sensor', '1.0', 'active', $3),
                  ($2, 'idle-device', 'sensor', '1.0', 'active', $3),
                  ($1, 'idle-device', 'sensor', '1.0', 'provisioned', $3)""",
        tenant,
        other,
        f"onboard-{tag}",
    )
    try:
        await _pending_as(pool, tenant, tag, 0, bucket, "temp")
        ready = await service.claim_window(_claim(f"{tag}/0", bucket, fill_readings=10))
        assert (ready.batches, ready.unready) == (1, 0)
        await _pending_as(pool, tenant, tag, 1, bucket, "temp")
        await pool.execute(
            """UPDATE data.ingest_batches SET device_ids = ARRAY['fill-device', 'idle-device', 'ghost']
               WHERE batch_id = $1""",
            f"{tag}-1",
        )
        unready = await service.claim_window(_claim(f"{tag}/1", bucket, fill_readings=10))
        assert (unready.batches, unready.unready) == (1, 2)
    finally:
        await _cleanup(pool, tag)
        await pool.execute("DELETE FROM device.devices WHERE tenant = ANY($1)", [tenant, other])
