"""The service dependency graph, derived from the code (`fleetflow graph`, `GET /v1/services`).

Nodes are the workflows (every one runs on the `orchestration` queue) and the services of
`fleetflow.interfaces.INTERFACES`. The edges are read from the source of `workflows/` and
`activities/` by `fleetflow.code_scan` (nothing is run); `fleetflow.graph_render` draws the
graph (Mermaid, README's block).

The API and the MQTT gateway (`api/`, `gateway/`) are edge processes, not nodes: the workflows
they start, signal or update for a client are not service edges (no service waits on them).

At the service level a workflow is `orchestration`. An edge *waits* when the caller needs the
callee's workers to answer (activity, child workflow, update, query, execute); a signal or a
start is handed to Temporal and the caller goes on. Cycles, the transitive closure and the
topological order are over waiting edges: a cycle of waits is a set of services that cannot
make progress without each other. Every edge, waiting or not, must be declared in `ALLOWED`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = "orchestration"

WAITING: frozenset[str] = frozenset({"activity", "child", "execute", "update", "query"})

# the service-level edges the architecture allows, each with why; a derived edge missing here
# fails tests/unit/test_dependency_graph.py, and so does a declaration nothing derives any more
ALLOWED: dict[tuple[str, str], str] = {
    (ORCHESTRATION, "device"): "workflows drive the device registry, credentials and rollout jobs",
    (
        ORCHESTRATION,
        "data",
    ): "ingestion claims, stores and splits windows; decommission retires telemetry; retention",
    (ORCHESTRATION, "analytics"): "ingestion evaluates the rules over each stored window",
    (ORCHESTRATION, "notification"): "workflows record (and retract) the events of what they did",
    (ORCHESTRATION, "webhook"): "EventDelivery posts a subscription's pending events",
    ("data", ORCHESTRATION): "the ingestion supervisor's activity starts missing TelemetryIngestion shards",
    ("device", ORCHESTRATION): "reconciliation starts missing DeviceTwins and ends retired ones",
    ("notification", ORCHESTRATION): "recording events signal-with-starts each subscription's EventDelivery",
}


@dataclass(frozen=True, order=True)
class Edge:
    """One dependency between two nodes (a workflow's class name or a service's name)."""

    source: str
    target: str
    kind: str
    via: str  # the activity type name, the workflow method, or the signal's name

    @property
    def waits(self) -> bool:
        """True when the caller needs the callee's workers to answer."""
        return self.kind in WAITING


class CycleError(ValueError):
    """The waiting edges have a cycle; `cycle` names its nodes in order."""

    def __init__(self, cycle: Sequence[str]) -> None:
        super().__init__("dependency cycle: " + " -> ".join([*cycle, cycle[0]]))
        self.cycle = list(cycle)


