"""Credential renewal and rotation on the real servers: a device renews (both credentials valid
for the overlap, then the old one refused), revoked or expired credentials cannot renew,
operators rotate one device or a fleet, the lifetime comes from the device type, and the JWKS
document alone verifies a device credential (PyJWT)."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
from temporalio.client import Client

from activities.devices import DeviceService
from fleetflow.contracts.devices import RotateChunk, RotateCredentials
from fleetflow.db import Pool
from fleetflow.security import DEVICE_AUDIENCE, issue_device_credential
from fleetflow.settings import Settings
from tests.integration.conftest import ENTERED, HOLDS
from tests.integration.flows import AUTH, active_device, fleet, new_id
from tests.integration.test_telemetry import device_auth, send
from tests.support import TEST_KEYS, bearer, eventually
from workflows.credential_rotation import rotation_workflow_id

GLOBEX = bearer("globex")
READ_ONLY = bearer("acme", scopes=["devices:read"])
RENEW = "/v1/device/credential:renew"


async def works(api: httpx.AsyncClient, device_id: str, credential: str) -> bool:
    """Whether the credential may send a reading for its device right now."""
    row = {"device_id": device_id, "ts": datetime.now(UTC).isoformat(), "metric": "t", "value": 1.0}
    answer = await send(api, device_auth(credential), [row])
    assert answer.status_code in (202, 401), answer.text
    return answer.status_code == 202


async def device_type(api: httpx.AsyncClient, **credential_policy: int) -> str:
    name = f"cred-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "config_schema": {"type": "object"}, **credential_policy}
    put = await api.put(f"/v1/device-types/{name}", json=body, headers=AUTH)
    assert put.status_code == 200, put.text
    return name


def lifetime(credential: str) -> timedelta:
    claims = jwt.decode(credential, options={"verify_signature": False})
    return timedelta(seconds=claims["exp"] - claims["iat"])


async def test_a_renewed_credential_keeps_the_old_one_for_the_overlap_only(api: httpx.AsyncClient) -> None:
    kind = await device_type(api, credential_overlap_s=1)
    device_id, old = await active_device(api, device_type=kind)
    renewed = await api.post(RENEW, headers=device_auth(old))
    assert renewed.status_code == 200, renewed.text
    new = renewed.json()["credential"]
    assert new != old and renewed.json()["device_id"] == device_id
    assert await works(api, device_id, new)
    # the overlap ends on its own: the check honours the end, nothing has to run then
    await eventually(lambda: works(api, device_id, old), lambda ok: not ok)
    assert await works(api, device_id, new)
    assert (await api.post(RENEW, headers=device_auth(old))).status_code == 401


async def test_within_the_overlap_both_work_and_a_repeated_renewal_gives_the_same_credential(
    api: httpx.AsyncClient,
) -> None:
    device_id, old = await active_device(api)  # thermostat: the default overlap (a day)
    first = (await api.post(RENEW, headers=device_auth(old))).json()
    again = (await api.post(RENEW, headers=device_auth(old))).json()  # its answer was lost
    assert again["credential"] == first["credential"]
    assert await works(api, device_id, old) and await works(api, device_id, first["credential"])
    third = (await api.post(RENEW, headers=device_auth(first["credential"]))).json()
    assert third["credential"] not in (old, first["credential"])
    assert await works(api, device_id, third["credential"])


async def test_a_revoked_or_expired_credential_cannot_renew(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    now = datetime.now(UTC)
    expired = issue_device_credential(
        TEST_KEYS,
        tenant="acme",
        device_id=device_id,
        jti=str(uuid.uuid4()),
        issued_at=now - timedelta(days=2),
        expires_at=now - timedelta(days=1),
    )
    assert (await api.post(RENEW, headers=device_auth(expired))).status_code == 401
    retired = await api.post(f"/v1/devices/{device_id}:decommission", json={}, headers=AUTH)
    assert retired.status_code == 202
    await eventually(lambda: api.post(RENEW, headers=device_auth(credential)), lambda r: r.status_code == 401)
    assert (await api.post(RENEW, headers=AUTH)).status_code == 401  # an API token is no device


async def test_an_operator_rotates_one_device_and_ends_the_old_credential_at_once(
    api: httpx.AsyncClient,
) -> None:
    device_id, old = await active_device(api)
    url = f"/v1/devices/{device_id}/credential:rotate"
    assert (await api.post(url, json={}, headers=READ_ONLY)).status_code == 403
    assert (await api.post(url, json={"overlap_s": 0}, headers=GLOBEX)).status_code == 404
    assert await works(api, device_id, old)
    bad = await api.post(url, json={"overlap_s": -1}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "overlap_s"]
    rotated = await api.post(url, json={"overlap_s": 0}, headers=AUTH)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["credential"]
    assert await works(api, device_id, new)
    await eventually(lambda: works(api, device_id, old), lambda ok: not ok)
    missing = await api.post(f"/v1/devices/{new_id()}/credential:rotate", headers=AUTH)
    assert missing.status_code == 404


async def test_a_fleet_is_rotated_in_one_batched_run_with_an_outcome_per_device(
    api: httpx.AsyncClient,
) -> None:
    tag = f"rot-{uuid.uuid4().hex[:6]}"
    olds = await fleet(api, 3, tags=[tag])
    started = await api.post("/v1/credential-rotations", json={"tags": [tag], "overlap_s": 0}, headers=AUTH)
    assert started.status_code == 202, started.text
    status_url = started.json()["status_url"]

    async def progress() -> dict[str, Any]:
        body: dict[str, Any] = (await api.get(status_url, headers=AUTH)).json()
        return body

    done = await eventually(progress, lambda p: p.get("status") == "completed")
    assert (done["rotated"], done["skipped"]) == (3, 0)
    assert sorted(d["device_id"] for d in done["devices"]) == sorted(olds)
    text = (await api.get(status_url + "/credentials", headers=AUTH)).text
    news = {r["device_id"]: r["credential"] for r in csv.DictReader(io.StringIO(text))}
    assert sorted(news) == sorted(olds)
    for device_id, credential in news.items():
        assert await works(api, device_id, credential)
        assert not await works(api, device_id, olds[device_id])
    assert (await api.get(status_url, headers=GLOBEX)).status_code == 404
    assert (await api.get(status_url + "/credentials", headers=GLOBEX)).status_code == 404

    by_ids = await api.post(
        "/v1/credential-rotations", json={"device_ids": [next(iter(news)), "nobody-here"]}, headers=AUTH
    )
    url = by_ids.json()["status_url"]
    second = await eventually(
        lambda: api.get(url, headers=AUTH), lambda r: r.json().get("status") == "completed"
    )
    outcomes = {d["device_id"]: (d["outcome"], d["reason"]) for d in second.json()["devices"]}
    first = next(iter(news))
    assert outcomes == {first: ("rotated", None), "nobody-here": ("skipped", "no such device")}
    none = await api.post("/v1/credential-rotations", json={}, headers=AUTH)
    assert none.status_code == 422 and none.json()["errors"][0]["loc"] == ["body"]


async def test_the_credential_lifetime_comes_from_the_device_type(api: httpx.AsyncClient) -> None:
    kind = await device_type(api, credential_lifetime_days=7)
    _, credential = await active_device(api, device_type=kind)
    assert lifetime(credential) == timedelta(days=7)
    renewed = (await api.post(RENEW, headers=device_auth(credential))).json()["credential"]
    assert lifetime(renewed) == timedelta(days=7)
    _, plain = await active_device(api)
    assert lifetime(plain) == timedelta(days=365)
    devices = [{"device_id": new_id("bulk7"), "device_type": kind}, {"device_id": new_id("bulk365")}]
    devices[1]["device_type"] = "thermostat"
    bulk = (await api.post("/v1/devices:bulk", json={"devices": devices}, headers=AUTH)).json()
    await eventually(
        lambda: api.get(bulk["status_url"], headers=AUTH), lambda r: r.json()["status"] == "completed"
    )
    text = (await api.get(f"/v1/bulk-onboardings/{bulk['bulk_id']}/credentials", headers=AUTH)).text
    made = {r["device_id"]: lifetime(r["credential"]) for r in csv.DictReader(io.StringIO(text))}
    assert made == {devices[0]["device_id"]: timedelta(days=7), devices[1]["device_id"]: timedelta(days=365)}
    types = {t["name"]: t for t in (await api.get("/v1/device-types", headers=AUTH)).json()}
    assert types[kind]["credential_lifetime_days"] == 7


async def test_the_jwks_document_alone_verifies_a_device_credential(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    device_id, before = await active_device(api)
    TEST_KEYS.rotate()  # the old key still verifies: the document keeps it
    _, after = await active_device(api)
    document = await api.get("/.well-known/jwks.json")  # anonymous
    assert document.status_code == 200
    keys = jwt.PyJWKSet.from_dict(document.json())
    assert all("d" not in k for k in document.json()["keys"])  # public halves only
    for credential in (before, after):
        kid = jwt.get_unverified_header(credential)["kid"]
        claims = jwt.decode(
            credential,
            keys[kid].key,
            algorithms=["ES256"],
            audience=DEVICE_AUDIENCE,
            issuer=settings.jwt_issuer,
        )
        assert claims["tenant"] == "acme"
    assert jwt.get_unverified_header(before)["kid"] != jwt.get_unverified_header(after)["kid"]
    assert (
        jwt.decode(
            before,
            keys[jwt.get_unverified_header(before)["kid"]].key,
            algorithms=["ES256"],
            audience=DEVICE_AUDIENCE,
        )["sub"]
        == device_id
    )


async def test_a_credential_an_operator_replaced_cannot_renew_itself_a_fresh_one(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    device_id, old = await active_device(api)
    rotated = await api.post(f"/v1/devices/{device_id}/credential:rotate", headers=AUTH)
    new = rotated.json()["credential"]
    assert await works(api, device_id, old)  # within the overlap (a day by default)
    refused = await api.post(RENEW, headers=device_auth(old))
    assert refused.status_code == 409 and "replaced" in refused.json()["detail"]
    jti = jwt.decode(new, options={"verify_signature": False})["jti"]
    assert await pool.fetchval("SELECT valid_until FROM device.credentials WHERE jti = $1", jti) is None
    assert await works(api, device_id, new)


HISTORY_EVENT_LIMIT = 16 * 1024  # a modest size: 1,000 ids of 128 characters are ~130 KB


async def test_a_rotation_of_1000_ids_keeps_them_out_of_its_history(
    api: httpx.AsyncClient, client: Client
) -> None:
    """The ids are stored once (a claim check): neither the run's input nor any step's carries them."""
    real = [(await active_device(api))[0] for _ in range(2)]
    ghost = uuid.uuid4().hex[:8]
    ids = real + [f"ghost-{ghost}-{i:04d}-".ljust(128, "x") for i in range(998)]
    accepted = await api.post("/v1/credential-rotations", json={"device_ids": ids}, headers=AUTH)
    assert accepted.status_code == 202, accepted.text
    rotation_id = accepted.json()["rotation_id"]
    done = await eventually(
        lambda: api.get(accepted.json()["status_url"], headers=AUTH),
        lambda r: r.json().get("status") == "completed",
    )
    assert (done.json()["rotated"], done.json()["skipped"]) == (2, 998)
    history = await client.get_workflow_handle(rotation_workflow_id("acme", rotation_id)).fetch_history()
    largest = max(len(event.SerializeToString()) for event in history.events)
    assert largest <= HISTORY_EVENT_LIMIT, f"an event of {largest} bytes"


async def test_a_credential_rotated_while_the_device_is_decommissioned_ends_with_it(
    api: httpx.AsyncClient,
) -> None:
    """Decommissioning revokes the credentials first and marks the device last: an operator's
    rotation in between (the device is still active) must not leave a decommissioned device a
    live credential."""
    device_id, credential = await active_device(api)
    key = f"cancel_jobs:{device_id}"
    HOLDS[key] = asyncio.Event()
    try:
        started = await api.post(f"/v1/devices/{device_id}:decommission", json={}, headers=AUTH)
        assert started.status_code == 202, started.text
        await eventually(lambda: asyncio.sleep(0, key in ENTERED), bool)  # credentials revoked
        assert not await works(api, device_id, credential)
        rotated = await api.post(f"/v1/devices/{device_id}/credential:rotate", headers=AUTH)
        assert rotated.status_code in (200, 409), rotated.text
    finally:
        HOLDS.pop(key).set()
    await eventually(
        lambda: api.get(f"/v1/decommissions/{device_id}", headers=AUTH),
        lambda r: r.status_code == 200 and r.json()["status"] == "completed",
    )
    if rotated.status_code == 200:
        assert not await works(api, device_id, rotated.json()["credential"])


async def test_a_late_chunk_of_a_rotation_still_leaves_the_old_credential_its_overlap(
    api: httpx.AsyncClient, pool: Pool, settings: Settings
) -> None:
    """A fleet rotation's issue time is set once; a chunk that runs an hour later (a long
    fleet, a step retried after an outage) must not end the device's credential at once."""
    device_id, old = await active_device(api)
    request = RotateCredentials(
        tenant="acme",
        rotation_id=f"rot-late-{uuid.uuid4().hex[:8]}",
        actor="tester",
        device_ids=[device_id],
        overlap_s=600,
        issued_at=datetime.now(UTC) - timedelta(hours=1),
    )
    done = await DeviceService(pool, settings).rotate_credentials(RotateChunk(request=request))
    assert (done.rotated, done.skipped) == (1, 0)
    assert await works(api, device_id, old)  # for ten more minutes
