"""What every service interface has: a name, a task queue and the system check's probe."""

from __future__ import annotations

from typing import ClassVar

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult


class ServiceInterface:
    """Base of the service interfaces; subclasses declare `<service>.ping` as an activity."""

    service: ClassVar[str]
    queue: ClassVar[TaskQueue]

    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        raise NotImplementedError
