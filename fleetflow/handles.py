"""Typed handles to running workflows, found by a workflow's run method and id."""

from __future__ import annotations

from typing import Any, TypeVar, overload

from temporalio.client import Client, WorkflowHandle
from temporalio.types import MethodAsyncNoParam, MethodAsyncSingleParam

S = TypeVar("S")
R = TypeVar("R")


# Why not `client.get_workflow_handle_for` directly: its parameter is the union
# `MethodAsyncNoParam | MethodAsyncSingleParam`, and mypy (2.4.1) infers through that union
# wrongly once any earlier module in the same run matched a run method of the other arity
# against it. Constraint inference records `builtins.function` as implementing the protocol
# in its subtype cache (a check that skips `__call__`), a later callable that fails the
# `__call__` check falls back to that cached entry, both union arms then "match" with
# conflicting constraints, and the call is inferred as `Never` ("Need type annotation",
# "incompatible type ... MethodAsyncNoParam[Never, Never] | ..."). Whether it fails depends on
# which modules a cold run checks first; one overload per arity never infers through the union.
@overload
def handle_for(client: Client, run: MethodAsyncNoParam[S, R], workflow_id: str) -> WorkflowHandle[S, R]: ...
@overload
def handle_for(
    client: Client, run: MethodAsyncSingleParam[S, Any, R], workflow_id: str
) -> WorkflowHandle[S, R]: ...
def handle_for(
    client: Client, run: MethodAsyncNoParam[S, R] | MethodAsyncSingleParam[S, Any, R], workflow_id: str
) -> WorkflowHandle[S, R]:
    """The handle of the workflow `workflow_id` (its latest run), typed by its run method."""
    return client.get_workflow_handle_for(run, workflow_id)
