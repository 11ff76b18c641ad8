"""A twin that cannot take a call for now is a 503 with Retry-After, not a 500."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastapi import HTTPException
from temporalio.client import WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from api.state import AppState
from api.twin_calls import on_twin


def _state() -> AppState:
    temporal = SimpleNamespace(get_workflow_handle=lambda workflow_id: workflow_id)
    return cast(AppState, SimpleNamespace(temporal=temporal))


async def _answer(failure: BaseException) -> HTTPException:
    async def action(handle: Any) -> None:
        raise failure

    with pytest.raises(HTTPException) as raised:
        await on_twin(_state(), "t1", "d1", action)
    return raised.value


async def test_a_twin_whose_workflow_task_failed_is_a_503_saying_nothing_changed() -> None:
    # what the server answers an update while the twin's workflow task is failed (being retried)
    failure = RPCError(
        "Unable to perform workflow execution update due to Workflow Task in failed state.",
        RPCStatusCode.FAILED_PRECONDITION,
        b"",
    )
    answer = await _answer(failure)
    assert answer.status_code == 503
    assert answer.headers == {"Retry-After": "1"}
    assert "nothing was changed" in str(answer.detail)


@pytest.mark.parametrize(
    "failure",
    [
        RPCError("deadline", RPCStatusCode.DEADLINE_EXCEEDED, b""),
        WorkflowUpdateRPCTimeoutOrCancelledError(),
    ],
)
async def test_a_twin_that_did_not_answer_in_time_is_a_503_saying_the_change_may_apply(
    failure: BaseException,
) -> None:
    answer = await _answer(failure)
    assert answer.status_code == 503
    assert "may still be applied" in str(answer.detail)


async def test_other_rpc_errors_are_not_taken_for_a_busy_twin() -> None:
    async def action(handle: Any) -> None:
        raise RPCError("denied", RPCStatusCode.PERMISSION_DENIED, b"")

    with pytest.raises(RPCError):
        await on_twin(_state(), "t1", "d1", action)
