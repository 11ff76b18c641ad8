"""The bridge's stop while paho's network thread waits for room to hand a message over
(MAX_HANDLING publishes in hand: the database away, a QoS 0 flood): stop joins that thread,
which waited for the event loop stop held, so neither went on (a SIGTERM never ended)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as paho
from temporalio.client import Client

from fleetflow.settings import Settings
from gateway.bridge import Bridge


async def test_the_bridges_stop_ends_while_pahos_thread_waits_for_room(tmp_path: Path) -> None:
    settings = Settings(keys_dir=tmp_path, mqtt_broker_url="mqtt://127.0.0.1:1")
    bridge = Bridge(settings, cast(Any, None), cast(Client, None), "", "bridge-1", "secret")
    bridge._loop = asyncio.get_running_loop()
    bridge._handling = threading.BoundedSemaphore(1)
    bridge._handling.acquire()  # every slot in hand
    msg = paho.MQTTMessage(mid=1, topic=b"tenants/acme/devices/d1/telemetry")
    network = threading.Thread(target=bridge._on_message, args=(bridge.client, None, msg), daemon=True)
    network.start()
    bridge.client._thread = network  # paho's network thread, as loop_start() leaves it
    rescued: list[bool] = []

    def rescue() -> None:  # without it the test hung with its loop, as the bridge did
        rescued.append(True)
        bridge._handling.release()

    watchdog = threading.Timer(60, rescue)
    watchdog.start()
    try:
        await bridge.stop()
    finally:
        watchdog.cancel()
    assert not rescued  # stop ended on its own
    assert not network.is_alive()
