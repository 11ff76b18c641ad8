"""Ingestion at its edges, on the real servers: the largest inputs the API accepts, poison
pills, and a shard workflow terminated under load."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid
import zlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from activities import analytics
from activities.telemetry import DataService
from fleetflow import rules
from fleetflow.contracts.limits import MAX_ABS_VALUE, MAX_AGE_DAYS, MAX_BATCH_BYTES, MAX_BATCH_READINGS
from fleetflow.contracts.telemetry import (
    BUCKETS,
    SUPERVISOR_ID,
    ClaimWindow,
    StoreWindow,
    WindowRef,
)
from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device
from tests.integration.test_telemetry import alerts, device_auth, readings, send, stored
from tests.support import bearer, eventually

MAX_EVENT_BYTES = 256 * 1024
SLOW = 180.0  # seconds a busy two-core machine may need to drain what these tests send


async def quarantined(pool: Pool, pattern: str) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM data.quarantined_readings WHERE device_id LIKE $1", pattern)
    )


async def test_a_flood_of_unknown_devices_stalls_nothing_and_no_history_event_passes_256_kib(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    for b in range(3):
        rows = [
            {"device_id": f"{tag}-{b}-{i:05d}-".ljust(110, "x"), "ts": now, "metric": "t", "value": i + 0.5}
            for i in range(MAX_BATCH_READINGS)
        ]
        body = json.dumps({"batch_id": f"{tag}-{b}", "readings": rows}, separators=(",", ":")).encode()
        assert len(body) <= MAX_BATCH_BYTES
        headers = {**AUTH, "Content-Type": "application/json"}
        accepted = await api.post("/v1/telemetry", content=body, headers=headers)
        assert accepted.status_code == 202, accepted.text
    device_id, credential = await active_device(api, device_type="sensor")
    assert (await send(api, device_auth(credential), readings(device_id, [1.0]))).status_code == 202

    await eventually(lambda: stored(pool, device_id), lambda n: n == 1, timeout_s=SLOW)
    await eventually(
        lambda: quarantined(pool, f"{tag}-%"), lambda n: n == 3 * MAX_BATCH_READINGS, timeout_s=SLOW
    )
    claimed = await pool.fetchval(
        "SELECT count(*) FROM data.ingest_batches WHERE batch_id LIKE $1 AND status <> 'stored'", f"{tag}-%"
    )
    assert claimed == 0

    # nothing that grows with the traffic travelled through any run's history
    runs = [r async for r in client.list_workflows("WorkflowType = 'TelemetryIngestion'")]
    assert runs
    for run in runs:
        history = await client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history()
        biggest = max(history.events, key=lambda e: e.ByteSize())
        assert biggest.ByteSize() <= MAX_EVENT_BYTES, (run.id, run.run_id, biggest.event_id)


def _csv(tenant: str, batch_id: str, device_id: str, rows: list[tuple[str, str]]) -> bytes:
    return "".join(f"{tenant},{batch_id},{device_id},p,{ts},{value}\n" for ts, value in rows).encode()


async def _acknowledged(pool: Pool, batch_id: str, bucket: int, device_id: str, payload: bytes) -> None:
    """A batch as the API stored it before the bounds existed (what is already in the table)."""
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload)
           VALUES ('acme', $1, $2, $3, $4, $5)""",
        batch_id,
        bucket,
        payload.count(b"\n"),
        [device_id],
        payload,
    )


