"""The broker hooks (/v1/mqtt/auth, /v1/mqtt/acl) an external MQTT broker authenticates and
authorizes devices with: the embedded gateway's rules, behind the `mqtt:hooks` scope."""

from __future__ import annotations

import httpx

from fleetflow.db import Pool
from tests.integration.flows import active_device
from tests.support import bearer

HOOK = bearer("platform", scopes=["mqtt:hooks"])


async def test_auth_hook_allows_a_device_credential_only(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id, token = await active_device(api)
    other_id, _ = await active_device(api)
    login = {"clientid": device_id, "username": device_id, "password": token}
    r = await api.post("/v1/mqtt/auth", json=login, headers=HOOK)
    assert r.status_code == 200 and r.json() == {"result": "allow", "client_attrs": {"tenant": "acme"}}
    for wrong in ({"password": "x"}, {"username": other_id}, {"clientid": other_id}, {"password": ""}):
        r = await api.post("/v1/mqtt/auth", json={**login, **wrong}, headers=HOOK)
        assert r.json() == {"result": "deny"}, wrong
    await pool.execute("UPDATE device.credentials SET revoked_at = now() WHERE device_id = $1", device_id)
    assert (await api.post("/v1/mqtt/auth", json=login, headers=HOOK)).json() == {"result": "deny"}
    # the hooks are for the broker: a token without the scope (or none) is refused
    no_scope = bearer("acme", scopes=["devices:read"])
    assert (await api.post("/v1/mqtt/auth", json=login, headers=no_scope)).status_code == 403
    assert (await api.post("/v1/mqtt/auth", json=login)).status_code == 401


async def test_acl_hook_confines_a_device_to_its_own_prefix(api: httpx.AsyncClient) -> None:
    own = "tenants/acme/devices/th-1"

    async def decide(tenant: str, topic: str, action: str) -> str:
        body = {"tenant": tenant, "username": "th-1", "topic": topic, "action": action}
        r = await api.post("/v1/mqtt/acl", json=body, headers=HOOK)
        assert r.status_code == 200, r.text
        return str(r.json()["result"])

    assert await decide("acme", f"{own}/telemetry", "publish") == "allow"
    assert await decide("acme", f"{own}/jobs/c-1/progress", "publish") == "allow"
    assert await decide("acme", f"{own}/twin/delta", "subscribe") == "allow"
    # the same device id in another tenant, another device, wildcards reaching past the prefix
    assert await decide("globex", f"{own}/telemetry", "publish") == "deny"
    assert await decide("acme", "tenants/acme/devices/th-2/telemetry", "publish") == "deny"
    assert await decide("acme", "tenants/acme/devices/+/twin/delta", "subscribe") == "deny"
    assert await decide("acme", "tenants/acme/#", "subscribe") == "deny"
    assert await decide("", f"{own}/telemetry", "publish") == "deny"
