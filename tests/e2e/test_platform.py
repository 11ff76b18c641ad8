"""The whole platform from `fleetflow up`, as a user runs it: health, crashes, restart on the same data.

One stack is started for the module and shared by the tests, in order; the last one stops it
with SIGINT, checks that nothing survives, and starts it again on the same data directory.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.system import SystemCheckRequest, SystemCheckResult
from tests.e2e.stack import (
    FLEETFLOW,
    Stack,
    alive,
    clean_env,
    cmdline,
    eventually,
    json_of,
    postmaster,
    replaced,
    survivors,
    wait_gone_async,
)

pytestmark = pytest.mark.e2e

QUEUES = tuple(q.value for q in TaskQueue)  # fleetflow up runs a worker for each
T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`fleetflow up` on free ports with its own data directory (embedded PostgreSQL, no JWT secret)."""
    root = tmp_path_factory.mktemp("e2e")
    data_dir = root / "data"
    stack = Stack(data_dir=data_dir, log_dir=root)
    stack.start()
    try:
        yield stack
    finally:
        stack.shutdown()


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """What one test leaves for a later one (the onboarded device)."""
    return {}


@pytest.fixture
async def temporal(stack: Stack) -> AsyncIterator[Client]:
    """A Temporal client on the stack's dev server."""
    client = await stack.temporal_client()
    yield client


def pid_of(worker: str | None) -> int:
    """The pid in a ProbeResult's `host:pid`."""
    assert worker and ":" in worker, worker
    return int(worker.rsplit(":", 1)[1])


# --- 1 -------------------------------------------------------------------------------------------


