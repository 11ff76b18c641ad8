"""Errors as RFC 9457 problem details (`application/problem+json`), everywhere.

Every error the API answers has `type`, `title`, `status`, `detail` and `instance` (the
request's path); a 422 (and any other refusal that names fields) adds `errors`, a list of
`{loc, msg, type}` naming each bad field and the reason, never the submitted value.
Routers raise FastAPI's HTTPException (or use `invalid`, `not_found`, `conflict`); the
handlers installed by `install_problem_handlers` turn every one into a problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

T = TypeVar("T")
PROBLEM_JSON = "application/problem+json"
MAX_LISTED = 3  # fields named in `detail`; `errors` has them all
# RFC 9110's names where Python's http module still has the older ones
_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


class FieldError(BaseModel):
    """One bad field: where it is (`["body", "config", "target_c"]`) and why."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    type: str = Field("about:blank", description="a URI naming the kind of problem")
    title: str = Field(description="the HTTP status's name")
    status: int
    detail: str = Field(description="what went wrong, for a person")
    instance: str = Field(description="the request's path")


class ValidationProblem(Problem):
    """A problem that names the fields at fault."""

    errors: list[FieldError]


class ProblemResponse(JSONResponse):
    """JSON with the problem media type."""

    media_type = PROBLEM_JSON


def title_of(code: int) -> str:
    """The status's name (`Not Found`)."""
    if code in _TITLES:
        return _TITLES[code]
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def problem_body(
    code: int, detail: str, instance: str, errors: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """A problem document (with `errors` when given)."""
    body: dict[str, Any] = {"type": "about:blank", "title": title_of(code), "status": code}
    body |= {"detail": detail, "instance": instance}
    if errors is not None:
        body["errors"] = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]
    return body


def problem(
    code: int,
    detail: str,
    instance: str,
    *,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A problem+json response."""
    return ProblemResponse(problem_body(code, detail, instance, errors), status_code=code, headers=headers)


def _summary(errors: Sequence[Mapping[str, Any]]) -> str:
    named = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:MAX_LISTED]]
    more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
    return "; ".join(named) + more


async def http_problem(request: Request, exc: Exception) -> Response:
    """Any HTTPException (a router's, or routing's 404 and 405) as a problem."""
    assert isinstance(exc, StarletteHTTPException)
    headers = exc.headers
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=headers)
    detail = exc.detail
    if isinstance(detail, list) and all(isinstance(e, dict) for e in detail):
        return problem(exc.status_code, _summary(detail), request.url.path, errors=detail, headers=headers)
    if isinstance(detail, dict):  # its members go along (RFC 9457 extension members)
        text = str(detail.get("detail") or detail.get("msg") or title_of(exc.status_code))
        body = problem_body(exc.status_code, text, request.url.path, detail.get("errors"))
        extra = {k: v for k, v in detail.items() if k not in body and k not in ("msg", "type", "title")}
        return ProblemResponse(extra | body, status_code=exc.status_code, headers=headers)
    return problem(exc.status_code, str(detail), request.url.path, headers=headers)


async def validation_problem(request: Request, exc: Exception) -> Response:
    """A 422 naming every bad field, without echoing the submitted values back: a rejected body
    may hold a secret (a webhook secret, a credential pasted in the wrong field)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    for error in errors:
        error["loc"] = list(error.get("loc", ()))
    code = status.HTTP_422_UNPROCESSABLE_CONTENT
    return problem(code, _summary(errors), request.url.path, errors=errors)


async def server_error_problem(request: Request, exc: Exception) -> Response:
    """A 500 that says nothing of the cause (the server logs it: the error is raised on)."""
    return problem(500, "the server failed to answer; the error is logged", request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error of app as a problem."""
    app.add_exception_handler(StarletteHTTPException, http_problem)
    app.add_exception_handler(RequestValidationError, validation_problem)
    app.add_exception_handler(Exception, server_error_problem)


def invalid(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> HTTPException:
    """A 422 naming the field (loc) and the reason."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, detail=[{"loc": list(loc), "msg": msg, "type": kind}]
    )


def not_found(what: str) -> HTTPException:
    """A 404 (also used for what another tenant owns, so ids do not leak)."""
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} not found")


def conflict(msg: str) -> HTTPException:
    """A 409."""
    return HTTPException(status.HTTP_409_CONFLICT, detail=msg)


async def progress_or_404(handle: WorkflowHandle[Any, Any], what: str, result_type: type[T], *args: Any) -> T:
    """The workflow's `progress` query (with args); 404 naming `what` when there is no such workflow."""
    try:
        result: T = await handle.query("progress", args=list(args), result_type=result_type)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise not_found(what) from None
        raise
    return result
