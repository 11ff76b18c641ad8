"""The service dependency graph, derived from the code (`fleetflow graph`, `GET /v1/services`).

Nodes are the workflows (every one runs on the `orchestration` queue) and the services of
`fleetflow.interfaces.INTERFACES`. The edges are read from the source of `workflows/` and
`activities/` with `ast`, nothing is run:

- workflow -> service: a reference to an interface method (`DeviceActivities.register`), an
  activity type name as a string (`"device.register"`, resolved through the catalogue), or
  `INTERFACES` (every service's `ping`, as SystemCheck uses it);
- workflow -> workflow: a reference to another workflow's method (`DeviceTwin.run` is a
  child, `DeviceTwin.end` a signal, an `@workflow.update` method an update), or a workflow
  type name given to `start_child_workflow`/`execute_child_workflow`;
- service -> workflow: `start_workflow`/`execute_workflow`/`signal_with_start_workflow` in a
  service's activities, by type name (a literal or a constant) or `Foo.run`; `start_signal=`
  makes it a signal-with-start; `.signal("name")`/`.execute_update("name")` by a name only one
  workflow declares.

The API and the MQTT gateway (`api/`, `gateway/`) are edge processes, not nodes: the workflows
they start, signal or update for a client are not service edges (no service waits on them).

A reference counts wherever it stands in the owner's code (a step table, a helper's argument),
so steps passed through helpers are found without following values. A workflow module's
references belong to the workflows it defines; an activities module's to the services whose
implementation class has its classes as bases (its module-level functions to the module's
services, a helper module without such a class to the services of the modules importing it).

At the service level a workflow is `orchestration`. An edge *waits* when the caller needs the
callee's workers to answer (activity, child workflow, update, query, execute); a signal or a
start is handed to Temporal and the caller goes on. Cycles, the transitive closure and the
topological order are over waiting edges: a cycle of waits is a set of services that cannot
make progress without each other. Every edge, waiting or not, must be declared in `ALLOWED`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from fleetflow.interfaces import CATALOGUE, ActivityEntry

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = "orchestration"

WAITING: frozenset[str] = frozenset({"activity", "child", "execute", "update", "query"})

# the service-level edges the architecture allows, each with why; a derived edge missing here
# fails tests/unit/test_dependency_graph.py, and so does a declaration nothing derives any more
ALLOWED: dict[tuple[str, str], str] = {
    (ORCHESTRATION, "device"): "workflows drive the device registry, credentials and rollout jobs",
    (ORCHESTRATION, "data"): "ingestion claims, stores and splits windows; decommission retires telemetry",
    (ORCHESTRATION, "analytics"): "ingestion evaluates the rules over each stored window",
    (ORCHESTRATION, "notification"): "workflows record (and retract) the events of what they did",
    (ORCHESTRATION, "webhook"): "EventDelivery posts a subscription's pending events",
    ("data", ORCHESTRATION): "the ingestion supervisor's activity starts missing TelemetryIngestion shards",
    ("notification", ORCHESTRATION): "recording events signal-with-starts each subscription's EventDelivery",
}

_WORKFLOW_STARTS = frozenset(
    {
        "start_workflow",
        "execute_workflow",
        "signal_with_start_workflow",
        "start_child_workflow",
        "execute_child_workflow",
    }
)
_HANDLES = frozenset(
    {
        "get_external_workflow_handle_for",
        "get_workflow_handle_for",
        "handle_for",
        "get_external_workflow_handle",
    }
)
_INTERFACES = ("fleetflow.interfaces", "INTERFACES")
_METHOD_KINDS = {"run": "run", "signal": "signal", "update": "update", "query": "query"}


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


# --- the scanner ------------------------------------------------------------------------


@dataclass
class _Module:
    name: str
    tree: ast.Module
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # local -> (module, name)
    constants: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, source: str) -> _Module:
        module = cls(name, ast.parse(source, filename=name))
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    module.imports[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    module.imports[alias.asname or alias.name.split(".")[0]] = (alias.name, "")
        for stmt in module.tree.body:
            if isinstance(stmt, ast.Assign | ast.AnnAssign):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                value = stmt.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    for target in targets:
                        if isinstance(target, ast.Name):
                            module.constants[target.id] = value.value
        return module

    def original(self, local: str) -> str:
        """The name a local name was imported as (itself when not imported)."""
        imported = self.imports.get(local)
        return imported[1] if imported and imported[1] else local

    def string(self, node: ast.expr | None) -> str | None:
        """The value of a string literal, or of a module-level or imported string constant."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.constants:
                return self.constants[node.id]
            imported = self.imports.get(node.id)
            if imported and imported[1]:
                return _constants_of(imported[0]).get(imported[1])
        return None