async def test_poison_pills_are_quarantined_with_their_reason_and_the_shard_goes_on(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    for kind, params in (("zscore", {"z": 3, "min_samples": 1}), ("rate", {"max_per_s": 10})):
        rule = {
            "rule_id": f"pill-{kind}",
            "device_type": "sensor",
            "metric": "p",
            "kind": kind,
            "params": params,
        }
        assert (await api.put(f"/v1/rules/pill-{kind}", json=rule, headers=AUTH)).status_code == 200
    sick, sick_credential = await active_device(api, device_type="sensor")
    healthy, healthy_credential = await active_device(api, device_type="sensor")
    now = datetime.now(UTC).replace(microsecond=0)

    # batches acknowledged before the bounds existed, in the healthy device's shard: the two
    # pills met so far, and a third kind, a row COPY cannot read
    bucket = zlib.crc32(healthy.encode()) % BUCKETS
    tag = uuid.uuid4().hex[:8]
    ts = (now - timedelta(minutes=1)).isoformat()
    warmup = [((now - timedelta(minutes=5, seconds=i)).isoformat(), "1.0") for i in range(3)]
    pills = {
        f"{tag}-warmup": warmup,  # gives the series a prior state, so the old ts is compared
        f"{tag}-ts": [("0001-01-01T00:00:00+00:00", "1.0")],
        f"{tag}-overflow": [
            ((now - timedelta(seconds=i)).isoformat(), repr(1e308 * (-1) ** i)) for i in range(10)
        ],
        f"{tag}-unreadable": [(ts, "not-a-number")],
    }
    for batch_id, rows in pills.items():
        await _acknowledged(pool, batch_id, bucket, sick, _csv("acme", batch_id, sick, rows))
    assert (
        await send(api, device_auth(healthy_credential), readings(healthy, [1.0, 2.0, 3.0]))
    ).status_code == 202

    await eventually(lambda: stored(pool, healthy), lambda n: n == 3, timeout_s=SLOW)

    async def statuses() -> dict[str, tuple[str, str | None]]:
        rows = await pool.fetch(
            "SELECT batch_id, status, reason FROM data.ingest_batches WHERE batch_id LIKE $1", f"{tag}-%"
        )
        return {r["batch_id"]: (r["status"], r["reason"]) for r in rows}

    done = await eventually(statuses, lambda s: all(v[0] in ("stored", "quarantined") for v in s.values()))
    assert done[f"{tag}-unreadable"][0] == "quarantined"
    assert "InvalidTextRepresentation" in str(done[f"{tag}-unreadable"][1])
    assert {k: v[0] for k, v in done.items() if k != f"{tag}-unreadable"} == {
        f"{tag}-warmup": "stored",
        f"{tag}-ts": "stored",
        f"{tag}-overflow": "stored",
    }
    assert await stored(pool, sick) == 3  # the warm-up; the out-of-bounds rows are set aside

    view: list[dict[str, Any]] = (
        await api.get("/v1/telemetry/quarantine", params={"device_id": sick}, headers=AUTH)
    ).json()
    reasons = {v["reason"].split(" (")[0]: v["readings"] for v in view}
    assert reasons == {"ts out of bounds": 1, "value out of bounds": 10}, view

    async def quarantine_events() -> list[dict[str, Any]]:
        rows = await pool.fetch(
            """SELECT data FROM notification.events
               WHERE tenant = 'acme' AND type = 'BatchQuarantined' AND data->>'batch_id' = $1""",
            f"{tag}-unreadable",
        )
        return [r["data"] for r in rows]

    events = await eventually(quarantine_events, lambda e: len(e) == 1)
    assert "InvalidTextRepresentation" in events[0]["reason"]
    listed = (await api.get("/v1/telemetry/quarantined-batches", headers=AUTH)).json()
    assert [b["readings"] for b in listed if b["batch_id"] == f"{tag}-unreadable"] == [1]
    foreign = await api.get("/v1/telemetry/quarantined-batches", headers=bearer("globex"))
    assert foreign.status_code == 200 and tag not in foreign.text

    # the API refuses both known pills now, naming the field
    old = [{"device_id": sick, "ts": "0001-01-01T00:00:00Z", "metric": "p", "value": 1.0}]
    refused = await send(api, device_auth(sick_credential), old)
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["body", "readings", 0, "ts"]
    huge = readings(sick, [1e308, -1e308], metric="p")
    refused = await send(api, device_auth(sick_credential), huge)
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"][-1] == "value"


async def test_a_terminated_shard_is_restarted_and_every_acknowledged_reading_is_stored(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    devices = [await active_device(api, device_type="sensor") for _ in range(4)]
    expected = {device_id: 0 for device_id, _ in devices}

    async def load(round_: int) -> None:
        for device_id, credential in devices:
            rows = readings(device_id, [float(round_)] * 50, start=round_ * 50)
            assert (await send(api, device_auth(credential), rows)).status_code == 202
            expected[device_id] += 50

    await load(0)
    shard = client.get_workflow_handle("ingest-0")
    dead_run = (await shard.describe()).run_id
    await shard.terminate("test: a shard dies under load")
    await load(1)
    # a batch the dead run had claimed when it died (acknowledged, never stored)
    device_id = devices[0][0]
    payload = "".join(
        f"acme,dead-{dead_run},{device_id},temperature,{r['ts']},{r['value']}\n"
        for r in readings(device_id, [7.0, 8.0], start=900)
    ).encode()
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload, status,
               window_id)
           VALUES ('acme', $1, 0, 2, $2, $3, 'claimed', $4)""",
        f"dead-{dead_run}",
        [device_id],
        payload,
        f"ingest-0/{dead_run}/999",
    )
    expected[device_id] += 2
    # and a window it had stored but whose events it never recorded
    orphan = f"ingest-0/{dead_run}/998"
    await pool.execute(
        """INSERT INTO data.windows (window_id, stored, quarantined, by_tenant)
           VALUES ($1, 0, 0, '{"acme": {"stored": 0, "quarantined": 0}}')""",
        orphan,
    )
    await load(2)

    async def counts() -> dict[str, int]:
        return {d: await stored(pool, d) for d in expected}

    await eventually(counts, lambda c: c == expected, timeout_s=SLOW)
    described = await shard.describe()
    assert described.run_id != dead_run and described.status == WorkflowExecutionStatus.RUNNING
    finished = await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM notification.events WHERE event_id = $1", f"{orphan}/acme/TelemetryStored"
        ),
        lambda n: n == 1,
        timeout_s=SLOW,
    )
    assert finished == 1


async def test_a_batch_spanning_the_whole_accepted_range_is_stored_and_older_is_refused(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, credential = await active_device(api, device_type="sensor")
    me = device_auth(credential)
    now = datetime.now(UTC)
    too_old = [
        {
            "device_id": device_id,
            "ts": (now - timedelta(days=MAX_AGE_DAYS + 1)).isoformat(),
            "metric": "span",
            "value": 1.0,
        }
    ]
    refused = await send(api, me, too_old)
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["body", "readings", 0, "ts"]

    # one reading in each of ~366 daily partitions that do not exist yet: stored, not a pill
    oldest = now - timedelta(days=MAX_AGE_DAYS) + timedelta(minutes=10)
    step = (now - oldest) / (MAX_BATCH_READINGS - 1)
    rows = [
        {"device_id": device_id, "ts": (oldest + step * i).isoformat(), "metric": "span", "value": float(i)}
        for i in range(MAX_BATCH_READINGS)
    ]
    assert (await send(api, me, rows)).status_code == 202
    await eventually(lambda: stored(pool, device_id), lambda n: n == MAX_BATCH_READINGS, timeout_s=SLOW)


async def test_a_window_is_capped_in_bytes_as_well_as_readings(pool: Pool) -> None:
    # a bucket of its own: -p % n is never a running shard's (p is prime, larger than any n),
    # -p % (p + 1) = -p is the shard this test claims, and no other test uses it
    tag = uuid.uuid4().hex[:8]
    bucket = -1_000_003
    ts = datetime.now(UTC).isoformat()
    big = "".join(f"acme,{tag},{'d' * 100},m,{ts},1.0\n" for _ in range(5000)).encode()  # ~0.6 MB
    for n in range(3):
        await pool.execute(
            """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload)
               VALUES ('acme', $1, $3, 5000, ARRAY['x'], $2)""",
            f"{tag}-{n}",
            big,
            bucket,
        )
    service = DataService(pool)
    windows = []
    for n in range(3):
        request = ClaimWindow(
            window_id=f"{tag}/{n}",
            shard=bucket,
            shards=-bucket + 1,
            max_readings=1_000_000,
            max_wait_ms=10,
            max_bytes=len(big) * 2 - 1,
        )
        windows.append(await service.claim_window(request))
    assert [(w.batches, w.bytes) for w in windows] == [(1, len(big)), (1, len(big)), (1, len(big))]
    await pool.execute("DELETE FROM data.ingest_batches WHERE batch_id LIKE $1", f"{tag}-%")


async def test_a_series_the_rules_cannot_evaluate_is_skipped_with_an_event_at_the_last_resort(
    api: httpx.AsyncClient, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = {
        "rule_id": "odd-hot",
        "device_type": "sensor",
        "metric": "odd",
        "kind": "threshold",
        "params": {"above": 5},
    }
    assert (await api.put("/v1/rules/odd-hot", json=rule, headers=AUTH)).status_code == 200
    first, _ = await active_device(api, device_type="sensor")
    second, _ = await active_device(api, device_type="sensor")
    window_id = f"test-{uuid.uuid4().hex[:8]}/r/0"
    now = datetime.now(UTC)
    for device_id, value in ((first, 9.0), (second, 9.0)):
        await pool.execute(
            "INSERT INTO data.window_stats VALUES ($1, 'acme', $2, 'odd', 1, $3, 0, $3, $3, $4, $3, $4, $3)",
            window_id,
            device_id,
            value,
            now,
        )
    real = rules.evaluate
    service = analytics.AnalyticsService(pool)
    # an attempt before the last resort fails the whole window, as before
    monkeypatch.setattr(analytics, "in_last_resort", lambda: False)

    def overflowing(rule: Any, w: Any, prior: Any) -> Any:
        if rule.rule_id == "odd-hot":  # other tests' windows may still be analysed meanwhile
            raise OverflowError("(34, 'Numerical result out of range')")
        return real(rule, w, prior)

    monkeypatch.setattr(rules, "evaluate", overflowing)
    with pytest.raises(OverflowError):
        await service.evaluate(WindowRef(window_id=window_id, counts_only=True))
    # the last resort skips that series only, with an AnalysisFailed event, and raises the other's alert
    monkeypatch.setattr(analytics, "in_last_resort", lambda: True)
    calls: list[str] = []

    def flaky(rule: Any, w: Any, prior: Any) -> Any:
        if rule.rule_id == "odd-hot":
            calls.append(rule.rule_id)
            if len(calls) == 1:  # the first of the two series
                raise OverflowError("(34, 'Numerical result out of range')")
        return real(rule, w, prior)

    monkeypatch.setattr(rules, "evaluate", flaky)
    evaluated = await service.evaluate(WindowRef(window_id=window_id, counts_only=True))
    assert (evaluated.failed, evaluated.raised, evaluated.events) == (1, 1, [])
    rows = await pool.fetch(
        "SELECT event FROM analytics.window_events WHERE window_id = $1 ORDER BY event_id", window_id
    )
    kinds = sorted(r["event"]["type"] for r in rows)
    assert kinds == ["AlertRaised", "AnalysisFailed"]
    failed = next(r["event"] for r in rows if r["event"]["type"] == "AnalysisFailed")
    assert "OverflowError" in failed["data"]["reason"]


async def test_a_terminated_supervisor_is_started_again_by_the_running_api(
    api: httpx.AsyncClient, client: Client
) -> None:
    # the supervisor restarts the shards; before, nothing restarted the supervisor itself
    # until an API process started again
    supervisor = client.get_workflow_handle(SUPERVISOR_ID)
    dead_run = (await supervisor.describe()).run_id
    await supervisor.terminate("test: the supervisor dies")

    async def latest() -> tuple[str | None, WorkflowExecutionStatus | None]:
        described = await client.get_workflow_handle(SUPERVISOR_ID).describe()
        return described.run_id, described.status

    run_id, status = await eventually(
        latest, lambda r: r[0] != dead_run and r[1] == WorkflowExecutionStatus.RUNNING, timeout_s=SLOW
    )
    assert run_id != dead_run and status == WorkflowExecutionStatus.RUNNING


async def _claimed(pool: Pool, tenant: str, window_id: str, ts: datetime) -> None:
    """A claimed batch of one reading (bucket -1: no running shard's)."""
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload, status,
               window_id)
           VALUES ($1, 'same-id', -1, 1, ARRAY['same-device'], $2, 'claimed', $3)""",
        tenant,
        f"{tenant},same-id,same-device,lock,{ts.isoformat()},1.0\n".encode(),
        window_id,
    )


async def test_a_store_held_up_in_one_shard_holds_up_no_other_shards_store(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    # storing took a lock for the daily partitions and held it to its commit, so every store
    # of every shard (every tenant) waited for the slowest one in flight
    tag = uuid.uuid4().hex[:8]
    ts = datetime.now(UTC) - timedelta(minutes=1)
    # windows of a running run (the supervisor's, which runs for an hour), so the supervisor
    # does not take their claims back as those of a run that is gone
    run = (await client.get_workflow_handle(SUPERVISOR_ID).describe()).run_id
    held, free = f"{SUPERVISOR_ID}/{run}/lock-{tag}-held", f"{SUPERVISOR_ID}/{run}/lock-{tag}-free"
    await _claimed(pool, "acme", held, ts)
    await _claimed(pool, "other", free, ts)
    service = DataService(pool)
    async with pool.acquire() as blocker:
        hold = blocker.transaction()
        await hold.start()
        # the held window's store gets as far as recording it, and waits there for this transaction
        await blocker.execute(
            "INSERT INTO data.windows (window_id, stored, quarantined, by_tenant) VALUES ($1, 0, 0, '{}')",
            held,
        )
        first = asyncio.create_task(service.store_window(StoreWindow(window_id=held, counts_only=True)))
        await eventually(
            lambda: pool.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO data.windows%'"""
            ),
            lambda n: n >= 1,
        )
        try:
            # a store in another shard goes through meanwhile (the bound only guards against a hang)
            other = await asyncio.wait_for(
                service.store_window(StoreWindow(window_id=free, counts_only=True)), 120
            )
        finally:
            await hold.rollback()
    assert other.stored == 1
    assert (await first).stored == 1


