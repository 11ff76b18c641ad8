"""`fleetflow simulate`: its core against the in-process API, workers and real servers."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from cli.main import build_parser
from cli.simulate import Options, simulate
from fleetflow.db import Pool
from fleetflow.errors import StartupError
from tests.support import bearer, eventually, free_port

AUTH = bearer("acme")  # every scope


async def test_simulated_devices_send_readings_that_are_stored_and_spikes_raise_alerts(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    options = Options(devices=5, rate=50, duration_s=2, anomaly_rate=1.0, settle_s=15, seed=7)
    out = io.StringIO()
    before = {s["subscription_id"] for s in (await api.get("/v1/subscriptions", headers=AUTH)).json()}
    summary = await simulate(api, AUTH, options, out)

    assert len(summary.devices) == 5 and all(d.startswith(f"{summary.run_id}-") for d in summary.devices)
    for device_id in summary.devices:
        device = (await api.get(f"/v1/devices/{device_id}", headers=AUTH)).json()
        assert device["status"] == "active", device
    assert summary.sent > 0 and summary.batches > 0
    assert (summary.rejected, dict(summary.reasons)) == (0, {}), summary.render()
    assert summary.acknowledged == summary.sent and summary.acknowledged_batches == summary.batches
    assert summary.anomalies > 0 and summary.exit_code == 0

    async def stored() -> int:
        return int(
            await pool.fetchval(
                "SELECT count(*) FROM data.readings WHERE device_id = ANY($1)", summary.devices
            )
        )

    await eventually(stored, lambda n: n == summary.acknowledged)
    assert summary.alerts_raised >= 1, summary.render()
    assert summary.bad_signatures == 0
    assert f"{summary.run_id}: 5 sensor devices onboarded" in out.getvalue()
    assert "alerts" in summary.render()
    # each simulated device was sent a command, took it and answered it
    assert (summary.jobs.commands_sent, summary.jobs.commands_succeeded) == (5, 5), summary.render()
    for device_id in summary.devices:
        page = (await api.get(f"/v1/devices/{device_id}/commands", headers=AUTH)).json()
        assert [(c["name"], c["status"]) for c in page["items"]] == [("ping", "succeeded")]

    # the run removes its subscription and rules
    after = {s["subscription_id"] for s in (await api.get("/v1/subscriptions", headers=AUTH)).json()}
    assert after <= before
    rules = (await api.get("/v1/rules", headers=AUTH)).json()
    assert not [r for r in rules if r["rule_id"].startswith(summary.run_id)]


async def test_an_unreachable_api_is_one_startup_error() -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}", timeout=3) as http:
        with pytest.raises(StartupError, match="cannot reach the API"):
            await simulate(http, AUTH, Options(devices=1, rate=1, duration_s=1), io.StringIO())


@pytest.mark.parametrize(
    "argv",
    [
        ["--devices", "0", "--rate", "1", "--duration", "1"],
        ["--devices", "2", "--rate", "-1", "--duration", "1"],
        ["--devices", "2", "--rate", "1", "--duration", "0"],
        ["--devices", "2", "--rate", "1", "--duration", "1", "--anomaly-rate", "1.5"],
        ["--devices", "2", "--rate", "1", "--duration", "1", "--colour", "red"],
    ],
)
def test_bad_options_are_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["simulate", *argv])
    assert exited.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


async def test_simulated_devices_take_part_in_a_rollout(api: httpx.AsyncClient, pool: Pool) -> None:
    """The simulator's devices fetch their job, check the image and report; failures as asked."""
    import random

    from cli.simulate_jobs import JobStats, work_jobs
    from tests.integration.flows import campaign_body, fleet, upload
    from tests.integration.test_rollouts import progress

    creds = await fleet(api, 6)
    version = f"8.{random.randrange(10_000)}.0"
    await upload(api, version)
    campaign = f"sim-{random.randrange(10**6)}"
    body = campaign_body(campaign, version, sorted(creds), canary=6)
    assert (await api.post("/v1/rollouts", json=body, headers=AUTH)).status_code == 202
    stats, stop = JobStats(), asyncio.Event()
    working = asyncio.create_task(work_jobs(api, creds.items(), 0.5, 0.0, random.Random(7), stats, stop))
    done = await eventually(
        lambda: progress(api, campaign), lambda p: p["status"] in ("completed", "aborted"), 60
    )
    stop.set()
    await working
    assert stats.offered >= 6 and stats.bad_images == 0
    assert stats.succeeded + stats.failed == stats.offered
    update_failures = done["counts"].get("failed", 0)
    assert 0 < update_failures <= stats.failed  # the simulator's failures are the campaign's


async def test_a_simulated_device_over_its_rate_waits_as_the_429_says_and_loses_nothing(
    api: httpx.AsyncClient,
) -> None:
    tenant = f"simq-{free_port()}"
    profile = {"device_readings_per_s": 20, "burst_s": 1}
    platform = bearer("platform", ["tenants:admin"])
    assert (await api.put(f"/v1/tenants/{tenant}/profile", json=profile, headers=platform)).status_code == 200
    # one device, 60 readings a second against 20/s allowed: the second batch is answered 429
    options = Options(devices=1, rate=60, duration_s=2, settle_s=5, seed=3)
    summary = await simulate(api, bearer(tenant), options, io.StringIO())
    assert (summary.rejected, dict(summary.reasons)) == (0, {}), summary.render()
    assert summary.acknowledged == summary.sent == 120


async def test_a_rate_past_the_tenants_readings_quota_is_named_at_start_and_the_rate_reached_at_the_end(
    api: httpx.AsyncClient,
) -> None:
    tenant = f"simr-{free_port()}"
    platform = bearer("platform", ["tenants:admin"])
    profile = {"readings_per_s": 30}
    assert (await api.put(f"/v1/tenants/{tenant}/profile", json=profile, headers=platform)).status_code == 200
    out = io.StringIO()
    options = Options(devices=2, rate=40, duration_s=1, settle_s=1, seed=5, commands=0)
    summary = await simulate(api, bearer(tenant), options, out)
    start = out.getvalue()
    assert "can reach at most 30 of 40 readings/s" in start, start
    assert "the tenant's readings_per_s quota is 30" in start, start
    assert "readings/s of 40 asked" in summary.render()
