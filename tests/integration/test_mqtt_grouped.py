"""Publishes without a batch id of their own, grouped: one `data.ingest_batches` row per tenant
and ingestion shard of a group commit (activities/telemetry_publishes.py). Each reading stays
with its tenant and device; a redelivered copy is stored once, in the same group too; a poison
publish in a grouped row sets aside its own device's readings only."""

from __future__ import annotations

import asyncio
import json
import uuid
import zlib
from datetime import UTC, datetime
from functools import partial
from typing import Any

import httpx

from activities.telemetry_publishes import GROUPED_WRITER, Outcome, Publish, accept_publishes
from fleetflow.contracts.telemetry import BUCKETS, MAX_BATCH_READINGS
from fleetflow.db import Pool
from fleetflow.mqtt_topics import parse_telemetry, payload_digest
from gateway.ingest import GroupCommitter
from tests.integration.flows import active_device
from tests.support import bearer, eventually

SLOW = 180.0  # seconds a busy two-core machine may need for a poison pill's retries
SHARDS = 2


def publish(tenant: str, device_id: str, value: float, packet_id: int, dup: bool = False) -> Publish:
    """A prepared single-reading QoS 1 publish, as the gateway makes it."""
    payload = json.dumps({"metric": "t", "value": value}).encode()
    readings = parse_telemetry(payload, device_id, datetime.now(UTC))
    p = Publish(tenant, device_id, readings.rows, None, packet_id, dup, payload_digest(payload))
    p.prepare()
    return p


async def values(pool: Pool, tenant: str, device_id: str) -> list[float]:
    rows = await pool.fetch(
        "SELECT value FROM data.readings WHERE tenant = $1 AND device_id = $2 ORDER BY value",
        tenant,
        device_id,
    )
    return [r["value"] for r in rows]


async def quarantined(pool: Pool, tenant: str, device_id: str) -> list[float]:
    rows = await pool.fetch(
        """SELECT value FROM data.quarantined_readings WHERE tenant = $1 AND device_id = $2
           ORDER BY value""",
        tenant,
        device_id,
    )
    return [r["value"] for r in rows]


async def blocked_by(pool: Pool, holder: Any) -> bool:
    """Whether a session waits for a lock that holder's transaction holds."""
    pid = holder.get_server_pid()
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
        )
    )