@dataclass(frozen=True)
class Graph:
    """The derived graph: nodes, node-level edges and their service-level view."""

    workflows: tuple[str, ...]
    services: tuple[str, ...]  # orchestration first, then the interfaces' services
    edges: tuple[Edge, ...]
    unattributed: tuple[str, ...] = ()  # activities modules whose references have no service

    def service_of(self, node: str) -> str:
        """The service a node belongs to: a workflow is `orchestration`."""
        return ORCHESTRATION if node in self.workflows else node

    def service_edges(self) -> dict[tuple[str, str], tuple[Edge, ...]]:
        """Service-level edges (a service's calls into itself left out) and the edges behind each."""
        found: dict[tuple[str, str], list[Edge]] = {}
        for edge in self.edges:
            pair = (self.service_of(edge.source), self.service_of(edge.target))
            if pair[0] != pair[1]:
                found.setdefault(pair, []).append(edge)
        return {pair: tuple(found[pair]) for pair in sorted(found)}

    def waits_on(self) -> dict[str, tuple[str, ...]]:
        """Per service, the services it waits on directly."""
        pairs = [p for p, edges in self.service_edges().items() if any(e.waits for e in edges)]
        return {s: tuple(sorted(b for a, b in pairs if a == s)) for s in self.services}

    def notifies(self) -> dict[str, tuple[str, ...]]:
        """Per service, the services it only signals or starts (it never waits on them)."""
        waits = self.waits_on()
        pairs = list(self.service_edges())
        return {s: tuple(sorted(b for a, b in pairs if a == s and b not in waits[s])) for s in self.services}

    def closure(self) -> dict[str, tuple[str, ...]]:
        """Per service, every service it waits on directly or through others."""
        return _closure(self.waits_on())

    def cycles(self) -> list[list[str]]:
        """Cycles of waiting edges among services, one per strongly connected set."""
        return _cycles(self.waits_on())

    def node_cycles(self) -> list[list[str]]:
        """Cycles of waiting edges among nodes (e.g. workflows waiting on each other's children)."""
        nodes = (*self.workflows, *self.services[1:])
        succ = {n: tuple(sorted({e.target for e in self.edges if e.source == n and e.waits})) for n in nodes}
        return _cycles(succ)

    def topological_order(self) -> list[str]:
        """Services, each after every service it waits on; CycleError when there is none."""
        waits = self.waits_on()
        cycles = _cycles(waits)
        if cycles:
            raise CycleError(cycles[0])
        order: list[str] = []
        remaining = [*self.services[1:], ORCHESTRATION]  # ties: the interfaces' order
        while remaining:
            ready = next(s for s in remaining if all(d in order for d in waits[s]))
            order.append(ready)
            remaining.remove(ready)
        return order

    def callers(self) -> dict[str, tuple[str, ...]]:
        """Per service, the nodes outside it that call, signal or start one of its nodes."""
        found: dict[str, set[str]] = {s: set() for s in self.services}
        for edge in self.edges:
            if self.service_of(edge.source) != self.service_of(edge.target):
                found[self.service_of(edge.target)].add(edge.source)
        return {s: tuple(sorted(found[s])) for s in self.services}


def check(graph: Graph, allowed: Mapping[tuple[str, str], str] = ALLOWED) -> list[str]:
    """What the graph breaks: undeclared edges, declarations nothing derives, cycles."""
    problems = []
    derived = graph.service_edges()
    for pair, edges in derived.items():
        if pair not in allowed:
            vias = ", ".join(sorted({f"{e.source} {e.kind} {_called_name(e)}" for e in edges}))
            problems.append(
                f"undeclared edge {pair[0]} -> {pair[1]} ({vias}): declare it in ALLOWED or remove it"
            )
    for pair in allowed:
        if pair not in derived:
            problems.append(f"declared edge {pair[0]} -> {pair[1]} is not in the code any more: remove it")
    for cycle in graph.cycles() + graph.node_cycles():
        problems.append("cycle of waiting calls: " + " -> ".join([*cycle, cycle[0]]))
    for module in graph.unattributed:
        problems.append(f"{module}: calls into workflows, but belongs to no service")
    return problems


def _called_name(edge: Edge) -> str:
    return edge.via if edge.kind == "activity" else f"{edge.target}.{edge.via}"


# --- graph algorithms -------------------------------------------------------------------


def _closure(succ: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    result = {}
    for start in succ:
        seen: set[str] = set()
        todo = list(succ[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(succ.get(node, ()))
        result[start] = tuple(sorted(seen))
    return result


def _cycles(succ: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle (its nodes in order) per strongly connected set of two or more nodes, or a
    node with an edge to itself."""
    reach = _closure(succ)
    cycles, placed = [], set()
    for node in sorted(succ):
        if node in placed or node not in reach[node]:
            continue
        component = {n for n in reach[node] if node in reach.get(n, ())} | {node}
        placed |= component
        cycles.append(_path_back(node, succ, component))
    return cycles


def _path_back(start: str, succ: Mapping[str, Sequence[str]], within: set[str]) -> list[str]:
    """The shortest path from start back to itself inside a strongly connected set."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in succ.get(node, ()):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if nxt in within and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError("a strongly connected node has a path back")  # pragma: no cover


@cache
def derive() -> Graph:
    """The graph of this code base's `workflows/` and `activities/`."""
    from fleetflow.code_scan import scan, sources  # the scanner builds this module's Graph

    return scan(sources("workflows"), sources("activities"))
