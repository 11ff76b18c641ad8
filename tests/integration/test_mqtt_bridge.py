"""`fleetflow mqtt-bridge` behind a real external broker: Debian's Mosquitto 2 (MQTT 5, shared
subscriptions, persistent sessions) stands in for EMQX (whose auth/ACL hooks are tested at the
API's endpoints). Two bridge processes share one subscription; readings are stored once each,
also across a SIGKILL of a bridge; pushes reach the device through the broker."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from activities.devices import DeviceService
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.e2e.stack import clean_env, pdeathsig_prefix
from tests.integration.flows import AUTH, active_device
from tests.integration.mqtt_support import Device
from tests.integration.test_alarms import START, Sensor
from tests.support import TEST_KEYS_DIR, bearer, eventually, free_port

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(
    MOSQUITTO is None, reason="Debian's mosquitto (the test broker) is not installed (.ci/run installs it)"
)


HOOK = bearer("platform", scopes=["mqtt:hooks"])


class Broker:
    """Mosquitto on a free port, anonymous (confinement is the EMQX ACL hook's job)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nmax_inflight_messages 0\n"
        )
        assert MOSQUITTO is not None
        self.process = subprocess.Popen([*pdeathsig_prefix(), MOSQUITTO, "-c", str(self.conf)])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


