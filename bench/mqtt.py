"""`python -m bench.mqtt`: devices publishing QoS 1 telemetry over MQTT to `fleetflow up`.

Figures: readings_per_s with single-reading and with 10-reading messages (each message
acknowledged only once durable), puback_p99_ms (paced: 1 message/s per device, spread over the
second; saturated_puback_p99_ms beside it), the HTTP path's rates from the same run, and
rss_mb of the MQTT process holding `--idle` idle connections. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import resource
import shutil
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import psutil

from bench.mqtt_load import LoadClient
from bench.platform import Platform, platform
from bench.stack import percentile, say

TENANT = "default"  # the tenant of `fleetflow up`'s admin token


async def onboard(p: Platform, http: httpx.AsyncClient, count: int) -> dict[str, str]:
    """Bulk-onboard count sensors; their credentials by device id."""
    prefix = f"mq-{uuid.uuid4().hex[:6]}"
    creds: dict[str, str] = {}
    for start in range(0, count, 10_000):
        devices = [
            {"device_id": f"{prefix}-{i:05d}", "device_type": "sensor", "firmware_version": "1.0.0"}
            for i in range(start, min(count, start + 10_000))
        ]
        bulk = (await http.post("/v1/devices:bulk", json={"devices": devices}, headers=p.headers)).json()
        for _ in range(7200):  # an hour at most
            if (await http.get(bulk["status_url"], headers=p.headers)).json()["status"] == "completed":
                break
            await asyncio.sleep(0.5)
        text = (await http.get(f"/v1/bulk-onboardings/{bulk['bulk_id']}/credentials", headers=p.headers)).text
        creds.update({r["device_id"]: r["credential"] for r in csv.DictReader(io.StringIO(text))})
    return creds


async def connect_all(p: Platform, creds: dict[str, str], keep_alive: int = 600) -> list[LoadClient]:
    """One connection per device, opened 100 at a time."""
    clients = [LoadClient(d, c, f"tenants/{TENANT}/devices/{d}/telemetry") for d, c in creds.items()]
    for i in range(0, len(clients), 100):
        await asyncio.gather(*(c.open(p.mqtt_port, keep_alive) for c in clients[i : i + 100]))
    return clients


async def mqtt_phase(
    clients: list[LoadClient], per_message: int, seconds: float, window: int, pace_s: float = 0.0
) -> dict[str, float]:
    """Every client publishes messages of per_message readings for seconds."""
    readings = [{"metric": "temp", "value": 20.5 + i} for i in range(per_message)]
    payload = json.dumps(readings[0] if per_message == 1 else readings).encode()
    for c in clients:
        c.latencies_ms.clear()
        c.acked = 0
    started = time.perf_counter()
    # paced: the devices' phases spread over the period, as a fleet's are (all in step, each
    # second began with a burst of every device's publish at once, and the PUBACK tail measured
    # that burst, this process's own included)
    until = started + seconds
    offsets = [pace_s * i / len(clients) for i in range(len(clients))]
    runs = [
        c.publish_for(payload, until, window, pace_s=pace_s, offset_s=o)
        for c, o in zip(clients, offsets, strict=True)
    ]
    await asyncio.gather(*runs)
    elapsed = time.perf_counter() - started
    acked = sum(c.acked for c in clients)
    latencies = [x for c in clients for x in c.latencies_ms]
    return {
        "messages_per_s": round(acked / elapsed),
        "readings_per_s": round(acked * per_message / elapsed),
        "puback_p50_ms": round(percentile(latencies, 50), 1) if latencies else 0.0,
        "puback_p99_ms": round(percentile(latencies, 99), 1) if latencies else 0.0,
    }


async def http_phase(
    p: Platform, creds: dict[str, str], per_batch: int, seconds: float, senders: int
) -> dict[str, Any]:
    """Device credentials posting batches of per_batch readings to /v1/telemetry."""
    devices = list(creds.items())[:senders]
    acked = 0
    latencies: list[float] = []
    refused: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def sender(http: httpx.AsyncClient, device_id: str, credential: str) -> None:
        nonlocal acked
        headers = {"Authorization": f"Bearer {credential}"}
        while time.perf_counter() < deadline:
            ts = datetime.now(UTC).isoformat()
            readings = [
                {"device_id": device_id, "ts": ts, "metric": "temp", "value": i} for i in range(per_batch)
            ]
            sent = time.perf_counter()
            r = await http.post(
                "/v1/telemetry", json={"batch_id": uuid.uuid4().hex, "readings": readings}, headers=headers
            )
            if r.status_code == 202:
                acked += per_batch
                latencies.append((time.perf_counter() - sent) * 1000)
            else:
                refused[r.status_code] = refused.get(r.status_code, 0) + 1

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=p.api_url, timeout=30) as http:
        await asyncio.gather(*(sender(http, d, c) for d, c in devices))
    elapsed = time.perf_counter() - started
    return {
        "readings_per_s": round(acked / elapsed),
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else 0.0,
        "refused": refused,  # by status code (429: over a rate)
    }


async def mosquitto_phase(p: Platform, creds: dict[str, str], clients: int = 4, lines: int = 20_000) -> float:
    """messages/s of `clients` mosquitto_pub processes each publishing `lines` QoS 1 readings
    (`-l`), as the issue measured amqtt and Mosquitto; 0 when mosquitto_pub is not installed."""
    if shutil.which("mosquitto_pub") is None:
        return 0.0
    text = "".join(f'{{"metric":"t","value":{i}}}\n' for i in range(lines)).encode()
    started = time.perf_counter()
    procs = []
    for device_id, credential in list(creds.items())[:clients]:
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(p.mqtt_port), "-i", device_id, "-u", device_id]
        argv += ["-P", credential, "-q", "1", "-l", "-t", f"tenants/{TENANT}/devices/{device_id}/telemetry"]
        procs.append(await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE))
    await asyncio.gather(*(proc.communicate(text) for proc in procs))
    return round(clients * lines / (time.perf_counter() - started))


async def delta_push_phase(
    p: Platform, http: httpx.AsyncClient, creds: dict[str, str], devices: int
) -> float:
    """p99 ms from PATCH desired (sent) to the device receiving the delta, over `devices` devices."""
    chosen = list(creds.items())[:devices]
    clients = []
    for device_id, credential in chosen:
        c = LoadClient(device_id, credential, "")
        await c.open(p.mqtt_port)
        await c.subscribe(f"tenants/{TENANT}/devices/{device_id}/twin/delta")
        clients.append(c)
    latencies: list[float] = []

    async def one(c: LoadClient, value: int) -> None:
        want = f'"report_interval_s": {value}'
        sent = time.perf_counter()
        r = await http.patch(
            f"/v1/devices/{c.device_id}/twin/desired", json={"report_interval_s": value}, headers=p.headers
        )
        r.raise_for_status()
        while True:
            _, payload = await asyncio.wait_for(c.next_publish(), 30)
            if want in payload.decode():
                latencies.append((time.perf_counter() - sent) * 1000)
                return

    # the first PATCH starts the twins of bulk-onboarded devices; then one change at a time (a
    # burst of concurrent PATCHes would measure the queue in front of the twins instead)
    await asyncio.gather(*(one(c, 11) for c in clients))
    latencies.clear()
    for value in (12, 13):
        for c in clients:
            await one(c, value)
    for c in clients:
        c.close()
    return round(percentile(latencies, 99), 1)


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu(p: Platform) -> dict[str, float]:
    """CPU seconds so far of the platform's processes by role (PostgreSQL and Temporal as one each)."""
    out: dict[str, float] = {}
    ours = set(psutil.Process(p.process.pid).children(recursive=True))
    for proc in psutil.process_iter():
        try:
            if str(p.data_dir) in " ".join(proc.cmdline()):  # PostgreSQL runs detached
                ours.add(proc)
                ours.update(proc.children(recursive=True))
        except psutil.Error:
            continue
    out["bench"] = sum(psutil.Process().cpu_times()[:2])
    for child in ours:
        try:
            argv = " ".join(child.cmdline())
            times = child.cpu_times()
        except psutil.Error:
            continue
        role = (
            "mqtt"
            if "cli.main mqtt" in argv
            else "api"
            if "cli.main api" in argv
            else "workers"
            if "--queue" in argv
            else "postgres"
            if "postgres" in argv
            else "temporal"
            if "temporal" in argv
            else "other"
        )
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


