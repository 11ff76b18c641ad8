"""Routes of the events resource."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["events"])