@cache
def _constants_of(module: str) -> dict[str, str]:
    """Module-level string constants of a module of this code base ({} when not found)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        return {}
    return _Module.parse(module, path.read_text()).constants


def _decorator_name(node: ast.expr) -> str:
    """`workflow.signal(name=...)` -> `signal`; `@defn` -> `defn`."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _start_signal(module: _Module, call: ast.Call) -> str:
    """The signal a signal-with-start sends (`?` when not a literal or a constant)."""
    signal = _keyword(call, "start_signal") or _keyword(call, "signal")
    return module.string(signal) or "?"


def _called(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


@dataclass
class _Workflow:
    name: str  # the workflow type name
    cls: str  # the class name
    methods: dict[str, str]  # method -> run | signal | update | query
    signals: dict[str, str]  # signal/update name -> method


def _workflows_of(module: _Module) -> list[_Workflow]:
    found = []
    for stmt in module.tree.body:
        if not isinstance(stmt, ast.ClassDef):
            continue
        defn = next((d for d in stmt.decorator_list if _decorator_name(d) == "defn"), None)
        if defn is None:
            continue
        name = module.string(_keyword(defn, "name")) if isinstance(defn, ast.Call) else None
        methods, signals = {}, {}
        for item in stmt.body:
            if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in item.decorator_list:
                kind = _METHOD_KINDS.get(_decorator_name(decorator))
                if kind:
                    methods[item.name] = kind
                    given = (
                        module.string(_keyword(decorator, "name"))
                        if isinstance(decorator, ast.Call)
                        else None
                    )
                    signals[given or item.name] = item.name
        found.append(_Workflow(name or stmt.name, stmt.name, methods, signals))
    return found


class _Catalogue:
    """The interfaces' activities as the scanner needs them."""

    def __init__(self, entries: Iterable[ActivityEntry]) -> None:
        self.entries = tuple(entries)
        self.by_name = {e.name: e for e in self.entries}
        self.by_method = {(e.interface.__name__, e.method): e for e in self.entries}
        self.interfaces = {e.interface.__name__: e.service for e in self.entries}
        self.pings = tuple(e for e in self.entries if e.method == "ping")


class _Scanner:
    def __init__(self, catalogue: _Catalogue, workflows: Sequence[_Workflow]) -> None:
        self.catalogue = catalogue
        self.by_class = {w.cls: w for w in workflows}
        self.by_type = {w.name: w for w in workflows}
        # (signal|update, name) -> the workflow declaring it, when only one does
        owners: dict[tuple[str, str], list[_Workflow]] = {}
        for w in workflows:
            for handler, method in w.signals.items():
                owners.setdefault((w.methods[method], handler), []).append(w)
        self.by_handler = {key: ws[0] for key, ws in owners.items() if len(ws) == 1}

    def references(self, module: _Module, node: ast.AST, in_workflow: bool) -> Iterator[tuple[str, str, str]]:
        """(target node, kind, via) of every reference under node."""
        starting: dict[int, ast.Call] = {}  # first arguments of workflow starts -> the call
        for inner in ast.walk(node):
            if isinstance(inner, ast.Call) and inner.args:
                starting[id(inner.args[0])] = inner
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name | ast.Attribute):
                owner = (
                    sub.value.attr if isinstance(sub.value, ast.Attribute) else module.original(sub.value.id)
                )
                entry = self.catalogue.by_method.get((owner, sub.attr))
                if entry is not None:
                    yield entry.service, "activity", entry.name
                workflow = self.by_class.get(owner)
                if workflow is not None and sub.attr in workflow.methods:
                    call = starting.get(id(sub))
                    kind = self._kind(workflow.methods[sub.attr], call, in_workflow)
                    via = _start_signal(module, call) if call and kind == "signal_with_start" else sub.attr
                    yield workflow.name, kind, via
            elif isinstance(sub, ast.Name) and module.imports.get(sub.id) == (
                "fleetflow.interfaces",
                "INTERFACES",
            ):
                for entry in self.catalogue.pings:
                    yield entry.service, "activity", entry.name
            elif (
                isinstance(sub, ast.Constant)
                and isinstance(sub.value, str)
                and sub.value in self.catalogue.by_name
            ):
                entry = self.catalogue.by_name[sub.value]
                yield entry.service, "activity", entry.name
            elif isinstance(sub, ast.Call) and sub.args:
                yield from self._by_name(module, sub, in_workflow)

    def _by_name(self, module: _Module, call: ast.Call, in_workflow: bool) -> Iterator[tuple[str, str, str]]:
        called, name = _called(call), module.string(call.args[0])
        if name is None:
            return
        if called in _WORKFLOW_STARTS and name in self.by_type:
            kind = self._kind("run", call, in_workflow)
            yield name, kind, _start_signal(module, call) if kind == "signal_with_start" else "run"
        elif called in ("signal", "execute_update", "start_update"):
            kind = "signal" if called == "signal" else "update"
            target = self.by_handler.get((kind, name))
            if target is not None:
                yield target.name, kind, name

    @staticmethod
    def _kind(method_kind: str, call: ast.Call | None, in_workflow: bool) -> str:
        called = _called(call) if call is not None else ""
        if call is not None and (
            _keyword(call, "start_signal") is not None or called == "signal_with_start_workflow"
        ):
            return "signal_with_start"
        if called in _HANDLES:
            return "handle"
        if method_kind != "run":
            return method_kind
        if called == "execute_workflow":
            return "execute"
        return "child" if in_workflow else "start"


