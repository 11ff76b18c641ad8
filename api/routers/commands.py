"""Device commands (durable RPC): operators send a command and read or wait for its result; the
device long-polls for its commands and answers each. Each command is a DeviceCommand workflow
(its deadlines) over a row of the device service (its truth)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from activities.device_commands import CAMPAIGN_SEPARATOR, CommandConflict
from api.auth import State, actor_of, require, require_device
from api.command_notices import CommandNotices, offered_key, settled_key
from api.models.base import as_contract
from api.models.commands import CommandBody, CommandPage, CommandResultBody, DeviceCommands
from api.problems import conflict, invalid, not_found
from api.state import AppState
from fleetflow.contracts.commands import (
    MAX_COMMAND_WAIT_S,
    TERMINAL_STATUSES,
    CommandInput,
    CommandSpec,
    CommandState,
    CommandView,
)
from fleetflow.contracts.common import TaskQueue
from fleetflow.security import DeviceClaims, TokenClaims
from fleetflow.temporal import device_search_attributes
from workflows.device_command import DeviceCommand, command_workflow_id

router = APIRouter(tags=["commands"])
Commander = Annotated[TokenClaims, Depends(require("devices:command"))]
Device = Annotated[tuple[DeviceClaims, str], Depends(require_device)]
Wait = Annotated[int, Query(ge=0, le=MAX_COMMAND_WAIT_S, description="seconds to wait")]
MAX_DELIVERED = 10  # commands handed to a device per poll
POLL_GRACE_S = 10  # a long-poll's lease outlives its wait by this much (a crashed process's lapses)
HANGUP_CHECK_S = 1.0  # how often a held long-poll looks whether its device hung up


@router.post(
    "/v1/devices/{device_id}/commands", status_code=status.HTTP_201_CREATED, response_model=CommandView
)
async def send_command(device_id: str, body: CommandBody, state: State, claims: Commander) -> CommandView:
    """Send a command: delivered when the device polls (or is pushed), until `expires_s`; its
    answer is due `timeout_s` after delivery. The same `command_id` again is the same command."""
    command_id = body.command_id or uuid.uuid4().hex
    wid = command_workflow_id(claims.tenant, device_id, command_id)
    spec = as_contract(body, CommandSpec)
    view = await state.devices.create_command(claims.tenant, device_id, command_id, spec, wid, claims.subject)
    if view is None:
        raise not_found(f"active device {device_id!r}")
    if (view.name, view.params, view.timeout_s) != (spec.name, spec.params, spec.timeout_s):
        raise conflict(f"command {command_id!r} exists with another name, params or timeout")
    try:
        await state.temporal.start_workflow(
            DeviceCommand.run,
            CommandInput(
                tenant=claims.tenant,
                device_id=device_id,
                command_id=command_id,
                actor=actor_of(claims),
                timeout_s=view.timeout_s,
                expires_at=view.expires_at,
            ),
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=device_search_attributes(claims.tenant, "command", device_id),
        )
    except WorkflowAlreadyStartedError:
        pass  # a retry of the same request: its run exists (or ended)
    except BaseException:
        if view.status == "pending" and body.command_id is None:
            await asyncio.shield(state.devices.drop_command(claims.tenant, device_id, command_id))
        raise
    return view


def _cursor(view: CommandView) -> str:
    raw = json.dumps([view.created_at.isoformat(), view.command_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _after(cursor: str | None) -> tuple[datetime, str] | None:
    if cursor is None:
        return None
    try:
        at, command_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(at), str(command_id)
    except (ValueError, TypeError, binascii.Error):
        raise invalid(["query", "cursor"], "not a cursor this API returned") from None


@router.get("/v1/devices/{device_id}/commands", response_model=CommandPage)
async def list_commands(
    device_id: str,
    state: State,
    claims: Commander,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> CommandPage:
    """The device's commands, newest first, a page at a time (`cursor` = the last page's `next`)."""
    if await state.devices.get_device(claims.tenant, device_id) is None:
        raise not_found(f"device {device_id!r}")
    items = await state.devices.list_commands(claims.tenant, device_id, limit + 1, _after(cursor))
    more = len(items) > limit
    items = items[:limit]
    return CommandPage(items=items, next=_cursor(items[-1]) if more else None)


@router.get("/v1/devices/{device_id}/commands/{command_id}", response_model=CommandView)
async def get_command(
    device_id: str, command_id: str, state: State, claims: Commander, wait: Wait = 0
) -> CommandView:
    """A command's status, result and times; with `wait`, held until it ends or `wait` passes."""
    return await _until_settled(state, claims.tenant, device_id, command_id, wait)


