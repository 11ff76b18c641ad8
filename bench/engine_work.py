"""Engine work per reading: the workers' Temporal SDK task counters, scraped from /metrics.

A task is one workflow task executed (`temporal_workflow_task_execution_latency` count) or
one activity executed (`temporal_activity_execution_latency` count), summed over every worker
process of the platform (each serves /metrics on its own FLEETFLOW_METRICS_PORT).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import httpx
import psutil

TASK_METRICS = ("temporal_workflow_task_execution_latency", "temporal_activity_execution_latency")
# the ingestion shards' own work (windows); the rest (alerts and their deliveries, onboarding, ...)
# grows with what happens to the readings, not with the readings
WINDOW_WORKFLOWS = frozenset({"TelemetryIngestion"})
_WORKFLOW_TYPE = re.compile(r'workflow_type="([^"]*)"')


def metrics_urls(processes: dict[str, psutil.Process]) -> list[str]:
    """The /metrics URL of each worker process."""
    urls = []
    for name, proc in processes.items():
        if name.startswith("worker-"):
            port = proc.environ().get("FLEETFLOW_METRICS_PORT")
            if port and port != "0":
                urls.append(f"http://127.0.0.1:{port}/metrics")
    return urls


def task_count(text: str) -> Counter[str]:
    """Workflow tasks plus activity executions in one Prometheus exposition, by the workflow
    type they ran for ("" where a counter names none)."""
    total: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.endswith("_count") and name.startswith(TASK_METRICS):
            workflow_type = _WORKFLOW_TYPE.search(line)
            total[workflow_type.group(1) if workflow_type else ""] += round(float(line.rsplit(" ", 1)[-1]))
    return total


def window_share(counts: Counter[str]) -> int:
    """The tasks of the ingestion shards' windows among `counts`."""
    return sum(n for workflow_type, n in counts.items() if workflow_type in WINDOW_WORKFLOWS)


async def tasks(http: httpx.AsyncClient, urls: list[str], attempts: int = 20) -> Counter[str]:
    """Tasks executed so far by the workers at urls, by workflow type (the SDK exports its
    counters each second). A worker whose /metrics is not listening yet (a slow start on a
    busy machine) is asked again, every half second, up to `attempts` times."""
    total: Counter[str] = Counter()
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
