"""The typed interface of every service, and the catalogue derived from them.

Each service's activities are the methods of one interface class (`fleetflow.interfaces.<service>`):
the activity type name, the input and the result are declared there once (and, with `@records`,
the domain event its completion records). Workflows call a step through it
(`workflows.calls.execute(DeviceActivities.register, ...)`, which takes the queue from here), so
"go to definition" from a workflow step lands on the declaration, and the implementation in
`activities/` is bound to the same name with `@implements(DeviceActivities.register)`. Metrics,
time travel, `/v1/services` and the dependency graph read the catalogue below; nothing else lists
names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from temporalio import activity

from fleetflow.contracts.common import TaskQueue
from fleetflow.interfaces.analytics import AnalyticsActivities
from fleetflow.interfaces.base import ServiceInterface, recorded_event
from fleetflow.interfaces.data import DataActivities
from fleetflow.interfaces.device import DeviceActivities
from fleetflow.interfaces.notification import NotificationActivities
from fleetflow.interfaces.webhook import WebhookActivities

F = TypeVar("F", bound=Callable[..., Any])

INTERFACES: tuple[type[ServiceInterface], ...] = (
    DeviceActivities,
    DataActivities,
    AnalyticsActivities,
    NotificationActivities,
    WebhookActivities,
)


@dataclass(frozen=True)
class ActivityEntry:
    """One activity of the catalogue: who serves it, where, and what it takes and gives."""

    service: str
    queue: TaskQueue
    name: str
    method: str
    interface: type[ServiceInterface]
    input: type | None
    result: type | None
    records: str | None = None  # the domain event its completion records (`@records`)


def _definition(stub: Callable[..., Any]) -> activity._Definition:
    return activity._Definition.must_from_callable(stub)


def activity_name(stub: Callable[..., Any]) -> str:
    """The activity type name declared on an interface method."""
    name = _definition(stub).name
    assert name is not None, "interface activities are named"
    return name


def implements(stub: Callable[..., Any]) -> Callable[[F], F]:
    """Bind the decorated method to an interface method's activity type name."""
    return activity.defn(name=activity_name(stub))


def _entries(interface: type[ServiceInterface]) -> list[ActivityEntry]:
    entries = []
    for method in sorted(vars(interface)):
        defn = activity._Definition.from_callable(vars(interface)[method])
        if defn is None or defn.name is None:
            continue
        arg_types = defn.arg_types or []
        entries.append(
            ActivityEntry(
                service=interface.service,
                queue=interface.queue,
                name=defn.name,
                method=method,
                interface=interface,
                input=arg_types[0] if arg_types else None,
                result=defn.ret_type,
                records=recorded_event(vars(interface)[method]),
            )
        )
    return entries


CATALOGUE: tuple[ActivityEntry, ...] = tuple(e for i in INTERFACES for e in _entries(i))
BY_NAME: dict[str, ActivityEntry] = {e.name: e for e in CATALOGUE}


def entry_of(stub: Callable[..., Any]) -> ActivityEntry:
    """The catalogue entry of an interface method."""
    return BY_NAME[activity_name(stub)]


def queue_of(stub: Callable[..., Any]) -> str:
    """The task queue that serves an interface method."""
    return entry_of(stub).queue.value
