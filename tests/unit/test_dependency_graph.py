"""The service dependency graph derived from the code: its edges, the declared set, cycles, the
README block, `fleetflow graph` and the `/v1/services` view."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio import workflow

from api.routers.health import service_nodes
from cli.main import build_parser, dispatch
from fleetflow.code_scan import scan
from fleetflow.dependency_graph import (
    ALLOWED,
    ORCHESTRATION,
    ROOT,
    CycleError,
    Edge,
    check,
    derive,
)
from fleetflow.graph_render import mermaid, owned_tables, readme_block, rewrite_readme
from fleetflow.interfaces import CATALOGUE, INTERFACES
from workers.registry import WORKFLOWS

# --- the graph of this code base ---------------------------------------------------------


def test_every_derived_edge_is_declared_and_no_calls_wait_in_a_cycle() -> None:
    assert check(derive()) == []


def test_the_nodes_are_the_registered_workflows_and_the_interfaces_services() -> None:
    graph = derive()
    registered = {workflow._Definition.must_from_class(w).name for w in WORKFLOWS}
    assert set(graph.workflows) == registered
    assert graph.services == (ORCHESTRATION, *(i.service for i in INTERFACES))


def test_every_activity_of_the_catalogue_is_called_by_a_workflow() -> None:
    # a step the scanner cannot see (a form of call it does not know) shows up here
    called = {e.via for e in derive().edges if e.kind == "activity"}
    # called by the identity interceptor (fleetflow/identity_workflow.py) for every scheduled
    # run of a schedulable workflow (fleetflow/schedules.py), before the workflow's own code
    called.add("data.verify_scheduled_run")
    assert sorted(e.name for e in CATALOGUE if e.name not in called) == []


def test_the_graph_has_the_edges_the_workflows_and_services_make() -> None:
    edges = set(derive().edges)
    assert {Edge("SystemCheck", i.service, "activity", f"{i.service}.ping") for i in INTERFACES} <= edges
    assert Edge("DeviceOnboarding", "device", "activity", "device.register") in edges
    assert Edge("EventDelivery", "webhook", "activity", "notification.deliver_pending") in edges
    assert Edge("DeviceOnboarding", "DeviceTwin", "child", "run") in edges
    assert Edge("DeviceDecommission", "DeviceTwin", "signal", "end") in edges
    assert Edge("notification", "EventDelivery", "signal_with_start", "nudge") in edges
    assert Edge("data", "TelemetryIngestion", "start", "run") in edges
    assert not [e for e in edges if e.source == "DeviceTwin"]


def test_services_start_after_what_they_wait_on() -> None:
    graph = derive()
    order = graph.topological_order()
    assert sorted(order) == sorted(graph.services) and order[-1] == ORCHESTRATION
    for service, waited in graph.closure().items():
        assert all(order.index(w) < order.index(service) for w in waited)
    # starting a workflow or signalling one is no wait: no cycle through orchestration
    assert graph.notifies()["notification"] == (ORCHESTRATION,)
    assert graph.waits_on()["notification"] == ()


# --- synthetic code: what the checks catch -----------------------------------------------

WORKFLOW = """
from temporalio import workflow
with workflow.unsafe.imports_passed_through():
    from fleetflow.interfaces.device import DeviceActivities as Devices

@workflow.defn(name=NAME)
class Probe:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity_method(Devices.register, None, task_queue="device")

    @workflow.signal
    async def poke(self) -> None: ...

    @workflow.update(name="bump")
    async def bump_it(self) -> None: ...

NAME = "ProbeFlow"
"""

ANALYTICS = """
from fleetflow.interfaces.analytics import AnalyticsActivities

class Mixin:
    async def _wake(self, client) -> None:
        await client.start_workflow("ProbeFlow", None, id="x", start_signal="poke")

class AnalyticsService(Mixin, AnalyticsActivities):
    pass
"""

DEVICE_WAITING = """
from fleetflow.interfaces.device import DeviceActivities
from workflows.probe import Probe

class DeviceService(DeviceActivities):
    async def register(self, client) -> None:
        await client.execute_workflow(Probe.run, id="y", task_queue="orchestration")
"""


def test_typed_activity_calls_through_an_alias_are_edges() -> None:
    graph = scan({"workflows.probe": WORKFLOW}, {})
    assert graph.workflows == ("ProbeFlow",)
    assert graph.edges == (Edge("ProbeFlow", "device", "activity", "device.register"),)


def test_an_undeclared_edge_fails_the_check() -> None:
    graph = scan({"workflows.probe": WORKFLOW}, {"activities.analytics": ANALYTICS})
    assert Edge("analytics", "ProbeFlow", "signal_with_start", "poke") in graph.edges
    allowed = {(ORCHESTRATION, "device"): "registers"}
    assert check(graph, allowed) == [
        "undeclared edge analytics -> orchestration (analytics signal_with_start ProbeFlow.poke): "
        "declare it in ALLOWED or remove it"
    ]
    assert check(graph, {**allowed, ("analytics", ORCHESTRATION): "wakes it"}) == []


def test_a_declaration_nothing_derives_fails_the_check() -> None:
    graph = scan({"workflows.probe": WORKFLOW}, {})
    problems = check(graph, {(ORCHESTRATION, "device"): "registers", ("device", "data"): "gone"})
    assert problems == ["declared edge device -> data is not in the code any more: remove it"]


def test_a_cycle_of_waiting_calls_fails_the_check_even_when_its_edges_are_declared() -> None:
    graph = scan({"workflows.probe": WORKFLOW}, {"activities.devices": DEVICE_WAITING})
    allowed = {(ORCHESTRATION, "device"): "registers", ("device", ORCHESTRATION): "waits on it"}
    assert check(graph, allowed) == [
        "cycle of waiting calls: device -> orchestration -> device",
        "cycle of waiting calls: ProbeFlow -> device -> ProbeFlow",
    ]
    with pytest.raises(CycleError) as raised:
        graph.topological_order()
    assert raised.value.cycle == ["device", ORCHESTRATION]


def test_signals_and_updates_by_name_reach_the_workflow_that_declares_them() -> None:
    source = """
