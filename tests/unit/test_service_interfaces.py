"""Each service implements its whole interface under the declared names, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetflow.contracts.common import SERVICE_QUEUES, TaskQueue
from fleetflow.interfaces import CATALOGUE, INTERFACES, activity_name
from fleetflow.interfaces.data import DataActivities
from fleetflow.interfaces.device import DeviceActivities
from fleetflow.settings import load_settings
from workers.registry import activities_of, service_for


@pytest.mark.parametrize("interface", INTERFACES, ids=lambda i: i.service)
def test_the_service_of_each_queue_implements_every_declared_activity(
    interface: type, tmp_path: Path
) -> None:
    settings = load_settings({"FLEETFLOW_DATA_DIR": str(tmp_path)})
    service = service_for(interface.queue, pool=None, settings=settings)  # type: ignore[arg-type,attr-defined]
    registered = {activity_name(fn): fn for fn in activities_of(service)}
    declared = {e.name for e in CATALOGUE if e.interface is interface}
    assert set(registered) == declared
    for entry in CATALOGUE:
        if entry.interface is interface:
            implementation = getattr(type(service), entry.method)
            stub = vars(interface)[entry.method]
            assert implementation is not stub, f"{entry.name} is declared but not implemented"


def test_every_service_queue_has_one_interface() -> None:
    assert sorted(i.queue for i in INTERFACES) == sorted(SERVICE_QUEUES)
    assert TaskQueue.ORCHESTRATION not in {i.queue for i in INTERFACES}


def test_activity_names_are_unique_in_the_catalogue() -> None:
    names = [e.name for e in CATALOGUE]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("interface", [DeviceActivities, DataActivities], ids=lambda i: i.service)
def test_a_composed_service_inherits_from_its_interface_only(interface: type, tmp_path: Path) -> None:
    """The device and data services hold their parts (bulk imports, rollout jobs, the read model;
    window isolation, supervision) instead of inheriting them: no mixins, no diamond."""
    settings = load_settings({"FLEETFLOW_DATA_DIR": str(tmp_path)})
    service = service_for(interface.queue, pool=None, settings=settings)  # type: ignore[arg-type,attr-defined]
    assert type(service).__mro__[1:] == interface.__mro__


async def test_the_legacy_delivery_queue_nudges_the_subscribers_of_circuit_events() -> None:
    """`notification.deliver_pending` carried over on the notification queue (EventDelivery runs
    from before the webhook queue) records circuit events like the webhook queue's does, and
    must wake their subscribers' deliveries; built without the Temporal client it woke none
    (they waited for their next poll)."""
    from typing import Any

    from fleetflow.contracts.common import TaskQueue
    from fleetflow.settings import Settings
    from workers.registry import carried_over

    row = {"tenant": "acme", "subscription_id": "sub-1", "backoff_s": 2.0, "max_backoff_s": 300.0}
    started: list[dict[str, Any]] = []

    class Pool:
        async def fetch(self, *_: Any) -> list[dict[str, Any]]:
            return [row]

    class Temporal:
        async def start_workflow(self, workflow: str, arg: Any, **options: Any) -> None:
            started.append({"workflow": workflow, **options})

    (deliver,) = carried_over(TaskQueue.NOTIFICATION, Pool(), Settings(), temporal=Temporal())  # type: ignore[arg-type]
    service = deliver.__self__  # type: ignore[attr-defined]
    await service.breaker._nudge(["sub-1"])
    assert [(s["workflow"], s["id"], s["start_signal"]) for s in started] == [
        ("EventDelivery", "deliveries-acme-sub-1", "nudge")
    ]
