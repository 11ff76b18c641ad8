"""`fleetflow up` serves MQTT: a device makes first contact by CONNECT, and its QoS 1 readings
are stored once each across a SIGKILL of the MQTT process (which the supervisor replaces) and
of the data worker."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.stack import Stack, cmdline, eventually, json_of, wait_gone_async
from tests.integration.mqtt_support import Device

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-mqtt")
    stack = Stack(data_dir=root / "data", log_dir=root)
    stack.start()
    try:
        yield stack
    finally:
        stack.shutdown()


def _mqtt_process(stack: Stack) -> psutil.Process | None:
    found = [c for c in stack.children() if cmdline(c)[-1:] == ["mqtt"]]
    return found[0] if found else None


async def test_up_serves_mqtt_and_survives_a_killed_mqtt_process(stack: Stack) -> None:
    await stack.wait_healthy()
    device_id = f"e2e-{uuid.uuid4().hex[:10]}"
    admin = stack.admin_headers()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        accepted = await http.post(
            "/v1/devices", json={"device_id": device_id, "device_type": "thermostat"}, headers=admin
        )
        assert accepted.status_code == 202, accepted.text
        status_url = accepted.json()["status_url"]
        waiting = await eventually(
            lambda: json_of(http, status_url, admin),
            lambda p: p.get("status") == "awaiting_first_contact",
            60,
            "awaiting_first_contact",
        )
        device = Device(stack.mqtt_port, device_id, waiting["credential"], v5=False, clean=False)
        count = 300
        try:
            assert await device.connect() == 0  # the first contact
            await eventually(
                lambda: json_of(http, status_url, admin),
                lambda p: p.get("status") == "completed",
                60,
                "active",
            )
            device.client.reconnect_delay_set(1, 1)
            topic = f"tenants/default/devices/{device_id}/telemetry"
            mids = [device.publish(topic, json.dumps({"metric": "t", "value": i})) for i in range(count)]
            await device.puback(mids[count // 3])
            victim = _mqtt_process(stack)
            assert victim is not None
            victim.send_signal(signal.SIGKILL)
            assert await wait_gone_async([victim]) == []
            for mid in mids:  # redelivered to the replacement the supervisor starts
                assert await device.puback(mid, timeout=120) == 0
            # acknowledged is durable: the data worker killed now loses none of them either
            data_worker = stack.worker("data")
            data_worker.send_signal(signal.SIGKILL)
            assert await wait_gone_async([data_worker]) == []
        finally:
            device.close()
        replacement = _mqtt_process(stack)
        assert replacement is not None and replacement.pid != victim.pid

        async def readings() -> list[Any]:
            body = await json_of(http, f"/v1/devices/{device_id}/telemetry?limit=10000", admin)
            return list(body["points"])

        points = await eventually(readings, lambda p: len(p) >= count, 120, f"{count} readings")
        assert sorted(p["value"] for p in points) == [float(i) for i in range(count)]
