"""`fleetflow simulate --transport mqtt`: each simulated device holds an MQTT 5 connection to the
platform's MQTT endpoint (username = device id, password = its credential) and publishes its
batches at QoS 1 on `tenants/{tenant}/devices/{id}/telemetry`; a PUBACK with reason 0 is the
HTTP 202 (durable), any other reason a rejection."""

from __future__ import annotations

import asyncio
import contextlib

from fleetflow.errors import StartupError

PUBACK_TIMEOUT_S = 30.0


def _text(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(encoded) + body


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
        self.topic = f"tenants/{tenant}/devices/{device_id}/telemetry"
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
                if kind == 4:
                    pid = int.from_bytes(body[:2], "big")
                    waiter = self._waiting.pop(pid, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(body[2] if len(body) > 2 else 0)
        except (asyncio.IncompleteReadError, OSError):
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("MQTT connection lost"))
            self._waiting.clear()

    async def publish(self, payload: bytes) -> int:
        """Publish at QoS 1; the PUBACK reason code (0: durable). ConnectionError when the
        connection is gone, TimeoutError without an answer."""
        if self._writer is None or self._task is None or self._task.done():
            raise ConnectionError("MQTT connection lost")
        self._next = self._next % 65535 + 1
        while self._next in self._waiting:
            self._next = self._next % 65535 + 1
        pid = self._next
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[pid] = waiter
        self._writer.write(_packet(0x32, _text(self.topic) + pid.to_bytes(2, "big") + b"\x00" + payload))
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