async def run(
    devices: int, seconds: float, window: int, idle: int, http_senders: int, mosquitto_lines: int = 20_000
) -> dict[str, Any]:
    """The whole benchmark."""
    _raise_file_limit()  # `fleetflow up` and its MQTT child inherit it
    env = {"FLEETFLOW_QUOTAS": "readings_per_s=0,requests_per_s=0,device_readings_per_s=0"}
    out: dict[str, Any] = {"devices": devices, "seconds": seconds, "window": window, "cpus": os.cpu_count()}
    async with platform(1, env) as p, httpx.AsyncClient(base_url=p.api_url, timeout=60) as http:
        say(f"onboarding {devices} devices ...")
        creds = await onboard(p, http, devices)
        say("HTTP, same run (first, on an idle pipeline) ...")
        out["http_single"] = await http_phase(p, creds, 1, seconds, http_senders)
        out["http_ten"] = await http_phase(p, creds, 10, seconds, http_senders)
        say(f"  {out['http_single']} {out['http_ten']}")
        await asyncio.sleep(10)  # the pipeline drains what HTTP sent
        say("connecting ...")
        clients = await connect_all(p, creds)
        say("single-reading messages ...")
        before = _cpu(p)
        out["single"] = await mqtt_phase(clients, 1, seconds, window)
        after = _cpu(p)
        out["single"]["cpu_s"] = {k: round(after[k] - before.get(k, 0.0), 1) for k in after}
        say(f"  {out['single']}")
        say("10-reading messages ...")
        before = _cpu(p)
        out["ten"] = await mqtt_phase(clients, 10, seconds, window)
        after = _cpu(p)
        out["ten"]["cpu_s"] = {k: round(after[k] - before.get(k, 0.0), 1) for k in after}
        say(f"  {out['ten']}")
        # the pipeline drains what the saturated phases stored: otherwise the paced latencies
        # measure that backlog's share of PostgreSQL, more of it the faster the phases before
        await asyncio.sleep(10)
        say("paced: 1 message/s per device ...")
        out["paced_1_per_s"] = await mqtt_phase(clients, 1, seconds, 1, pace_s=1.0)
        say(f"  {out['paced_1_per_s']}")
        for c in clients:
            c.close()
        if mosquitto_lines:
            say(f"4 mosquitto_pub clients x {mosquitto_lines} lines ...")
            out["mosquitto_pub_4_msgs_per_s"] = await mosquitto_phase(p, creds, lines=mosquitto_lines)
            say(f"  {out['mosquitto_pub_4_msgs_per_s']}")
        say("delta push ...")
        out["delta_push_p99_ms"] = await delta_push_phase(p, http, creds, 100)
        say(f"  {out['delta_push_p99_ms']}")
        if idle:
            say(f"onboarding {idle} idle devices ...")
            idle_creds = await onboard(p, http, idle)
            mqtt = p.processes()["mqtt"]
            before = mqtt.memory_info().rss
            idle_clients = await connect_all(p, idle_creds, keep_alive=3600)
            await asyncio.sleep(2)
            out["idle_connections"] = len(idle_clients)
            out["rss_mb"] = round(mqtt.memory_info().rss / 2**20, 1)
            out["rss_mb_before_idle"] = round(before / 2**20, 1)
            for c in idle_clients:
                c.close()
    out["readings_per_s_single"] = out["single"]["readings_per_s"]
    out["readings_per_s_ten"] = out["ten"]["readings_per_s"]
    # the latency figure is the paced phase's: saturated, a PUBACK waits behind the devices'
    # whole in-flight window (devices x window / rate, Little's law), which the client chooses
    out["puback_p99_ms"] = out["paced_1_per_s"]["puback_p99_ms"]
    out["saturated_puback_p99_ms"] = max(out["single"]["puback_p99_ms"], out["ten"]["puback_p99_ms"])
    return out


def main() -> None:
    """Parse arguments, run, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--window", type=int, default=4, help="unacknowledged publishes per device")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections for rss_mb (0: skip)")
    parser.add_argument("--http-senders", type=int, default=32)
    parser.add_argument("--mosquitto-lines", type=int, default=20_000, help="per mosquitto_pub (0: skip)")
    args = parser.parse_args()
    result = asyncio.run(
        run(args.devices, args.seconds, args.window, args.idle, args.http_senders, args.mosquitto_lines)
    )
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
