"""`fleetflow simulate`'s HTTP client (cli/http_lanes.py): its requests are all in flight at
once, and what it does per request does not grow with the connections it holds (one pool of
96 connections took the simulator's CPU: it sent ~20 requests/s while the platform answered
several times that)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpcore
import httpx
import pytest

from cli.http_lanes import LaneTransport
from cli.simulate import simulator_client
from cli.simulate_devices import IN_FLIGHT
from cli.simulate_jobs import JOB_IN_FLIGHT

LANES = IN_FLIGHT + JOB_IN_FLIGHT


@dataclass
class HeldServer:
    """An HTTP/1.1 server that answers no request until `hold` of them have arrived (then each
    at once): requests a client serialises never all arrive."""

    hold: int
    url: str = ""
    arrived: int = 0
    connections: set[int] = field(default_factory=set)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[1]
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.lower().split(b"\r\n")
                length = next((int(h[15:]) for h in lines if h.startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.connections.add(peer)
                self.arrived += 1
                if self.arrived >= self.hold:
                    self.all_in.set()
                await self.all_in.wait()
                writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Held = Callable[[int], Awaitable[HeldServer]]


@pytest.fixture
async def held() -> AsyncIterator[Held]:
    """Start HeldServers on free ports (closed after the test)."""
    servers: list[asyncio.Server] = []

    async def started(hold: int) -> HeldServer:
        server = HeldServer(hold)
        listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        servers.append(listener)
        server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        return server

    yield started
    for listener in servers:
        listener.close()


async def _post_all(http: httpx.AsyncClient, n: int) -> list[int]:
    async def post(i: int) -> int:
        response = await http.post("/v1/telemetry", content=b'{"batch_id":"b%d"}' % i)
        return response.status_code

    return await asyncio.wait_for(asyncio.gather(*(post(i) for i in range(n))), 60)


async def test_the_simulators_requests_are_all_in_flight_at_once_each_on_its_own_connection(
    held: Held,
) -> None:
    server = await held(LANES)
    async with simulator_client(server.url) as http:
        codes = await _post_all(http, LANES)
    assert codes == [202] * LANES
    assert len(server.connections) == LANES


async def test_the_simulators_work_per_request_does_not_grow_with_its_connections(
    held: Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpcore checks each connection of a pool (has it expired? a socket poll when idle) at
    every request it assigns and every response it closes: in one pool of 96, 96 checks a step."""
    checks = 0
    has_expired = httpcore.AsyncHTTPConnection.has_expired

    def counted(self: httpcore.AsyncHTTPConnection) -> bool:
        nonlocal checks
        checks += 1
        return has_expired(self)

    monkeypatch.setattr(httpcore.AsyncHTTPConnection, "has_expired", counted)
    rounds = 3
    async with simulator_client((await held(LANES)).url) as http:
        for _ in range(rounds):  # the first round opens the connections, the next reuse them
            assert await _post_all(http, LANES) == [202] * LANES
    # one connection's check when a request is assigned and one when its response is closed
    assert checks / (rounds * LANES) <= 4


async def test_a_lane_is_free_again_once_its_response_is_closed_or_its_request_failed(
    held: Held,
) -> None:
    server = await held(1)
    transport = LaneTransport(2)
    async with httpx.AsyncClient(base_url=server.url, transport=transport) as http:
        async with http.stream("POST", "/v1/telemetry", content=b"{}") as response:
            assert transport.free == 1  # the open response holds its lane
            await response.aread()
        assert transport.free == 2
        assert (await http.post("/v1/telemetry", content=b"{}")).status_code == 202
        assert transport.free == 2
    refused = LaneTransport(2)
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9", transport=refused) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")
        assert refused.free == 2


async def test_a_request_waits_for_a_free_lane_at_most_its_pool_timeout(
    held: Held,
) -> None:
    server = await held(1)
    transport = LaneTransport(1)
    async with httpx.AsyncClient(base_url=server.url, transport=transport) as http:
        async with http.stream("POST", "/v1/telemetry", content=b"{}"):
            with pytest.raises(httpx.PoolTimeout):
                await http.post("/v1/telemetry", content=b"{}", timeout=httpx.Timeout(5.0, pool=0.05))
            waiting = asyncio.ensure_future(http.post("/v1/telemetry", content=b"{}"))
            await asyncio.sleep(0)
            assert not waiting.done()
        assert (await waiting).status_code == 202  # served once the lane was free
