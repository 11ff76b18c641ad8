"""MQTT test support: the gateway as its own process (so a test can SIGKILL it), and a paho
client with waits the async tests can await."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetflow.settings import Settings
from gateway import codec
from tests.e2e.stack import clean_env, pdeathsig_prefix
from tests.support import TEST_KEYS_DIR, free_port


@dataclass
class GatewayProcess:
    """`fleetflow mqtt` on a free port, against the session's database and Temporal."""

    settings: Settings
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # more settings (the TLS listener's)
    wait_port: int | None = None  # the port that says it listens (default: port)

    def start(self) -> None:
        """Start it and wait until it accepts connections."""
        assert self.settings.database_url
        env = clean_env(
            DATABASE_URL=self.settings.database_url,
            TEMPORAL_ADDRESS=self.settings.temporal_address,
            FLEETFLOW_KEYS_DIR=str(TEST_KEYS_DIR),
            FLEETFLOW_DATA_DIR=str(self.settings.data_dir),
            FLEETFLOW_MQTT_PORT=str(self.port),
            FLEETFLOW_LOG_FORMAT="text",
            **self.env,
        )
        argv = [*pdeathsig_prefix(), sys.executable, "-m", "cli.main", "mqtt"]
        self.process = subprocess.Popen(argv, env=env)
        import socket
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fleetflow mqtt exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.wait_port or self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("fleetflow mqtt did not listen within 60 s")

    def kill(self) -> None:
        """SIGKILL: nothing of it gets to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def gateway_process(settings: Settings) -> Iterator[GatewayProcess]:
    """A running gateway process, stopped afterwards (fixture body)."""
    gateway = GatewayProcess(settings)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


class Device:
    """A paho client of one device, with its events in queues."""

    def __init__(
        self,
        port: int,
        device_id: str,
        password: str,
        *,
        v5: bool = True,
        clean: bool = True,
        keep_alive: int = 60,
        client_id: str | None = None,
        username: str | None = None,
        ca: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.port = port
        self.keep_alive = keep_alive
        self.v5 = v5
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": clean}
        self.clean = clean
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id if client_id is None else client_id,
            protocol=protocol,
            **kwargs,
        )
        self.client.username_pw_set(device_id if username is None else username, password)
        if ca is not None:  # MQTT over TLS, trusting that CA only
            cert, key = client_cert if client_cert is not None else (None, None)
            self.client.tls_set(
                ca_certs=str(ca),
                certfile=None if cert is None else str(cert),
                keyfile=None if key is None else str(key),
            )
        self.connacks: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda _c, _u, m: self.messages.put(m)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connacks.put(rc.value)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.disconnects.put(rc.value)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self.subacks.put([c.value for c in codes])

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._acked:
            self.acks[mid] = rc.value
            self._acked.notify_all()

    async def connect(self, timeout: float = 30) -> int:
        """CONNECT; the CONNACK code (paho's value for 3.1.1 return codes too)."""
        kwargs: dict[str, Any] = {"keepalive": self.keep_alive}
        if self.v5:
            kwargs["clean_start"] = self.clean
            if not self.clean:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 3600
                kwargs["properties"] = props
        self.client.connect("127.0.0.1", self.port, **kwargs)
        self.client.loop_start()
        return await asyncio.to_thread(self.connacks.get, True, timeout)

    async def next_disconnect(self, timeout: float = 30) -> int:
        """The reason of the next disconnection."""
        return await asyncio.to_thread(self.disconnects.get, True, timeout)

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 30) -> list[int]:
        """SUBSCRIBE; the SUBACK codes."""
        self.client.subscribe(topic, qos)
        return await asyncio.to_thread(self.subacks.get, True, timeout)

    def publish(self, topic: str, payload: str | bytes, qos: int = 1) -> int:
        """PUBLISH; its message id."""
        info = self.client.publish(topic, payload, qos)
        return int(info.mid)

    async def puback(self, mid: int, timeout: float = 30) -> int:
        """The PUBACK reason code of message mid (0: success)."""

        def wait() -> int:
            with self._acked:
                if not self._acked.wait_for(lambda: mid in self.acks, timeout):
                    raise TimeoutError(f"no PUBACK for message {mid}")
                return self.acks[mid]

        return await asyncio.to_thread(wait)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


async def raw_connack_311(port: int, client_id: str, username: str, password: str) -> int:
    """The return code byte of the CONNACK an MQTT 3.1.1 CONNECT gets (as on the wire)."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = text("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
    body += text(client_id) + text(username) + text(password)
    length = len(body)
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(bytes([0x10]) + bytes(encoded) + body)
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), 30)
        assert connack[0] == 0x20, connack
        return connack[3]
    finally:
        writer.close()


class RawDevice:
    """An MQTT client on a bare socket that acknowledges nothing unless told: what paho cannot
    be made to do (keep a QoS 1 publish unacknowledged). Packets read with gateway/codec.py."""

    def __init__(self, port: int, device_id: str, password: str, *, receive_maximum: int | None = None):
        self.port = port
        self.device_id = device_id
        self.password = password
        self.receive_maximum = receive_maximum
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()

    _text = staticmethod(codec.text)
    _packet = staticmethod(codec.packet)

    async def connect(self) -> int:
        """CONNECT (5.0, clean start, Receive Maximum when given); the CONNACK reason code."""
        props = (
            b"" if self.receive_maximum is None else bytes([0x21]) + self.receive_maximum.to_bytes(2, "big")
        )
        body = self._text("MQTT") + bytes([5, 0xC2]) + (60).to_bytes(2, "big")
        body += bytes([len(props)]) + props
        body += self._text(self.device_id) + self._text(self.device_id) + self._text(self.password)
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(self._packet(0x10, body))
        kind, _flags, packet = await self.next_packet()
        assert kind == codec.CONNACK, kind
        return packet[1]

    async def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        """SUBSCRIBE one filter; the SUBACK codes."""
        assert self.writer is not None
        self.writer.write(
            self._packet(0x82, (1).to_bytes(2, "big") + b"\x00" + self._text(topic) + bytes([qos]))
        )
        kind, _flags, packet = await self.next_packet()
        assert kind == codec.SUBACK, kind
        return list(packet[3:])

    async def next_packet(self, timeout: float = 60) -> tuple[int, int, bytes]:
        """(type, flags, body) of the next packet from the gateway."""
        assert self.reader is not None
        while True:
            found = codec.split_packet(self.buf, 1 << 24)
            if found is not None:
                kind, flags, start, end = found
                body = bytes(self.buf[start:end])
                del self.buf[:end]
                return kind, flags, body
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                raise ConnectionError("closed by the gateway")
            self.buf += chunk

    async def next_publish(self, timeout: float = 60) -> codec.Publish:
        """The next PUBLISH (other packets skipped); not acknowledged."""
        while True:
            kind, flags, body = await self.next_packet(timeout)
            if kind == codec.PUBLISH:
                return codec.parse_publish(flags, body, codec.V5)

    def puback(self, packet_id: int) -> None:
        """Acknowledge one publish."""
        assert self.writer is not None
        self.writer.write(self._packet(0x40, packet_id.to_bytes(2, "big")))

    def drop(self) -> None:
        """Close the socket without DISCONNECT (as a connection that dies)."""
        if self.writer is not None:
            self.writer.close()
