"""The device's long-poll for a delta: held by the twin's `wait_for_delta` update.

One waiter per device (429 for a second), released in the twin at once when the device hangs up
(answered 499), retried while the twin continues as new (`Restarting`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import HTTPException, Request, Response, status
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.state import AppState
from api.twin_calls import on_twin, refusal
from fleetflow.contracts.twin import DeltaView, WaitForDelta
from workflows.device_twin import DeviceTwin, twin_id

T = TypeVar("T")

MAX_WAIT_S = 60
RESTART_PAUSE_S = 0.2  # while the twin continues as new, before asking the next run
WAIT_GRACE_S = 10  # how long past its wait a long-poll waits for the twin's answer
MIN_REWAIT_S = 1.0  # less time left than this: answer rather than wait again
CLIENT_CLOSED_REQUEST = 499  # the status of a long-poll whose device hung up (as nginx logs it)


def busy(wait: int) -> HTTPException:
    """429 for a second concurrent long-poll of one device, retry after its wait."""
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail="this device already has a long-poll waiting: one at a time",
        headers={"Retry-After": str(max(wait, 1))},
    )


async def long_poll(
    http: Request, state: AppState, tenant: str, device_id: str, wait: int, answer: DeltaView
) -> DeltaView | Response:
    """Hold the device's request until the twin has a delta or `wait` seconds are over."""
    key = (tenant, device_id)
    if key in state.twin_waiters:
        raise busy(wait)  # this process already holds one: no need to ask the twin
    state.twin_waiters.add(key)
    waiter_id = uuid.uuid4().hex
    release = state.temporal.get_workflow_handle(twin_id(tenant, device_id))
    try:
        return await _held(http, state, tenant, device_id, wait, answer, waiter_id)
    except asyncio.CancelledError:
        # the device is gone: end its wait in the twin too, or its next request would get 429
        await asyncio.shield(release.signal(DeviceTwin.release_wait, waiter_id))
        raise
    except _HungUp:
        # as above; a device dropping its connection is routine, not a server error (an
        # exception here was logged as one, with its traceback): answered for the access log
        await asyncio.shield(release.signal(DeviceTwin.release_wait, waiter_id))
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        state.twin_waiters.discard(key)


class _HungUp(Exception):
    """The client of a long-poll disconnected."""


async def _unless_hung_up(http: Request, work: Awaitable[T]) -> T:
    """work's result; _HungUp (and work cancelled) when the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        # the server delivers http.disconnect when the client hangs up (the body is read by then)
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            # the SDK ends a cancelled update call with an error of its own: retrieved here,
            # or asyncio logs "Task exception was never retrieved" for every hang-up
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise _HungUp
        return task.result()
    finally:
        task.cancel()
        watcher.cancel()


async def _held(
    http: Request, state: AppState, tenant: str, device_id: str, wait: int, answer: DeltaView, waiter_id: str
) -> DeltaView:
    """Wait on the twin's `wait_for_delta` until there is a delta or the wait is over."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    tries = 0
    while (left := deadline - loop.time()) > 0 and (tries == 0 or left >= MIN_REWAIT_S):
        tries += 1
        request = WaitForDelta(tenant=tenant, device_id=device_id, timeout_s=left, waiter_id=waiter_id)

        async def hold(handle: WorkflowHandle[Any, Any], request: WaitForDelta = request) -> DeltaView:
            result: DeltaView = await handle.execute_update(DeviceTwin.wait_for_delta, request)
            return result

        try:
            async with asyncio.timeout(left + WAIT_GRACE_S):
                answer = await _unless_hung_up(http, on_twin(state, tenant, device_id, hold))
        except TimeoutError:
            break  # the twin did not answer (its worker is down): answer what we know
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            kind = cause.type if isinstance(cause, ApplicationError) else None
            if kind == "WaiterBusy":
                raise busy(wait) from None
            if kind == "Restarting":
                await asyncio.sleep(RESTART_PAUSE_S)
                continue
            if kind == "TwinEnded":
                break
            raise refusal(exc) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.RESOURCE_EXHAUSTED:  # the twin's limit of updates in flight
                raise busy(wait) from None
            raise
        if answer.delta:
            break
    return answer
