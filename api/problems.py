"""Errors in FastAPI's 422 shape, so every bad field is named the same way."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import HTTPException, status


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
