"""Bodies of the twin routes."""

from __future__ import annotations

from typing import Any

from api.models.base import Body


class ReportedBody(Body):
    """Body of `POST /v1/device/twin/reported`."""

    reported: dict[str, Any]
