"""Helpers shared by the tests: binaries, free ports, tokens."""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fleetflow.keys import KeyRing
from fleetflow.security import SCOPES, issue_token

BIN = Path(sys.executable).parent
TEMPORAL_CLI = BIN / "temporal"
TEST_SERVER = BIN / "temporal-test-server"
# the test session's signing keys: tokens made here verify in the session's API
TEST_KEYS_DIR = Path(tempfile.mkdtemp(prefix="fleetflow-test-keys-"))
TEST_KEYS = KeyRing(TEST_KEYS_DIR)
T = TypeVar("T")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(
    tenant: str = "acme",
    scopes: list[str] | None = None,
    ttl: timedelta = timedelta(hours=3),
    ring: KeyRing = TEST_KEYS,
) -> dict[str, str]:
    """Authorization header of an API token (by default outliving a slow run of the whole suite:
    session fixtures hold theirs from the start)."""
    token = issue_token(ring, subject="tester", tenant=tenant, scopes=scopes or sorted(SCOPES), ttl=ttl)
    return {"Authorization": f"Bearer {token}"}


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout_s: float = 30.0
) -> T:
    """Poll probe until done(result); the last result fails the test on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await probe()
        if done(result):
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached in {timeout_s}s; last: {result!r}")
        await asyncio.sleep(0.1)


class SpanRecorder(InMemorySpanExporter):
    """An in-memory span exporter that keeps spans only while `recording` is set, so a
    session-long tracer provider does not hoard every span of every test."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Keep spans while recording; drop them otherwise."""
        if not self.recording:
            return SpanExportResult.SUCCESS
        return super().export(spans)
