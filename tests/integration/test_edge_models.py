"""The API's bodies refuse what the contracts behind them would ignore: an unknown field, at any
depth, is a 422 naming it and nothing is started; a reason is bounded on every route that takes one."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fleetflow.contracts.limits import REASON_MAX_CHARS
from tests.integration.flows import AUTH, campaign_body, new_id

DEVICE = {"device_type": "thermostat", "config": {"target_c": 21}}
WEBHOOK = {"url": "https://example.com/hook", "event_types": ["*"], "secret": "whsec_" + "A" * 32}
RULE = {
    "rule_id": "r1",
    "device_type": "thermostat",
    "metric": "t",
    "kind": "threshold",
    "params": {"above": 1},
}
TYPE = {"name": "probe-edge", "config_schema": {"type": "object"}}

# (method, path, body, where the unknown field is)
UNKNOWN_FIELDS: dict[str, tuple[str, str, dict[str, Any], list[str | int]]] = {
    "onboarding": ("POST", "/v1/devices", {"device_id": "edge-1", **DEVICE, "colour": 1}, ["body", "colour"]),
    "bulk item": (
        "POST",
        "/v1/devices:bulk",
        {"devices": [{"device_id": "edge-2", **DEVICE, "colour": 1}]},
        ["body", "devices", 0, "colour"],
    ),
    "rollout target": (
        "POST",
        "/v1/rollouts",
        {**campaign_body("edge-c1", "9.9.9", ["edge-3"]), "target": {"device_ids": ["edge-3"], "colour": 1}},
        ["body", "target", "colour"],
    ),
    "rollout policy": (
        "POST",
        "/v1/rollouts",
        {**campaign_body("edge-c2", "9.9.9", ["edge-3"]), "policy": {"canary": 1, "colour": 1}},
        ["body", "policy", "colour"],
    ),
    "rollout cancel": (
        "POST",
        "/v1/rollouts/edge-c3/cancel",
        {"reason": "r", "colour": 1},
        ["body", "colour"],
    ),
    "rule": ("PUT", "/v1/rules/r1", {**RULE, "colour": 1}, ["body", "colour"]),
    "subscription": ("POST", "/v1/subscriptions", {**WEBHOOK, "colour": 1}, ["body", "colour"]),
    "device type": ("PUT", "/v1/device-types/probe-edge", {**TYPE, "colour": 1}, ["body", "colour"]),
}


@pytest.mark.parametrize("case", list(UNKNOWN_FIELDS))
async def test_an_unknown_field_in_a_body_is_a_422_naming_it(api: httpx.AsyncClient, case: str) -> None:
    method, path, body, loc = UNKNOWN_FIELDS[case]
    response = await api.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert loc in [e["loc"] for e in response.json()["errors"]]


async def test_nothing_is_started_for_a_body_with_an_unknown_field(api: httpx.AsyncClient) -> None:
    device_id = new_id("edge")
    refused = await api.post(
        "/v1/devices", json={"device_id": device_id, **DEVICE, "colour": 1}, headers=AUTH
    )
    assert refused.status_code == 422
    assert (await api.get(f"/v1/onboardings/{device_id}", headers=AUTH)).status_code == 404
    assert (await api.get(f"/v1/devices/{device_id}", headers=AUTH)).status_code == 404


async def test_a_cancel_reason_past_the_limit_is_a_422_naming_it(api: httpx.AsyncClient) -> None:
    """It was taken unbounded and passed to the update's contract, which stops at 500: a 500."""
    reason = "r" * (REASON_MAX_CHARS + 1)
    response = await api.post("/v1/rollouts/edge-c4/cancel", json={"reason": reason}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", "reason"]
    # at the limit, the route goes on to look for the campaign
    at_limit = await api.post("/v1/rollouts/edge-c4/cancel", json={"reason": reason[:-1]}, headers=AUTH)
    assert at_limit.status_code == 404, at_limit.text


@pytest.mark.parametrize("bound", ["1e400", "-1e400", "NaN", "Infinity"])
async def test_a_rule_threshold_that_is_no_finite_number_is_a_422_naming_it(
    api: httpx.AsyncClient, bound: str
) -> None:
    """1e400 parses as infinity (NaN and Infinity are taken by the JSON parser too): the rule was
    accepted and its params written as JSON PostgreSQL refuses, a 500 (a NaN bound never fires)."""
    body = '{"rule_id": "r-inf", "device_type": "thermostat", "metric": "t", "kind": "threshold", '
    body += f'"params": {{"above": {bound}}}}}'
    response = await api.put(
        "/v1/rules/r-inf", content=body, headers={**AUTH, "content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert ["body", "params", "above"] in [e["loc"] for e in response.json()["errors"]]