async def _until_settled(
    state: AppState, tenant: str, device_id: str, command_id: str, wait: int
) -> CommandView:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with state.commands.watching(settled_key(tenant, device_id, command_id)) as notice:
        while True:
            notice.clear()
            view = await state.devices.command(tenant, device_id, command_id)
            if view is None:
                raise not_found(f"command {command_id!r} of device {device_id!r}")
            left = deadline - loop.time()
            if view.status in TERMINAL_STATUSES or left <= 0:
                return view
            await CommandNotices.nap(notice, min(left, state.commands.recheck_s))


def _busy(wait: int) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail="this device already has a command long-poll waiting: one at a time",
        headers={"Retry-After": str(max(wait, 1))},
    )


@router.get("/v1/device/commands", response_model=DeviceCommands)
async def poll_commands(
    http: Request, state: State, device: Device, wait: Wait = 0
) -> DeviceCommands | Response:
    """The calling device's commands to run now, each delivered once; with `wait`, held until
    one arrives. One waiter per device: a second concurrent one gets 429."""
    claims, _ = device
    tenant, device_id = claims.tenant, claims.device_id
    key = (tenant, device_id)
    if key in state.command_waiters:
        raise _busy(wait)  # this process holds one already
    state.command_waiters.add(key)
    waiter_id = uuid.uuid4().hex
    try:
        if not await state.devices.claim_poller(tenant, device_id, waiter_id, wait + POLL_GRACE_S):
            raise _busy(wait)  # another API process holds one
        try:
            return await _take(http, state, tenant, device_id, wait)
        finally:
            await asyncio.shield(state.devices.release_poller(tenant, device_id, waiter_id))
    finally:
        state.command_waiters.discard(key)


async def _take(
    http: Request, state: AppState, tenant: str, device_id: str, wait: int
) -> DeviceCommands | Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    read_at = loop.time()  # read at once
    with state.commands.watching(offered_key(tenant, device_id)) as notice:
        while True:
            if wait and await http.is_disconnected():
                return Response(status_code=499)  # nobody to hand a command to: leave it pending
            if notice.is_set() or loop.time() >= read_at:
                notice.clear()
                taken = await state.devices.take_commands(tenant, device_id, MAX_DELIVERED)
                if taken or loop.time() >= deadline:
                    break
                read_at = min(loop.time() + state.commands.recheck_s, deadline)
            # the hang-up is checked every HANGUP_CHECK_S (no query), so the device's next
            # poll finds its lease free; the rows only on a notice or at read_at
            await CommandNotices.nap(notice, min(read_at - loop.time(), HANGUP_CHECK_S))
    for command in taken:  # the runs learn it now rather than at their expiry
        if command.command_id.find(CAMPAIGN_SEPARATOR) < 0:  # a campaign's job has no run of its own
            moved = CommandState(status="delivered", delivered_at=command.delivered_at)
            _signal(state, tenant, device_id, command.command_id, moved)
    return DeviceCommands(commands=taken)


_SIGNALS: set[asyncio.Task[None]] = set()  # signals on their way (a reference keeps each alive)


def _signal(state: AppState, tenant: str, device_id: str, command_id: str, moved: CommandState) -> None:
    """Tell the command's run, in the background: the row already says it, so the device's
    answer does not wait for Temporal, and a lost signal only ends the run at its deadline."""
    handle = state.temporal.get_workflow_handle(command_workflow_id(tenant, device_id, command_id))

    async def send() -> None:
        try:
            await handle.signal(DeviceCommand.moved, moved)
        except RPCError:
            pass  # the run ended: the row is the truth, its deadline reads it

    task = asyncio.create_task(send())
    _SIGNALS.add(task)
    task.add_done_callback(_SIGNALS.discard)


@router.post("/v1/device/commands/{command_id}/result", response_model=CommandView)
async def answer_command(
    command_id: str, body: CommandResultBody, state: State, device: Device
) -> CommandView:
    """The device's answer to a command it was handed; 409 once the command has ended."""
    claims, _ = device
    try:
        view = await state.devices.answer_command(
            claims.tenant, claims.device_id, command_id, body.status, body.result
        )
    except LookupError:
        raise not_found(f"command {command_id!r} of this device") from None
    except CommandConflict as exc:
        raise conflict(str(exc)) from None
    if view.campaign_id is None:
        _signal(state, claims.tenant, claims.device_id, command_id, CommandState(status=view.status))
    return view
