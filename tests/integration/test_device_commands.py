"""Device commands (durable RPC) against the real stack: a DeviceCommand workflow per command over
the device service's row; the device long-polls and answers; deadlines end it clearly."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device, fleet, new_id
from tests.support import bearer, eventually

GLOBEX = bearer("globex")


def device_auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def send(
    api: httpx.AsyncClient, device_id: str, auth: dict[str, str] = AUTH, **body: Any
) -> dict[str, Any]:
    body.setdefault("name", "reboot")
    response = await api.post(f"/v1/devices/{device_id}/commands", json=body, headers=auth)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def status_of(
    api: httpx.AsyncClient, device_id: str, command_id: str, auth: dict[str, str] = AUTH
) -> str:
    response = await api.get(f"/v1/devices/{device_id}/commands/{command_id}", headers=auth)
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


async def test_round_trip_with_a_waiting_device_and_a_waiting_caller(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    poll = asyncio.create_task(
        api.get("/v1/device/commands", params={"wait": 30}, headers=device_auth(credential))
    )
    await asyncio.sleep(0.3)
    assert not poll.done()  # held: nothing to run yet
    command = await send(api, device_id, params={"delay_s": 5, "deep": {"a": [1, 2]}}, timeout_s=30)
    assert command["status"] == "pending" and command["workflow_id"].startswith("command-acme-")
    handed = (await poll).json()["commands"]
    assert [(c["command_id"], c["name"], c["params"]) for c in handed] == [
        (command["command_id"], "reboot", {"delay_s": 5, "deep": {"a": [1, 2]}})
    ]
    url = f"/v1/devices/{device_id}/commands/{command['command_id']}"
    waiting = asyncio.create_task(api.get(url, params={"wait": 30}, headers=AUTH))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    answered = await api.post(
        f"/v1/device/commands/{command['command_id']}/result",
        json={"status": "succeeded", "result": {"uptime_s": 3}},
        headers=device_auth(credential),
    )
    assert answered.status_code == 200, answered.text
    done = (await waiting).json()
    assert done["status"] == "succeeded" and done["result"] == {"uptime_s": 3}
    assert done["delivered_at"] and done["finished_at"]
    # a second answer, after the terminal status, is refused
    again = await api.post(
        f"/v1/device/commands/{command['command_id']}/result",
        json={"status": "failed"},
        headers=device_auth(credential),
    )
    assert again.status_code == 409
    # delivered once: the next poll finds nothing
    assert (await api.get("/v1/device/commands", headers=device_auth(credential))).json()["commands"] == []
    page = (await api.get(f"/v1/devices/{device_id}/commands", headers=AUTH)).json()
    assert [c["command_id"] for c in page["items"]] == [command["command_id"]]


async def test_an_offline_device_gets_it_when_back_within_expiry(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    first = await send(api, device_id, name="set_interval", params={"s": 10}, expires_s=600)
    second = await send(api, device_id, name="diag.dump", expires_s=600)
    await asyncio.sleep(1)
    assert await status_of(api, device_id, first["command_id"]) == "pending"
    handed = (await api.get("/v1/device/commands", headers=device_auth(credential))).json()["commands"]
    assert [c["command_id"] for c in handed] == [first["command_id"], second["command_id"]]
    assert await status_of(api, device_id, first["command_id"]) == "delivered"


async def test_never_delivered_before_expiry_is_expired(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    command = await send(api, device_id, expires_s=1)
    url = f"/v1/devices/{device_id}/commands/{command['command_id']}"
    await eventually(lambda: api.get(url, headers=AUTH), lambda r: r.json()["status"] == "expired")
    assert (await api.get("/v1/device/commands", headers=device_auth(credential))).json()["commands"] == []
    late = await api.post(
        f"/v1/device/commands/{command['command_id']}/result",
        json={"status": "succeeded"},
        headers=device_auth(credential),
    )
    assert late.status_code == 409 and "expired" in late.json()["detail"]


async def test_delivered_but_unanswered_is_timed_out_and_a_late_answer_is_409(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    command = await send(api, device_id, timeout_s=1)
    assert (
        len((await api.get("/v1/device/commands", headers=device_auth(credential))).json()["commands"]) == 1
    )
    url = f"/v1/devices/{device_id}/commands/{command['command_id']}"
    done = (await api.get(url, params={"wait": 20}, headers=AUTH)).json()
    assert done["status"] == "timed_out"
    late = await api.post(
        f"/v1/device/commands/{command['command_id']}/result",
        json={"status": "succeeded"},
        headers=device_auth(credential),
    )
    assert late.status_code == 409
    assert (await api.get(url, headers=AUTH)).json()["status"] == "timed_out"


async def test_a_second_concurrent_waiter_gets_429(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    first = asyncio.create_task(
        api.get("/v1/device/commands", params={"wait": 30}, headers=device_auth(credential))
    )
    await asyncio.sleep(0.3)
    second = await api.get("/v1/device/commands", params={"wait": 30}, headers=device_auth(credential))
    assert second.status_code == 429 and second.headers["Retry-After"] == "30"
    await send(api, device_id)
    assert len((await first).json()["commands"]) == 1
    # the lease is given back: the device may poll again
    assert (await api.get("/v1/device/commands", headers=device_auth(credential))).status_code == 200


async def test_commands_are_scoped_to_their_tenant_and_device(api: httpx.AsyncClient) -> None:
    device_id = new_id("cmd")
    _, ours = await active_device(api, device_id=device_id)
    _, theirs = await active_device(api, auth=GLOBEX, device_id=device_id)
    other_device, other = await active_device(api)
    command_id = "same-id"
    await send(api, device_id, command_id=command_id, params={"who": "acme"})
    await send(api, device_id, auth=GLOBEX, command_id=command_id, params={"who": "globex"})
    # the other device of acme, and globex's device of the same id, never see acme's command
    assert (await api.get("/v1/device/commands", headers=device_auth(other))).json()["commands"] == []
    mine = (await api.get("/v1/device/commands", headers=device_auth(theirs))).json()["commands"]
    assert [c["params"] for c in mine] == [{"who": "globex"}]
    stolen = await api.post(
        f"/v1/device/commands/{command_id}/result", json={"status": "succeeded"}, headers=device_auth(other)
    )
    assert stolen.status_code == 404
    # globex answering its own command leaves acme's alone
    ok = await api.post(
        f"/v1/device/commands/{command_id}/result",
        json={"status": "failed", "result": {"e": 1}},
        headers=device_auth(theirs),
    )
    assert ok.status_code == 200
    assert await status_of(api, device_id, command_id) == "pending"
    assert await status_of(api, device_id, command_id, GLOBEX) == "failed"
    # acme's operator cannot read globex's, nor command a device of another tenant's only
    assert (
        await api.get(f"/v1/devices/{other_device}/commands/{command_id}", headers=GLOBEX)
    ).status_code == 404
    refused = await api.post(f"/v1/devices/{other_device}/commands", json={"name": "reboot"}, headers=GLOBEX)
    assert refused.status_code == 404
    # a token without the scope
    reader = bearer("acme", ["devices:read"])
    assert (
        await api.post(f"/v1/devices/{device_id}/commands", json={"name": "x"}, headers=reader)
    ).status_code == 403
    handed = (await api.get("/v1/device/commands", headers=device_auth(ours))).json()["commands"]
    assert [c["params"] for c in handed] == [{"who": "acme"}]


async def test_bad_commands_are_refused_with_the_field(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    url = f"/v1/devices/{device_id}/commands"
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    cases = [
        ({"name": "rm -rf"}, "name"),
        ({"name": "a" * 65}, "name"),
        ({"name": "ok", "params": {"blob": "x" * 9000}}, "params"),
        ({"name": "ok", "params": deep}, "params"),
        ({"name": "ok", "timeout_s": 0}, "timeout_s"),
        ({"name": "ok", "expires_s": 10**9}, "expires_s"),
        ({"name": "ok", "surprise": 1}, "surprise"),
    ]
    for body, field in cases:
        response = await api.post(url, json=body, headers=AUTH)
        assert response.status_code == 422, (body, response.text)
        assert any(field in e["loc"] for e in response.json()["errors"]), response.json()
    command = await send(api, device_id)
    await api.get("/v1/device/commands", headers=device_auth(credential))
    big = await api.post(
        f"/v1/device/commands/{command['command_id']}/result",
        json={"status": "succeeded", "result": {"blob": "x" * 20000}},
        headers=device_auth(credential),
    )
    assert big.status_code == 422
    wrong = await api.post(
        f"/v1/device/commands/{command['command_id']}/result",
        json={"status": "done"},
        headers=device_auth(credential),
    )
    assert wrong.status_code == 422
    assert await status_of(api, device_id, command["command_id"]) == "delivered"  # nothing accepted is lost
    assert (
        await api.post("/v1/devices/no-such-device/commands", json={"name": "x"}, headers=AUTH)
    ).status_code == 404


async def test_decommissioning_ends_pending_commands(api: httpx.AsyncClient) -> None:
    device_id, credential = await active_device(api)
    pending = await send(api, device_id, expires_s=600)
    retired = await api.post(f"/v1/devices/{device_id}:decommission", json={}, headers=AUTH)
    assert retired.status_code == 202
    url = f"/v1/devices/{device_id}/commands/{pending['command_id']}"
    await eventually(lambda: api.get(url, headers=AUTH), lambda r: r.json()["status"] == "cancelled")
    await eventually(
        lambda: api.get(f"/v1/decommissions/{device_id}", headers=AUTH),
        lambda r: r.json()["status"] == "completed",
    )
    assert (
        await api.post(f"/v1/devices/{device_id}/commands", json={"name": "x"}, headers=AUTH)
    ).status_code == 404
    assert (await api.get("/v1/device/commands", headers=device_auth(credential))).status_code == 401


# --- a command to many devices: a campaign on the rollout machinery ---------------------------


async def devices_answer(
    api: httpx.AsyncClient, creds: dict[str, str], answer: dict[str, str | None], stop: asyncio.Event
) -> dict[str, list[str]]:
    """Each device polls its commands and answers answer[device] (None: stays silent)."""
    seen: dict[str, list[str]] = {}
    while not stop.is_set():
        for device_id, credential in creds.items():
            if answer.get(device_id) is None:
                continue
            handed = (await api.get("/v1/device/commands", headers=device_auth(credential))).json()
            for command in handed["commands"]:
                seen.setdefault(device_id, []).append(command["name"])
                await api.post(
                    f"/v1/device/commands/{command['command_id']}/result",
                    json={"status": answer[device_id], "result": {"echo": command["params"]}},
                    headers=device_auth(credential),
                )
        await asyncio.sleep(0.05)
    return seen


def command_campaign(campaign: str, ids: list[str], **policy: Any) -> dict[str, Any]:
    policy.setdefault("rate_per_minute", 60000)
    return {
        "campaign_id": campaign,
        "device_type": "sensor",
        "command": {"name": "calibrate", "params": {"ref": 1.5}, "timeout_s": 30},
        "target": {"device_ids": ids},
        "policy": policy,
    }


async def test_a_command_campaign_reaches_every_device_with_its_outcome(api: httpx.AsyncClient) -> None:
    creds = await fleet(api, 6)
    campaign = new_id("cc")
    stop = asyncio.Event()
    answer: dict[str, str | None] = dict.fromkeys(creds, "succeeded")
    working = asyncio.create_task(devices_answer(api, creds, answer, stop))
    started = await api.post(
        "/v1/rollouts", json=command_campaign(campaign, list(creds), canary=2), headers=AUTH
    )
    assert started.status_code == 202, started.text
    done = await eventually(
        lambda: api.get(f"/v1/rollouts/{campaign}", headers=AUTH),
        lambda r: r.json()["status"] == "completed",
        60,
    )
    stop.set()
    seen = await working
    assert done.json()["counts"] == {"succeeded": 6}
    assert seen == {d: ["calibrate"] for d in creds}  # one command each, once
    outcomes = (await api.get(f"/v1/rollouts/{campaign}/devices", headers=AUTH)).json()
    assert [o["device_id"] for o in outcomes] == sorted(creds)
    assert all(o["state"] == "succeeded" and o["result"] == {"echo": {"ref": 1.5}} for o in outcomes)
    # the device's firmware route never offered it as a firmware job
    credential = next(iter(creds.values()))
    assert (await api.get("/v1/device/jobs", headers=device_auth(credential))).status_code == 204
    events = (await api.get("/v1/events", params={"type": "DeviceCommandFinished"}, headers=AUTH)).json()
    assert events  # recorded per device


async def test_a_command_campaign_aborts_on_failures_and_ends_open_commands(api: httpx.AsyncClient) -> None:
    creds = await fleet(api, 8)
    ids = sorted(creds)
    campaign = new_id("cc")
    stop = asyncio.Event()
    # the first wave (4) fails on 3 devices; the last device never answers
    answer: dict[str, str | None] = {d: ("failed" if i < 3 else "succeeded") for i, d in enumerate(ids)}
    answer[ids[-1]] = None
    working = asyncio.create_task(devices_answer(api, creds, answer, stop))
    body = command_campaign(campaign, ids, canary=4, growth=2, abort_failure_percent=50, abort_min_finished=4)
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202
    done = await eventually(
        lambda: api.get(f"/v1/rollouts/{campaign}", headers=AUTH),
        lambda r: r.json()["status"] == "aborted",
        60,
    )
    stop.set()
    await working
    assert done.json()["rollback_counts"] == {}  # a command has nothing to roll back
    outcomes = {
        o["device_id"]: o for o in (await api.get(f"/v1/rollouts/{campaign}/devices", headers=AUTH)).json()
    }
    assert [outcomes[d]["state"] for d in ids[:3]] == ["failed"] * 3
    assert all(o["state"] in ("succeeded", "failed", "cancelled") for o in outcomes.values())
    # no command of the campaign is left open, and nobody gets one after the abort
    assert all(o["command_status"] in (None, "succeeded", "failed", "cancelled") for o in outcomes.values())
    silent = creds[ids[-1]]
    assert (await api.get("/v1/device/commands", headers=device_auth(silent))).json()["commands"] == []


async def test_a_command_campaign_is_refused_without_a_device_type_or_with_firmware(
    api: httpx.AsyncClient,
) -> None:
    body = command_campaign(new_id("cc"), ["x"])
    del body["device_type"]
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 422
    body = command_campaign(new_id("cc"), ["x"]) | {"firmware_id": "sensor-1.0.0"}
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 422
    body = command_campaign(new_id("cc"), ["x"]) | {"device_type": "toaster"}
    refused = await api.post("/v1/rollouts", json=body, headers=AUTH)
    assert refused.status_code == 422 and "device_type" in str(refused.json()["errors"])


async def test_only_the_current_offer_of_a_campaign_job_moves_it(api: httpx.AsyncClient) -> None:
    creds = await fleet(api, 1)
    device_id, credential = next(iter(creds.items()))
    campaign = new_id("cc")
    body = command_campaign(campaign, [device_id], canary=1, device_timeout_s=1, retry_limit=1)
    body["command"]["timeout_s"] = 60
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202

    async def poll() -> list[dict[str, Any]]:
        handed: list[dict[str, Any]] = (
            await api.get("/v1/device/commands", headers=device_auth(credential))
        ).json()["commands"]
        return handed

    first = (await eventually(poll, bool))[0]
    assert first["command_id"] == f"{campaign}~1"
    # silent past the device timeout: offered again, as a new command
    second = (await eventually(poll, bool))[0]
    assert second["command_id"] == f"{campaign}~2"
    late = await api.post(
        f"/v1/device/commands/{first['command_id']}/result",
        json={"status": "failed"},
        headers=device_auth(credential),
    )
    assert late.status_code == 409
    ok = await api.post(
        f"/v1/device/commands/{second['command_id']}/result",
        json={"status": "succeeded"},
        headers=device_auth(credential),
    )
    assert ok.status_code == 200, ok.text
    done = await eventually(
        lambda: api.get(f"/v1/rollouts/{campaign}", headers=AUTH),
        lambda r: r.json()["status"] == "completed",
        60,
    )
    assert done.json()["counts"] == {"succeeded": 1}


async def test_a_new_command_notifies_its_channel_and_its_run_is_found_by_device(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    """What a push transport (the MQTT gateway) listens to, and what the Web UI searches by."""
    device_id, _ = await active_device(api)
    heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    async with pool.acquire() as conn:

        def hear(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            heard.put_nowait(json.loads(str(payload)))

        await conn.add_listener("device_command_offered", hear)
        try:
            command = await send(api, device_id)
            notice = await asyncio.wait_for(heard.get(), 10)
        finally:
            await conn.remove_listener("device_command_offered", hear)
    assert notice == {"tenant": "acme", "device_id": device_id, "command_id": command["command_id"]}

    async def runs() -> list[str]:
        query = f"DeviceId = '{device_id}' AND Operation = 'command'"
        return [w.id async for w in client.list_workflows(query)]

    assert await eventually(runs, bool) == [command["workflow_id"]]


async def test_a_command_past_its_deadline_keeps_its_status_when_the_device_is_retired(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    """The API died between writing the row and starting its run: the row reads as expired once
    past expires_s, and a decommission does not turn that terminal status into `cancelled`."""
    from activities.device_commands import DeviceCommands
    from fleetflow.contracts.commands import CommandSpec

    device_id, _credential = await active_device(api)
    rows = DeviceCommands(pool)
    orphan = await rows.create_command(
        "acme", device_id, new_id("orphan"), CommandSpec(name="reboot", expires_s=1), "none", "test"
    )
    assert orphan is not None and orphan.status == "pending"
    url = f"/v1/devices/{device_id}/commands/{orphan.command_id}"
    await eventually(lambda: api.get(url, headers=AUTH), lambda r: r.json()["status"] == "expired")
    retired = await api.post(f"/v1/devices/{device_id}:decommission", json={}, headers=AUTH)
    assert retired.status_code == 202
    await eventually(
        lambda: api.get(f"/v1/decommissions/{device_id}", headers=AUTH),
        lambda r: r.json()["status"] == "completed",
    )
    assert await status_of(api, device_id, orphan.command_id) == "expired"
    stored = await pool.fetchval(
        "SELECT status FROM device.commands WHERE tenant = 'acme' AND device_id = $1 AND command_id = $2",
        device_id,
        orphan.command_id,
    )
    assert stored == "expired"  # stored, not only read as: the row is terminal


async def test_a_campaign_command_taken_late_in_its_offer_gets_the_device_timeout_from_delivery(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    """A device back just before its offer's device timeout takes the command: its answer, in
    time after the delivery, is the job's outcome; the job is not offered (run) a second time."""
    creds = await fleet(api, 1)
    device_id, credential = next(iter(creds.items()))
    campaign = new_id("cc")
    body = command_campaign(campaign, [device_id], canary=1, device_timeout_s=30, retry_limit=3)
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202
    job = (
        "SELECT state FROM device.rollout_jobs WHERE tenant = 'acme' AND campaign_id = $1 AND device_id = $2"
    )
    await eventually(lambda: pool.fetchval(job, campaign, device_id), lambda s: s == "offered")
    # offered 28 s ago: the device was away for most of its device timeout
    await pool.execute(
        """UPDATE device.rollout_jobs SET updated_at = updated_at - interval '28 s',
               offered_at = offered_at - interval '28 s'
           WHERE tenant = 'acme' AND campaign_id = $1 AND device_id = $2""",
        campaign,
        device_id,
    )
    handed = (await api.get("/v1/device/commands", headers=device_auth(credential))).json()["commands"]
    assert [c["command_id"] for c in handed] == [f"{campaign}~1"]
    await asyncio.sleep(4)  # the command runs a few seconds; the campaign ticks meanwhile
    answered = await api.post(
        f"/v1/device/commands/{campaign}~1/result",
        json={"status": "succeeded"},
        headers=device_auth(credential),
    )
    assert answered.status_code == 200, answered.text
    done = await eventually(
        lambda: api.get(f"/v1/rollouts/{campaign}", headers=AUTH),
        lambda r: r.json()["status"] == "completed",
        60,
    )
    assert done.json()["counts"] == {"succeeded": 1}