class BridgeProcess:
    """`fleetflow mqtt-bridge` with a stable client id; started() once it has subscribed."""

    def __init__(self, settings: Settings, broker: Broker, client_id: str, emqx_url: str = "") -> None:
        self.settings = settings
        self.broker = broker
        self.client_id = client_id
        self.emqx_url = emqx_url
        self.process: subprocess.Popen[str] | None = None
        self._connected = threading.Event()

    def start(self) -> None:
        assert self.settings.database_url
        extra = {}
        if self.emqx_url:
            extra = {
                "FLEETFLOW_EMQX_API_URL": self.emqx_url,
                "FLEETFLOW_EMQX_API_KEY": "bridge-key",
                "FLEETFLOW_EMQX_API_SECRET": "bridge-secret",
            }
        # its database sessions carry its client id, so a test can see them wait
        dsn = self.settings.database_url
        dsn += ("&" if "?" in dsn else "?") + f"application_name={self.client_id}"
        env = clean_env(
            DATABASE_URL=dsn,
            TEMPORAL_ADDRESS=self.settings.temporal_address,
            FLEETFLOW_KEYS_DIR=str(TEST_KEYS_DIR),
            FLEETFLOW_DATA_DIR=str(self.settings.data_dir),
            FLEETFLOW_MQTT_BROKER_URL=f"mqtt://127.0.0.1:{self.broker.port}",
            FLEETFLOW_MQTT_BRIDGE_TOKEN="anonymous-broker",
            FLEETFLOW_MQTT_BRIDGE_ID=self.client_id,
            FLEETFLOW_LOG_FORMAT="text",
            **extra,
        )
        self._connected.clear()
        argv = [*pdeathsig_prefix(), sys.executable, "-m", "cli.main", "mqtt-bridge"]
        self.process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            if f"bridge {self.client_id} connected" in line:
                self._connected.set()

    async def started(self) -> None:
        assert await asyncio.to_thread(self._connected.wait, 60), f"{self.client_id} did not connect"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    running = Broker(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield running
    finally:
        running.stop()


class EmqxApi:
    """A small HTTP server standing in for EMQX's REST API: records the kicks it is asked for;
    every client it is asked about is connected, an acme device (its `client_attrs.tenant`)
    logged in with the credential `jtis` names."""

    def __init__(self) -> None:
        self.kicks: list[tuple[str, str]] = []  # (path, Authorization header)
        self.jtis: dict[str, str] = {}  # client id -> the jti it logged in with
        kicks, jtis = self.kicks, self.jtis

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                client_id = self.path.rsplit("/", 1)[1]
                attrs = {"tenant": "acme", "jti": jtis.get(client_id, "")}
                body = json.dumps({"clientid": client_id, "client_attrs": attrs}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_DELETE(self) -> None:
                kicks.append((self.path, self.headers.get("Authorization", "")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def emqx_api() -> Iterator[EmqxApi]:
    api = EmqxApi()
    try:
        yield api
    finally:
        api.server.shutdown()


@pytest.fixture(scope="module")
async def bridges(settings: Settings, pool: Pool, broker: Broker, emqx_api: EmqxApi) -> Any:
    # one bridge kicks revoked devices (one is enough; more would only repeat the kick)
    pair = [
        BridgeProcess(settings, broker, f"bridge-test-{i}", emqx_api.url if i == 0 else "") for i in (0, 1)
    ]
    for bridge in pair:
        bridge.start()
    try:
        for bridge in pair:
            await bridge.started()
        yield pair
    finally:
        for bridge in pair:
            bridge.stop()


def base(device_id: str) -> str:
    return f"tenants/acme/devices/{device_id}"


async def stored(pool: Pool, device_ids: list[str]) -> list[tuple[str, float]]:
    rows = await pool.fetch(
        """SELECT device_id, value FROM data.readings WHERE tenant = 'acme' AND device_id = ANY($1)
           ORDER BY device_id, value""",
        device_ids,
    )
    return [(r["device_id"], r["value"]) for r in rows]


async def publish_all(device: Device, device_id: str, values: range) -> None:
    """QoS 1 readings, each acknowledged by the broker."""
    mids = [
        device.publish(f"{base(device_id)}/telemetry", json.dumps({"metric": "t", "value": v}))
        for v in values
    ]
    for mid in mids:
        assert await device.puback(mid) == 0


async def test_two_bridges_store_every_reading_once(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker, pool: Pool
) -> None:
    ids = [(await active_device(api))[0] for _ in range(3)]
    devices = [Device(broker.port, device_id, "-") for device_id in ids]
    try:
        for device in devices:
            assert await device.connect() == 0
        await asyncio.gather(*(publish_all(d, i, range(40)) for d, i in zip(devices, ids, strict=True)))
    finally:
        for device in devices:
            device.close()
    want = sorted((i, float(v)) for i in ids for v in range(40))
    await eventually(lambda: stored(pool, ids), lambda got: len(got) >= len(want), 120)
    await asyncio.sleep(1)  # a second copy, if any, would land by now
    assert await stored(pool, ids) == want


async def test_a_killed_bridge_loses_no_acknowledged_reading(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker, pool: Pool
) -> None:
    ids = [(await active_device(api))[0] for _ in range(2)]
    devices = [Device(broker.port, device_id, "-") for device_id in ids]
    victim = bridges[0]

    async def victim_waits() -> int:
        return int(
            await pool.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE application_name = $1 AND wait_event_type = 'Lock'""",
                victim.client_id,
            )
        )

    try:
        for device in devices:
            assert await device.connect() == 0
        async with pool.acquire() as holder:
            # the bridges' commits wait: what they received is in their hands, not stored
            held = holder.transaction()
            await held.start()
            try:
                await holder.execute("LOCK TABLE data.ingest_batches IN SHARE ROW EXCLUSIVE MODE")
                # every reading acknowledged to its device by the broker
                await asyncio.gather(
                    *(publish_all(d, i, range(100)) for d, i in zip(devices, ids, strict=True))
                )
                await eventually(victim_waits, lambda n: n > 0, 120)
                victim.kill()
            finally:
                await held.rollback()
        await asyncio.gather(*(publish_all(d, i, range(100, 150)) for d, i in zip(devices, ids, strict=True)))
    finally:
        for device in devices:
            device.close()
    victim.start()  # same client id: its persistent session, and what the broker kept for it
    await victim.started()
    want = sorted((i, float(v)) for i in ids for v in range(150))
    await eventually(lambda: stored(pool, ids), lambda got: len(got) >= len(want), 120)
    await asyncio.sleep(1)
    assert await stored(pool, ids) == want


async def test_a_desired_change_reaches_the_device_through_the_bridge(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker
) -> None:
    device_id, _ = await active_device(api)
    device = Device(broker.port, device_id, "-")
    try:
        assert await device.connect() == 0
        assert await device.subscribe(f"{base(device_id)}/twin/delta") == [1]
        answer = await api.patch(f"/v1/devices/{device_id}/twin/desired", json={"target_c": 23}, headers=AUTH)
        assert answer.status_code in (200, 202), answer.text
        message = await asyncio.to_thread(device.messages.get, True, 60)
        assert message.topic == f"{base(device_id)}/twin/delta"
        assert json.loads(message.payload)["delta"]["target_c"] == 23
    finally:
        device.close()


async def test_a_command_is_pushed_once_by_two_bridges(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker
) -> None:
    device_id, _ = await active_device(api)
    device = Device(broker.port, device_id, "-")
    try:
        assert await device.connect() == 0
        assert await device.subscribe(f"{base(device_id)}/commands") == [1]
        sent = await api.post(f"/v1/devices/{device_id}/commands", json={"name": "reboot"}, headers=AUTH)
        assert sent.status_code == 201, sent.text
        command_id = sent.json()["command_id"]
        message = await asyncio.to_thread(device.messages.get, True, 60)
        assert json.loads(message.payload)["command_id"] == command_id
        # the second bridge heard the same NOTIFY: a barrier command, then nothing in between
        again = await api.post(f"/v1/devices/{device_id}/commands", json={"name": "ping"}, headers=AUTH)
        barrier = json.loads((await asyncio.to_thread(device.messages.get, True, 60)).payload)
        assert barrier["command_id"] == again.json()["command_id"]
        assert device.messages.empty()
        status = await api.get(f"/v1/devices/{device_id}/commands/{command_id}", headers=AUTH)
        assert status.json()["status"] == "delivered"
    finally:
        device.close()


async def test_a_command_sent_before_the_subscription_comes_at_subscribe(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker
) -> None:
    """No subscriber when it was offered: the broker said so (PUBACK 0x10), the command stays
    pending, and the broker's session.subscribed event brings it."""
    device_id, _ = await active_device(api)
    sent = await api.post(f"/v1/devices/{device_id}/commands", json={"name": "reboot"}, headers=AUTH)
    assert sent.status_code == 201, sent.text
    command_id = sent.json()["command_id"]
    device = Device(broker.port, device_id, "-")
    try:
        assert await device.connect() == 0
        assert await device.subscribe(f"{base(device_id)}/commands") == [1]
        event = {
            "event": "session.subscribed",
            "clientid": device_id,
            "username": device_id,
            "tenant": "acme",
            "topic": f"{base(device_id)}/commands",
        }
        assert (await api.post("/v1/mqtt/events", json=event, headers=HOOK)).status_code == 204
        message = await asyncio.to_thread(device.messages.get, True, 60)
        assert json.loads(message.payload)["command_id"] == command_id
    finally:
        device.close()


async def test_a_command_nobody_subscribed_to_is_not_offered_round_and_round(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker, settings: Settings
) -> None:
    """The broker has no subscriber for it (PUBACK 0x10): the command is given back pending
    without a new offer, which brought it straight back to the bridges, for ever (190 offers in
    3 s, each a take, a publish and a give-back), until the device subscribes."""
    device_id, _ = await active_device(api)
    offers: list[str] = []
    listener = await asyncpg.connect(settings.database_url)
    await listener.add_listener(
        "device_command_offered", lambda *a: offers.append(str(a[3])) if device_id in str(a[3]) else None
    )
    other_id, _ = await active_device(api)
    other = Device(broker.port, other_id, "-")
    device = Device(broker.port, device_id, "-")
    try:
        sent = await api.post(f"/v1/devices/{device_id}/commands", json={"name": "reboot"}, headers=AUTH)
        assert sent.status_code == 201, sent.text
        # a barrier: a later command of a subscribed device, pushed by the same bridges
        assert await other.connect() == 0
        assert await other.subscribe(f"{base(other_id)}/commands") == [1]
        later = await api.post(f"/v1/devices/{other_id}/commands", json={"name": "ping"}, headers=AUTH)
        assert later.status_code == 201, later.text
        await asyncio.to_thread(other.messages.get, True, 60)
        assert len(offers) == 1, offers  # its own offer only
        # still pending: the device's subscription brings it
        assert await device.connect() == 0
        assert await device.subscribe(f"{base(device_id)}/commands") == [1]
        event = {
            "event": "session.subscribed",
            "clientid": device_id,
            "username": device_id,
            "tenant": "acme",
            "topic": f"{base(device_id)}/commands",
        }
        assert (await api.post("/v1/mqtt/events", json=event, headers=HOOK)).status_code == 204
        message = await asyncio.to_thread(device.messages.get, True, 60)
        assert json.loads(message.payload)["command_id"] == sent.json()["command_id"]
    finally:
        device.close()
        other.close()
        await listener.close()


async def test_a_command_a_killed_bridge_took_comes_when_it_runs_again(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker, settings: Settings, pool: Pool
) -> None:
    """A bridge killed between taking a command and the broker's PUBACK: the row names it
    (pushed_by), and its next run, with the same client id, gives it back and it is pushed."""
    device_id, _ = await active_device(api)
    sent = await api.post(f"/v1/devices/{device_id}/commands", json={"name": "reboot"}, headers=AUTH)
    assert sent.status_code == 201, sent.text
    command_id = sent.json()["command_id"]
    devices = DeviceService(pool, settings)
    # no subscriber yet: the running bridges give it back (PUBACK 0x10); take it as the killed
    # bridge did, for a device that is subscribed by the time it would have been published
    killed = BridgeProcess(settings, broker, "bridge-killed")

    async def take() -> list[str]:
        taken = await devices.take_commands("acme", device_id, 10, f"bridge:{killed.client_id}")
        return [c.command_id for c in taken]

    await eventually(take, lambda ids: ids == [command_id])
    device = Device(broker.port, device_id, "-")
    try:
        assert await device.connect() == 0
        assert await device.subscribe(f"{base(device_id)}/commands") == [1]
        killed.start()
        await killed.started()
        message = await asyncio.to_thread(device.messages.get, True, 60)
        assert json.loads(message.payload)["command_id"] == command_id
        # the broker's PUBACK: the row no longer names a bridge (no later restart pushes it again)
        await eventually(
            lambda: pool.fetchval(
                "SELECT pushed_by FROM device.commands WHERE tenant = 'acme' AND command_id = $1", command_id
            ),
            lambda by: by is None,
        )
    finally:
        device.close()
        killed.stop()


async def test_a_revoked_credential_kicks_the_device_from_the_broker(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], emqx_api: EmqxApi, pool: Pool
) -> None:
    device_id, _ = await active_device(api)
    other_id, _ = await active_device(api)
    emqx_api.jtis[device_id] = await pool.fetchval(
        "SELECT jti FROM device.credentials WHERE tenant = 'acme' AND device_id = $1 AND revoked_at IS NULL",
        device_id,
    )
    await pool.execute("UPDATE device.credentials SET revoked_at = now() WHERE device_id = $1", device_id)
    basic = "Basic " + base64.b64encode(b"bridge-key:bridge-secret").decode()
    await eventually(lambda: _kicks(emqx_api), lambda k: (f"/api/v5/clients/{device_id}", basic) in k)
    assert not any(other_id in path for path, _ in emqx_api.kicks)


async def _kicks(emqx_api: EmqxApi) -> list[tuple[str, str]]:
    return list(emqx_api.kicks)


async def test_a_reading_bridged_from_the_broker_raises_its_threshold_alert_while_its_window_waits(
    api: httpx.AsyncClient, bridges: list[BridgeProcess], broker: Broker, pool: Pool, backlog: asyncio.Event
) -> None:
    # as through the embedded gateway (api/early_alerts.py): a threshold rule's reading does
    # not cut its window's fill short, so its alert must not wait for that window
    s = await Sensor(api, pool).start()
    device = Device(broker.port, s.device_id, "-")
    try:
        assert await device.connect() == 0
        reading = {"metric": s.metric, "value": 33, "ts": START.isoformat()}
        assert await device.puback(device.publish(f"{base(s.device_id)}/telemetry", json.dumps(reading))) == 0
    finally:
        device.close()
    [alert] = await eventually(s.alerts, lambda a: len(a) == 1, 60)
    assert (alert["status"], alert["raised_value"]) == ("open", 33)
    stored_readings = await pool.fetchval(
        "SELECT count(*) FROM data.readings WHERE tenant = 'acme' AND device_id = $1", s.device_id
    )
    assert stored_readings == 0  # its window is not stored yet
