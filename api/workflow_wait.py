"""A bounded wait for a workflow's result: a route that answers with its workflow's outcome
(acknowledge, clear, renew, rotate one device) never hangs when no orchestration worker runs.

After `settings.workflow_wait_s` the route answers 503 with `Retry-After`, the workflow id and,
where there is one, the URL that shows the outcome; the run itself goes on and completes once
a worker polls (repeating a renewal joins it and gets its credential).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import HTTPException, status
from temporalio.client import WorkflowHandle

T = TypeVar("T")
RETRY_AFTER_S = 5


async def result_within(
    handle: WorkflowHandle[Any, T], seconds: float, what: str, status_url: str | None = None
) -> T:
    """The workflow's result, or a 503 naming it once `seconds` have passed without one."""
    try:
        return await asyncio.wait_for(handle.result(), seconds)
    except TimeoutError:
        detail: dict[str, Any] = {
            "detail": f"{what} is accepted but did not finish within {seconds:g} s "
            "(no orchestration worker answering?); it completes once one runs",
            "workflow_id": handle.id,
        }
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if status_url is not None:
            detail["status_url"] = status_url
            headers["Location"] = status_url
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail, headers=headers) from None