def _class_services(modules: Sequence[_Module], catalogue: _Catalogue) -> dict[str, set[str]]:
    """Per class of the activities modules, the services whose implementation has it as a base."""
    bases: dict[str, list[str]] = {}
    for module in modules:
        for stmt in module.tree.body:
            if isinstance(stmt, ast.ClassDef):
                names = [
                    b.attr if isinstance(b, ast.Attribute) else module.original(b.id)
                    for b in stmt.bases
                    if isinstance(b, ast.Name | ast.Attribute)
                ]
                bases[stmt.name] = names
    ancestors = _closure(bases)
    services: dict[str, set[str]] = {c: set() for c in bases}
    for cls, above in ancestors.items():
        served = {catalogue.interfaces[a] for a in (*above, cls) if a in catalogue.interfaces}
        for member in (cls, *above):
            if member in services:
                services[member] |= served
    return services


def scan(
    workflow_sources: Mapping[str, str],
    activity_sources: Mapping[str, str],
    catalogue: Iterable[ActivityEntry] = CATALOGUE,
) -> Graph:
    """The graph of the given modules (dotted module name -> source)."""
    cat = _Catalogue(catalogue)
    wf_modules = [_Module.parse(n, s) for n, s in sorted(workflow_sources.items())]
    act_modules = [_Module.parse(n, s) for n, s in sorted(activity_sources.items())]
    workflows_by_module = {m.name: _workflows_of(m) for m in wf_modules}
    all_workflows = [w for ws in workflows_by_module.values() for w in ws]
    scanner = _Scanner(cat, all_workflows)
    edges: set[Edge] = set()

    for module in wf_modules:
        defined = workflows_by_module[module.name]
        for stmt in module.tree.body:
            by = [w.name for w in defined if isinstance(stmt, ast.ClassDef) and w.cls == stmt.name]
            for target, kind, via in scanner.references(module, stmt, in_workflow=True):
                edges.update(Edge(o, target, kind, via) for o in by or [w.name for w in defined])

    class_services = _class_services(act_modules, cat)
    module_services = {
        m.name: {svc for s in m.tree.body if isinstance(s, ast.ClassDef) for svc in class_services[s.name]}
        for m in act_modules
    }
    for _ in act_modules:  # a helper module serves the services of the modules importing it
        for module in act_modules:
            for imported, _name in module.imports.values():
                if imported in module_services and not module_services[imported]:
                    module_services[imported] |= module_services[module.name]
    unattributed = []
    for module in act_modules:
        for stmt in module.tree.body:
            owners = class_services.get(stmt.name, set()) if isinstance(stmt, ast.ClassDef) else set()
            owners = owners or module_services[module.name]
            found = [
                r for r in scanner.references(module, stmt, in_workflow=False) if r[0] in scanner.by_type
            ]
            if found and not owners:
                unattributed.append(module.name)
            edges.update(Edge(o, target, kind, via) for o in owners for target, kind, via in found)

    services = (ORCHESTRATION, *dict.fromkeys(e.service for e in cat.entries))
    return Graph(
        workflows=tuple(w.name for w in all_workflows),
        services=services,
        edges=tuple(sorted(edges)),
        unattributed=tuple(sorted(set(unattributed))),
    )


def _sources(package: str) -> dict[str, str]:
    return {
        f"{package}.{p.stem}": p.read_text()
        for p in sorted((ROOT / package).glob("*.py"))
        if p.stem != "__init__"
    }


