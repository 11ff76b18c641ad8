"""Reads across a service boundary, through the owner's read facade: what moved out of a
cross-schema query must answer as the query did."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import TypeAdapter
from temporalio.client import Client

from activities.analytics import AnalyticsService
from activities.telemetry import DataService
from activities.telemetry_accept import Accepted, ConflictingBatch, accept_batch
from activities.telemetry_publishes import Outcome, Publish, accept_publishes
from cli.status import _SECTIONS, _section
from fleetflow.contracts.telemetry import BATCH_QUARANTINED, TELEMETRY_STORED, TelemetryBatchDict
from fleetflow.db import Pool
from fleetflow.mqtt_topics import parse_telemetry

_BATCH = TypeAdapter(TelemetryBatchDict)


async def test_the_supervisor_finds_the_windows_whose_events_were_never_recorded(
    pool: Pool, client: Client
) -> None:
    # windows of a run that never existed (so not running), an hour-old bar a minute: the
    # supervisor looks at the oldest first, before the windows of other tests
    tag = uuid.uuid4().hex[:10]
    tenant, run = f"t{tag}", f"gone-{tag}/run"
    recorded, missing, quarantined = (f"{run}/{n}" for n in range(3))
    for window in (recorded, missing):
        await pool.execute(
            """INSERT INTO data.windows (window_id, stored, quarantined, by_tenant, stored_at)
               VALUES ($1, 1, 0, $2, now() - interval '59 minutes')""",
            window,
            {tenant: {"stored": 1, "quarantined": 0}},
        )
    await pool.execute(
        """INSERT INTO data.ingest_batches
               (tenant, batch_id, bucket, readings, device_ids, status, reason, quarantined_at, window_id)
           VALUES ($1, $2, -1, 1, ARRAY['d1'], 'quarantined', 'poison', now() - interval '59 minutes', $3)""",
        tenant,
        f"b{tag}",
        quarantined,
    )
    # only the first window's TelemetryStored event was recorded
    await pool.execute(
        """INSERT INTO notification.events (event_id, tenant, type, occurred_at, actor)
           VALUES ($1, $2, $3, now(), 'ingestion')""",
        f"{recorded}/{tenant}/{TELEMETRY_STORED}",
        tenant,
        TELEMETRY_STORED,
    )
    # the same event id recorded for another tenant is not this tenant's event
    await pool.execute(
        """INSERT INTO notification.events (event_id, tenant, type, occurred_at, actor)
           VALUES ($1, $2, $3, now(), 'ingestion')""",
        f"{quarantined}/{tenant}/b{tag}/{BATCH_QUARANTINED}",
        f"other{tag}",
        BATCH_QUARANTINED,
    )
    try:
        orphans = await DataService(pool, client).supervision._orphans()
        assert missing in orphans
        assert quarantined in orphans
        assert recorded not in orphans
        assert len(orphans) == len(set(orphans))
    finally:
        await pool.execute("DELETE FROM notification.events WHERE event_id LIKE $1", f"gone-{tag}/%")
        await pool.execute("DELETE FROM data.windows WHERE window_id LIKE $1", f"gone-{tag}/%")
        await pool.execute("DELETE FROM data.ingest_batches WHERE tenant = $1", tenant)


async def test_the_status_screen_reads_every_service_through_its_facade(pool: Pool) -> None:
    for name in _SECTIONS:
        section = await _section(pool, name)
        assert isinstance(section, list), (name, section)
    ingestion = await _section(pool, "ingestion")
    assert isinstance(ingestion, list)
    assert set(ingestion[0]) == {
        "pending_batches",
        "pending_readings",
        "oldest_s",
        "stored_last_minute",
        "quarantined_last_minute",
    }


async def test_a_windows_series_get_their_own_tenants_device_type_and_prior_state(pool: Pool) -> None:
    # what analytics.evaluate once joined across three schemas: two tenants with the same device
    # id (of different types, one with a prior series state) and a device no tenant registered
    tag = uuid.uuid4().hex[:10]
    window, a, b = f"w-{tag}", f"a{tag}", f"b{tag}"
    for tenant, device_type in ((a, "thermostat"), (b, "meter")):
        await pool.execute(
            """INSERT INTO device.devices (tenant, device_id, device_type, firmware_version, status,
                                           onboarding_id)
               VALUES ($1, 'd1', $2, '1.0.0', 'active', 'o1')""",
            tenant,
            device_type,
        )
    for tenant, device_id in ((a, "d1"), (b, "d1"), (a, "nobody")):
        await pool.execute(
            """INSERT INTO data.window_stats (window_id, tenant, device_id, metric, n, mean, var,
                   min_value, max_value, first_ts, first_value, last_ts, last_value)
               VALUES ($1, $2, $3, 'temp', 1, 20, 0, 20, 20, now(), 20, now(), 20)""",
            window,
            tenant,
            device_id,
        )
    await pool.execute(
        """INSERT INTO analytics.series (tenant, device_id, metric, n, mean, var, last_ts, last_value)
           VALUES ($1, 'd1', 'temp', 7, 19.5, 0.25, now(), 19)""",
        b,
    )
    try:
        rows = await AnalyticsService(pool)._window_series(pool, window)
        got = {(r["tenant"], r["device_id"]): (r["device_type"], r["s_n"]) for r in rows}
        assert got == {(a, "d1"): ("thermostat", None), (b, "d1"): ("meter", 7)}
    finally:
        await pool.execute("DELETE FROM data.window_stats WHERE window_id = $1", window)
        await pool.execute("DELETE FROM analytics.series WHERE tenant = $1", b)
        await pool.execute("DELETE FROM device.devices WHERE tenant = ANY($1)", [a, b])


async def test_the_accept_path_stores_a_batch_once_per_tenant_and_sender(pool: Pool) -> None:
    # the data service's accept path without HTTP: the same batch id of two tenants (and the
    # same writer name) is two batches; repeated, a duplicate; with other readings, a conflict
    tag = uuid.uuid4().hex[:10]
    at = datetime.now(UTC)
    batch = _BATCH.validate_python(
        {"batch_id": f"b{tag}", "readings": [{"device_id": "d1", "ts": at, "metric": "temp", "value": 20.5}]}
    )
    tenants = (f"a{tag}", f"b{tag}")
    try:
        for tenant in tenants:
            first = await accept_batch(pool, tenant, "device:d1", batch, ["d1"])
            again = await accept_batch(pool, tenant, "device:d1", batch, ["d1"])
            assert (first, again) == (Accepted(1, duplicate=False), Accepted(1, duplicate=True))
        other = _BATCH.validate_python(
            {
                "batch_id": f"b{tag}",
                "readings": [{"device_id": "d1", "ts": at, "metric": "temp", "value": 99.0}],
            }
        )
        with pytest.raises(ConflictingBatch):
            await accept_batch(pool, tenants[0], "device:d1", other, ["d1"])
        rows = await pool.fetch(
            "SELECT tenant, readings, payload FROM data.ingest_batches WHERE tenant = ANY($1) ORDER BY 1",
            list(tenants),
        )
        assert [(r["tenant"], r["readings"]) for r in rows] == [(tenants[0], 1), (tenants[1], 1)]
        assert rows[0]["payload"].decode().startswith(f"{tenants[0]},b{tag},d1,temp,")
    finally:
        await pool.execute("DELETE FROM data.ingest_batches WHERE tenant = ANY($1)", list(tenants))


async def test_a_batch_accepted_before_the_columns_parse_is_a_duplicate_when_repeated(pool: Pool) -> None:
    # batches stored by the release before (its CSV: isoformat, repr) under their digest, pending
    # when the API is upgraded: the same readings again are a duplicate, other readings a conflict
    tag = uuid.uuid4().hex[:10]
    tenant, at = f"a{tag}", datetime(2026, 12, 6, 8, 0, 0, 500000, tzinfo=UTC)
    batch = _BATCH.validate_python(
        {"batch_id": f"b{tag}", "readings": [{"device_id": "d1", "ts": at, "metric": "temp", "value": 1e-05}]}
    )
    before = f"{tenant},b{tag},d1,temp,{at.isoformat()},{1e-05!r}\n".encode()
    try:
        await pool.execute(
            """INSERT INTO data.ingest_batches
                   (tenant, writer, batch_id, bucket, readings, device_ids, payload, digest)
               VALUES ($1, 'device:d1', $2, 0, 1, ARRAY['d1'], $3, $4)""",
            tenant,
            f"b{tag}",
            before,
            hashlib.sha256(before).digest(),
        )
        assert await accept_batch(pool, tenant, "device:d1", batch, ["d1"]) == Accepted(1, duplicate=True)
        batch["readings"][0]["value"] = 2e-05
        with pytest.raises(ConflictingBatch):
            await accept_batch(pool, tenant, "device:d1", batch, ["d1"])
    finally:
        await pool.execute("DELETE FROM data.ingest_batches WHERE tenant = $1", tenant)


async def test_a_batch_accepted_before_the_upgrade_is_a_duplicate_when_published_again(pool: Pool) -> None:
    # a batch id stored by the release before (over MQTT, or over HTTP with the device's
    # credential: the same CSV, isoformat and repr) whose PUBACK was lost: the device publishes
    # it again after the upgrade; the same readings are a duplicate, other readings a conflict
    tag = uuid.uuid4().hex[:10]
    tenant, at = f"a{tag}", datetime(2026, 12, 6, 8, 0, 0, 500000, tzinfo=UTC)
    before = f"{tenant},b{tag},d1,temp,{at.isoformat()},{1e16!r}\n".encode()

    def again(value: float) -> Publish:
        reading = {"metric": "temp", "value": value, "ts": at.isoformat()}
        payload = json.dumps({"batch_id": f"b{tag}", "readings": [reading]}).encode()
        readings = parse_telemetry(payload, "d1", at)
        publish = Publish(tenant, "d1", readings.rows, readings.batch_id, 1)
        publish.prepare()
        return publish

    try:
        await pool.execute(
            """INSERT INTO data.ingest_batches
                   (tenant, writer, batch_id, bucket, readings, device_ids, payload, digest)
               VALUES ($1, 'device:d1', $2, 0, 1, ARRAY['d1'], $3, $4)""",
            tenant,
            f"b{tag}",
            before,
            hashlib.sha256(before).digest(),
        )
        assert await accept_publishes(pool, [again(1e16)], shards=1) == [Outcome.DUPLICATE]
        assert await accept_publishes(pool, [again(2e16)], shards=1) == [Outcome.CONFLICT]
    finally:
        await pool.execute("DELETE FROM data.ingest_batches WHERE tenant = $1", tenant)