async def test_a_group_is_a_row_per_tenant_and_shard_and_each_reading_keeps_its_tenant_and_device(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    devices = [(await active_device(api))[0] for _ in range(4)]
    shared = devices[0]  # the same id in globex: unknown there
    group = [publish("acme", d, float(i), 1) for i, d in enumerate(devices)]
    group += [publish("acme", d, float(10 + i), 2) for i, d in enumerate(devices)]
    group.append(publish("globex", shared, 99.0, 1))
    assert await accept_publishes(pool, group, shards=SHARDS) == [Outcome.STORED] * len(group)

    rows = await pool.fetch(
        """SELECT tenant, bucket, readings, device_ids FROM data.ingest_batches
           WHERE writer = $1 AND device_ids && $2::text[]""",
        GROUPED_WRITER,
        devices,
    )
    shards = {(t, zlib.crc32(d.encode()) % BUCKETS % SHARDS) for t, d in (("acme", d) for d in devices)}
    shards.add(("globex", zlib.crc32(shared.encode()) % BUCKETS % SHARDS))
    assert sorted((r["tenant"], r["bucket"]) for r in rows) == sorted(shards)
    assert sum(r["readings"] for r in rows) == len(group)
    for r in rows:  # each device on its own shard's row, once
        assert all(zlib.crc32(d.encode()) % BUCKETS % SHARDS == r["bucket"] for d in r["device_ids"])
        assert len(set(r["device_ids"])) == len(r["device_ids"])

    for i, d in enumerate(devices):
        assert await eventually(partial(values, pool, "acme", d), lambda v: len(v) >= 2) == [i, 10 + i]
    # globex has no such device: its reading is set aside under globex, not mixed with acme's
    assert await eventually(lambda: quarantined(pool, "globex", shared), lambda v: len(v) >= 1) == [99.0]
    assert await quarantined(pool, "acme", shared) == []


async def test_a_grouped_row_is_no_larger_than_an_http_batch(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id, _ = await active_device(api)
    ts = datetime.now(UTC).isoformat()
    big = [f"{device_id},t,{ts},{i}.0\n" for i in range(MAX_BATCH_READINGS * 3 // 5)]
    group = [Publish("acme", device_id, big, None, packet_id) for packet_id in (1, 2)]
    for p in group:
        p.prepare()
    assert await accept_publishes(pool, group, shards=SHARDS) == [Outcome.STORED] * 2
    rows = await pool.fetch(
        """SELECT readings FROM data.ingest_batches WHERE writer = $1 AND device_ids = $2::text[]
           ORDER BY batch_id""",
        GROUPED_WRITER,
        [device_id],
    )
    assert [r["readings"] for r in rows] == [len(big), len(big)]


async def test_a_redelivered_copy_in_the_same_group_or_a_later_one_is_stored_once(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    first = publish("acme", device_id, 1.0, 7)
    copy = publish("acme", device_id, 1.0, 7, dup=True)
    other = publish("acme", device_id, 2.0, 8)
    # the PUBACK of the first was lost and the copy arrived before the first was committed
    assert await accept_publishes(pool, [first, copy, other], shards=SHARDS) == [
        Outcome.STORED,
        Outcome.DUPLICATE,
        Outcome.STORED,
    ]
    again = publish("acme", device_id, 2.0, 8, dup=True)
    fresh = publish("acme", device_id, 1.0, 7)  # the packet id used again (no DUP): new
    assert await accept_publishes(pool, [again, fresh], shards=SHARDS) == [Outcome.DUPLICATE, Outcome.STORED]
    assert await eventually(lambda: values(pool, "acme", device_id), lambda v: len(v) >= 3) == [1.0, 1.0, 2.0]


async def test_a_poison_publish_in_a_grouped_row_sets_aside_its_own_device_only(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    good = [(await active_device(api))[0] for _ in range(2)]
    sick = f"sick-{uuid.uuid4().hex[:8]}"
    group_id = f"mqtt-group-{uuid.uuid4().hex}"
    ts = datetime.now(UTC).isoformat()
    lines = [
        f"acme,mqtt-{uuid.uuid4().hex},{good[0]},t,{ts},1.0\n",
        f"acme,mqtt-{uuid.uuid4().hex},{sick},t,{ts},not-a-number\n",  # a row COPY cannot read
        f"acme,mqtt-{uuid.uuid4().hex},{good[1]},t,{ts},2.0\n",
        f"acme,mqtt-{uuid.uuid4().hex},{good[0]},t,{ts},3.0\n",
    ]
    await pool.execute(
        """INSERT INTO data.ingest_batches (tenant, writer, batch_id, bucket, readings, device_ids, payload)
           VALUES ('acme', $1, $2, 0, $3, $4, $5)""",
        GROUPED_WRITER,
        group_id,
        len(lines),
        [good[0], sick, good[1]],
        "".join(lines).encode(),
    )
    # the good devices' readings are stored in spite of the poison beside them
    assert await eventually(lambda: values(pool, "acme", good[0]), lambda v: len(v) >= 2, timeout_s=SLOW) == [
        1.0,
        3.0,
    ]
    assert await eventually(lambda: values(pool, "acme", good[1]), lambda v: len(v) >= 1) == [2.0]

    async def batches() -> dict[str, tuple[str, list[str]]]:
        rows = await pool.fetch(
            "SELECT batch_id, status, device_ids FROM data.ingest_batches WHERE batch_id LIKE $1",
            f"{group_id}%",
        )
        return {r["batch_id"]: (r["status"], r["device_ids"]) for r in rows}

    done = await eventually(
        batches, lambda b: all(s in ("stored", "quarantined") for s, _ in b.values()), timeout_s=SLOW
    )
    # only the sick device's row is set aside, with its reading, under its own device id
    assert {k: v for k, v in done.items() if v[0] == "quarantined"} == {
        f"{group_id}/{sick}": ("quarantined", [sick])
    }
    listed = (await api.get("/v1/telemetry/quarantined-batches", headers=bearer("acme"))).json()
    assert [b["readings"] for b in listed if b["batch_id"] == f"{group_id}/{sick}"] == [1]


async def test_a_copy_redelivered_while_its_original_commits_in_another_group_is_stored_once(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    """The device's connection dropped while the group holding its publish was committing (up
    to 4 groups are in flight; another gateway process may hold the new connection): the DUP
    copy's group waits for that commit and finds the original, instead of storing it twice."""
    device_id, _ = await active_device(api)
    first = publish("acme", device_id, 5.0, 9)
    copy = publish("acme", device_id, 5.0, 9, dup=True)
    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()
        # the first group's statement ran; its commit has not happened yet
        assert await accept_publishes(conn, [first], shards=SHARDS) == [Outcome.STORED]
        second = asyncio.ensure_future(accept_publishes(pool, [copy], shards=SHARDS))

        async def settled() -> bool:  # done, or blocked by the first group's uncommitted row
            return second.done() or await blocked_by(pool, conn)

        try:
            await eventually(settled, bool)
        finally:
            await outer.commit()
    assert await second == [Outcome.DUPLICATE]
    assert await eventually(lambda: values(pool, "acme", device_id), lambda v: len(v) >= 1) == [5.0]
    rows = await pool.fetchval(
        "SELECT count(*) FROM data.ingest_batches WHERE writer = $1 AND device_ids = $2::text[]",
        GROUPED_WRITER,
        [device_id],
    )
    assert rows == 1


async def test_each_grouped_row_lists_exactly_the_devices_of_its_lines(pool: Pool) -> None:
    """Many tenants and shards in one group: every row's device_ids (what the unready check and
    the poison give-back go by) are the devices its CSV lines name, no more, no fewer."""
    tenants = [f"many-{uuid.uuid4().hex[:6]}-{t}" for t in range(5)]
    group = [publish(t, f"d-{d}", float(d), 1 + d) for t in tenants for d in range(40)]
    group += [publish(t, f"d-{d}", float(d), 100 + d) for t in tenants[:2] for d in range(0, 40, 3)]
    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()  # rolled back: these tenants exist nowhere
        try:
            assert await accept_publishes(conn, group, shards=8) == [Outcome.STORED] * len(group)
            rows = await conn.fetch(
                """SELECT tenant, device_ids, payload FROM data.ingest_batches
                   WHERE writer = $1 AND tenant = ANY($2::text[])""",
                GROUPED_WRITER,
                tenants,
            )
        finally:
            await outer.rollback()
    assert len(rows) == len({(p.tenant, zlib.crc32(p.device_id.encode()) % BUCKETS % 8) for p in group})
    for r in rows:
        named = [line.split(b",")[2].decode() for line in r["payload"].splitlines()]
        assert r["device_ids"] == list(dict.fromkeys(named))
    assert sorted((r["tenant"], d) for r in rows for d in r["device_ids"]) == sorted(
        {(p.tenant, p.device_id) for p in group}
    )


async def test_a_group_caught_in_a_deadlock_is_committed_again_not_refused(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    """Two transactions taking the same device's packet ids (or batch ids) in opposite orders
    deadlock, and PostgreSQL aborts one. When that is a group commit, its publishes (of every
    tenant in it) are committed again, not answered unavailable: a device sending its packet
    ids in a crafted order would otherwise close the other tenants' connections."""
    device_id, _ = await active_device(api)
    committer = GroupCommitter(pool, SHARDS)
    committer.start()
    first, second = publish("acme", device_id, 1.0, 1), publish("acme", device_id, 2.0, 2)
    async with pool.acquire() as other:
        tx = other.transaction()
        await tx.start()
        try:
            await other.execute("SET LOCAL deadlock_timeout = '10min'")  # the group is the victim
            remember = """INSERT INTO data.mqtt_packets (tenant, device_id, packet_id, digest, batch_id)
                          VALUES ('acme', $1, $2, '\\x00', 'x') ON CONFLICT DO NOTHING"""
            await other.execute(remember, device_id, 2)  # holds packet id 2
            done = asyncio.gather(committer.submit(first), committer.submit(second))

            await eventually(lambda: blocked_by(pool, other), bool)  # holding packet id 1, waiting for 2
            await other.execute(remember, device_id, 1)  # the deadlock: the group is aborted
            await tx.rollback()
        except BaseException:
            await tx.rollback()
            raise
    try:
        assert list(await done) == [Outcome.STORED, Outcome.STORED]
    finally:
        await committer.stop()
    assert await eventually(lambda: values(pool, "acme", device_id), lambda v: len(v) >= 2) == [1.0, 2.0]
