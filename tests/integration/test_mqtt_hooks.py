"""The broker hooks (/v1/mqtt/auth, /v1/mqtt/acl) an external MQTT broker authenticates and
authorizes devices with: the embedded gateway's rules, behind the `mqtt:hooks` scope."""

from __future__ import annotations

import uuid

import httpx

from api.revocations import revoke
from fleetflow.db import Pool
from fleetflow.security import verify_token
from fleetflow.settings import Settings
from gateway.bridge import BRIDGE_USERNAME, SUBSCRIPTIONS
from tests.integration.flows import AUTH, active_device
from tests.support import TEST_KEYS, bearer, eventually

HOOK = bearer("platform", scopes=["mqtt:hooks"])


async def test_auth_hook_allows_a_device_credential_only(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id, token = await active_device(api)
    other_id, _ = await active_device(api)
    login = {"clientid": device_id, "username": device_id, "password": token}
    r = await api.post("/v1/mqtt/auth", json=login, headers=HOOK)
    assert r.status_code == 200 and r.json()["result"] == "allow"
    assert r.json()["client_attrs"]["tenant"] == "acme"  # and the credential's jti (first contact)
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


def _token(scopes: list[str], tenant: str = "platform") -> str:
    return bearer(tenant, scopes=scopes)["Authorization"].removeprefix("Bearer ")


async def test_auth_hook_lets_a_bridge_in_with_the_mqtt_bridge_scope_only(api: httpx.AsyncClient) -> None:
    async def login(password: str, username: str = BRIDGE_USERNAME) -> object:
        body = {"clientid": "fleetflow-bridge-1", "username": username, "password": password}
        r = await api.post("/v1/mqtt/auth", json=body, headers=HOOK)
        assert r.status_code == 200, r.text
        return r.json()

    allowed = {"result": "allow", "client_attrs": {"role": "bridge"}}
    assert await login(_token(["mqtt:bridge"])) == allowed
    # a tenant's admin does not include it; a device credential or garbage is no bridge
    assert await login(_token(["admin"], tenant="acme")) == {"result": "deny"}
    assert await login(_token(["mqtt:hooks"])) == {"result": "deny"}
    _, credential = await active_device(api)
    assert await login(credential) == {"result": "deny"}
    assert await login("not-a-token") == {"result": "deny"}


async def test_acl_hook_gives_a_bridge_its_subscriptions_and_pushes_only(api: httpx.AsyncClient) -> None:
    async def decide(topic: str, action: str, role: str = "bridge", username: str = BRIDGE_USERNAME) -> str:
        body = {"tenant": "", "username": username, "topic": topic, "action": action, "role": role}
        r = await api.post("/v1/mqtt/acl", json=body, headers=HOOK)
        assert r.status_code == 200, r.text
        return str(r.json()["result"])

    for name in SUBSCRIPTIONS:
        assert await decide(name, "subscribe") == "allow"
    for kind in ("twin/desired", "twin/delta", "jobs/notify", "commands"):
        assert await decide(f"tenants/acme/devices/th-1/{kind}", "publish") == "allow"
    assert await decide("#", "subscribe") == "deny"
    assert await decide("tenants/+/devices/+/telemetry", "subscribe") == "allow"  # as EMQX may ask
    assert await decide("tenants/+/devices/+/twin/desired", "subscribe") == "deny"
    assert await decide("tenants/acme/devices/th-1/telemetry", "publish") == "deny"
    assert await decide("tenants/acme/devices/+/commands", "publish") == "deny"
    # the role comes from the auth hook's answer; without it a bridge's name is nobody's
    assert await decide(SUBSCRIPTIONS[0], "subscribe", role="") == "deny"
    assert await decide(SUBSCRIPTIONS[0], "subscribe", username="th-1") == "deny"


async def _connection(api: httpx.AsyncClient, device_id: str) -> str:
    twin = (await api.get(f"/v1/devices/{device_id}/twin", headers=AUTH)).json()
    return str(twin["connection"])


async def test_events_hook_records_presence_at_the_broker(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id, _ = await active_device(api)
    device = {"clientid": device_id, "username": device_id, "tenant": "acme"}

    async def event(**body: object) -> None:
        r = await api.post("/v1/mqtt/events", json={**device, **body}, headers=HOOK)
        assert r.status_code == 204, r.text

    # the broker's rule selects every field for every event: the ones an event has not are null
    await event(event="client.connected", connected_at=1_000, disconnected_at=None, reason="undefined")
    assert await _connection(api, device_id) == "online"
    # a late disconnection of an earlier session leaves the newer one online
    await event(event="client.disconnected", disconnected_at=999, reason="keepalive_timeout")
    assert await _connection(api, device_id) == "online"
    await event(event="client.disconnected", disconnected_at=2_000, reason="normal")
    assert await _connection(api, device_id) == "offline"

    async def types() -> list[str]:
        events = (await api.get("/v1/events", params={"device_id": device_id}, headers=AUTH)).json()
        return [e["type"] for e in (events["items"] if isinstance(events, dict) else events)]

    await eventually(types, lambda t: "DeviceConnected" in t and "DeviceDisconnected" in t)
    # another tenant's device of that id, or a client that is not the device, changes nothing
    await event(event="client.connected", connected_at=3_000, tenant="globex")
    await event(event="client.connected", connected_at=3_000, clientid="someone-else")
    assert await _connection(api, device_id) == "offline"
    async with pool.acquire() as conn:
        ghosts = await conn.fetchval(
            "SELECT count(*) FROM device.mqtt_presence WHERE tenant = 'globex' AND device_id = $1", device_id
        )
    assert ghosts == 0
    no_scope = bearer("acme", scopes=["devices:read"])
    bad = await api.post("/v1/mqtt/events", json={**device, "event": "client.connected"}, headers=no_scope)
    assert bad.status_code == 403


async def test_a_tenant_admin_token_is_no_broker(api: httpx.AsyncClient) -> None:
    # the hooks decide for every tenant: with acme's admin token, /v1/mqtt/events would set
    # globex's devices online or offline and /v1/mqtt/auth would test any credential
    admin = bearer("acme", scopes=["admin"])
    bodies = {
        "/v1/mqtt/auth": {"clientid": "d-1", "username": "d-1", "password": "x"},
        "/v1/mqtt/acl": {"tenant": "globex", "username": "d-1", "topic": "t", "action": "publish"},
        "/v1/mqtt/events": {
            "event": "client.connected",
            "clientid": "d-1",
            "username": "d-1",
            "tenant": "globex",
            "connected_at": 1,
        },
    }
    for path, body in bodies.items():
        r = await api.post(path, json=body, headers=admin)
        assert r.status_code == 403, (path, r.text)
        assert "mqtt:hooks" in r.json()["detail"]


async def test_a_client_id_at_the_broker_stays_with_the_tenant_whose_device_used_it_first(
    api: httpx.AsyncClient,
) -> None:
    # EMQX's client id is the device id: a second tenant's device of that id logging in would
    # take the first one's session over (its subscriptions, its queued commands) and kick it
    device_id = f"same-{uuid.uuid4().hex[:8]}"
    _, acme = await active_device(api, device_id=device_id, auth=bearer("acme"))
    _, globex = await active_device(api, device_id=device_id, auth=bearer("globex"))

    async def login(password: str) -> str:
        body = {"clientid": device_id, "username": device_id, "password": password}
        r = await api.post("/v1/mqtt/auth", json=body, headers=HOOK)
        assert r.status_code == 200, r.text
        return str(r.json()["result"])

    assert await login(acme) == "allow"
    connected = {"event": "client.connected", "clientid": device_id, "username": device_id}
    r = await api.post(
        "/v1/mqtt/events", json={**connected, "tenant": "acme", "connected_at": 1}, headers=HOOK
    )
    assert r.status_code == 204, r.text
    assert await login(globex) == "deny"
    # also once acme's device is offline (its session, with its subscriptions, outlives it)
    gone = {**connected, "event": "client.disconnected", "tenant": "acme", "disconnected_at": 2}
    assert (await api.post("/v1/mqtt/events", json=gone, headers=HOOK)).status_code == 204
    assert await login(globex) == "deny"
    assert await login(acme) == "allow"


async def test_a_revoked_bridge_token_is_no_bridge(
    api: httpx.AsyncClient, pool: Pool, settings: Settings
) -> None:
    # the bridge's token is the password in the body: the revoked-token middleware never sees it
    token = _token(["mqtt:bridge"])
    body = {"clientid": "fleetflow-bridge-1", "username": BRIDGE_USERNAME, "password": token}
    assert (await api.post("/v1/mqtt/auth", json=body, headers=HOOK)).json()["result"] == "allow"
    claims = verify_token(TEST_KEYS, token, settings.jwt_issuer)
    await revoke(pool, claims.tenant, claims.jti, claims.expires_at, "leaked")

    async def login() -> object:
        return (await api.post("/v1/mqtt/auth", json=body, headers=HOOK)).json()

    await eventually(login, lambda answer: answer == {"result": "deny"})
