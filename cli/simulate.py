"""`fleetflow simulate`: devices onboarded in bulk that send readings with their own credentials
through the HTTP API (or over MQTT, `--transport mqtt`), with injected anomalies and a webhook
receiver that counts the alerts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import math
import random
import secrets
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import jwt

from cli.http_lanes import LaneTransport
from cli.simulate_devices import (
    IN_FLIGHT,
    METRICS,
    SimulatedDevice,
    drive,
    pause,
    refusal_reason,
)
from cli.simulate_jobs import JOB_IN_FLIGHT, JobStats, work_jobs
from cli.simulate_mqtt import connect_all, work_jobs_mqtt
from cli.simulate_plan import plan
from cli.simulate_receiver import ALERTS, Receiver
from fleetflow.contracts.tenants import TenantLimits
from fleetflow.errors import StartupError
from fleetflow.settings import Settings

TIMEOUT = httpx.Timeout(10.0, connect=3.0)
ONBOARD_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Options:
    """What to simulate: N devices of a type sending `rate` readings/s in total for `duration_s`."""

    devices: int
    rate: float
    duration_s: float
    anomaly_rate: float = 0.0
    device_type: str = "sensor"
    job_failure_rate: float = 0.0  # rollout jobs a device reports as failed
    job_timeout_rate: float = 0.0  # rollout jobs a device never answers
    commands: int = 1  # commands sent to each device (answered at the job rates)
    webhook_host: str = "127.0.0.1"  # where the receiver listens; the platform must reach it
    settle_s: float = 20.0  # at most this long after sending, for storage and alert delivery
    seed: int | None = None
    transport: str = "http"  # or "mqtt": telemetry published at QoS 1 to mqtt_host:mqtt_port
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883


@dataclass
class Summary:
    """The outcome of a run; readings are counted, rejection reasons per batch."""

    run_id: str
    devices: list[str] = field(default_factory=list)
    sent: int = 0
    batches: int = 0
    acknowledged: int = 0
    acknowledged_batches: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    anomalies: int = 0
    alerts_raised: int = 0
    alerts_cleared: int = 0
    bad_signatures: int = 0
    webhook_refused: bool = False  # the platform's network policy refused the receiver
    jobs: JobStats = field(default_factory=JobStats)
    elapsed_s: float = 0.0
    interrupted: bool = False
    sending_s: float = 0.0  # from the first batch to the last sent
    behind_s: float = 0.0  # of it, waiting for answers (slower than the rate asked)
    asked: float = 0.0  # readings/s asked

    def render_rate(self) -> str:
        """The rate reached while sending, and whether the run fell behind the one asked."""
        reached = self.sent / self.sending_s
        of = f" of {self.asked:,.0f} asked" if self.asked else ""
        line = f"  rate          {reached:,.0f} readings/s{of} sent and answered over {self.sending_s:.1f} s"
        if self.behind_s >= 1.0:
            line += (
                f"; {self.behind_s:.1f} s waiting for answers (the platform, or this process,"
                " is slower than the rate asked)"
            )
        return line

    @property
    def exit_code(self) -> int:
        """0 when nothing was rejected, else 1."""
        return 0 if self.rejected == 0 else 1

    def render(self) -> str:
        """The final summary, one fact a line."""
        return "\n".join(
            [
                f"{self.run_id}: {len(self.devices)} devices, {self.elapsed_s:.1f} s"
                f"{' (interrupted)' if self.interrupted else ''}",
                f"  sent          {self.sent:,} readings in {self.batches:,} batches",
                f"  acknowledged  {self.acknowledged:,} readings in {self.acknowledged_batches:,} batches",
                *([self.render_rate()] * (self.sending_s > 0)),
                f"  rejected      {self.rejected:,} readings",
                *(f"    {n:,} batch(es): {reason}" for reason, n in self.reasons.most_common()),
                f"  anomalies     {self.anomalies:,} injected (temperature spikes)",
                f"  alerts        {self.alerts_raised:,} raised, {self.alerts_cleared:,} cleared (webhook)"
                f"{' (not counted: the platform refused the webhook)' if self.webhook_refused else ''}",
                *([f"  bad webhook signatures {self.bad_signatures}"] * (self.bad_signatures > 0)),
                *([self.jobs.render()] * (self.jobs.offered > 0)),
                *([self.jobs.render_commands()] * (self.jobs.commands_sent > 0)),
            ]
        )


async def _call(http: httpx.AsyncClient, method: str, url: str, what: str, **kw: Any) -> httpx.Response:
    """A setup request; a transport error or refusal ends the run with one line."""
    try:
        response = await http.request(method, url, **kw)
    except httpx.TransportError as exc:
        raise StartupError(f"cannot reach the API at {http.base_url}: {exc or type(exc).__name__}") from None
    if response.status_code >= 400:
        raise StartupError(f"{what} refused: {refusal_reason(response)}")
    return response


async def _onboard(
    http: httpx.AsyncClient, headers: dict[str, str], options: Options, run: str, stop: asyncio.Event
) -> dict[str, str]:
    """Bulk-onboard the devices; their credentials by id (empty when stopped meanwhile)."""
    width = max(4, len(str(options.devices)))
    ids = [f"{run}-{i:0{width}d}" for i in range(1, options.devices + 1)]
    specs = [{"device_id": d, "device_type": options.device_type, "tags": ["simulated"]} for d in ids]
    accepted = (
        await _call(
            http, "POST", "/v1/devices:bulk", "bulk onboarding", headers=headers, json={"devices": specs}
        )
    ).json()
    deadline = time.monotonic() + ONBOARD_TIMEOUT_S
    progress: dict[str, Any] = {"status": "running"}
    while progress["status"] in ("running", "compensating") and time.monotonic() < deadline:
        if stop.is_set():
            return {}
        await pause(stop, 0.3)
        progress = (await _call(http, "GET", accepted["status_url"], "progress", headers=headers)).json()
    if progress["status"] != "completed" or progress.get("failed"):
        why = progress.get("failures", [{}])[0].get("reason") if progress.get("failures") else None
        raise StartupError(f"bulk onboarding {progress['status']}: {why or progress.get('reason')}")
    url = f"/v1/bulk-onboardings/{accepted['bulk_id']}/credentials"
    rows = csv.DictReader(io.StringIO((await _call(http, "GET", url, "credentials", headers=headers)).text))
    credentials = {row["device_id"]: row["credential"] for row in rows}
    if missing := [d for d in ids if d not in credentials]:
        raise StartupError(f"no credential for {len(missing)} device(s), e.g. {missing[0]}")
    return {d: credentials[d] for d in ids}


async def _limits(http: httpx.AsyncClient, headers: dict[str, str]) -> TenantLimits | None:
    """The caller's tenant's limits in force (GET /v1/quotas), or None when they cannot be read."""
    try:
        response = await http.get("/v1/quotas", headers=headers)
        if response.status_code != 200:
            return None
        given = response.json()["limits"]
        # only the fields this version knows: a newer API may name more
        return TenantLimits.model_validate({k: v for k, v in given.items() if k in TenantLimits.model_fields})
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


async def _progress(summary: Summary, receiver: Receiver, out: TextIO, started: float, total: float) -> None:
    """Refresh the progress line in place (on a terminal; elsewhere a line every 5 s) until
    cancelled; the rate is of acknowledged readings over the last few seconds."""
    tty = out.isatty()
    recent = deque([(started, 0)], maxlen=7 if tty else 2)
    while True:
        await asyncio.sleep(0.5 if tty else 5.0)
        now = time.monotonic()
        recent.append((now, summary.acknowledged))
        rate = (summary.acknowledged - recent[0][1]) / max(now - recent[0][0], 1e-3)
        alerts = receiver.count("AlertRaised")
        line = (
            f"sent {summary.sent:,}  acked {summary.acknowledged:,}  rejected {summary.rejected:,}  "
            f"alerts {alerts:,}  {rate:,.0f}/s  {now - started:.0f}/{total:.0f} s"
        )
        out.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
        out.flush()


async def _settle(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    devices: list[SimulatedDevice],
    summary: Summary,
    receiver: Receiver,
    options: Options,
    stop: asyncio.Event,
) -> None:
    """Wait, at most `settle_s`, until a sample of devices has every acknowledged reading stored
    and, when spikes were sent, an alert arrived and the deliveries went quiet."""
    deadline = time.monotonic() + options.settle_s
    for device in devices[:: max(1, len(devices) // 8)]:
        while device.acked and time.monotonic() < deadline and not stop.is_set():
            try:
                response = await http.get(
                    f"/v1/devices/{device.device_id}/telemetry", params={"bucket": "1d"}, headers=headers
                )
            except httpx.HTTPError:
                return
            if response.status_code != 200:  # e.g. a token without telemetry:read: cannot tell
                return
            if sum(int(p["count"]) for p in response.json()["points"]) >= device.acked:
                break
            await pause(stop, 0.5)
    while time.monotonic() < deadline and not stop.is_set():
        alerted = receiver.count("AlertRaised") > 0 or summary.anomalies == 0 or summary.webhook_refused
        if alerted and time.monotonic() - receiver.last > 2.0:
            return
        await pause(stop, 0.25)


async def _send_commands(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    devices: list[SimulatedDevice],
    options: Options,
    summary: Summary,
) -> None:
    """Send each device `options.commands` commands; the simulated devices answer them."""
    for n in range(options.commands):
        for device in devices:
            body = {
                "name": "ping",
                "params": {"run": summary.run_id, "n": n},
                "timeout_s": 30,
                "expires_s": 600,
            }
            with contextlib.suppress(httpx.HTTPError):
                sent = await http.post(f"/v1/devices/{device.device_id}/commands", json=body, headers=headers)
                if sent.status_code == 201:
                    summary.jobs.commands_sent += 1


async def simulate(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    options: Options,
    out: TextIO,
    stop: asyncio.Event | None = None,
) -> Summary:
    """Onboard the devices, put the rules, subscribe the receiver, send for the duration, wait for
    storage and alerts, then remove the rules and the subscription. `headers` authenticate the
    operator (devices use their own credentials); a failed setup raises StartupError."""
    stop = stop or asyncio.Event()
    rng = random.Random(options.seed)
    summary = Summary(run_id=f"sim-{secrets.token_hex(3)}")
    receiver = Receiver(secrets.token_urlsafe(24), f"{summary.run_id}-")
    hook = await receiver.start(options.webhook_host)
    rules: list[str] = []
    subscription: list[str] = []
    ticker: asyncio.Task[None] | None = None
    started = time.monotonic()
    try:
        credentials = await _onboard(http, headers, options, summary.run_id, stop)
        summary.devices = list(credentials)
        for kind, params in (
            ("threshold", {"above": 40.0, "clear_above": 35.0}),
            ("zscore", {"z": 8.0, "clear_z": 3.0, "min_samples": 20}),
        ):
            if stop.is_set():
                return summary
            rule = {
                "rule_id": f"{summary.run_id}-{kind}",
                "device_type": options.device_type,
                "metric": "temperature",
                "kind": kind,
                "params": params,
            }
            await _call(http, "PUT", f"/v1/rules/{rule['rule_id']}", "rule", headers=headers, json=rule)
            rules.append(str(rule["rule_id"]))
        hook_request = {"url": hook, "event_types": list(ALERTS), "secret": receiver.secret}
        try:
            created = await http.post("/v1/subscriptions", headers=headers, json=hook_request)
        except httpx.TransportError as exc:
            reason = exc or type(exc).__name__
            raise StartupError(f"cannot reach the API at {http.base_url}: {reason}") from None
        if created.status_code == 422 and '"url"' in created.text:
            # the platform's network policy keeps webhooks off loopback: run without alerts
            summary.webhook_refused = True
            out.write(
                f"{summary.run_id}: the platform refuses webhooks to {options.webhook_host} (allow "
                "it with FLEETFLOW_WEBHOOK_ALLOW_NETWORKS); alerts are not counted\n"
            )
        elif created.status_code >= 400:
            raise StartupError(f"subscription refused: {refusal_reason(created)}")
        else:
            subscription.append(str(created.json()["subscription_id"]))
        devices = [
            SimulatedDevice(
                d,
                c,
                {m: rng.uniform(-s, s) for m, (_, s, _, _) in METRICS.items()},
                rng.uniform(0, 2 * math.pi),
            )
            for d, c in credentials.items()
        ]
        limits = await _limits(http, headers)
        schedule = plan(len(devices), options.rate, limits)
        summary.asked = options.rate
        out.write(
            f"{summary.run_id}: {len(devices)} {options.device_type} devices onboarded; sending "
            f"{options.rate:g} readings/s for {options.duration_s:g} s, {schedule.describe()}\n"
            + (
                "  (the tenant's rate limits are unknown: GET /v1/quotas was refused)\n"
                if limits is None
                else ""
            )
        )
        started = time.monotonic()
        ticker = asyncio.create_task(_progress(summary, receiver, out, started, options.duration_s))
        await _send_commands(http, headers, devices, options, summary)
        if devices and not stop.is_set():
            mqtt = None
            if options.transport == "mqtt":
                tenant = str(jwt.decode(devices[0].credential, options={"verify_signature": False})["tenant"])
                mqtt = await connect_all(credentials, tenant, options.mqtt_host, options.mqtt_port)
            jobs_done = asyncio.Event()
            rates = (options.job_failure_rate, options.job_timeout_rate)
            if mqtt is not None:  # jobs pushed on jobs/notify, progress published
                working = work_jobs_mqtt(http, mqtt, rates, rng, summary.jobs, jobs_done)
            else:
                fleet = [(d.device_id, d.credential) for d in devices]
                working = work_jobs(http, fleet, *rates, rng, summary.jobs, jobs_done)
            jobs = asyncio.create_task(working)
            try:
                await drive(http, devices, options, summary, rng, stop, mqtt, schedule)
                await _settle(http, headers, devices, summary, receiver, options, stop)
            finally:
                jobs_done.set()
                await jobs
                for conn in (mqtt or {}).values():
                    await conn.close()
    finally:
        summary.elapsed_s, summary.interrupted = time.monotonic() - started, stop.is_set()
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            out.write("\r\x1b[K" if out.isatty() else "")
        for url in [f"/v1/subscriptions/{s}" for s in subscription] + [f"/v1/rules/{r}" for r in rules]:
            with contextlib.suppress(httpx.HTTPError):
                await http.delete(url, headers=headers)
        await receiver.close()
        summary.alerts_raised, summary.alerts_cleared = (receiver.count(k) for k in ALERTS)
        summary.bad_signatures = receiver.bad_signatures
    return summary


def simulator_client(api_url: str) -> httpx.AsyncClient:
    """The simulator's HTTP client: telemetry's IN_FLIGHT and the job polls' JOB_IN_FLIGHT each get
    a connection, each in a pool of its own (cli/http_lanes.py): one pool of them all took this
    process's CPU, and its rate was what that CPU could send, not what the platform answers."""
    return httpx.AsyncClient(
        base_url=api_url, timeout=TIMEOUT, transport=LaneTransport(IN_FLIGHT + JOB_IN_FLIGHT)
    )


async def run_command(settings: Settings, args: argparse.Namespace) -> int:
    """`fleetflow simulate`: the live progress line, then the summary; exit 0 when nothing was
    rejected, 1 otherwise. Ctrl-C ends the run early, with the summary."""
    from cli.commands import _token
    from fleetflow.contracts.limits import MAX_BATCH_READINGS, MAX_BULK_DEVICES

    if args.devices > MAX_BULK_DEVICES:
        raise StartupError(f"--devices must be at most {MAX_BULK_DEVICES} (one bulk onboarding)")
    if args.rate / args.devices > MAX_BATCH_READINGS:
        raise StartupError(f"--rate allows at most {MAX_BATCH_READINGS} readings/s per device")
    options = Options(
        args.devices,
        args.rate,
        args.duration,
        args.anomaly_rate,
        args.device_type,
        job_failure_rate=args.job_failure_rate,
        job_timeout_rate=args.job_timeout_rate,
        commands=args.commands,
    )
    headers = {"Authorization": f"Bearer {_token(settings, args.token)}"}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        async with simulator_client(settings.api_url) as http:
            summary = await simulate(http, headers, options, sys.stdout, stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    print(summary.render())
    return summary.exit_code