class Waker:
    async def wake(self, client) -> None:
        await client.get_workflow_handle("x").signal("poke")
        await client.get_workflow_handle("x").execute_update("bump")
        await client.get_workflow_handle("x").execute_update("poke")  # a signal: no update

class DataService(Waker, DataActivities):
    pass
"""
    graph = scan({"workflows.probe": WORKFLOW}, {"activities.telemetry": source})
    assert Edge("data", "ProbeFlow", "signal", "poke") in graph.edges
    assert Edge("data", "ProbeFlow", "update", "bump") in graph.edges
    assert Edge("data", "ProbeFlow", "update", "poke") not in graph.edges
    assert graph.waits_on()["data"] == (ORCHESTRATION,)  # an update waits for the workflow's answer


def test_code_that_starts_workflows_but_belongs_to_no_service_fails_the_check() -> None:
    source = """
async def kick(client) -> None:
    await client.start_workflow("ProbeFlow", None, id="x")
"""
    graph = scan({"workflows.probe": WORKFLOW}, {"activities.stray": source})
    assert check(graph, {(ORCHESTRATION, "device"): "registers"}) == [
        "activities.stray: calls into workflows, but belongs to no service"
    ]


def test_child_workflows_waiting_on_each_other_are_a_cycle() -> None:
    source = """
from temporalio import workflow

@workflow.defn
class Ping:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_child_workflow(Pong.run)

@workflow.defn
class Pong:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_child_workflow("Ping")
"""
    graph = scan({"workflows.pingpong": source}, {})
    assert graph.service_edges() == {}
    assert check(graph, {}) == ["cycle of waiting calls: Ping -> Pong -> Ping"]


# --- where the graph is shown --------------------------------------------------------------


def test_readme_block_is_what_the_command_writes() -> None:
    text = (ROOT / "README.md").read_text()
    assert rewrite_readme(text, derive()) == text, "run: fleetflow graph --readme README.md"


def test_readme_table_names_each_services_tables_and_callers() -> None:
    graph, block = derive(), readme_block(derive())
    callers = graph.callers()
    for service, tables in owned_tables().items():
        if service in graph.services:
            row = next(line for line in block.splitlines() if line.startswith(f"| `{service}` |"))
            assert all(f"`{t}`" in row for t in tables)
            assert all(f"`{c}`" in row for c in callers[service])


def test_graph_command_prints_the_mermaid_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(build_parser().parse_args(["graph"])) == 0
    out = capsys.readouterr().out
    assert out == mermaid(derive())
    assert out.startswith("flowchart LR\n")
    assert '  svc_notification -.->|"signal-with-start nudge"| EventDelivery' in out.splitlines()


def test_graph_command_rewrites_only_the_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n<!-- dependency-graph:begin (generated by `fleetflow graph --readme README.md`) -->\n"
        "stale\n<!-- dependency-graph:end -->\ntail\n"
    )
    assert dispatch(build_parser().parse_args(["graph", "--readme", str(readme)])) == 0
    text = readme.read_text()
    assert text == f"# Title\n{readme_block(derive())}\ntail\n"
    readme.write_text("# no markers\n")
    assert dispatch(build_parser().parse_args(["graph", "--readme", str(readme)])) == 2
    assert readme.read_text() == "# no markers\n"
    assert dispatch(build_parser().parse_args(["graph", "--readme", str(tmp_path / "missing.md")])) == 2
    capsys.readouterr()


def test_services_view_keeps_called_by_and_adds_the_graph() -> None:
    graph = derive()
    nodes = {n.queue: n for n in service_nodes(graph, {"device": 2})}
    assert nodes["device"].pollers == 2 and nodes["data"].pollers == 0
    assert nodes["webhook"].called_by == ["EventDelivery", "SystemCheck"]
    assert nodes[ORCHESTRATION].called_by == []
    assert nodes[ORCHESTRATION].callers == ["data", "device", "notification"]
    assert nodes["notification"].signals_or_starts == [ORCHESTRATION]
    assert nodes[ORCHESTRATION].waits_on_transitively == sorted(graph.services[1:])
    assert [q for q, n in sorted(nodes.items(), key=lambda kv: kv[1].order)] == graph.topological_order()
    assert {(e.source, e.target, e.kind) for e in nodes["data"].edges} == {
        ("data", "TelemetryIngestion", "start")
    }
    assert set(ALLOWED) == set(graph.service_edges())
