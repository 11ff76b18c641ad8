"""`fleetflow simulate --transport mqtt`: each simulated device holds an MQTT 5 connection to the
platform's MQTT endpoint (username = device id, password = its credential) and publishes its
batches at QoS 1 on `tenants/{tenant}/devices/{id}/telemetry`; a PUBACK with reason 0 is the
HTTP 202 (durable), any other reason a rejection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

import httpx

from cli.simulate_jobs import JobStats, handle_job
from fleetflow.errors import StartupError
from gateway.codec import packet as _packet
from gateway.codec import text as _text

PUBACK_TIMEOUT_S = 30.0


def _varint_size(data: bytes, at: int) -> int:
    size = 1
    while data[at + size - 1] & 0x80:
        size += 1
    return size


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    multiplier, length = 1, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return first >> 4, await reader.readexactly(length)


class MqttDevice:
    """One simulated device's MQTT 5 connection: publishes at QoS 1, PUBACK reason per publish."""

    def __init__(self, device_id: str, credential: str, tenant: str) -> None:
        self.device_id = device_id
        self.credential = credential
        self.prefix = f"tenants/{tenant}/devices/{device_id}/"
        self.topic = self.prefix + "telemetry"
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=100)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._next = 0
        self._task: asyncio.Task[None] | None = None

    async def connect(self, host: str, port: int) -> None:
        """CONNECT; StartupError when refused or unreachable."""
        try:
            self._reader, self._writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise StartupError(f"cannot reach the MQTT endpoint at {host}:{port}: {exc}") from None
        body = _text("MQTT") + bytes([5, 0xC2]) + (60).to_bytes(2, "big") + b"\x00"
        body += _text(self.device_id) + _text(self.device_id) + _text(self.credential)
        self._writer.write(_packet(0x10, body))
        kind, connack = await _read_packet(self._reader)
        if kind != 2 or connack[1] != 0:
            raise StartupError(f"MQTT CONNECT of {self.device_id} refused (reason {connack[1]:#x})")
        self._task = asyncio.create_task(self._acks())

    async def _acks(self) -> None:
        assert self._reader is not None
        try:
            while True:
                kind, body = await _read_packet(self._reader)
                if kind == 13 and self._writer is not None:  # PINGRESP
                    continue
                if kind in (4, 9):  # PUBACK: its reason; SUBACK: the first filter's code
                    pid = int.from_bytes(body[:2], "big")
                    waiter = self._waiting.pop(pid, None)
                    if waiter is not None and not waiter.done():
                        code = body[2] if kind == 4 and len(body) > 2 else 0
                        if kind == 9:
                            code = body[2 + _varint_size(body, 2) + body[2]]  # past the properties
                        waiter.set_result(code)
                elif kind == 3:  # a push (QoS 0): topic, properties, payload
                    size = int.from_bytes(body[:2], "big")
                    topic = body[2 : 2 + size].decode()
                    at = 2 + size
                    props = body[at]  # short properties (the gateway sends none)
                    if not self.messages.full():
                        self.messages.put_nowait((topic, body[at + 1 + props :]))
        except (asyncio.IncompleteReadError, OSError):
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("MQTT connection lost"))
            self._waiting.clear()

    def _waiter(self) -> tuple[int, asyncio.Future[int]]:
        if self._writer is None or self._task is None or self._task.done():
            raise ConnectionError("MQTT connection lost")
        self._next = self._next % 65535 + 1
        while self._next in self._waiting:
            self._next = self._next % 65535 + 1
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = waiter
        return self._next, waiter

    async def publish(self, payload: bytes, topic: str | None = None) -> int:
        """Publish at QoS 1 (to the telemetry topic unless told); the PUBACK reason code (0:
        durable). ConnectionError when the connection is gone, TimeoutError without an answer."""
        pid, waiter = self._waiter()
        assert self._writer is not None
        name = _text(topic or self.topic)
        self._writer.write(_packet(0x32, name + pid.to_bytes(2, "big") + b"\x00" + payload))
        return await asyncio.wait_for(waiter, PUBACK_TIMEOUT_S)

    async def subscribe(self, topic: str) -> int:
        """SUBSCRIBE at QoS 0; the SUBACK code (0: granted)."""
        pid, waiter = self._waiter()
        assert self._writer is not None
        self._writer.write(_packet(0x82, pid.to_bytes(2, "big") + b"\x00" + _text(topic) + b"\x00"))
        return await asyncio.wait_for(waiter, PUBACK_TIMEOUT_S)

    async def close(self) -> None:
        """DISCONNECT and close."""
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.write(b"\xe0\x00")
                self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def connect_all(
    credentials: dict[str, str], tenant: str, host: str, port: int, at_once: int = 100
) -> dict[str, MqttDevice]:
    """An open connection per device, opened at_once at a time."""
    devices = {d: MqttDevice(d, c, tenant) for d, c in credentials.items()}
    items = list(devices.values())
    for i in range(0, len(items), at_once):
        await asyncio.gather(*(d.connect(host, port) for d in items[i : i + at_once]))
    return devices


async def work_jobs_mqtt(
    http: httpx.AsyncClient,
    devices: dict[str, MqttDevice],
    rates: tuple[float, float],
    rng: random.Random,
    stats: JobStats,
    stop: asyncio.Event,
) -> None:
    """Every device subscribes to its jobs/notify and works on each job pushed there until
    stop, publishing its progress on jobs/{campaign}/progress (the image comes over HTTP)."""
    seen: set[tuple[str, str, str]] = set()
    for device in devices.values():
        await device.subscribe(device.prefix + "jobs/notify")

    async def one(device: MqttDevice) -> None:
        async def report(campaign: str, body: dict[str, Any]) -> None:
            await device.publish(json.dumps(body).encode(), f"{device.prefix}jobs/{campaign}/progress")

        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                pushed = asyncio.ensure_future(device.messages.get())
                await asyncio.wait({pushed, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not pushed.done():
                    pushed.cancel()
                    return
                topic, payload = pushed.result()
                if not topic.endswith("/jobs/notify"):
                    continue
                job = json.loads(payload)
                with contextlib.suppress(httpx.HTTPError, ConnectionError, TimeoutError):
                    await handle_job(
                        http, device.device_id, device.credential, job, report, rates, rng, seen, stats
                    )
        finally:
            stopping.cancel()

    await asyncio.gather(*(one(d) for d in devices.values()))
