"""Tenant isolation and device-credential confinement, on the real servers.

Tenant acme makes one of each resource through the API (acme_world). Tenant globex, holding
every scope, tries each by-id read, change and delete of them and gets exactly the 404 a
nonexistent id gets (same body, so ids do not leak), finds none of acme's items in any list, and acme's
resources are unchanged afterwards. A device credential reaches only its own device's
endpoints, an API token none of them, and a decommissioned device's credential is refused
on its next request.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from fleetflow.contracts.common import tenant_scoped_id
from fleetflow.db import Pool
from tests.integration.acme_world import (
    CASES,
    DEVICE_ROUTES,
    PROBE,
    World,
    acme_world,
    call,
    missing_ids,
    names_in,
    render,
    scrub,
)
from tests.integration.flows import (
    AUTH,
    IMAGE,
    active_device,
    fleet,
    new_id,
)
from tests.integration.test_telemetry import device_auth, send
from tests.support import bearer, eventually

GLOBEX = bearer("globex")


@pytest.fixture(scope="module")
async def world(api: httpx.AsyncClient, pool: Pool, client: Client) -> AsyncIterator[World]:
    """acme's world for this module's tests."""
    async with acme_world(api, pool, client) as built:
        yield built


# --- another tenant's resources by id: the 404 of a nonexistent one -------------------


def _view(response: httpx.Response, keys: tuple[str, ...]) -> Any:
    assert response.status_code == 200, response.text
    if response.headers.get("content-type", "").startswith("text/csv"):
        return response.text
    body = response.json()
    return {k: body[k] for k in keys} if keys else body


def _said(response: httpx.Response, ids: dict[str, str], used: set[str]) -> str:
    """What an answer says, its ids scrubbed; a problem's `instance` (the path the caller sent,
    where a short numeric id would also match inside `/v1`) left out."""
    if response.headers.get("content-type") != "application/problem+json":
        return scrub(response.text, ids, used)
    body = {k: v for k, v in response.json().items() if k != "instance"}
    return scrub(json.dumps(body, sort_keys=True), ids, used)


@pytest.mark.parametrize("name", list(CASES))
async def test_another_tenants_resource_is_not_found(name: str, api: httpx.AsyncClient, world: World) -> None:
    case = CASES[name]
    witness = render(case.witness, world.ids)
    before = _view(await api.get(witness, headers=AUTH), case.keys)

    foreign = await call(api, case.method, render(case.path, world.ids), GLOBEX, render(case.body, world.ids))
    nowhere = missing_ids(world)
    missing = await call(api, case.method, render(case.path, nowhere), GLOBEX, render(case.body, nowhere))

    assert foreign.status_code == 404, foreign.text
    assert missing.status_code == 404, missing.text
    used = names_in(case.path) | names_in(case.body)
    assert _said(foreign, world.ids, used) == _said(missing, nowhere, used)
    for secret in world.credentials.values():
        assert secret not in foreign.text
    assert _view(await api.get(witness, headers=AUTH), case.keys) == before


# --- lists: none of acme's items ----------------------------------------------------------

LISTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "devices-by-tag": ("/v1/devices?tag={tag}", ("device", "waiting", "gateway", "idle_device", "retired")),
    "devices-by-type": ("/v1/devices?tag={tag}&type=sensor", ("job_device", "idle_device")),
    "devices-by-status": ("/v1/devices?tag={tag}&status=provisioned", ("waiting",)),
    "devices-after-cursor": ("/v1/devices?tag={tag}&cursor=0&limit=2", ("device", "job_device")),
    "events-of-device": ("/v1/events?device_id={device}", ("device",)),
    "events-by-type": (f"/v1/events?type={PROBE}", ("device",)),
    "alerts-of-device": ("/v1/alerts?device_id={device}", ("device", "rule")),
    "open-alerts": ("/v1/alerts?status=open&limit=1000", ("rule",)),
    "rules": ("/v1/rules", ("rule", "metric")),
    "quarantine": ("/v1/telemetry/quarantine?device_id={ghost}", ("ghost",)),
    "subscriptions": ("/v1/subscriptions", ("subscription",)),
    "dead-letters": ("/v1/dead-letters?limit=1000", ("subscription",)),
    "dead-letters-of-subscription": ("/v1/dead-letters?subscription_id={subscription}", ("subscription",)),
}


@pytest.mark.parametrize("name", list(LISTS))
async def test_lists_show_none_of_another_tenants_items(
    name: str, api: httpx.AsyncClient, world: World
) -> None:
    template, markers = LISTS[name]
    path = render(template, world.ids)
    own = await api.get(path, headers=AUTH)
    assert own.status_code == 200, own.text
    for marker in markers:  # acme itself sees them: the question below is a real one
        assert world.ids[marker] in own.text, (marker, own.text)
    foreign = await api.get(path, headers=GLOBEX)
    assert foreign.status_code == 200, foreign.text
    for marker in markers:
        assert world.ids[marker] not in foreign.text, (marker, foreign.text)


async def test_every_page_of_the_registry_is_the_callers_own(api: httpx.AsyncClient, world: World) -> None:
    acme_devices = {world.ids[n] for n in ("device", "waiting", "gateway", "job_device", "idle_device")}
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/v1/devices", params=params, headers=GLOBEX)).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert {d["tenant"] for d in seen} <= {"globex"}
    assert not acme_devices & {d["device_id"] for d in seen}


async def test_a_rule_id_is_per_tenant(api: httpx.AsyncClient, world: World) -> None:
    rule_id = world.ids["rule"]
    acme_rules = (await api.get("/v1/rules", headers=AUTH)).json()
    theirs = {
        "rule_id": rule_id,
        "device_type": "sensor",
        "metric": "humidity",
        "kind": "threshold",
        "params": {"below": 1},
    }
    assert (await api.put(f"/v1/rules/{rule_id}", json=theirs, headers=GLOBEX)).status_code == 200
    assert (await api.get("/v1/rules", headers=AUTH)).json() == acme_rules
    [own] = [r for r in (await api.get("/v1/rules", headers=GLOBEX)).json() if r["rule_id"] == rule_id]
    assert {k: own[k] for k in theirs} == theirs
    assert (await api.delete(f"/v1/rules/{rule_id}", headers=GLOBEX)).status_code == 204
    assert (await api.get("/v1/rules", headers=AUTH)).json() == acme_rules


async def test_a_rollout_cannot_use_another_tenants_firmware(api: httpx.AsyncClient, world: World) -> None:
    def body(firmware_id: str) -> dict[str, Any]:
        return {"campaign_id": new_id("iso"), "firmware_id": firmware_id, "target": {"tags": ["x"]}}

    nobodys = new_id("nope")
    foreign = await api.post("/v1/rollouts", json=body(world.ids["firmware"]), headers=GLOBEX)
    missing = await api.post("/v1/rollouts", json=body(nobodys), headers=GLOBEX)
    assert foreign.status_code == missing.status_code == 422, foreign.text
    assert foreign.text.replace(world.ids["firmware"], "<id>") == missing.text.replace(nobodys, "<id>")


async def test_the_same_device_id_in_two_tenants_is_two_devices(api: httpx.AsyncClient) -> None:
    device_id = new_id("twice")
    await active_device(api, device_id=device_id)
    await active_device(api, auth=GLOBEX, device_id=device_id)  # not 409: the id is not acme's to hold
    changed = await api.patch(f"/v1/devices/{device_id}/twin/desired", json={"target_c": 25}, headers=GLOBEX)
    assert changed.status_code == 200, changed.text
    ours = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
    theirs = (await api.get(f"/v1/devices/{device_id}/twin", headers=GLOBEX)).json()
    assert ours["desired"]["target_c"] == 21 and ours["desired_version"] == 1
    assert theirs["desired"]["target_c"] == 25 and theirs["desired_version"] == 2
    retired = await api.post(f"/v1/devices/{device_id}:decommission", json={}, headers=GLOBEX)
    assert retired.status_code == 202
    await eventually(
        lambda: api.get(f"/v1/decommissions/{device_id}", headers=GLOBEX),
        lambda r: r.status_code == 200 and r.json()["status"] == "completed",
    )
    assert (await api.get(f"/v1/devices/{device_id}", headers=AUTH)).json()["status"] == "active"
    assert (await api.get(f"/v1/decommissions/{device_id}", headers=AUTH)).status_code == 404


# --- workflow ids: a tenant whose name extends another's reaches none of its runs ----------


async def test_a_tenant_named_like_another_plus_a_suffix_reaches_none_of_its_workflows(
    api: httpx.AsyncClient,
) -> None:
    base = f"iso{uuid.uuid4().hex[:6]}"
    short, long = bearer(base), bearer(f"{base}-eu")
    device, _ = await active_device(api, auth=long)
    alias = f"eu-{device}"  # `<kind>-<base>-eu-<device>` was once also the id of short's `alias`
    for method, path, body in [
        ("GET", f"/v1/onboardings/{alias}", None),
        ("DELETE", f"/v1/onboardings/{alias}", None),
        ("POST", f"/v1/onboardings/{alias}/approve", {}),
        ("GET", f"/v1/devices/{alias}/twin", None),
        ("PATCH", f"/v1/devices/{alias}/twin/desired", {"target_c": 5}),
        ("GET", f"/v1/decommissions/{alias}", None),
    ]:
        answer = await call(api, method, path, short, body)
        assert answer.status_code == 404, (method, path, answer.text)
    await active_device(api, auth=short, device_id=alias)  # its own runs, beside long's
    changed = await api.patch(f"/v1/devices/{alias}/twin/desired", json={"target_c": 25}, headers=short)
    assert changed.status_code == 200, changed.text
    assert (await api.get(f"/v1/devices/{device}/twin", headers=long)).json()["desired"]["target_c"] == 21
    progress = (await api.get(f"/v1/onboardings/{device}", headers=long)).json()
    assert progress["tenant"] == f"{base}-eu" and progress["status"] == "completed"


TENANTS = ["a", "a-b", "a-b-c", "b", "ab"]
KEYS = ["b", "b-c", "c", "b-c-d", "x~y", "b~c", "~", "c~"]


def test_scoped_ids_never_coincide_and_plain_tenants_keep_theirs() -> None:
    ids = {(t, k): tenant_scoped_id("twin", t, k) for t, k in itertools.product(TENANTS, KEYS)}
    assert len(set(ids.values())) == len(ids)
    assert tenant_scoped_id("onboard", "acme", "th-1") == "onboard-acme-th-1"  # runs in flight stay found
    with pytest.raises(ValueError, match="tenant"):
        tenant_scoped_id("twin", "a~b", "c")


# --- device credentials: their own device's endpoints only ---------------------------------


@pytest.mark.parametrize("name", list(CASES))
async def test_a_device_credential_is_not_an_api_token(
    name: str, api: httpx.AsyncClient, world: World
) -> None:
    case = CASES[name]
    answer = await call(
        api,
        case.method,
        render(case.path, world.ids),
        world.credential("device"),
        render(case.body, world.ids),
    )
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("name", list(DEVICE_ROUTES))
async def test_an_api_token_is_not_a_device_credential(
    name: str, api: httpx.AsyncClient, world: World
) -> None:
    method, path, body = DEVICE_ROUTES[name]
    answer = await call(api, method, render(path, world.ids), AUTH, body)
    assert answer.status_code == 401, answer.text


@pytest.mark.parametrize("name", [*DEVICE_ROUTES, "telemetry"])
async def test_a_decommissioned_devices_credential_is_refused(
    name: str, api: httpx.AsyncClient, world: World
) -> None:
    if name == "telemetry":
        reading = {
            "device_id": world.ids["retired"],
            "ts": datetime.now(UTC).isoformat(),
            "metric": "t",
            "value": 1,
        }
        method, path, body = "POST", "/v1/telemetry", {"batch_id": uuid.uuid4().hex, "readings": [reading]}
    else:
        method, path, body = DEVICE_ROUTES[name]
    answer = await call(api, method, render(path, world.ids), world.credential("retired"), body)
    assert answer.status_code == 401, answer.text
    assert "revoked" in answer.json()["detail"]


async def test_telemetry_naming_another_device_is_refused_whole(
    api: httpx.AsyncClient, pool: Pool, world: World
) -> None:
    me, other = world.ids["idle_device"], world.ids["job_device"]
    now = datetime.now(UTC).isoformat()
    for names in ([other], [me, other]):
        batch_id = uuid.uuid4().hex
        rows = [{"device_id": d, "ts": now, "metric": "t", "value": 1.0} for d in names]
        answer = await send(api, world.credential("idle_device"), rows, batch_id=batch_id)
        assert answer.status_code == 403, answer.text
        assert answer.json()["errors"][0]["loc"] == ["body", "readings", len(names) - 1, "device_id"]
        stored = await pool.fetchval("SELECT count(*) FROM data.ingest_batches WHERE batch_id = $1", batch_id)
        assert stored == 0


async def test_a_device_reports_only_into_its_own_twin(api: httpx.AsyncClient, world: World) -> None:
    me, other = world.ids["idle_device"], world.ids["job_device"]
    theirs = (await api.get(f"/v1/devices/{other}/twin", headers=AUTH)).json()
    mine = world.credential("idle_device")
    smuggled = await api.post(
        "/v1/device/twin/reported", json={"device_id": other, "reported": {}}, headers=mine
    )
    assert smuggled.status_code == 422
    marker = uuid.uuid4().int % 1000
    reported = await api.post("/v1/device/twin/reported", json={"reported": {"rssi": -marker}}, headers=mine)
    assert reported.status_code == 202, reported.text
    assert (await api.get(f"/v1/devices/{me}/twin", headers=AUTH)).json()["reported"]["rssi"] == -marker
    after = (await api.get(f"/v1/devices/{other}/twin", headers=AUTH)).json()
    assert (after["reported"], after["reported_version"]) == (theirs["reported"], theirs["reported_version"])


async def test_a_device_sees_and_moves_only_its_own_job(api: httpx.AsyncClient, world: World) -> None:
    campaign = world.ids["campaign"]
    owner, idle = world.credential("job_device"), world.credential("idle_device")
    job = await api.get("/v1/device/jobs", headers=owner)
    assert (
        job.status_code == 200 and job.json()["campaign_id"] == campaign and job.json()["state"] == "offered"
    )
    assert (await api.get("/v1/device/jobs", headers=idle)).status_code == 204
    for state in ("downloading", "failed", "succeeded"):
        moved = await api.post(
            f"/v1/device/jobs/{campaign}/progress", json={"kind": "update", "state": state}, headers=idle
        )
        assert moved.status_code == 404, moved.text
    assert (await api.get("/v1/device/jobs", headers=owner)).json() == job.json()
    counts = (await api.get(f"/v1/rollouts/{campaign}", headers=AUTH)).json()["counts"]
    assert counts == {"offered": 1}


async def test_a_device_downloads_no_other_tenants_firmware(api: httpx.AsyncClient, world: World) -> None:
    url = f"/v1/device/firmware/{world.ids['firmware']}"
    own = await api.get(url, headers=world.credential("idle_device"))
    assert own.status_code == 200 and own.content == IMAGE
    stranger = device_auth(next(iter((await fleet(api, 1, auth=GLOBEX)).values())))
    foreign = await api.get(url, headers=stranger)
    nobodys = new_id("nope")
    missing = await api.get(f"/v1/device/firmware/{nobodys}", headers=stranger)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.text.replace(world.ids["firmware"], "<id>") == missing.text.replace(nobodys, "<id>")
    assert (await api.get("/v1/device/jobs", headers=stranger)).status_code == 204


async def test_a_tenants_device_type_changes_nothing_for_another_tenant(api: httpx.AsyncClient) -> None:
    """A tenant admin replacing a built-in type (or adding one) changes it for that tenant only."""
    tenant = f"types{uuid.uuid4().hex[:6]}"
    own = bearer(tenant)
    strict = {
        "name": "thermostat",
        "requires_approval": True,
        "default_config": {"target_c": 20},
        "config_schema": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"target_c": {"type": "number", "minimum": 18, "maximum": 22}},
        },
    }
    assert (await api.put("/v1/device-types/thermostat", json=strict, headers=own)).status_code == 200
    mine = {t["name"]: t for t in (await api.get("/v1/device-types", headers=own)).json()}
    theirs = {t["name"]: t for t in (await api.get("/v1/device-types", headers=GLOBEX)).json()}
    assert mine["thermostat"]["requires_approval"] is True and "sensor" in mine
    assert theirs["thermostat"]["requires_approval"] is False  # still the built-in one
    # the same body is checked against each tenant's own type
    body = {"device_id": new_id(), "device_type": "thermostat", "config": {"target_c": 30}}
    refused = await api.post("/v1/devices", json=body, headers=own)
    assert refused.status_code == 422 and "target_c" in refused.text
    assert (await api.post("/v1/devices", json=body, headers=GLOBEX)).status_code == 202
