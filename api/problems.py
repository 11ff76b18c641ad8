"""Errors in FastAPI's 422 shape, so every bad field is named the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

T = TypeVar("T")


def invalid(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> HTTPException:
    """A 422 naming the field (loc) and the reason."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, detail=[{"loc": list(loc), "msg": msg, "type": kind}]
    )


async def validation_problem(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing the submitted values back: a rejected body may hold a
    secret (a webhook secret, a credential pasted in the wrong field)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def not_found(what: str) -> HTTPException:
    """A 404 (also used for what another tenant owns, so ids do not leak)."""
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} not found")


def conflict(msg: str) -> HTTPException:
    """A 409."""
    return HTTPException(status.HTTP_409_CONFLICT, detail=msg)


async def progress_or_404(handle: WorkflowHandle[Any, Any], what: str, result_type: type[T]) -> T:
    """The workflow's `progress` query; 404 naming `what` when there is no such workflow."""
    try:
        result: T = await handle.query("progress", result_type=result_type)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise not_found(what) from None
        raise
    return result
