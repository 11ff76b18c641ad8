"""Calling a device's twin workflow: starting it when missing, and its update failures as HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import HTTPException, status
from temporalio.client import RPCTimeoutOrCancelledError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.problems import conflict, invalid, not_found
from api.state import AppState
from api.twin_documents import limit_problem
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import DeviceStatus
from fleetflow.contracts.twin import TwinInput, TwinState
from fleetflow.temporal import device_search_attributes
from fleetflow.twin_state import Breach
from workflows.device_twin import DeviceTwin, twin_id

T = TypeVar("T")
# the twin cannot take the call for now (its workflow task failed and is being retried, the
# server is away): 503 with Retry-After, not a 500; the call was refused, nothing changed
REFUSED_FOR_NOW = {RPCStatusCode.UNAVAILABLE, RPCStatusCode.FAILED_PRECONDITION}
RETRY_AFTER_S = 1


async def start_twin(state: AppState, tenant: str, device_id: str) -> None:
    """Start the twin of an active device that has none yet (bulk-onboarded devices)."""
    device = await state.devices.get_device(tenant, device_id)
    if device is None:
        raise not_found(f"device {device_id!r}")
    if device.status != DeviceStatus.ACTIVE:
        raise conflict(f"device {device_id!r} is {device.status.value}: it has no twin")
    kind = await state.devices.device_type(tenant, device.device_type)
    config = await state.devices.config_of(tenant, device_id) or {}
    await state.temporal.start_workflow(
        DeviceTwin.run,
        TwinInput(
            tenant=tenant,
            device_id=device_id,
            config_schema=kind.config_schema if kind else {},
            initial_desired=config,
            initial_reported={"firmware_version": device.firmware_version},
        ),
        id=twin_id(tenant, device_id),
        task_queue=TaskQueue.ORCHESTRATION.value,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=device_search_attributes(tenant, "twin", device_id),
    )


async def on_twin(
    state: AppState,
    tenant: str,
    device_id: str,
    action: Callable[[WorkflowHandle[Any, Any]], Awaitable[T]],
) -> T:
    """Run action on the device's twin, starting the twin first if the device has none; 503
    (Retry-After) while the twin cannot answer."""
    handle = state.temporal.get_workflow_handle(twin_id(tenant, device_id))
    try:
        try:
            return await action(handle)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
        await start_twin(state, tenant, device_id)
        return await action(handle)
    except RPCTimeoutOrCancelledError:
        raise _unavailable(
            "it did not answer in time: a change may still be applied, read its version first"
        ) from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.DEADLINE_EXCEEDED:
            raise _unavailable(
                "it did not answer in time: a change may still be applied, read its version first"
            ) from None
        if exc.status not in REFUSED_FOR_NOW:
            raise
        raise _unavailable(f"{exc.message}; nothing was changed") from None


def _unavailable(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail=f"the device's twin cannot answer right now ({reason}); retry",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def twin_state(state: AppState, tenant: str, device_id: str) -> TwinState:
    """The twin's current state (its `get` query), starting the twin if the device has none."""

    async def get(handle: WorkflowHandle[Any, Any]) -> TwinState:
        result: TwinState = await handle.query(DeviceTwin.get)
        return result

    return await on_twin(state, tenant, device_id, get)


def refusal(exc: WorkflowUpdateFailedError) -> HTTPException:
    """The HTTP answer for a twin update the twin refused (412, 422, 413, 403, else 409)."""
    cause = exc.cause
    if not isinstance(cause, ApplicationError):
        return conflict(str(cause or exc))
    if cause.type == "StaleVersion":
        return HTTPException(status.HTTP_412_PRECONDITION_FAILED, detail=cause.message)
    if cause.type == "InvalidDocument":
        path = str(cause.details[0]) if cause.details else "desired"
        reason = str(cause.details[1]) if len(cause.details) > 1 else cause.message
        loc = list(cause.details[2]) if len(cause.details) > 2 else path.split(".")
        return invalid(["body", *loc[1:]], reason)
    if cause.type == "TooLarge" and len(cause.details) > 1:
        what, limit = str(cause.details[0]), str(cause.details[1])
        if limit in ("bytes", "depth", "keys"):
            return limit_problem(["body"], Breach(what, limit, cause.message))  # type: ignore[arg-type]
    if cause.type == "Forbidden":
        return HTTPException(status.HTTP_403_FORBIDDEN, detail=cause.message)
    return conflict(cause.message)
