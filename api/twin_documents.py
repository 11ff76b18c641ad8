"""Reading a twin route's JSON body within the twin document limits (413 bytes, 422 depth/keys)."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException, Request

from api.limits import TWIN_DOCUMENT_MAX_BYTES
from api.problems import invalid
from fleetflow.contracts.twin import MAX_DOCUMENT_DEPTH
from fleetflow.twin_state import Breach, document_breach

MAX_BODY_BYTES = TWIN_DOCUMENT_MAX_BYTES  # BodyLimit refuses a larger body before it is read


def limit_problem(loc: list[str | int], breach: Breach) -> HTTPException:
    """413 (bytes) or 422 (depth, keys), naming the document and the limit."""
    detail = [{"loc": loc, "msg": f"{breach.what} {breach.reason}", "type": f"limit.{breach.limit}"}]
    return HTTPException(breach.status, detail=detail)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


async def json_body(request: Request) -> Any:
    """The request's JSON body, refused with 413 past MAX_BODY_BYTES before it is read whole."""
    too_large = Breach("body", "bytes", f"must be at most {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise limit_problem(["body"], too_large)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise limit_problem(["body"], too_large)
    try:
        return json.loads(raw, parse_float=_finite, parse_constant=_constant)
    except RecursionError:
        deep = Breach("body", "depth", f"must nest at most {MAX_DOCUMENT_DEPTH} levels deep")
        raise limit_problem(["body"], deep) from None
    except ValueError:
        raise invalid(["body"], "is not valid JSON (finite numbers only)") from None


async def document(request: Request, what: str) -> dict[str, Any]:
    """A twin document (or patch) from the body: a JSON object within the document limits."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise invalid(["body"], "must be a JSON object")
    breach = document_breach(body, what)
    if breach is not None:
        raise limit_problem(["body"], breach)
    return body
