"""Workflows name each activity they call by its interface method, never by a string.

A string (`"device.register"`) compiles whatever it says: a typo, a renamed activity or a
step sent to the wrong queue only shows when a run reaches it, and "go to definition" stops
at the string. These checks read the workflow modules' source (the AST), so they hold for
branches no test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fleetflow.interfaces import CATALOGUE, INTERFACES

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
MODULES = sorted(WORKFLOWS.glob("*.py"))
NAMES = {e.name for e in CATALOGUE}
BY_INTERFACE = {i.__name__: {e.method for e in CATALOGUE if e.interface is i} for i in INTERFACES}
# the SDK's calls by activity name; the `_method` forms take the interface method
BY_NAME_CALLS = {"execute_activity", "start_activity", "execute_local_activity", "start_local_activity"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_no_workflow_calls_an_activity_by_name(path: Path) -> None:
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Constant) and node.value in NAMES:
            found.append(f"line {node.lineno}: activity name {node.value!r} as a string")
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in BY_NAME_CALLS:
                found.append(f"line {node.lineno}: workflow.{called} takes the activity by name")
            if any(k.arg == "result_type" for k in node.keywords):
                found.append(f"line {node.lineno}: result_type by hand (the interface declares it)")
    assert not found, f"{path.name}: " + "; ".join(found)


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_every_interface_reference_in_a_workflow_is_a_declared_activity(path: Path) -> None:
    """`DeviceActivities.<x>` in a workflow resolves statically to an activity of the catalogue,
    so the dependency graph can be read off the source."""
    unknown = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            methods = BY_INTERFACE.get(node.value.id)
            if methods is not None and node.attr not in methods:
                unknown.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not unknown, f"{path.name}: not activities of the interface: {unknown}"


def test_the_workflows_calling_activities_name_them_by_interface() -> None:
    """The check above looks at real references: each service's activities are called somewhere."""
    referenced: set[tuple[str, str]] = set()
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.attr in BY_INTERFACE.get(node.value.id, set()):
                    referenced.add((node.value.id, node.attr))
    services = {interface for interface, _ in referenced}
    assert services >= {"DeviceActivities", "DataActivities", "AnalyticsActivities", "NotificationActivities"}
    assert ("WebhookActivities", "deliver_pending") in referenced
