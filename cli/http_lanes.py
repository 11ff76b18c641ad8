"""An httpx transport for many requests at once from one process: `lanes` connections, each in a
connection pool of its own, a request taking a free lane for as long as its response is open.

Why: httpcore's connection pool walks all its connections, with a socket check on each idle
one, at every request it assigns and every response it closes. With the 96 connections of
`fleetflow simulate` (64 telemetry requests and 32 job polls in flight), that walk took the
process's CPU: it sent ~20 requests/s while the platform answered 75-110 of 400 readings and
180-300 of 10 from a client holding one connection per pool. A lane's pool holds one connection,
so its walk is one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx

# one connection a lane; kept open for reuse as long as the server keeps it
_ONE = httpx.Limits(max_connections=1, max_keepalive_connections=1)


class _LaneStream(httpx.AsyncByteStream):
    """A response body that hands its lane back once it is closed (or on garbage collection,
    never: an unclosed response keeps its lane, as it keeps its connection in httpx's pool)."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class LaneTransport(httpx.AsyncBaseTransport):
    """At most `lanes` requests at once, each on a lane (a one-connection pool) of its own; more
    wait for a free lane, at most the request's pool timeout (httpx.PoolTimeout). The most
    recently freed lane is taken first, so lanes in use stay warm and spare ones idle out."""

    def __init__(self, lanes: int, *, verify: bool | str = True) -> None:
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        context = httpx.create_ssl_context(verify=verify)  # built once: loading the CAs is slow
        self._lanes = [httpx.AsyncHTTPTransport(verify=context, limits=_ONE) for _ in range(lanes)]
        self._free = list(self._lanes)  # a stack: the last freed on top
        self._slots = asyncio.Semaphore(lanes)

    @property
    def lanes(self) -> int:
        """How many lanes (connections at most) this transport has."""
        return len(self._lanes)

    @property
    def free(self) -> int:
        """Lanes not held by a request or an open response."""
        return len(self._free)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request on a free lane; the lane is the response's until it is closed."""
        if self._slots.locked():  # all lanes busy: wait, as long as httpx would for a connection
            timeout = request.extensions.get("timeout", {}).get("pool")
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout)
            except TimeoutError:
                raise httpx.PoolTimeout("no free lane within the pool timeout", request=request) from None
        else:
            await self._slots.acquire()  # returns at once
        lane = self._free.pop()
        try:
            response = await lane.handle_async_request(request)
        except BaseException:
            self._give_back(lane)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_LaneStream(response.stream, lambda: self._give_back(lane)),
            extensions=response.extensions,
        )

    def _give_back(self, lane: httpx.AsyncHTTPTransport) -> None:
        self._free.append(lane)
        self._slots.release()

    async def aclose(self) -> None:
        """Close every lane's connection."""
        for lane in self._lanes:
            await lane.aclose()
