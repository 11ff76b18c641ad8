"""What every service interface has: a name, a task queue and the system check's probe."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult


class ServiceInterface(ABC):
    """Base of the service interfaces; subclasses declare `<service>.ping` as an activity. Every
    method is abstract: a service that leaves one unimplemented cannot be constructed."""

    service: ClassVar[str]
    queue: ClassVar[TaskQueue]

    @abstractmethod
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
