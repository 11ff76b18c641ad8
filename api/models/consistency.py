"""Answers of `/v1/consistency` and `/v1/consistency:run`."""

from __future__ import annotations

from api.models.base import View


class ReconcileStarted(View):
    """A Reconciliation run was started (or one with the same id already runs)."""

    workflow_id: str