async def test_a_held_long_poll_does_not_read_the_database_every_second(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process listens for new commands: a device's held poll reads its commands when it
    starts, on a notice and when its wait ends, not once a second (10,000 held polls would be
    10,000 queries a second)."""
    device_id, credential = await active_device(api)
    transport = api._transport
    assert isinstance(transport, httpx.ASGITransport)
    state = transport.app.state.fleetflow  # type: ignore[attr-defined]
    await eventually(lambda: asyncio.sleep(0.1, state.commands.listening), bool)
    takes = 0
    take = state.devices.take_commands

    async def counted(*args: Any) -> Any:
        nonlocal takes
        takes += 1
        return await take(*args)

    monkeypatch.setattr(state.devices, "take_commands", counted)
    answer = await api.get("/v1/device/commands", params={"wait": 5}, headers=device_auth(credential))
    assert answer.status_code == 200 and answer.json()["commands"] == []
    assert takes <= 2
    # and a command sent meanwhile still wakes it at once (its notice), well before the wait ends
    poll = asyncio.create_task(
        api.get("/v1/device/commands", params={"wait": 60}, headers=device_auth(credential))
    )
    await asyncio.sleep(0.3)
    command = await send(api, device_id)
    handed = (await poll).json()["commands"]
    assert [c["command_id"] for c in handed] == [command["command_id"]]
    assert takes <= 4


async def test_a_campaign_device_view_shows_its_command_timed_out_once_the_campaign_ends(
    api: httpx.AsyncClient,
) -> None:
    """A campaign's command has no run of its own to store its timeout: the campaign's device view
    reads its status as the command's own view does, not `delivered` for ever."""
    creds = await fleet(api, 1)
    device_id, credential = next(iter(creds.items()))
    campaign = new_id("cc")
    body = command_campaign(campaign, [device_id], canary=1, device_timeout_s=600, retry_limit=0)
    body["command"]["timeout_s"] = 1
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202

    async def poll() -> list[dict[str, Any]]:
        handed: list[dict[str, Any]] = (
            await api.get("/v1/device/commands", headers=device_auth(credential))
        ).json()["commands"]
        return handed

    taken = (await eventually(poll, bool))[0]
    assert taken["command_id"] == f"{campaign}~1"
    await eventually(
        lambda: api.get(f"/v1/devices/{device_id}/commands/{taken['command_id']}", headers=AUTH),
        lambda r: r.json()["status"] == "timed_out",
    )
    await eventually(
        lambda: api.get(f"/v1/rollouts/{campaign}", headers=AUTH),
        lambda r: r.json()["status"] in ("completed", "aborted"),
        60,
    )
    view = (await api.get(f"/v1/rollouts/{campaign}/devices", headers=AUTH)).json()
    assert [(d["command_id"], d["command_status"]) for d in view] == [(taken["command_id"], "timed_out")]


async def test_a_command_without_a_run_stores_its_expiry_when_the_device_polls(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    """The API died between writing the row and starting its run: no run will settle it, and
    the device's next poll stores the status it reads as (and notifies a waiting caller)."""
    from activities.device_commands import DeviceCommands
    from fleetflow.contracts.commands import CommandSpec

    device_id, credential = await active_device(api)
    orphan = await DeviceCommands(pool).create_command(
        "acme", device_id, new_id("orphan"), CommandSpec(name="reboot", expires_s=1), "none", "test"
    )
    assert orphan is not None
    url = f"/v1/devices/{device_id}/commands/{orphan.command_id}"
    await eventually(lambda: api.get(url, headers=AUTH), lambda r: r.json()["status"] == "expired")
    assert (await api.get("/v1/device/commands", headers=device_auth(credential))).json()["commands"] == []
    stored = await pool.fetchrow(
        """SELECT status, finished_at FROM device.commands
           WHERE tenant = 'acme' AND device_id = $1 AND command_id = $2""",
        device_id,
        orphan.command_id,
    )
    assert stored is not None and stored["status"] == "expired" and stored["finished_at"] is not None


async def test_a_campaign_job_ends_when_its_command_times_out_not_at_the_device_timeout(
    api: httpx.AsyncClient,
) -> None:
    """The device took the command and went silent: once the command has timed out no answer can
    move the job, and the campaign does not wait out a 10-minute device timeout for it."""
    creds = await fleet(api, 1)
    device_id, credential = next(iter(creds.items()))
    campaign = new_id("cc")
    body = command_campaign(campaign, [device_id], canary=1, device_timeout_s=600, retry_limit=0)
    body["command"]["timeout_s"] = 1
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202

    async def poll() -> list[dict[str, Any]]:
        handed: list[dict[str, Any]] = (
            await api.get("/v1/device/commands", headers=device_auth(credential))
        ).json()["commands"]
        return handed

    assert (await eventually(poll, bool))[0]["command_id"] == f"{campaign}~1"
    done = await eventually(
        lambda: api.get(f"/v1/rollouts/{campaign}", headers=AUTH),
        lambda r: r.json()["status"] in ("completed", "aborted"),
        60,
    )
    assert done.json()["counts"] == {"timed_out": 1}
