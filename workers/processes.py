"""Worker processes: one in this process, or several under a supervisor."""

from __future__ import annotations

import asyncio
import sys

from fleetflow.contracts.common import TaskQueue
from fleetflow.settings import Settings
from workers.devstack import metrics_port_of
from workers.supervisor import Child, Supervisor, SupervisorFailed
from workers.worker import run_worker


def run_workers(settings: Settings, queue: TaskQueue, processes: int) -> int:
    """One worker in this process, or `processes` supervised worker processes."""
    if processes == 1:
        asyncio.run(run_worker(queue, settings))
        return 0
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    argv = [sys.executable, "-m", "cli.main", "worker", "--queue", queue.value]
    try:
        for i in range(processes):
            # each process its own /metrics port: FLEETFLOW_METRICS_PORT + i
            port = {"FLEETFLOW_METRICS_PORT": str(metrics_port_of(settings.metrics_port, i))}
            supervisor.add(Child(f"worker-{queue.value}-{i + 1}", argv, port))
        supervisor.run()
        return 0
    except SupervisorFailed as exc:
        print(f"fleetflow: {exc}; stopping", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()
