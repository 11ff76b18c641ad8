"""Probes and the system check: `/livez` and `/readyz` (anonymous, cheap), `/health` and
`/v1/services` (`system:read`).

`/livez` answers while the process serves; `/readyz` checks that PostgreSQL and Temporal are
reachable (a `SELECT 1` and Temporal's gRPC health check, no workflow), its answer shared for a
second so a flood of probes costs one check a second. `/health` runs the SystemCheck workflow
(one run a service of every queue answers) and reports worker hosts and database errors, so it
needs a token; concurrent calls share one run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Annotated, Generic, Literal, TypeVar

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from api.auth import State, require
from fleetflow.contracts.common import Strict, TaskQueue
from fleetflow.contracts.system import SystemCheckRequest, SystemReport
from fleetflow.db import select_one
from fleetflow.dependency_graph import CycleError, Graph, derive
from fleetflow.security import TokenClaims
from fleetflow.system_report import pollers, run_system_check

router = APIRouter(tags=["system"])
T = TypeVar("T")

READY_TTL_S = 1.0
READY_TIMEOUT_S = 2.0


class GraphEdge(Strict):
    """One derived dependency: `source` calls, signals or starts `target` (see `fleetflow graph`)."""

    source: str
    target: str
    target_service: str
    kind: str
    via: str
    waits: bool


class ServiceNode(Strict):
    """A service (task queue), its pollers, and its place in the dependency graph derived from
    the code: who calls it, what it waits on (directly and through others), what it only
    signals or starts, its position in the start order, and its outgoing edges."""

    queue: str
    pollers: int
    called_by: list[str]
    callers: list[str]
    waits_on: list[str]
    waits_on_transitively: list[str]
    signals_or_starts: list[str]
    order: int
    edges: list[GraphEdge]


def service_nodes(graph: Graph, pollers: Mapping[str, int]) -> list[ServiceNode]:
    """The graph's services in task-queue order; `called_by` keeps its meaning (the workflows
    whose activities run on the queue; none for the workflows' own queue)."""
    callers, waits, notifies, closure = graph.callers(), graph.waits_on(), graph.notifies(), graph.closure()
    try:
        order = graph.topological_order()
    except CycleError:  # tests keep cycles out; a graph with one still serves, unordered (-1)
        order = []
    nodes = []
    for queue in TaskQueue:
        name = queue.value
        edges = [
            GraphEdge(
                source=e.source,
                target=e.target,
                target_service=graph.service_of(e.target),
                kind=e.kind,
                via=e.via,
                waits=e.waits,
            )
            for e in graph.edges
            if graph.service_of(e.source) == name
        ]
        nodes.append(
            ServiceNode(
                queue=name,
                pollers=pollers.get(name, 0),
                called_by=[c for c in callers.get(name, ()) if c in graph.workflows],
                callers=list(callers.get(name, ())),
                waits_on=list(waits.get(name, ())),
                waits_on_transitively=list(closure.get(name, ())),
                signals_or_starts=list(notifies.get(name, ())),
                order=order.index(name) if name in order else -1,
                edges=edges,
            )
        )
    return nodes


class Shared(Generic[T]):
    """One computation per key at a time, its result kept ttl_s seconds: concurrent and
    repeated callers share it."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._running: dict[object, asyncio.Future[T]] = {}
        self._done: dict[object, tuple[float, T]] = {}

    async def get(self, key: object, compute: Callable[[], Awaitable[T]]) -> T:
        """compute()'s result for key, computed at most once per ttl_s."""
        kept = self._done.get(key)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(compute())
            running.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(running)

    def _finished(self, key: object, done: asyncio.Future[T]) -> None:
        self._running.pop(key, None)
        if not done.cancelled() and done.exception() is None:
            if len(self._done) > 100:  # keys are a handful of timeouts; bound them anyway
                self._done.clear()
            self._done[key] = (time.monotonic() + self.ttl_s, done.result())


class Liveness(Strict):
    """The process serves."""

    status: Literal["alive"] = "alive"


class Readiness(Strict):
    """Whether the API's dependencies answer (`ok` or `unreachable`, never the error)."""

    ready: bool
    database: Literal["ok", "unreachable"]
    temporal: Literal["ok", "unreachable"]


_readiness: Shared[Readiness] = Shared(READY_TTL_S)
_reports: Shared[SystemReport] = Shared(0.0)


async def _reachable(probe: Awaitable[object]) -> Literal["ok", "unreachable"]:
    try:
        await asyncio.wait_for(probe, READY_TIMEOUT_S)
    except Exception:  # any failure to answer in time is "unreachable"; the reason is not shown
        return "unreachable"
    return "ok"


@router.get("/livez", response_model=Liveness)
async def livez() -> Liveness:
    """200 while the process serves requests; touches nothing else."""
    return Liveness()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(state: State) -> JSONResponse:
    """200 when PostgreSQL and Temporal answer (no workflow is started), 503 otherwise."""

    async def check() -> Readiness:
        database, temporal = await asyncio.gather(
            _reachable(select_one(state.pool)),
            _reachable(
                state.temporal.service_client.check_health(timeout=timedelta(seconds=READY_TIMEOUT_S))
            ),
        )
        return Readiness(ready=database == temporal == "ok", database=database, temporal=temporal)

    readiness = await _readiness.get(id(state), check)
    return JSONResponse(readiness.model_dump(mode="json"), status_code=200 if readiness.ready else 503)


@router.get("/health", response_model=SystemReport, responses={503: {"model": SystemReport}})
async def health(
    state: State,
    _: Annotated[TokenClaims, Depends(require("system:read"))],
    timeout: Annotated[float, Query(ge=0.001, le=60)] = 5.0,
) -> JSONResponse:
    """Run the SystemCheck workflow; 200 when every service answered, 503 otherwise. Calls
    made while one runs (with the same timeout) get its report.

    `timeout` is at least 1 ms: a smaller one rounds to a zero activity timeout, which Temporal
    reads as none, so the check's workflow would fail every task until its deadline."""
    report = await _reports.get(
        (id(state), timeout), lambda: run_system_check(state.temporal, SystemCheckRequest(timeout_s=timeout))
    )
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.ok else 503)


@router.get("/v1/services", response_model=list[ServiceNode])
async def services(
    state: State, _: Annotated[TokenClaims, Depends(require("system:read"))]
) -> list[ServiceNode]:
    """Every task queue with its pollers and its dependencies, derived from the code."""
    counts: dict[str, int] = {}
    for queue in TaskQueue:
        counts[queue.value] = await pollers(
            state.temporal, queue.value, workflows=queue is TaskQueue.ORCHESTRATION
        )
    return service_nodes(derive(), counts)  # parsed at the API's start-up (cached)
