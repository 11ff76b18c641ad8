"""A bridge that stored a publish and lost its acknowledgement (killed between the commit and
the PUBACK): the broker delivers it again to the bridge's session (DUP), and it is stored once.
In-process bridges against Debian's Mosquitto; the first one's acknowledgements are dropped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from temporalio.client import Client

from fleetflow.db import Pool
from fleetflow.settings import Settings
from gateway.bridge import Bridge
from tests.integration.flows import active_device
from tests.integration.mqtt_support import Device
from tests.integration.test_mqtt_bridge import MOSQUITTO, Broker, stored
from tests.support import eventually

pytestmark = pytest.mark.skipif(
    MOSQUITTO is None, reason="Debian's mosquitto (the test broker) is not installed (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    running = Broker(tmp_path_factory.mktemp("mosquitto-redelivery"))
    try:
        yield running
    finally:
        running.stop()


async def test_a_stored_publish_whose_ack_was_lost_is_stored_once(
    api: httpx.AsyncClient,
    settings: Settings,
    pool: Pool,
    client: Client,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert settings.database_url
    here = settings.model_copy(update={"mqtt_broker_url": f"mqtt://127.0.0.1:{broker.port}"})
    device_id, _ = await active_device(api)
    first = Bridge(here, pool, client, settings.database_url, "bridge-redelivery", "-")
    monkeypatch.setattr(first.client, "ack", lambda _mid, _qos: None)  # stored, never acknowledged
    await first.start()
    await first.connected()
    device = Device(broker.port, device_id, "-")
    try:
        assert await device.connect() == 0
        name = f"tenants/acme/devices/{device_id}/telemetry"
        mids = [device.publish(name, json.dumps({"metric": "t", "value": v})) for v in range(5)]
        for mid in mids:
            assert await device.puback(mid) == 0
    finally:
        device.close()
    await eventually(lambda: asyncio.sleep(0, first.stored), lambda n: n >= 5)
    await first.stop()
    # the same client id: the session's unacknowledged publishes come again, DUP set
    second = Bridge(here, pool, client, settings.database_url, "bridge-redelivery", "-")
    await second.start()
    try:
        await eventually(lambda: asyncio.sleep(0, second.stored), lambda n: n >= 5)
    finally:
        await second.stop()
    want = [(device_id, float(v)) for v in range(5)]
    await eventually(lambda: stored(pool, [device_id]), lambda got: len(got) >= len(want), 120)
    await asyncio.sleep(1)
    assert await stored(pool, [device_id]) == want