async def test_timestamps_with_any_accepted_utc_offset_are_stored_not_made_poison(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # ISO 8601 offsets up to ±23:59 pass validation, PostgreSQL reads only up to ±15:59: the
    # batch was written as sent, failed every store of its window and was split off as poison
    # (each such batch cost the other tenants' batches in its window three failed stores per split)
    device_id, credential = await active_device(api, device_type="sensor")
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    rows = [
        {
            "device_id": device_id,
            "ts": (now + timedelta(seconds=i)).astimezone(timezone(offset)).isoformat(),
            "metric": "tz",
            "value": float(i),
        }
        for i, offset in enumerate((timedelta(hours=20), -timedelta(hours=23, minutes=59), timedelta(0)))
    ]
    batch_id = f"tz-{uuid.uuid4().hex[:8]}"
    assert (await send(api, device_auth(credential), rows, batch_id)).status_code == 202

    async def status() -> str:
        found = await pool.fetchval("SELECT status FROM data.ingest_batches WHERE batch_id = $1", batch_id)
        return str(found)

    assert await eventually(status, lambda s: s in ("stored", "quarantined"), timeout_s=SLOW) == "stored"
    ts = await pool.fetch("SELECT ts FROM data.readings WHERE device_id = $1 ORDER BY ts", device_id)
    assert [r["ts"] for r in ts] == [now + timedelta(seconds=i) for i in range(3)]


async def test_a_batch_accepted_with_its_offsets_as_sent_is_a_duplicate_when_repeated(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # accepted before timestamps were written in UTC (its digest is of the offsets as sent):
    # the device's retry after the upgrade is the same batch, not a 409
    device_id, credential = await active_device(api, device_type="sensor")
    ts = (datetime.now(UTC) - timedelta(minutes=1)).astimezone(timezone(timedelta(hours=2)))
    batch_id = f"legacy-{uuid.uuid4().hex[:8]}"
    payload = f"acme,{batch_id},{device_id},tz,{ts.isoformat()},{1.5!r}\n".encode()
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, writer, batch_id, bucket, readings, device_ids, payload,
               digest, status)
           VALUES ('acme', $1, $2, -1, 1, $3, $4, $5, 'stored')""",
        f"device:{device_id}",
        batch_id,
        [device_id],
        payload,
        hashlib.sha256(payload).digest(),
    )
    rows = [{"device_id": device_id, "ts": ts.isoformat(), "metric": "tz", "value": 1.5}]
    again = await send(api, device_auth(credential), rows, batch_id)
    assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
    other = [{**rows[0], "value": 2.5}]
    assert (await send(api, device_auth(credential), other, batch_id)).status_code == 409


async def test_the_most_extreme_accepted_values_are_stored_and_analysed_without_overflow(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # the largest batch of the largest values the API accepts, alternating in sign a microsecond
    # apart (var_pop, the EWMA variance, z-scores and rates at their largest), and subnormals
    for kind, params in (("zscore", {"z": 3, "min_samples": 1}), ("rate", {"max_per_s": 10})):
        rule = {
            "rule_id": f"huge-{kind}",
            "device_type": "sensor",
            "metric": "huge",
            "kind": kind,
            "params": params,
        }
        assert (await api.put(f"/v1/rules/huge-{kind}", json=rule, headers=AUTH)).status_code == 200
    device_id, credential = await active_device(api, device_type="sensor")
    start = datetime.now(UTC) - timedelta(minutes=2)
    values = [MAX_ABS_VALUE * (-1) ** i for i in range(MAX_BATCH_READINGS - 2)] + [5e-324, -5e-324]
    for n in range(2):  # the second batch meets the first one's series state
        rows = [
            {
                "device_id": device_id,
                "ts": (start + timedelta(seconds=n, microseconds=i)).isoformat(),
                "metric": "huge",
                "value": v,
            }
            for i, v in enumerate(values)
        ]
        batch_id = uuid.uuid4().hex
        answer = await send(api, device_auth(credential), rows, batch_id)
        if answer.status_code == 429:  # the device's readings/s: once more after Retry-After
            await asyncio.sleep(float(answer.headers["Retry-After"]))
            answer = await send(api, device_auth(credential), rows, batch_id)
        assert answer.status_code == 202, answer.text
        expected = (n + 1) * len(values)
        await eventually(lambda: stored(pool, device_id), lambda c: c == expected, timeout_s=SLOW)  # noqa: B023
    assert await quarantined(pool, device_id) == 0

    async def raised() -> set[str]:
        return {a["rule_id"] for a in await alerts(api, device_id)}

    # changing 2e100 a microsecond raises the rate alert; against a standard deviation of 1e100
    # the z-score of ±1e100 is 1, which holds
    assert await eventually(raised, lambda r: r == {"huge-rate"}, timeout_s=SLOW)

    async def series() -> Any:
        return await pool.fetchrow(
            "SELECT n, mean, var FROM analytics.series WHERE device_id = $1 AND metric = 'huge'", device_id
        )

    # the alert may come from the first window; the second one's analysis can still be running
    state = await eventually(series, lambda s: s is not None and s["n"] == 2 * len(values), timeout_s=SLOW)
    assert math.isfinite(state["var"])
    assert state["var"] == pytest.approx(MAX_ABS_VALUE**2, rel=1e-3)
    failed = await pool.fetchval(
        "SELECT count(*) FROM notification.events WHERE device_id = $1 AND type = 'AnalysisFailed'", device_id
    )
    assert failed == 0


async def test_a_batch_quarantined_by_a_run_that_died_before_recording_gets_its_event(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    # the supervisor finished the stored windows of dead runs, not the quarantined ones: the
    # BatchQuarantined event of a shard terminated right after quarantining was never recorded
    tag = uuid.uuid4().hex[:8]
    window_id = f"ingest-0/{uuid.uuid4()}/7/a"  # a run that is not running
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, batch_id, bucket, readings, device_ids, payload, status,
               window_id, reason, quarantined_at)
           VALUES ('acme', $1, -1, 1, ARRAY['ghost'], NULL, 'quarantined', $2, 'test: poison', now())""",
        f"dead-{tag}",
        window_id,
    )
    event_id = f"{window_id}/acme/dead-{tag}/BatchQuarantined"
    recorded = await eventually(
        lambda: pool.fetchval("SELECT count(*) FROM notification.events WHERE event_id = $1", event_id),
        lambda n: n == 1,
        timeout_s=SLOW,
    )
    assert recorded == 1
