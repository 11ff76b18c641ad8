"""The simulated devices of `fleetflow simulate`: readings with a per-device offset, a slow
drift, noise and injected temperature spikes, sent as each device with its own credential at
the run's rate (a refused batch is retried as a device would)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx
import orjson

from cli.simulate_plan import Plan, plan, slots

if TYPE_CHECKING:
    from cli.simulate import Options, Summary
    from cli.simulate_mqtt import MqttDevice

IN_FLIGHT = 64  # telemetry requests at once
BACKLOG_TICKS = 2  # ticks whose answers may still be outstanding before the run waits ...
BACKLOG_S = 2.0  # ... or this many seconds of ticks, when ticks are shorter
# metric -> (typical value, spread between devices, slow drift amplitude, noise)
METRICS = {
    "temperature": (21.0, 1.5, 0.8, 0.15),
    "humidity": (45.0, 5.0, 3.0, 0.5),
    "pressure": (1013.0, 3.0, 0.6, 0.2),
}
SPIKE_C = (25.0, 40.0)  # an anomaly adds this to a temperature reading: well past both rules


@dataclass
class SimulatedDevice:
    """One simulated device: its credential, its offsets from the typical values, its counts."""

    device_id: str
    credential: str
    offsets: dict[str, float]
    phase: float
    batches: int = 0
    acked: int = 0
    turn: int = 0  # next metric, round robin

    def batch(
        self, n: int, start: datetime, elapsed: float, p: float, rng: random.Random, span_s: float = 1.0
    ) -> tuple[bytes, int]:
        """A batch of n readings spread over span_s seconds from `start`; and its count of spikes."""
        readings, spikes = [], 0
        for i in range(n):
            metric = list(METRICS)[self.turn % len(METRICS)]
            self.turn += 1
            base, _, drift, noise = METRICS[metric]
            value = base + self.offsets[metric] + drift * math.sin(elapsed / 95.0 + self.phase)
            value += rng.gauss(0.0, noise)
            if metric == "temperature" and rng.random() < p:
                value, spikes = value + rng.uniform(*SPIKE_C), spikes + 1
            ts = start + timedelta(seconds=span_s * i / n)
            readings.append(
                {
                    "device_id": self.device_id,
                    "ts": ts.isoformat(),
                    "metric": metric,
                    "value": round(value, 2),
                }
            )
        self.batches += 1
        body = {"batch_id": f"{self.device_id}-{self.batches:06d}", "readings": readings}
        return orjson.dumps(body), spikes


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, unless stop is set first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(seconds, 0.0))


def refusal_reason(response: httpx.Response) -> str:
    """Why the API refused a request, in one line: status, then the first field error or the detail."""
    try:
        body = response.json()
        # a problem (RFC 9457): `errors` names the fields, `detail` says it for a person
        detail = body.get("errors") or body.get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        detail = f"{'.'.join(str(p) for p in detail[0].get('loc', []))}: {detail[0].get('msg')}"
    return f"{response.status_code} {str(detail)[:200]}"


async def post_batch(
    http: httpx.AsyncClient, device: SimulatedDevice, body: bytes, n: int, summary: Summary
) -> None:
    """Send one batch as its device; a 503, a 429 or a transport error is retried with the same
    batch id (after the 429's Retry-After)."""
    headers = {"Authorization": f"Bearer {device.credential}", "Content-Type": "application/json"}
    reason = ""
    for attempt in range(3):
        wait_s = 0.25 * 2**attempt
        try:
            response = await http.post("/v1/telemetry", content=body, headers=headers)
        except httpx.TransportError as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
        else:
            if response.status_code == 202:
                summary.acknowledged += n
                summary.acknowledged_batches += 1
                device.acked += n
                return
            reason = refusal_reason(response)
            if response.status_code not in (429, 503):
                break
            # over a tenant or device rate (429): wait as long as the API says, as a device would
            retry_after = response.headers.get("Retry-After", "")
            wait_s = max(wait_s, min(float(retry_after), 30.0)) if retry_after.isdigit() else wait_s
        if attempt < 2:
            await asyncio.sleep(wait_s)
    summary.rejected += n
    summary.reasons[reason] += 1


async def publish_batch(
    conn: MqttDevice, device: SimulatedDevice, body: bytes, n: int, summary: Summary
) -> None:
    """Publish one batch over MQTT; a PUBACK with reason 0 acknowledges it (durable)."""
    try:
        code = await conn.publish(body)
    except (ConnectionError, TimeoutError, OSError) as exc:
        reason = f"MQTT {type(exc).__name__}: {exc}"[:200]
    else:
        if code == 0:
            summary.acknowledged += n
            summary.acknowledged_batches += 1
            device.acked += n
            return
        reason = f"MQTT PUBACK reason {code:#x}"
    summary.rejected += n
    summary.reasons[reason] += 1


async def drive(
    http: httpx.AsyncClient,
    devices: list[SimulatedDevice],
    options: Options,
    summary: Summary,
    rng: random.Random,
    stop: asyncio.Event,
    mqtt: dict[str, MqttDevice] | None = None,
    schedule: Plan | None = None,
) -> None:
    """R readings/s as `schedule` (default: plan(devices, R)) says: each device a batch every
    period_s, the devices split into groups that send in turn every tick, so the requests are
    spread evenly (over MQTT when `mqtt` holds the devices' connections). A tick does not wait
    for the previous ones' answers, but at most BACKLOG_S of them are outstanding: past that the
    run waits (the platform or this process is slower than the rate asked) and counts it."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    started = time.monotonic()
    n = len(devices)
    schedule = schedule or plan(n, options.rate)
    groups = slots(schedule)
    tick_s = schedule.period_s / groups
    backlog = max(BACKLOG_TICKS, math.ceil(BACKLOG_S / tick_s))
    outstanding: deque[asyncio.Future[list[None]]] = deque()

    async def send(device: SimulatedDevice, count: int, start: datetime, elapsed: float) -> None:
        async with gate:
            body, spikes = device.batch(count, start, elapsed, options.anomaly_rate, rng, schedule.period_s)
            summary.sent, summary.batches = summary.sent + count, summary.batches + 1
            summary.anomalies += spikes
            if mqtt is not None:
                await publish_batch(mqtt[device.device_id], device, body, count, summary)
            else:
                await post_batch(http, device, body, count, summary)

    tick = 0
    while not stop.is_set() and tick * tick_s < options.duration_s:
        begin, end = tick * tick_s, min((tick + 1) * tick_s, options.duration_s)
        due = round(options.rate * end) - round(options.rate * begin)
        group = devices[tick % groups :: groups]
        m = len(group)
        first = ((tick // groups) * (due % m)) % m  # who gets the remainder rotates
        # a batch holds the readings its device took since its last one: the period up to now
        start, elapsed = datetime.now(UTC) - timedelta(seconds=schedule.period_s), time.monotonic() - started
        counts = [due // m + ((i - first) % m < due % m) for i in range(m)]
        sends = [send(d, c, start, elapsed) for d, c in zip(group, counts, strict=True) if c]
        outstanding.append(asyncio.gather(*sends))
        while len(outstanding) > backlog or (outstanding and outstanding[0].done()):
            if not outstanding[0].done():
                summary.behind_s += await _waited(outstanding[0])
            outstanding.popleft().result()
        tick += 1
        await pause(stop, started + tick * tick_s - time.monotonic())
    for pending in outstanding:
        await pending
    summary.sending_s = time.monotonic() - started


async def _waited(pending: asyncio.Future[list[None]]) -> float:
    """Seconds spent waiting for `pending`."""
    waited = time.monotonic()
    await asyncio.wait([pending])
    return time.monotonic() - waited
