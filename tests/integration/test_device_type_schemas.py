"""Tenant-defined device types: Draft 2020-12 schemas checked on PUT, applied at onboarding and
by the twin."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from fleetflow import config_schema
from tests.integration.flows import AUTH, active_device, new_id
from tests.support import eventually
from tests.unit.test_config_schema import PROBE as PROBE_SCHEMA  # the same keywords, end to end


async def put_type(api: httpx.AsyncClient, name: str, schema: dict[str, Any], **extra: Any) -> httpx.Response:
    body = {"name": name, "config_schema": schema, **extra}
    return await api.put(f"/v1/device-types/{name}", json=body, headers=AUTH)


async def test_a_nullable_type_onboards_and_every_keyword_is_enforced(api: httpx.AsyncClient) -> None:
    name = f"probe-{uuid.uuid4().hex[:6]}"
    assert (await put_type(api, name, PROBE_SCHEMA)).status_code == 200
    device_id, _ = await active_device(api, device_type=name, config={"label": None, "channels": [1]})

    for config, field in [
        ({"label": "ABC"}, "label"),
        ({"label": 5}, "label"),
        ({"channels": []}, "channels"),
        ({"gain": 0}, "gain"),
        ({"mode": "manual"}, "mode"),
    ]:
        body = {"device_id": new_id(), "device_type": name, "config": config}
        refused = await api.post("/v1/devices", json=body, headers=AUTH)
        assert refused.status_code == 422, (config, refused.text)
        assert refused.json()["errors"][0]["loc"] == ["body", "config", field]

    url = f"/v1/devices/{device_id}/twin/desired"
    bad = await api.patch(url, json={"gain": -1}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "gain"], bad.text
    good = await api.patch(url, json={"gain": 0.5, "label": "probe", "mode": 2}, headers=AUTH)
    assert good.status_code == 200, good.text


@pytest.mark.parametrize(
    ("schema", "loc"),
    [
        ({"type": "object", "properties": {"x": {"type": ["string", "nul"]}}}, ["properties", "x", "type"]),
        ({"properties": {"n": {"minItems": -1}}}, ["properties", "n", "minItems"]),
        ({"properties": {"s": {"pattern": "^(?=a)"}}}, ["properties", "s", "pattern"]),
        ({"$ref": "https://example.com/schema.json"}, ["$ref"]),
        ({"$schema": "http://json-schema.org/draft-07/schema#"}, ["$schema"]),
    ],
)
async def test_an_unusable_schema_is_422_at_its_place_and_not_stored(
    api: httpx.AsyncClient, schema: dict[str, Any], loc: list[str | int]
) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    refused = await put_type(api, name, schema)
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["loc"] == ["body", "config_schema", *loc]
    stored = {t["name"] for t in (await api.get("/v1/device-types", headers=AUTH)).json()}
    assert name not in stored


async def test_a_default_config_is_checked_against_its_schema(api: httpx.AsyncClient) -> None:
    refused = await put_type(api, f"def-{uuid.uuid4().hex[:6]}", PROBE_SCHEMA, default_config={"gain": 0})
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["loc"] == ["body", "default_config", "gain"]


async def test_a_bulk_import_shares_one_schema_step_budget_and_checks_a_repeated_config_once(
    api: httpx.AsyncClient,
) -> None:
    # each config (12 KiB) takes 7,500 steps, under one validation's budget; 100 different ones
    # took 750,000 steps of the API's event loop in one request (10,000 could take 200 million)
    name = f"list-{uuid.uuid4().hex[:6]}"
    item = {"type": "integer", "minimum": 0, "maximum": 10_000}
    schema = {"type": "object", "properties": {"l": {"type": "array", "items": item}}}
    assert (await put_type(api, name, schema)).status_code == 200

    def device(config: dict[str, Any]) -> dict[str, Any]:
        return {"device_id": new_id(), "device_type": name, "config": config}

    costly = [device({"l": [n, *range(2500)]}) for n in range(100)]
    refused = await api.post("/v1/devices:bulk", json={"devices": costly}, headers=AUTH)
    assert refused.status_code == 422, refused.text
    assert "schema steps" in refused.json()["errors"][0]["msg"]
    same = {"l": list(range(2500))}  # the same config for 100 devices: checked once
    alike = [device(same) for _ in range(100)]
    assert (await api.post("/v1/devices:bulk", json={"devices": alike}, headers=AUTH)).status_code == 202


async def test_a_config_shared_by_a_bulk_imports_devices_is_checked_once_per_slice(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the device service validated it again for every device of a slice: 1,000 validations of
    # up to 20,000 steps each in one activity, however cheaply the API had accepted the import
    resolve, calls = config_schema.resolve, []

    def counted(*args: Any) -> dict[str, Any]:
        calls.append(args)
        return resolve(*args)

    monkeypatch.setattr(config_schema, "resolve", counted)
    config = {"target_c": 19.25}
    devices = [{"device_id": new_id(), "device_type": "thermostat", "config": config} for _ in range(50)]
    accepted = await api.post("/v1/devices:bulk", json={"devices": devices}, headers=AUTH)
    assert accepted.status_code == 202, accepted.text

    async def status() -> str:
        return str((await api.get(accepted.json()["status_url"], headers=AUTH)).json()["status"])

    assert await eventually(status, lambda s: s == "completed") == "completed"
    # once by the API, once by the slice's activity (other tests' imports may still be running)
    assert sum(args[0] == config for args in calls) == 2
