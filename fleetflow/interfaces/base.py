"""What every service interface has: a name, a task queue and the system check's probe."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import ProbeRequest, ProbeResult

F = TypeVar("F", bound=Callable[..., Any])
RECORDS_ATTR = "__fleetflow_records__"


def records(event: str) -> Callable[[F], F]:
    """Declare the domain event an activity's completion records (what time travel shows for it)."""

    def mark(stub: F) -> F:
        setattr(stub, RECORDS_ATTR, event)
        return stub

    return mark


def recorded_event(stub: Callable[..., Any]) -> str | None:
    """The domain event declared with `records` on an interface method, if any."""
    event = getattr(stub, RECORDS_ATTR, None)
    return event if isinstance(event, str) else None


class ServiceInterface(ABC):
    """Base of the service interfaces; subclasses declare `<service>.ping` as an activity. Every
    method is abstract: a service that leaves one unimplemented cannot be constructed."""

    service: ClassVar[str]
    queue: ClassVar[TaskQueue]

    @abstractmethod
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
