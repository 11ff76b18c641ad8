"""A batch id belongs to its sender: (tenant, writer, batch_id), the writer being the device of a
device credential or the subject of an API token. One device's ids never block another's; the
same id again is a duplicate when its readings are the same and 409 when they are not."""

from __future__ import annotations

import httpx

from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device
from tests.integration.test_telemetry import device_auth, readings, send, stored
from tests.support import bearer, eventually


async def test_a_device_cannot_squat_another_devices_batch_ids(api: httpx.AsyncClient, pool: Pool) -> None:
    (a, a_credential), (b, b_credential) = await active_device(api), await active_device(api)
    batch_id = f"sq-b-{a}"  # the id device B will use too

    squat = await send(api, device_auth(a_credential), readings(a, [1.0]), batch_id)
    assert squat.status_code == 202 and squat.json()["duplicate"] is False
    real = await send(api, device_auth(b_credential), readings(b, [1.0, 2.0, 3.0]), batch_id)
    assert real.status_code == 202, real.text
    assert real.json() == {"batch_id": batch_id, "readings": 3, "duplicate": False}

    # an operator's batch of the same id is its own too, and so is another tenant's
    operator = await send(api, AUTH, readings(b, [4.0], start=10), batch_id)
    assert operator.status_code == 202 and operator.json()["duplicate"] is False
    other_tenant = await send(api, bearer("globex"), readings(b, [5.0], start=20), batch_id)
    assert other_tenant.status_code == 202 and other_tenant.json()["duplicate"] is False

    # B's three readings and the operator's one are stored; globex has no device B: quarantined
    async def quarantined() -> int:
        return int(
            await pool.fetchval(
                "SELECT count(*) FROM data.quarantined_readings WHERE tenant = 'globex' AND device_id = $1", b
            )
        )

    await eventually(quarantined, lambda n: n == 1)
    assert await eventually(lambda: stored(pool, b), lambda n: n >= 4) == 4
    assert await stored(pool, a) == 1


async def test_a_reused_batch_id_is_a_duplicate_with_the_same_readings_and_409_with_others(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, credential = await active_device(api)
    me = device_auth(credential)
    batch_id = f"re-{device_id}"
    first = await send(api, me, readings(device_id, [1.0, 2.0]), batch_id)
    assert first.status_code == 202 and first.json()["duplicate"] is False

    again = await send(api, me, readings(device_id, [1.0, 2.0]), batch_id)
    assert again.status_code == 202 and again.json() == {
        "batch_id": batch_id,
        "readings": 2,
        "duplicate": True,
    }

    other = await send(api, me, readings(device_id, [1.0, 9.0]), batch_id)
    assert other.status_code == 409, other.text
    assert batch_id in other.text

    # the operator's own batch of that id follows the same rule within its own ids
    assert (await send(api, AUTH, readings(device_id, [7.0], start=30), batch_id)).status_code == 202
    assert (await send(api, AUTH, readings(device_id, [8.0], start=30), batch_id)).status_code == 409

    await eventually(lambda: stored(pool, device_id), lambda n: n >= 3)
    values = await pool.fetch("SELECT value FROM data.readings WHERE device_id = $1 ORDER BY ts", device_id)
    assert [r["value"] for r in values] == [1.0, 2.0, 7.0]  # nothing of the refused batches