@cache
def derive() -> Graph:
    """The graph of this code base's `workflows/` and `activities/`."""
    return scan(_sources("workflows"), _sources("activities"))


# --- rendering --------------------------------------------------------------------------

README_BEGIN = "<!-- dependency-graph:begin (generated by `fleetflow graph --readme README.md`) -->"
README_END = "<!-- dependency-graph:end -->"
_LABELS = {"signal_with_start": "signal-with-start", "execute": "execute"}


def mermaid(graph: Graph) -> str:
    """The graph as a Mermaid flowchart: solid arrows wait, dotted ones signal or start."""
    lines = ["flowchart LR", f"  subgraph {ORCHESTRATION}"]
    lines += [f"    {w}" for w in graph.workflows]
    lines.append("  end")
    lines += [f"  svc_{s}[({s})]" for s in graph.services[1:]]

    def node(name: str) -> str:
        return name if name in graph.workflows else f"svc_{name}"

    pairs: dict[tuple[str, str, str], list[str]] = {}
    for edge in graph.edges:
        if edge.kind == "activity":
            pairs.setdefault((edge.source, edge.target, "activity"), [])
        else:
            pairs.setdefault((edge.source, edge.target, edge.kind), []).append(edge.via)
    for (source, target, kind), vias in sorted(pairs.items()):
        arrow = "-->" if kind in WAITING else "-.->"
        text = f"{_LABELS.get(kind, kind)} {', '.join(sorted(set(vias)))}"
        label = "" if kind == "activity" else f'|"{text}"|'
        lines.append(f"  {node(source)} {arrow}{label} {node(target)}")
    return "\n".join(lines) + "\n"


_TABLE = re.compile(r"\b(CREATE|DROP) TABLE (?:IF (?:NOT )?EXISTS )?(\w+)\.(\w+)", re.IGNORECASE)


def owned_tables() -> dict[str, list[str]]:
    """Per schema, the tables the migrations leave (created and not dropped)."""
    from fleetflow.migrations import MIGRATIONS

    tables: dict[str, None] = {}
    for _name, sql in MIGRATIONS:
        for match in re.finditer(
            r"\b(CREATE|DROP) TABLE (?:IF (?:NOT )?EXISTS )?(\w+)\.(\w+)", sql, re.IGNORECASE
        ):
            key = f"{match[2]}.{match[3]}"
            if match[1].upper() == "CREATE":
                tables[key] = None
            else:
                tables.pop(key, None)
    result: dict[str, list[str]] = {}
    for key in tables:
        result.setdefault(key.split(".")[0], []).append(key)
    return result


def services_table(graph: Graph) -> str:
    """Per service: its schema's tables, who calls it, what it waits on, what it signals or starts."""
    tables, callers, waits = owned_tables(), graph.callers(), graph.waits_on()
    sends: dict[str, dict[str, None]] = {s: {} for s in graph.services}
    for (source, _target), edges in graph.service_edges().items():
        for e in edges:
            if not e.waits:
                via = "" if e.via == "run" else f" `{e.via}`"
                sends[source][f"`{e.target}` ({_LABELS.get(e.kind, e.kind)}{via})"] = None

    def names(items: Sequence[str]) -> str:
        return ", ".join(f"`{i}`" for i in items) or "—"

    rows = [
        "| service | owns | called by | waits on | signals or starts |",
        "|---|---|---|---|---|",
    ]
    for service in graph.services:
        owns = names(tables.get(service, []))
        if service == ORCHESTRATION:
            owns = f"the workflows ({len(graph.workflows)}); their state is their history"
        cells = [
            f"`{service}`",
            owns,
            names(callers[service]),
            names(waits[service]),
            ", ".join(sends[service]) or "—",
        ]
        rows.append(f"| {' | '.join(cells)} |")
    order = " → ".join(f"`{s}`" for s in graph.topological_order())
    return "\n".join(rows) + f"\n\nStart order (each after what it waits on): {order}.\n"


def readme_block(graph: Graph) -> str:
    """What `fleetflow graph --readme` puts between README's markers."""
    return f"{README_BEGIN}\n```mermaid\n{mermaid(graph)}```\n\n{services_table(graph)}{README_END}"


def rewrite_readme(text: str, graph: Graph) -> str:
    """text with the block between the markers replaced; ValueError when a marker is missing."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {README_BEGIN!r} ... {README_END!r} block")
    return text[:start] + readme_block(graph) + text[end + len(README_END) :]
