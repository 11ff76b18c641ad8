"""Time travel names an activity's completion by the domain event its interface declares."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory

from api.time_travel import ACTIVITY_EVENTS, _entries
from fleetflow.interfaces import CATALOGUE, entry_of
from fleetflow.interfaces.device import DeviceActivities
from tests.replay.test_replay import CONVERTER

HISTORIES = Path(__file__).resolve().parents[1] / "replay" / "histories"


def test_time_travel_reads_the_event_names_from_the_catalogue() -> None:
    declared = {e.name: e.records for e in CATALOGUE if e.records is not None}
    assert ACTIVITY_EVENTS == declared
    assert entry_of(DeviceActivities.register).records == "DeviceRegistered"
    assert entry_of(DeviceActivities.deprovision_batch).records == "DevicesDeprovisioned"
    assert entry_of(DeviceActivities.rollout_tick).records is None  # not a step of a device's past


async def test_a_recorded_onboarding_shows_the_declared_events_in_order() -> None:
    path = HISTORIES / "onboarding_completed.json"
    history = WorkflowHistory.from_json("onboard-t-d", path.read_text())
    entries = await _entries(CONVERTER, history, "DeviceOnboarding", "run", "d")
    steps = [e.type for e in entries if e.type in ACTIVITY_EVENTS.values()]
    assert steps == ["DeviceRegistered", "CredentialIssued", "ConfigurationStored", "DeviceActivated"]
