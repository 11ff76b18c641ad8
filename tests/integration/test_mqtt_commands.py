"""Device commands over MQTT: pushed on `commands` when offered and at SUBSCRIBE, answered on
`commands/{command_id}/result`, the caller reading the result over HTTP."""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from activities.devices import DeviceService
from fleetflow.contracts.commands import DeviceCommandView
from fleetflow.db import Pool
from fleetflow.settings import Settings
from gateway.commands import CommandPush
from tests.integration.flows import AUTH, fleet, new_id
from tests.integration.mqtt_support import Device, GatewayProcess, RawDevice, gateway_process
from tests.support import eventually

NOT_AUTHORIZED = 0x87
NO_MATCHING = 0x10
REFUSED = 0x80
PAYLOAD_INVALID = 0x99


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool) -> Iterator[GatewayProcess]:
    yield from gateway_process(settings)


def base(device_id: str) -> str:
    return f"tenants/acme/devices/{device_id}/commands"


async def send(api: httpx.AsyncClient, device_id: str, **body: Any) -> dict[str, Any]:
    body.setdefault("name", "reboot")
    response = await api.post(f"/v1/devices/{device_id}/commands", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def command_of(api: httpx.AsyncClient, device_id: str, command_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/devices/{device_id}/commands/{command_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def pushed(device: Device, timeout: float = 60) -> tuple[str, dict[str, Any]]:
    message = await asyncio.to_thread(device.messages.get, True, timeout)
    return message.topic, json.loads(message.payload)


async def answer(device: Device, device_id: str, command_id: str, body: Any) -> int:
    raw = body if isinstance(body, str) else json.dumps(body)
    return await device.puback(device.publish(f"{base(device_id)}/{command_id}/result", raw))


async def test_connected_device_gets_its_command_pushed_and_answers_over_mqtt(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    creds = await fleet(api, 2)
    (own_id, own_cred), (other_id, other_cred) = list(creds.items())
    device = Device(gateway.port, own_id, own_cred)
    other = Device(gateway.port, other_id, other_cred)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(base(own_id)) == [1]
        assert await other.connect() == 0
        # another device can neither receive nor answer it
        assert await other.subscribe(base(own_id)) == [NOT_AUTHORIZED]
        assert await other.subscribe("tenants/acme/devices/+/commands") == [NOT_AUTHORIZED]
        assert await other.subscribe(base(other_id)) == [1]

        command = await send(api, own_id, params={"delay_s": 5}, timeout_s=60)
        command_id = command["command_id"]
        name, doc = await pushed(device)  # pushed: the device never polled
        assert name == base(own_id)
        assert doc["command_id"] == command_id and doc["name"] == "reboot"
        assert doc["params"] == {"delay_s": 5} and doc["timeout_s"] == 60
        assert doc["expires_at"] and doc["delivered_at"]
        assert (await command_of(api, own_id, command_id))["status"] == "delivered"
        # delivered once: the HTTP poll does not hand it out again
        poll = await api.get("/v1/device/commands", headers={"Authorization": f"Bearer {own_cred}"})
        assert poll.json()["commands"] == []

        outside = other.publish(f"{base(own_id)}/{command_id}/result", json.dumps({"status": "failed"}))
        assert await other.puback(outside) == NOT_AUTHORIZED
        assert await answer(other, other_id, command_id, {"status": "failed"}) == NO_MATCHING

        assert await answer(device, own_id, command_id, "not json") == PAYLOAD_INVALID
        assert await answer(device, own_id, command_id, {"status": "done"}) == PAYLOAD_INVALID
        assert await answer(device, own_id, command_id, {"status": "failed", "extra": 1}) == PAYLOAD_INVALID
        big = {"status": "succeeded", "result": {"blob": "x" * 20000}}
        assert await answer(device, own_id, command_id, big) == PAYLOAD_INVALID
        assert (await command_of(api, own_id, command_id))["status"] == "delivered"

        result = {"status": "succeeded", "result": {"uptime_s": 3}}
        assert await answer(device, own_id, command_id, result) == 0
        # a redelivery of the same answer (its PUBACK lost) is accepted; another is refused
        assert await answer(device, own_id, command_id, result) == 0
        assert await answer(device, own_id, command_id, {"status": "failed"}) == REFUSED
        assert other.messages.empty()
    finally:
        device.close()
        other.close()
    done = await command_of(api, own_id, command_id)
    assert done["status"] == "succeeded" and done["result"] == {"uptime_s": 3}
    assert done["finished_at"]


async def test_command_sent_while_offline_is_pushed_at_subscribe(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    first = await send(api, device_id, name="first")
    second = await send(api, device_id, name="second")
    device = Device(gateway.port, device_id, credential)
    try:
        assert await device.connect() == 0
        with pytest.raises(queue.Empty):  # nothing before the device subscribes
            device.messages.get(True, 1)
        assert await device.subscribe(f"tenants/acme/devices/{device_id}/#") == [1]
        got = [(await pushed(device))[1] for _ in range(2)]
        assert [(c["command_id"], c["name"]) for c in got] == [
            (first["command_id"], "first"),
            (second["command_id"], "second"),
        ]
        assert await answer(device, device_id, first["command_id"], {"status": "failed"}) == 0
    finally:
        device.close()
    assert (await command_of(api, device_id, first["command_id"]))["status"] == "failed"
    assert (await command_of(api, device_id, second["command_id"]))["status"] == "delivered"


async def test_late_answer_is_refused_and_changes_nothing(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    device = Device(gateway.port, device_id, credential)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(base(device_id)) == [1]
        command = await send(api, device_id, timeout_s=1)
        _, doc = await pushed(device)
        assert doc["command_id"] == command["command_id"]

        async def status() -> dict[str, Any]:
            return await command_of(api, device_id, command["command_id"])

        await eventually(status, lambda c: c["status"] == "timed_out", 60)
        late = {"status": "succeeded", "result": {"too": "late"}}
        assert await answer(device, device_id, command["command_id"], late) == REFUSED
    finally:
        device.close()
    after = await command_of(api, device_id, command["command_id"])
    assert after["status"] == "timed_out" and after["result"] is None


async def test_push_and_http_poll_never_deliver_the_same_command(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    device_auth = {"Authorization": f"Bearer {credential}"}
    device = Device(gateway.port, device_id, credential)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(base(device_id)) == [1]
        poll = asyncio.create_task(api.get("/v1/device/commands", params={"wait": 5}, headers=device_auth))
        sent = await asyncio.gather(*(send(api, device_id, name=f"c{i}") for i in range(8)))
        by_http = [c["command_id"] for c in (await poll).json()["commands"]]
        by_http += [
            c["command_id"]
            for c in (await api.get("/v1/device/commands", headers=device_auth)).json()["commands"]
        ]
        by_mqtt: list[str] = []
        while len(by_http) + len(by_mqtt) < len(sent):
            by_mqtt.append((await pushed(device))[1]["command_id"])
        await asyncio.sleep(1)  # a duplicate push would arrive meanwhile
        while not device.messages.empty():
            by_mqtt.append(json.loads(device.messages.get().payload)["command_id"])
    finally:
        device.close()
    delivered = by_http + by_mqtt
    assert sorted(delivered) == sorted(c["command_id"] for c in sent)


async def test_a_command_campaign_reaches_a_connected_device_over_mqtt(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    device = Device(gateway.port, device_id, credential)
    campaign = new_id("cc")
    try:
        assert await device.connect() == 0
        assert await device.subscribe(base(device_id)) == [1]
        body = {
            "campaign_id": campaign,
            "device_type": "sensor",
            "command": {"name": "calibrate", "params": {"ref": 1.5}, "timeout_s": 30},
            "target": {"device_ids": [device_id]},
            "policy": {"rate_per_minute": 60000},
        }
        started = await api.post("/v1/rollouts", json=body, headers=AUTH)
        assert started.status_code == 202, started.text
        _, doc = await pushed(device)
        assert doc["name"] == "calibrate" and doc["command_id"].startswith(campaign)
        result = {"status": "succeeded", "result": {"echo": doc["params"]}}
        assert await answer(device, device_id, doc["command_id"], result) == 0
    finally:
        device.close()
    done = await eventually(
        lambda: api.get(f"/v1/rollouts/{campaign}", headers=AUTH),
        lambda r: r.json()["status"] == "completed",
        60,
    )
    assert done.json()["counts"] == {"succeeded": 1}
    outcomes = (await api.get(f"/v1/rollouts/{campaign}/devices", headers=AUTH)).json()
    assert [(o["state"], o["result"]) for o in outcomes] == [("succeeded", {"echo": {"ref": 1.5}})]


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class _Connection:
    """A device's connection that another gateway takes over while its commands are taken."""

    def __init__(self, tenant: str, device_id: str) -> None:
        self.claims = SimpleNamespace(tenant=tenant, device_id=device_id)
        self.subscriptions = {f"tenants/{tenant}/devices/{device_id}/#": 1}
        self.transport = _Transport()
        self.sent: list[str] = []

    def qos_for(self, topic: str) -> int:
        return 1

    def room(self) -> int:
        return 20

    def push(self, topic: str, payload: bytes, retain: bool = False, **callbacks: Any) -> None:
        if not self.transport.closing:
            self.sent.append(topic)


async def test_commands_taken_while_the_connection_is_taken_over_stay_pending(
    api: httpx.AsyncClient, pool: Pool, settings: Settings, client: Client
) -> None:
    device_id = next(iter((await fleet(api, 1)).keys()))
    command = await send(api, device_id)
    conn = _Connection("acme", device_id)

    devices = DeviceService(pool, settings, client)
    take = devices.take_commands

    async def taken_over(
        tenant: str, device_id: str, limit: int, pushed_by: str | None = None
    ) -> list[DeviceCommandView]:
        taken = await take(tenant, device_id, limit, pushed_by)
        conn.transport.closing = True  # the takeover closes it during the take
        return taken

    devices.take_commands = taken_over
    await CommandPush(devices, client).push(conn)  # type: ignore[arg-type]
    assert conn.sent == []
    # the next connection (or an HTTP poll) gets it
    assert (await command_of(api, device_id, command["command_id"]))["status"] == "pending"


async def test_command_is_pushed_at_qos_1_and_delivered_once_acknowledged(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    device = Device(gateway.port, device_id, credential)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(base(device_id), qos=1) == [1]
        command = await send(api, device_id)
        message = await asyncio.to_thread(device.messages.get, True, 60)
        assert message.qos == 1  # the subscription's QoS: kept by the gateway until the PUBACK
        assert json.loads(message.payload)["command_id"] == command["command_id"]
        assert (await command_of(api, device_id, command["command_id"]))["status"] == "delivered"
    finally:
        device.close()


async def test_command_not_acknowledged_before_the_connection_dies_is_delivered_again_once(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    raw = RawDevice(gateway.port, device_id, credential)
    assert await raw.connect() == 0
    assert await raw.subscribe(base(device_id), qos=1) == [1]
    command = await send(api, device_id)
    command_id = command["command_id"]
    pushed_once = await raw.next_publish()
    assert pushed_once.qos == 1 and pushed_once.packet_id
    assert json.loads(pushed_once.payload)["command_id"] == command_id
    raw.drop()  # no PUBACK: the device may never have seen it

    async def status() -> str:
        return str((await command_of(api, device_id, command_id))["status"])

    assert await eventually(status, lambda s: s == "pending") == "pending"  # given back
    device = Device(gateway.port, device_id, credential)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(base(device_id), qos=1) == [1]
        name, doc = await pushed(device)
        assert name == base(device_id) and doc["command_id"] == command_id
        assert await status() == "delivered"
        assert await answer(device, device_id, command_id, {"status": "succeeded"}) == 0
        with pytest.raises(queue.Empty):  # once: not pushed again
            device.messages.get(True, 2)
    finally:
        device.close()
    assert await status() == "succeeded"


async def test_unacknowledged_pushes_are_capped_by_the_receive_maximum(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    sent = [(await send(api, device_id, name=f"c{i}"))["command_id"] for i in range(3)]
    raw = RawDevice(gateway.port, device_id, credential, receive_maximum=2)
    try:
        assert await raw.connect() == 0
        assert await raw.subscribe(base(device_id), qos=1) == [1]
        first, second = await raw.next_publish(), await raw.next_publish()
        got = [json.loads(p.payload)["command_id"] for p in (first, second)]
        assert got == sent[:2]
        # the third waits for room, pending (an HTTP poll could still take it)
        assert (await command_of(api, device_id, sent[2]))["status"] == "pending"
        with pytest.raises(TimeoutError):
            await raw.next_publish(timeout=2)
        assert first.packet_id is not None
        raw.puback(first.packet_id)
        third = await raw.next_publish()
        assert json.loads(third.payload)["command_id"] == sent[2]
    finally:
        raw.drop()
    # the two never acknowledged are pending again; the acknowledged one is delivered

    async def statuses() -> list[str]:
        return [str((await command_of(api, device_id, c))["status"]) for c in sent]

    assert await eventually(statuses, lambda s: s == ["delivered", "pending", "pending"])


async def test_command_in_flight_when_the_gateway_is_killed_is_given_back_at_its_restart(
    api: httpx.AsyncClient, settings: Settings, pool: Pool
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    gateway = GatewayProcess(settings)
    await asyncio.to_thread(gateway.start)
    try:
        raw = RawDevice(gateway.port, device_id, credential)
        assert await raw.connect() == 0
        assert await raw.subscribe(base(device_id), qos=1) == [1]
        command_id = (await send(api, device_id))["command_id"]
        assert json.loads((await raw.next_publish()).payload)["command_id"] == command_id
        await asyncio.to_thread(gateway.kill)  # before the PUBACK: nothing of it cleans up
        raw.drop()
        assert (await command_of(api, device_id, command_id))["status"] == "delivered"
        await asyncio.to_thread(gateway.start)  # the same node (host and port) starts again
        assert (await command_of(api, device_id, command_id))["status"] == "pending"
        device = Device(gateway.port, device_id, credential)
        try:
            assert await device.connect() == 0
            assert await device.subscribe(base(device_id), qos=1) == [1]
            assert (await pushed(device))[1]["command_id"] == command_id

            async def pushed_by() -> object:
                query = "SELECT pushed_by FROM device.commands WHERE device_id = $1 AND command_id = $2"
                return await pool.fetchval(query, device_id, command_id)

            # acknowledged: a later restart gives nothing back
            assert await eventually(pushed_by, lambda by: by is None) is None
        finally:
            device.close()
    finally:
        await asyncio.to_thread(gateway.stop)
    assert (await command_of(api, device_id, command_id))["status"] == "delivered"


async def test_command_unacknowledged_on_a_connection_taken_over_goes_to_the_new_one(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    raw = RawDevice(gateway.port, device_id, credential)
    assert await raw.connect() == 0
    assert await raw.subscribe(base(device_id), qos=1) == [1]
    command_id = (await send(api, device_id))["command_id"]
    assert json.loads((await raw.next_publish()).payload)["command_id"] == command_id
    # the device comes back on a new connection (a new network, say) while the old one
    # still holds the push: the takeover gives it back, and the new connection gets it
    device = Device(gateway.port, device_id, credential)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(base(device_id), qos=1) == [1]
        assert (await pushed(device))[1]["command_id"] == command_id
        with pytest.raises(queue.Empty):  # once
            device.messages.get(True, 2)
    finally:
        device.close()
        raw.drop()


async def test_commands_unacknowledged_when_the_gateway_stops_are_pending_again(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    device_id, credential = next(iter((await fleet(api, 1)).items()))
    gateway = GatewayProcess(settings)
    await asyncio.to_thread(gateway.start)
    try:
        raw = RawDevice(gateway.port, device_id, credential)
        assert await raw.connect() == 0
        assert await raw.subscribe(base(device_id), qos=1) == [1]
        command_id = (await send(api, device_id))["command_id"]
        assert json.loads((await raw.next_publish()).payload)["command_id"] == command_id
    finally:
        await asyncio.to_thread(gateway.stop)  # SIGTERM: a clean stop, no restart after it
    raw.drop()
    assert (await command_of(api, device_id, command_id))["status"] == "pending"
