"""The simulator's webhook receiver: a small HTTP server that checks each delivery's Standard
Webhooks signature and counts the alert events of the run's devices.

It listens on a loopback address, which the platform refuses to deliver to unless its operator
allows that network (`FLEETFLOW_WEBHOOK_ALLOW_NETWORKS=127.0.0.1/32`)."""

from __future__ import annotations

import asyncio
import json
import time

from fleetflow.webhook_signing import verify

MAX_HOOK_BYTES = 1 << 20
ALERTS = ("AlertRaised", "AlertCleared")


class Receiver:
    """A small HTTP server for webhook deliveries: checks each signature, deduplicates by event
    id and keeps the alert events of the run's devices."""

    def __init__(self, secret: str, prefix: str) -> None:
        self.secret, self.prefix = secret, prefix
        self.alerts: dict[str, str] = {}  # event id -> type
        self.bad_signatures = 0
        self.last = time.monotonic()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> str:
        """Listen on a free port of host; the URL to subscribe."""
        self._server = await asyncio.start_server(self._handle, host, 0)
        return f"http://{host}:{self._server.sockets[0].getsockname()[1]}/hooks"

    def count(self, kind: str) -> int:
        """Distinct events of this type received."""
        return sum(1 for t in self.alerts.values() if t == kind)

    async def close(self) -> None:
        """Stop listening and drop open connections."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:  # keep-alive: one request after another until the sender closes
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[1:]
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head)}
                length = int(headers.get("content-length", "0"))
                if length > MAX_HOOK_BYTES:
                    writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
                    return
                body = await reader.readexactly(length)
                if verify(self.secret, headers, body):
                    self._record(body)
                    writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                else:
                    self.bad_signatures += 1
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _record(self, body: bytes) -> None:
        self.last = time.monotonic()
        event = json.loads(body)
        if event.get("type") in ALERTS and str(event.get("device_id", "")).startswith(self.prefix):
            self.alerts[str(event["event_id"])] = str(event["type"])
