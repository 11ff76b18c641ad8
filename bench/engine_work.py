"""Engine work per reading: the workers' Temporal SDK task counters, scraped from /metrics.

A task is one workflow task executed (`temporal_workflow_task_execution_latency` count) or
one activity executed (`temporal_activity_execution_latency` count), summed over every worker
process of the platform (each serves /metrics on its own FLEETFLOW_METRICS_PORT).
"""

from __future__ import annotations

import asyncio

import httpx
import psutil

TASK_METRICS = ("temporal_workflow_task_execution_latency", "temporal_activity_execution_latency")


def metrics_urls(processes: dict[str, psutil.Process]) -> list[str]:
    """The /metrics URL of each worker process."""
    urls = []
    for name, proc in processes.items():
        if name.startswith("worker-"):
            port = proc.environ().get("FLEETFLOW_METRICS_PORT")
            if port and port != "0":
                urls.append(f"http://127.0.0.1:{port}/metrics")
    return urls


def task_count(text: str) -> int:
    """Workflow tasks plus activity executions in one Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.endswith("_count") and name.startswith(TASK_METRICS):
            total += float(line.rsplit(" ", 1)[-1])
    return round(total)


async def tasks(http: httpx.AsyncClient, urls: list[str], attempts: int = 20) -> int:
    """Tasks executed so far by the workers at urls (the SDK exports its counters each second).
    A worker whose /metrics is not listening yet (a slow start on a busy machine) is asked
    again, every half second, up to `attempts` times."""
    total = 0
    for url in urls:
        for attempt in range(attempts):
            try:
                total += task_count((await http.get(url)).text)
                break
            except httpx.ConnectError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.5)
    return total