async def test_up_becomes_healthy_and_check_passes(stack: Stack) -> None:
    report = await stack.wait_healthy()
    assert report["ok"] is True
    assert report["temporal_ok"] is True and report["database_ok"] is True
    by_service = {s["service"]: s for s in report["services"]}
    assert sorted(by_service) == sorted(QUEUES)
    for name, service in by_service.items():
        assert service["answered"] is True, service
        assert service["pollers"] and service["pollers"] >= 1, service
        if name != "orchestration":
            assert pid_of(service["worker"]) in {w.pid for w in stack.workers(name)}, service

    check = await asyncio.to_thread(
        subprocess.run,
        [FLEETFLOW, "check", "--timeout", "30"],
        # the platform's keys: a check signed with other keys is refused (tested below)
        env=clean_env(TEMPORAL_ADDRESS=stack.temporal_address, FLEETFLOW_DATA_DIR=str(stack.data_dir)),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=stack.log_dir,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Traceback" not in check.stderr
    lines = check.stdout.splitlines()
    assert lines[-1] == "all services answered", check.stdout
    assert any(line.startswith("service") and "answered" in line for line in lines), check.stdout
    for name in QUEUES:
        row = next((line for line in lines if line.split()[:1] == [name]), None)
        assert row is not None and row.split()[1] == "yes", check.stdout

    # a CLI with keys of its own (another data directory) is not the platform: refused, and says so
    stranger = await asyncio.to_thread(
        subprocess.run,
        [FLEETFLOW, "check", "--timeout", "10"],
        env=clean_env(TEMPORAL_ADDRESS=stack.temporal_address),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=stack.log_dir,
    )
    assert stranger.returncode == 1, stranger.stdout + stranger.stderr
    # its payloads are sealed with its own key: the workers cannot read them, and it is told so
    assert "payload key" in stranger.stdout and "FLEETFLOW_KEYS_DIR" in stranger.stdout, stranger.stdout

    # the Web UI decodes payloads through the API's /codec, which answers the UI's origin
    ui = f"http://127.0.0.1:{stack.ui_port}"
    async with httpx.AsyncClient(timeout=30) as http:
        codec = (await http.get(f"{ui}/api/v1/settings")).json()["Codec"]
        assert codec["Endpoint"] == f"{stack.api_url}/codec", codec
        preflight = await http.options(
            f"{stack.api_url}/codec/decode",
            headers={"Origin": ui, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers.get("access-control-allow-origin") == ui, preflight.headers


# --- 2 -------------------------------------------------------------------------------------------


async def test_worker_killed_during_system_check_is_replaced(stack: Stack, temporal: Client) -> None:
    await stack.wait_healthy()
    victim = stack.worker("device")
    handle = await temporal.start_workflow(
        "SystemCheck",
        SystemCheckRequest(timeout_s=60, hold_ms=4000),
        id=f"e2e-system-check-{uuid.uuid4()}",
        task_queue="orchestration",
        result_type=SystemCheckResult,
        execution_timeout=timedelta(seconds=90),
    )

    async def device_ping_started() -> bool:
        description = await handle.describe()
        return any(
            a.activity_type.name == "device.ping"
            and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            for a in description.raw_description.pending_activities
        )

    await eventually(device_ping_started, bool, 30, "the device probe running")
    victim.send_signal(signal.SIGKILL)
    assert await wait_gone_async([victim]) == []

    result = await asyncio.wait_for(handle.result(), 120)
    device = next(s for s in result.services if s.service == "device")
    assert device.answered, device
    assert pid_of(device.worker) != victim.pid
    successor = await replaced(stack, "device", victim)
    assert alive(successor)
    assert pid_of(device.worker) == successor.pid, (device.worker, successor)
    assert all(s.answered for s in result.services), result


# --- 3 -------------------------------------------------------------------------------------------


async def test_onboarding_survives_killed_workers(stack: Stack, shared: dict[str, Any]) -> None:
    await stack.wait_healthy()
    device_id = f"e2e-{uuid.uuid4().hex[:10]}"
    admin = stack.admin_headers()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        accepted = await http.post(
            "/v1/devices", json={"device_id": device_id, "device_type": "thermostat"}, headers=admin
        )
        assert accepted.status_code == 202, accepted.text
        status_url = accepted.json()["status_url"]
        assert status_url == f"/v1/onboardings/{device_id}"

        waiting = await eventually(
            lambda: json_of(http, status_url, admin),
            lambda p: p.get("status") == "awaiting_first_contact",
            60,
            "awaiting_first_contact",
        )
        credential = waiting["credential"]
        assert credential

        victims = [stack.worker("orchestration"), stack.worker("device")]
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        assert await wait_gone_async(victims) == []

        contact = await http.post(
            "/v1/device-contact", json={}, headers={"Authorization": f"Bearer {credential}"}
        )
        assert contact.status_code == 202, contact.text
        for queue, victim in zip(("orchestration", "device"), victims, strict=True):
            await replaced(stack, queue, victim)

        done = await eventually(
            lambda: json_of(http, status_url, admin),
            lambda p: p.get("status") in ("completed", "failed", "compensated"),
            120,
            "completed",
        )
        assert done["status"] == "completed", done
        assert done["compensations"] == [], done
        device = await http.get(f"/v1/devices/{device_id}", headers=admin)
        assert device.status_code == 200, device.text
        assert device.json()["status"] == "active"

    dsn = stack.environ_of_worker()["DATABASE_URL"]
    conn = await asyncpg.connect(dsn)
    try:
        credentials = await conn.fetch(
            "SELECT jti, revoked_at FROM device.credentials WHERE tenant = 'default' AND device_id = $1",
            device_id,
        )
        events = await conn.fetchval(
            """SELECT count(*) FROM notification.events
               WHERE tenant = 'default' AND device_id = $1 AND type = 'DeviceOnboarded'""",
            device_id,
        )
    finally:
        await conn.close()
    assert len(credentials) == 1 and credentials[0]["revoked_at"] is None, credentials
    assert events == 1
    shared["device_id"] = device_id


async def test_twin_updates_survive_a_killed_orchestration_worker(
    stack: Stack, shared: dict[str, Any]
) -> None:
    device_id = shared["device_id"]
    admin = stack.admin_headers()
    url = f"/v1/devices/{device_id}/twin/desired"
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=90) as http:
        before = await json_of(http, f"/v1/devices/{device_id}/twin", admin)
        accepted: list[int] = []

        async def updates() -> None:
            for target in range(10, 30):
                response = await http.patch(url, json={"target_c": target}, headers=admin)
                if response.status_code == 200:
                    accepted.append(response.json()["version"])

        sending = asyncio.create_task(updates())
        await eventually(lambda: asyncio.sleep(0.05, len(accepted)), lambda n: n >= 5, 60, "five updates")
        victim = stack.worker("orchestration")
        victim.send_signal(signal.SIGKILL)
        await sending
        await replaced(stack, "orchestration", victim)
        after = await json_of(http, f"/v1/devices/{device_id}/twin", admin)
    # every update the API acknowledged is in the twin, once, in order
    assert len(accepted) == 20
    assert accepted == list(range(before["desired_version"] + 1, before["desired_version"] + 21))
    assert after["desired_version"] == accepted[-1] and after["desired"]["target_c"] == 29


async def test_campaign_survives_killed_workers_and_updates_each_device_once(stack: Stack) -> None:
    admin = stack.admin_headers()
    prefix = f"e2e-fw-{uuid.uuid4().hex[:6]}"
    devices = [{"device_id": f"{prefix}-{i:02d}", "device_type": "sensor"} for i in range(16)]
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
        bulk = (await http.post("/v1/devices:bulk", json={"devices": devices}, headers=admin)).json()
        await eventually(
            lambda: json_of(http, bulk["status_url"], admin),
            lambda p: p.get("status") == "completed",
            60,
            "bulk onboarding",
        )
        rows = (await http.get(f"/v1/bulk-onboardings/{bulk['bulk_id']}/credentials", headers=admin)).text
        creds = dict(line.split(",", 1) for line in rows.strip().splitlines()[1:])
        upload = await http.post(
            "/v1/firmware",
            params={"device_type": "sensor", "version": "7.0.0"},
            content=b"e2e-image",
            headers={**admin, "Content-Type": "application/octet-stream"},
        )
        assert upload.status_code in (200, 201), upload.text
        campaign = f"{prefix}-c"
        policy = {"canary": 2, "growth": 2, "rate_per_minute": 60, "abort_min_finished": 100}
        target = {"device_ids": list(creds)}
        body = {"campaign_id": campaign, "firmware_id": "sensor-7.0.0", "target": target, "policy": policy}
        assert (await http.post("/v1/rollouts", json=body, headers=admin)).status_code == 202
        stop = asyncio.Event()

        async def devices_answer() -> None:
            while not stop.is_set():
                for credential in creds.values():
                    auth = {"Authorization": f"Bearer {credential}"}
                    try:
                        job = await http.get("/v1/device/jobs", headers=auth)
                        if job.status_code == 200:
                            url = f"/v1/device/jobs/{job.json()['campaign_id']}/progress"
                            await http.post(url, json={"state": "succeeded"}, headers=auth)
                    except httpx.HTTPError:
                        pass
                await asyncio.sleep(0.1)

        answering = asyncio.create_task(devices_answer())
        status_url = f"/v1/rollouts/{campaign}"
        await eventually(
            lambda: json_of(http, status_url, admin),
            lambda p: p.get("counts", {}).get("succeeded", 0) >= 3,
            60,
            "three updated",
        )
        victims = [stack.worker("orchestration"), stack.worker("device")]
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        for queue, victim in zip(("orchestration", "device"), victims, strict=True):
            await replaced(stack, queue, victim)
        done = await eventually(
            lambda: json_of(http, status_url, admin),
            lambda p: p.get("status") == "completed",
            120,
            "campaign",
        )
        stop.set()
        await answering
    assert done["counts"] == {"succeeded": 16}
    conn = await asyncpg.connect(stack.environ_of_worker()["DATABASE_URL"])
    try:
        attempts = await conn.fetch(
            "SELECT attempts FROM device.rollout_jobs WHERE campaign_id = $1 AND kind = 'update'", campaign
        )
        events = await conn.fetch(
            """SELECT device_id, count(*) AS n FROM notification.events
               WHERE type = 'FirmwareUpdated' AND source_workflow = $1 GROUP BY device_id""",
            f"rollout-default-{campaign}",
        )
        versions = await conn.fetch(
            "SELECT DISTINCT firmware_version FROM device.devices WHERE device_id = ANY($1)", list(creds)
        )
    finally:
        await conn.close()
    assert [a["attempts"] for a in attempts] == [1] * 16  # no device was offered the update twice
    assert len(events) == 16 and all(e["n"] == 1 for e in events)
    assert [v["firmware_version"] for v in versions] == ["7.0.0"]


# --- 4 -------------------------------------------------------------------------------------------


async def stop_and_check_nothing_survives(stack: Stack) -> None:
    """SIGINT the supervisor: exit 0, no descendant and no postmaster left, no traceback."""
    before = stack.descendants()
    lines = [cmdline(p) for p in before]
    assert any("start-dev" in line for line in lines), lines
    # one worker per task queue, the API and the MQTT endpoint
    assert len([line for line in lines if "cli.main" in line]) == len(QUEUES) + 2, lines
    pm = postmaster(stack.pgdata)
    assert pm is not None and alive(pm)
    pm_children = pm.children(recursive=True)

    assert stack.process is not None
    stack.process.send_signal(signal.SIGINT)
    assert await stack.wait_exit() == 0, stack.output()

    left = survivors(before)
    assert left == [], [cmdline(p) for p in left]
    assert await wait_gone_async([pm, *pm_children], deadline_s=15) == []
    assert not (stack.pgdata / "postmaster.pid").exists()
    assert "Traceback" not in stack.output(), stack.output()


def keys_cli(stack: Stack, *args: str) -> str:
    """Run `fleetflow keys|token ...` on the stack's data directory, as an operator would."""
    result = subprocess.run(
        [FLEETFLOW, *args],
        env=clean_env(FLEETFLOW_DATA_DIR=str(stack.data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=stack.log_dir,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_key_rotation_keeps_old_tokens_until_the_key_is_retired(stack: Stack) -> None:
    """Rotation while the platform runs: old tokens keep working, new ones are signed by the new
    key, workflows still run (their service tokens follow the new key); a payload key rotation
    keeps older runs readable; retiring the old signing key refuses what it signed, at once, in
    the running API."""
    old = stack.admin_headers()
    old_kid = keys_cli(stack, "keys", "list").splitlines()[1].split()[0]
    assert "signs from now on" in keys_cli(stack, "keys", "rotate")
    token = keys_cli(stack, "token", "issue", "--tenant", "default", "--scopes", "admin").strip()
    new = {"Authorization": f"Bearer {token}"}

    async def onboarding_runs(http: httpx.AsyncClient, headers: dict[str, str]) -> str:
        device_id = f"rot-{uuid.uuid4().hex[:8]}"
        body = {"device_id": device_id, "device_type": "thermostat"}
        assert (await http.post("/v1/devices", json=body, headers=headers)).status_code == 202
        await eventually(
            lambda: json_of(http, f"/v1/onboardings/{device_id}", headers),
            lambda p: p.get("status") == "awaiting_first_contact",
            60,
            "onboarding after rotation",
        )
        return device_id

    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        assert (await http.get("/v1/devices", headers=old)).status_code == 200
        sealed_before = await onboarding_runs(http, new)
        # a new payload key while runs are in flight: every process seals with it from its
        # next payload, and what the old key sealed still reads
        assert "encrypts from now on" in keys_cli(stack, "keys", "rotate", "--payload")
        await onboarding_runs(http, new)
        history = await http.get(f"/v1/devices/{sealed_before}/history", headers=new)
        assert history.status_code == 200, history.text
        assert "DeviceOnboardingStarted" in {e["type"] for e in history.json()}, history.text
        keys_cli(stack, "keys", "retire", old_kid)
        refused = await http.get("/v1/devices", headers=old)
        assert refused.status_code == 401 and "retired" in refused.json()["detail"], refused.text
        await onboarding_runs(http, new)


async def test_a_revoked_token_is_refused_by_the_running_api(stack: Stack) -> None:
    """`fleetflow token revoke`, run as an operator would, reaches the running API at once (and
    no one but its owner may read the dev admin token's file)."""
    assert oct((stack.data_dir / "admin-token").stat().st_mode & 0o777) == "0o600"
    token = keys_cli(stack, "token", "issue", "--tenant", "default", "--scopes", "devices:read").strip()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        assert (await http.get("/v1/devices", headers=headers)).status_code == 200
        assert "revoked" in keys_cli(stack, "token", "revoke", token, "--reason", "e2e")
        refused = await eventually(
            lambda: http.get("/v1/devices", headers=headers), lambda r: r.status_code == 401, 5, "refusal"
        )
        assert refused.json()["detail"] == "token revoked", refused.text


@pytest.mark.timeout(600)
async def test_sigint_stops_everything_and_restart_reuses_data(stack: Stack, shared: dict[str, Any]) -> None:
    device_id = shared.get("device_id")
    assert device_id, "needs the onboarding test to have run first"
    await stop_and_check_nothing_survives(stack)

    stack.start()
    await stack.wait_healthy()
    admin = stack.admin_headers()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        device = await http.get(f"/v1/devices/{device_id}", headers=admin)
        assert device.status_code == 200, device.text
        assert device.json()["status"] == "active"
        progress = await eventually(
            lambda: json_of(http, f"/v1/onboardings/{device_id}", admin),
            lambda p: "_status" not in p,
            60,
            "onboarding progress",
        )
        assert progress["status"] == "completed", progress

    client = await stack.temporal_client()
    description = await client.get_workflow_handle(progress["workflow_id"]).describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED

    await stop_and_check_nothing_survives(stack)
