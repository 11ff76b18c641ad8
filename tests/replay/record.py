"""`make record-histories`: run every workflow type through its scenarios on a fresh stack and
save the histories under tests/replay/histories/, for the replay test.

Recording again adds files (`name-2.json`, ...) and never replaces one: the code must
keep replaying every history it ever produced. A failing replay means the change would
break runs in flight: guard it with `workflow.patched`, never delete the history.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle

from bench.stack import Stack, say, stack

HISTORIES = Path(__file__).parent / "histories"
Scenario = Callable[[Stack], Awaitable[WorkflowHandle[Any, Any]]]


async def _progress(s: Stack, device_id: str, status: str) -> dict[str, Any]:
    for _ in range(300):
        body: dict[str, Any] = (await s.api.get(f"/v1/onboardings/{device_id}", headers=s.headers)).json()
        if body.get("status") == status:
            return body
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{device_id} never reached {status}")


async def onboarding_completed(s: Stack) -> WorkflowHandle[Any, Any]:
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "thermostat", "tags": ["rec"]}
    accepted = (await s.api.post("/v1/devices", json=body, headers=s.headers)).json()
    waiting = await _progress(s, device_id, "awaiting_first_contact")
    auth = {"Authorization": f"Bearer {waiting['credential']}"}
    await s.api.post("/v1/device-contact", json={"firmware_version": "1.0.1"}, headers=auth)
    await _progress(s, device_id, "completed")
    return s.client.get_workflow_handle(accepted["workflow_id"])


async def device_twin(s: Stack) -> WorkflowHandle[Any, Any]:
    """A twin that takes desired changes, reports, continues as new once, and ends."""
    onboarding = await onboarding_completed(s)
    device_id = onboarding.id.removeprefix("onboard-bench-")
    handle = s.client.get_workflow_handle(f"twin-bench-{device_id}")
    for version in range(2, 40):
        url = f"/v1/devices/{device_id}/twin/desired"
        await s.api.patch(url, json={"target_c": 10 + version % 20}, headers=s.headers)
        if version % 10 == 0:
            report = {"patch": {"target_c": 10 + version % 20}, "at": "2026-01-01T00:00:00Z"}
            await handle.signal("report", report)
    await handle.signal("end", {"reason": "recorded", "actor": "recorder"})
    await handle.result()
    return handle


async def onboarding_rejected(s: Stack) -> WorkflowHandle[Any, Any]:
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "gateway", "config": {"site": "rec"}}
    accepted = (await s.api.post("/v1/devices", json=body, headers=s.headers)).json()
    await _progress(s, device_id, "awaiting_approval")
    await s.api.post(f"/v1/onboardings/{device_id}/reject", json={"reason": "no"}, headers=s.headers)
    await _progress(s, device_id, "failed")
    return s.client.get_workflow_handle(accepted["workflow_id"])


async def onboarding_cancelled(s: Stack) -> WorkflowHandle[Any, Any]:
    device_id = f"rec-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "device_type": "sensor"}
    accepted = (await s.api.post("/v1/devices", json=body, headers=s.headers)).json()
    await _progress(s, device_id, "awaiting_first_contact")
    await s.api.delete(f"/v1/onboardings/{device_id}", headers=s.headers)
    await _progress(s, device_id, "cancelled")
    return s.client.get_workflow_handle(accepted["workflow_id"])


async def bulk_onboarding(s: Stack) -> WorkflowHandle[Any, Any]:
    devices = [{"device_id": f"rec-bulk-{i}", "device_type": "sensor"} for i in range(5)]
    accepted = (await s.api.post("/v1/devices:bulk", json={"devices": devices}, headers=s.headers)).json()
    handle = s.client.get_workflow_handle(accepted["workflow_id"])
    await handle.result()
    return handle


async def system_check(s: Stack) -> WorkflowHandle[Any, Any]:
    report = (await s.api.get("/health")).json()
    assert report["ok"], report
    runs = [w async for w in s.client.list_workflows("WorkflowType = 'SystemCheck'")]
    return s.client.get_workflow_handle(runs[0].id)


SCENARIOS: dict[str, Scenario] = {
    "system_check": system_check,
    "onboarding_completed": onboarding_completed,
    "onboarding_rejected": onboarding_rejected,
    "onboarding_cancelled": onboarding_cancelled,
    "bulk_onboarding": bulk_onboarding,
    "device_twin": device_twin,
}


def _new_path(name: str) -> Path:
    """Histories accumulate: an older one stays, so the code must keep replaying it."""
    path, n = HISTORIES / f"{name}.json", 1
    while path.exists():
        n += 1
        path = HISTORIES / f"{name}-{n}.json"
    return path


async def record(names: list[str]) -> None:
    """Run the named scenarios (all by default) and write their histories."""
    HISTORIES.mkdir(parents=True, exist_ok=True)
    async with stack() as s:
        for name in names or list(SCENARIOS):
            handle = await SCENARIOS[name](s)
            history = await handle.fetch_history()
            path = _new_path(name)
            path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
            say(f"recorded {name}: {len(history.events)} events -> {path}")


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1:]))
    sys.stderr.flush()
    os._exit(0)
