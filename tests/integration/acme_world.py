"""Tenant acme's world: one of each resource, made through the API, for the isolation tests.

`ids` names each resource by what the routes' paths call it (`{device}`, `{campaign}`, ...);
CASES are the operator requests that reach one of them by id, DEVICE_ROUTES the device's own;
`render` fills a template with the ids, `missing_ids` gives ids of the same kinds that
nobody has, and `scrub` lets two answers about different ids be compared.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from string import Formatter
from typing import Any

import httpx
from temporalio.client import Client

from activities.notifications import NotificationService
from fleetflow.db import Pool
from tests.integration.flows import (
    AUTH,
    active_device,
    campaign_body,
    fleet,
    new_id,
    onboard,
    progress_until,
    upload,
)
from tests.integration.test_event_bus import probe_events, subscribe
from tests.integration.test_telemetry import device_auth, send
from tests.support import eventually, free_port

PROBE = "IsolationProbe"


@dataclass(frozen=True)
class World:
    """acme's resources: `ids` names each by what the routes' paths call it."""

    ids: dict[str, str]
    credentials: dict[str, str] = field(default_factory=dict)  # device id -> credential

    def credential(self, name: str) -> dict[str, str]:
        """The Authorization header of the device that `ids[name]` names."""
        return device_auth(self.credentials[self.ids[name]])


@dataclass(frozen=True)
class Case:
    """A by-id request; `witness` is acme's read of the resource: 200, and for a request that
    would change something, the same `keys` (all when empty) afterwards."""

    method: str
    path: str
    witness: str
    keys: tuple[str, ...] = ()
    body: Any = None


TWIN = "/v1/devices/{device}/twin"
ROLLOUT = "/v1/rollouts/{campaign}"
CASES: dict[str, Case] = {
    "device": Case("GET", "/v1/devices/{device}", "/v1/devices/{device}"),
    "onboarding": Case("GET", "/v1/onboardings/{waiting}", "/v1/onboardings/{waiting}"),
    "approve": Case("POST", "/v1/onboardings/{gateway}/approve", "/v1/onboardings/{gateway}", body={}),
    "reject": Case(
        "POST", "/v1/onboardings/{gateway}/reject", "/v1/onboardings/{gateway}", body={"reason": "x"}
    ),
    "cancel-onboarding": Case("DELETE", "/v1/onboardings/{waiting}", "/v1/onboardings/{waiting}"),
    "bulk-onboarding": Case("GET", "/v1/bulk-onboardings/{bulk}", "/v1/bulk-onboardings/{bulk}"),
    "bulk-credentials": Case(
        "GET", "/v1/bulk-onboardings/{bulk}/credentials", "/v1/bulk-onboardings/{bulk}/credentials"
    ),
    "twin": Case("GET", TWIN, TWIN),
    "twin-as-of-time": Case(
        "GET", TWIN + "?as_of=2099-01-01T00:00:00Z", TWIN + "?as_of=2099-01-01T00:00:00Z"
    ),
    "twin-as-of-event": Case("GET", TWIN + "?as_of=1", TWIN + "?as_of=1"),
    "set-desired": Case(
        "PATCH", TWIN + "/desired", TWIN, ("desired", "desired_version"), body={"target_c": 5}
    ),
    "history": Case("GET", "/v1/devices/{device}/history", "/v1/devices/{device}/history"),
    "telemetry": Case(
        "GET",
        "/v1/devices/{device}/telemetry?metric={metric}",
        "/v1/devices/{device}/telemetry?metric={metric}",
    ),
    "delete-rule": Case("DELETE", "/v1/rules/{rule}", "/v1/rules"),
    "firmware": Case("GET", "/v1/firmware/{firmware}", "/v1/firmware/{firmware}"),
    "rollout": Case("GET", ROLLOUT, ROLLOUT),
    "pause": Case("POST", ROLLOUT + "/pause", ROLLOUT, ("status", "counts")),
    "resume": Case("POST", ROLLOUT + "/resume", ROLLOUT, ("status", "counts")),
    "cancel-rollout": Case("POST", ROLLOUT + "/cancel", ROLLOUT, ("status", "counts"), body={"reason": "x"}),
    "decommission": Case("POST", "/v1/devices/{device}:decommission", "/v1/devices/{device}", body={}),
    "decommission-many": Case(
        "POST", "/v1/devices:decommission", "/v1/devices/{device}", body={"device_ids": ["{device}"]}
    ),
    "decommission-progress": Case("GET", "/v1/decommissions/{retired}", "/v1/decommissions/{retired}"),
    "subscription": Case("GET", "/v1/subscriptions/{subscription}", "/v1/subscriptions/{subscription}"),
    "delete-subscription": Case(
        "DELETE", "/v1/subscriptions/{subscription}", "/v1/subscriptions/{subscription}"
    ),
    "redeliver": Case(
        "POST", "/v1/dead-letters/{delivery}/redeliver", "/v1/dead-letters?subscription_id={subscription}"
    ),
}

DEVICE_ROUTES: dict[str, tuple[str, str, Any]] = {
    "contact": ("POST", "/v1/device-contact", {}),
    "twin-delta": ("GET", "/v1/device/twin/delta", None),
    "twin-reported": ("POST", "/v1/device/twin/reported", {"reported": {"rssi": -1}}),
    "jobs": ("GET", "/v1/device/jobs", None),
    "job-progress": (
        "POST",
        "/v1/device/jobs/{campaign}/progress",
        {"kind": "update", "state": "downloading"},
    ),
    "firmware": ("GET", "/v1/device/firmware/{firmware}", None),
}


def render(template: Any, ids: Mapping[str, str]) -> Any:
    """template (a string, or JSON with strings) with `{name}` replaced by ids[name]."""
    if isinstance(template, str):
        return template.format_map(ids)
    if isinstance(template, list):
        return [render(t, ids) for t in template]
    if isinstance(template, dict):
        return {k: render(v, ids) for k, v in template.items()}
    return template


def names_in(template: Any) -> set[str]:
    """The `{name}`s a template uses."""
    if isinstance(template, str):
        return {name for _, name, _, _ in Formatter().parse(template) if name}
    if isinstance(template, list):
        return set().union(*(names_in(t) for t in template))
    if isinstance(template, dict):
        return set().union(*(names_in(v) for v in template.values()))
    return set()


def scrub(text: str, ids: Mapping[str, str], names: set[str]) -> str:
    """text with each id it names replaced by `<name>`, to compare answers about different ids."""
    for name in sorted(names, key=lambda n: -len(ids[n])):
        text = text.replace(ids[name], f"<{name}>")
    return text


def missing_ids(world: World) -> dict[str, str]:
    """Ids of the same kinds that nobody has."""
    fresh = {name: f"nope-{uuid.uuid4().hex[:10]}" for name in world.ids}
    return {**fresh, "delivery": str(10**12 + uuid.uuid4().int % 10**6)}


async def call(
    api: httpx.AsyncClient, method: str, path: str, auth: dict[str, str], body: Any = None
) -> httpx.Response:
    """One request; body (when given) as JSON."""
    return await api.request(method, path, json=body, headers=auth)


@asynccontextmanager
async def acme_world(api: httpx.AsyncClient, pool: Pool, client: Client) -> AsyncIterator[World]:
    """One of each resource of tenant acme, made through the API (and torn down after)."""
    tag = f"iso-{uuid.uuid4().hex[:8]}"
    metric = f"iso_{uuid.uuid4().hex[:8]}"
    ids: dict[str, str] = {"tag": tag, "metric": metric}

    # an active thermostat: twin changed once, readings stored, an open alert
    device, credential = await active_device(api, tags=[tag])
    ids["device"] = device
    ids["rule"] = f"iso-{uuid.uuid4().hex[:8]}"
    rule = {
        "rule_id": ids["rule"],
        "device_type": "thermostat",
        "metric": metric,
        "kind": "threshold",
        "params": {"above": 30, "clear_above": 28},
    }
    assert (await api.put(f"/v1/rules/{ids['rule']}", json=rule, headers=AUTH)).status_code == 200
    assert (
        await api.patch(f"/v1/devices/{device}/twin/desired", json={"target_c": 22}, headers=AUTH)
    ).is_success
    start = datetime.now(UTC) - timedelta(minutes=5)
    rows = [
        {"device_id": device, "ts": (start + timedelta(seconds=i)).isoformat(), "metric": metric, "value": v}
        for i, v in enumerate([20.0, 40.0])
    ]
    assert (await send(api, device_auth(credential), rows)).status_code == 202
    ids["ghost"] = new_id("ghost")
    ghostly = [{**rows[0], "device_id": ids["ghost"]}]
    assert (await send(api, AUTH, ghostly)).status_code == 202

    async def alerts() -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = (
            await api.get("/v1/alerts", params={"device_id": device}, headers=AUTH)
        ).json()
        return answer

    await eventually(alerts, lambda a: [x["status"] for x in a] == ["open"])

    async def quarantined() -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = (
            await api.get("/v1/telemetry/quarantine", params={"device_id": ids["ghost"]}, headers=AUTH)
        ).json()
        return answer

    await eventually(quarantined, lambda q: len(q) == 1)

    # onboardings in flight: one awaiting first contact (its progress shows the credential),
    # one awaiting approval
    ids["waiting"] = new_id("wait")
    assert (await onboard(api, ids["waiting"], tags=[tag])).status_code == 202
    await progress_until(api, ids["waiting"], "awaiting_first_contact")
    ids["gateway"] = new_id("gw")
    gateway = await onboard(api, ids["gateway"], device_type="gateway", config={"site": "x"}, tags=[tag])
    assert gateway.status_code == 202
    await progress_until(api, ids["gateway"], "awaiting_approval")

    # bulk-onboarded sensors: one gets a job of a paused campaign, one stays idle, one is retired
    sensors = await fleet(api, 3, tags=[tag])
    ids["job_device"], ids["idle_device"], ids["retired"] = sorted(sensors)
    ids["bulk"] = await pool.fetchval(
        """SELECT split_part(onboarding_id, '/', 1) FROM device.devices
           WHERE tenant = 'acme' AND device_id = $1""",
        ids["retired"],
    )
    version = f"7.{uuid.uuid4().int % 100_000}.0"
    uploaded = await upload(api, version)
    assert uploaded.status_code == 201, uploaded.text
    ids["firmware"] = uploaded.json()["firmware_id"]
    ids["campaign"] = f"iso-{uuid.uuid4().hex[:8]}"
    body = campaign_body(ids["campaign"], version, [ids["job_device"]], canary=1, device_timeout_s=3600)
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202

    async def campaign() -> dict[str, Any]:
        answer: dict[str, Any] = (await api.get(f"/v1/rollouts/{ids['campaign']}", headers=AUTH)).json()
        return answer

    await eventually(campaign, lambda p: p["counts"].get("offered") == 1)
    assert (await api.post(f"/v1/rollouts/{ids['campaign']}/pause", headers=AUTH)).status_code == 200

    # the retired sensor's credential works until it is decommissioned
    retired_auth = device_auth(sensors[ids["retired"]])
    assert (await api.get("/v1/device/twin/delta", headers=retired_auth)).status_code == 200
    retire = await api.post(f"/v1/devices/{ids['retired']}:decommission", json={}, headers=AUTH)
    assert retire.status_code == 202, retire.text

    async def retirement() -> dict[str, Any]:
        answer: dict[str, Any] = (await api.get(f"/v1/decommissions/{ids['retired']}", headers=AUTH)).json()
        return answer

    await eventually(retirement, lambda p: p.get("status") == "completed")

    # a webhook nobody answers, and its dead letter
    sub = await subscribe(
        api,
        AUTH,
        f"http://127.0.0.1:{free_port()}/hook",
        event_types=[PROBE],
        max_attempts=1,
        backoff_s=1,
        max_backoff_s=1,
    )
    ids["subscription"] = sub["subscription_id"]
    await NotificationService(pool, client).record_events(probe_events("acme", device, 1, kind=PROBE))

    async def dead() -> list[dict[str, Any]]:
        params = {"subscription_id": ids["subscription"]}
        page: dict[str, Any] = (await api.get("/v1/dead-letters", params=params, headers=AUTH)).json()
        return list(page["items"])

    [letter] = await eventually(dead, lambda items: len(items) == 1)
    ids["delivery"] = str(letter["delivery_id"])

    yield World(ids=ids, credentials={device: credential, **sensors})

    await api.post(f"/v1/rollouts/{ids['campaign']}/cancel", json={"reason": "test over"}, headers=AUTH)
    await api.delete(f"/v1/onboardings/{ids['waiting']}", headers=AUTH)
    await api.post(f"/v1/onboardings/{ids['gateway']}/reject", json={"reason": "test over"}, headers=AUTH)
    await api.delete(f"/v1/subscriptions/{ids['subscription']}", headers=AUTH)
    await api.delete(f"/v1/rules/{ids['rule']}", headers=AUTH)
