"""MQTT over TLS: the gateway's second listener, with the plain one turned off
(FLEETFLOW_MQTT_PORT=0), a certificate made by a test CA, the same login as over plain MQTT."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import active_device
from tests.integration.mqtt_support import Device, GatewayProcess
from tests.support import eventually, free_port
from tests.tls_support import MadeCA, make_ca

NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mqtt-tls")


@pytest.fixture(scope="module")
def ca(tls_dir: Path) -> MadeCA:
    return make_ca(tls_dir / "trusted")


@pytest.fixture(scope="module")
def gateway(settings: Settings, pool: Pool, ca: MadeCA) -> Iterator[GatewayProcess]:
    tls_port = free_port()
    env = {
        "FLEETFLOW_MQTT_TLS_PORT": str(tls_port),
        "FLEETFLOW_MQTT_TLS_CERT": str(ca.cert),
        "FLEETFLOW_MQTT_TLS_KEY": str(ca.key),
    }
    # port 0: no plain listener, TLS only
    gateway = GatewayProcess(settings, port=0, env=env, wait_port=tls_port)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def tls_port(gateway: GatewayProcess) -> int:
    return int(gateway.env["FLEETFLOW_MQTT_TLS_PORT"])


async def readings_of(pool: Pool, device_id: str) -> list[float]:
    rows = await pool.fetch("SELECT value FROM data.readings WHERE device_id = $1", device_id)
    return sorted(r["value"] for r in rows)


async def test_paho_over_tls_logs_in_with_its_credential_and_publishes(
    api: httpx.AsyncClient, gateway: GatewayProcess, ca: MadeCA, pool: Pool
) -> None:
    device_id, credential = await active_device(api)
    wrong = Device(tls_port(gateway), device_id, "not-the-credential", ca=ca.ca)
    try:
        assert await wrong.connect() == NOT_AUTHORIZED  # the same login as the plain listener
    finally:
        wrong.close()
    device = Device(tls_port(gateway), device_id, credential, ca=ca.ca)
    try:
        assert await device.connect() == 0
        base = f"tenants/acme/devices/{device_id}"
        mid = device.publish(f"{base}/telemetry", json.dumps({"metric": "temperature", "value": 7.5}))
        assert await device.puback(mid) == 0
        # confined as over plain MQTT
        outside = device.publish(
            "tenants/acme/devices/other/telemetry", json.dumps({"metric": "t", "value": 1})
        )
        assert await device.puback(outside) == NOT_AUTHORIZED
    finally:
        device.close()
    assert await eventually(lambda: readings_of(pool, device_id), bool) == [7.5]


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
async def test_mosquitto_pub_with_cafile_publishes_over_tls(
    api: httpx.AsyncClient, gateway: GatewayProcess, ca: MadeCA, pool: Pool
) -> None:
    device_id, credential = await active_device(api)
    reading = json.dumps({"metric": "temperature", "value": 21.4})
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *("-h", "127.0.0.1", "-p", str(tls_port(gateway)), "--cafile", str(ca.ca)),
        *("-i", device_id, "-u", device_id, "-P", credential, "-q", "1"),
        *("-t", f"tenants/acme/devices/{device_id}/telemetry", "-m", reading),
    )
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert await eventually(lambda: readings_of(pool, device_id), bool) == [21.4]


async def test_client_that_does_not_trust_the_ca_fails_the_handshake(
    gateway: GatewayProcess, tls_dir: Path
) -> None:
    other = make_ca(tls_dir / "other", "another CA")  # trusts another CA, not the server's
    context = ssl.create_default_context(cafile=str(other.ca))

    def handshake() -> None:
        with socket.create_connection(("127.0.0.1", tls_port(gateway)), timeout=30) as raw:
            context.wrap_socket(raw, server_hostname="127.0.0.1").close()

    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(handshake)


async def test_plaintext_client_on_the_tls_port_gets_no_connack(
    api: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    device_id, credential = await active_device(api)

    def text(value: str) -> bytes:
        raw = value.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = text("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
    body += text(device_id) + text(device_id) + text(credential)
    assert len(body) < 16384
    length = len(body)
    encoded = bytes([length % 128 | 0x80, length // 128]) if length >= 128 else bytes([length])
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_port(gateway))
    try:
        writer.write(bytes([0x10]) + encoded + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)  # until the gateway closes
    finally:
        writer.close()
    assert not answer.startswith(b"\x20")  # no CONNACK: at most a TLS alert, then closed


async def test_client_ca_requires_a_client_certificate_besides_the_credential(
    api: httpx.AsyncClient, settings: Settings, ca: MadeCA, tls_dir: Path
) -> None:
    clients = make_ca(tls_dir / "clients", "device CA")  # signs the devices' certificates
    port = free_port()
    env = {
        "FLEETFLOW_MQTT_TLS_PORT": str(port),
        "FLEETFLOW_MQTT_TLS_CERT": str(ca.cert),
        "FLEETFLOW_MQTT_TLS_KEY": str(ca.key),
        "FLEETFLOW_MQTT_TLS_CA": str(clients.ca),
    }
    gateway = GatewayProcess(settings, port=0, env=env, wait_port=port)
    await asyncio.to_thread(gateway.start)
    try:
        device_id, credential = await active_device(api)
        without = Device(port, device_id, credential, ca=ca.ca)
        try:  # no client certificate: the handshake (or the first read after it) fails
            with pytest.raises((ssl.SSLError, OSError, TimeoutError, queue.Empty)):
                await without.connect(timeout=10)
        finally:
            without.close()
        mine = (clients.cert, clients.key)
        device = Device(port, device_id, credential, ca=ca.ca, client_cert=mine)
        try:
            assert await device.connect() == 0
        finally:
            device.close()
        wrong = Device(
            port, device_id, "not-the-credential", ca=ca.ca, client_cert=(clients.cert, clients.key)
        )
        try:  # a certificate alone does not log in
            assert await wrong.connect() == NOT_AUTHORIZED
        finally:
            wrong.close()
    finally:
        await asyncio.to_thread(gateway.stop)
