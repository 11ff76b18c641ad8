"""A lean MQTT 3.1.1 load client for the benchmark: pre-encoded packets, QoS 1 publishes kept
`window` in flight per connection, PUBACK latencies by packet id. Python paho costs more CPU
per message than the gateway under test; this one costs little more than the socket writes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gateway.codec import packet
from gateway.codec import text as _text


def connect_packet(device_id: str, password: str, keep_alive: int = 600) -> bytes:
    """CONNECT (3.1.1, clean session) of a device."""
    body = _text("MQTT") + bytes([4, 0xC2]) + keep_alive.to_bytes(2, "big")
    return packet(0x10, body + _text(device_id) + _text(device_id) + _text(password))


@dataclass
class LoadClient:
    """One device's connection."""

    device_id: str
    password: str
    topic: str
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    sent: dict[int, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    acked: int = 0
    refused: int = 0

    async def open(self, port: int, keep_alive: int = 600) -> None:
        """Connect; RuntimeError when refused."""
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(connect_packet(self.device_id, self.password, keep_alive))
        connack = await self.reader.readexactly(4)
        if connack[3] != 0:
            raise RuntimeError(f"{self.device_id}: CONNACK {connack[3]}")

    async def publish_for(
        self,
        payload: bytes,
        until: float,
        window: int,
        measure: bool = True,
        pace_s: float = 0.0,
        offset_s: float = 0.0,
    ) -> None:
        """Publish payload at QoS 1 until the deadline, `window` unacknowledged at most (one
        every pace_s seconds when given, the first offset_s after the start)."""
        assert self.reader is not None and self.writer is not None
        topic = _text(self.topic)
        pid = 0
        free = asyncio.Semaphore(window)
        reader, writer = self.reader, self.writer

        async def acks() -> None:
            while True:
                head = await reader.readexactly(4)  # PUBACK: 0x40 0x02 pid
                got = int.from_bytes(head[2:4], "big")
                started = self.sent.pop(got, None)
                if started is not None and measure:
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                self.acked += 1
                free.release()

        reading = asyncio.ensure_future(acks())
        try:
            await asyncio.sleep(offset_s)
            while time.perf_counter() < until:
                if pace_s:
                    await asyncio.sleep(pace_s)
                await free.acquire()
                pid = pid % 65535 + 1
                self.sent[pid] = time.perf_counter()
                writer.write(packet(0x32, topic + pid.to_bytes(2, "big") + payload))
                if writer.transport.get_write_buffer_size() > 256 * 1024:
                    await writer.drain()
            for _ in range(600):  # the last acknowledgements, 30 s at most
                if not self.sent:
                    break
                await asyncio.sleep(0.05)
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def subscribe(self, topic: str) -> None:
        """SUBSCRIBE at QoS 0 and wait for the SUBACK."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(packet(0x82, (1).to_bytes(2, "big") + _text(topic) + b"\x00"))
        suback = await self.reader.readexactly(5)
        if suback[4] == 0x80:
            raise RuntimeError(f"{self.device_id}: subscription to {topic} refused")

    async def next_publish(self) -> tuple[str, bytes]:
        """The next QoS 0 PUBLISH the gateway sends: (topic, payload)."""
        assert self.reader is not None
        first = (await self.reader.readexactly(1))[0]
        multiplier, length = 1, 0
        while True:
            byte = (await self.reader.readexactly(1))[0]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        body = await self.reader.readexactly(length)
        if first >> 4 != 3:
            return "", b""
        size = int.from_bytes(body[:2], "big")
        return body[2 : 2 + size].decode(), body[2 + size :]

    def close(self) -> None:
        """Drop the connection."""
        if self.writer is not None:
            self.writer.close()
