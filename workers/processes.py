"""Worker and API processes: one in this process, or several under a supervisor."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping

from fleetflow.contracts.common import TaskQueue
from fleetflow.errors import StartupError
from fleetflow.settings import Settings
from workers.supervisor import Child, Supervisor, supervise

API_PROCESSES_ENV = "FLEETFLOW_API_PROCESSES"  # read by api/quotas.py (not imported: no API here)


def metrics_port_of(base: int, index: int) -> int:
    """The /metrics port of the index-th (0-based) worker process a command starts: base +
    index (0: no endpoint). `fleetflow up` numbers its workers queue by queue in TaskQueue
    order (orchestration, device, data, analytics, notification, webhook), N per queue."""
    if base == 0:
        return 0
    if base + index > 65535:
        raise StartupError(f"metrics port {base + index} is out of range (FLEETFLOW_METRICS_PORT={base})")
    return base + index


def worker_child(queue: TaskQueue, index: int, metrics_port: int, env: Mapping[str, str] = {}) -> Child:
    """The index-th (0-based) supervised worker process of a queue, its /metrics on metrics_port."""
    argv = [sys.executable, "-m", "cli.main", "worker", "--queue", queue.value]
    port = {"FLEETFLOW_METRICS_PORT": str(metrics_port)}
    return Child(f"worker-{queue.value}-{index + 1}", argv, {**env, **port}, tier=1)


def run_workers(settings: Settings, queue: TaskQueue, processes: int) -> int:
    """One worker in this process, or `processes` supervised worker processes."""
    if processes == 1:
        from workers.worker import run_worker  # the worker's imports only where one runs here

        asyncio.run(run_worker(queue, settings))
        return 0

    def start(supervisor: Supervisor) -> bool:
        for i in range(processes):
            # each process its own /metrics port: FLEETFLOW_METRICS_PORT + i
            supervisor.add(worker_child(queue, i, metrics_port_of(settings.metrics_port, i)))
        return True

    return supervise(start)


def declared_api_processes(base_env: Mapping[str, str] = {}) -> int:
    """The API processes sharing the tenants' rates that the environment declares (1: none)."""
    value = base_env.get(API_PROCESSES_ENV) or os.environ.get(API_PROCESSES_ENV) or "1"
    try:
        return max(1, int(value))
    except ValueError:
        return 1


def api_children(settings: Settings, processes: int, base_env: Mapping[str, str] = {}) -> list[Child]:
    """The supervised processes of `fleetflow api --processes N` (and `fleetflow up
    --api-processes N`): all on the API port (SO_REUSEPORT: the kernel spreads connections over
    them), each knowing how many share the tenants' rates (api/quotas.py): N, or the total
    FLEETFLOW_API_PROCESSES already declares when larger (N processes on each of several hosts
    behind one balancer: each must hold 1/total, not 1/N, of a tenant's rates)."""
    env = {
        **base_env,
        "FLEETFLOW_API_HOST": settings.api_host,
        "FLEETFLOW_API_PORT": str(settings.api_port),
        "FLEETFLOW_API_REUSE_PORT": "1" if processes > 1 else "0",  # api/server.py
        API_PROCESSES_ENV: str(max(processes, declared_api_processes(base_env))),  # api/quotas.py
    }
    argv = [sys.executable, "-m", "cli.main", "api"]
    if processes == 1:
        return [Child("api", argv, env, tier=2)]
    return [Child(f"api-{i + 1}", argv, env, tier=2) for i in range(processes)]


def run_api(settings: Settings, processes: int) -> int:
    """The API in this process, or `processes` supervised API processes on one port."""
    if processes == 1:
        from api.server import serve  # the API's imports only where one runs here

        return asyncio.run(serve(settings))

    from workers.devstack import ensure_port_free

    # SO_REUSEPORT would let the processes share the port with another stack's that set it
    # too (another `fleetflow api --processes`): requests split between two platforms
    ensure_port_free(settings.api_port, "FLEETFLOW_API_PORT / --port", settings.api_host)

    def start(supervisor: Supervisor) -> bool:
        for child in api_children(settings, processes):
            supervisor.add(child)
        return True

    return supervise(start)
