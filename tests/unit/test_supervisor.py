"""`supervise` (shared by `fleetflow up` and `fleetflow worker --processes N`) and the worker
processes it is given."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

import pytest

from fleetflow.contracts.common import TaskQueue
from workers.processes import worker_child
from workers.supervisor import Child, Supervisor, supervise


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """supervise installs its own SIGINT/SIGTERM handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_child_that_fails_for_good_is_exit_status_1_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def start(supervisor: Supervisor) -> bool:
        supervisor.add(Child("once", [sys.executable, "-c", "raise SystemExit(3)"], restart=False))
        return True

    assert supervise(start) == 1
    assert "fleetflow: once exited with status 3; stopping" in capsys.readouterr().err


def test_a_start_that_declines_stops_what_it_started() -> None:
    children: list[Child] = []

    def start(supervisor: Supervisor) -> bool:
        children.append(
            supervisor.add(Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"]))
        )
        return False

    assert supervise(start) == 0
    assert children[0].process is not None and children[0].process.poll() is not None


def test_a_start_that_raises_still_stops_its_children() -> None:
    children: list[Child] = []

    def start(supervisor: Supervisor) -> bool:
        children.append(
            supervisor.add(Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"]))
        )
        raise RuntimeError("setup failed")

    with pytest.raises(RuntimeError, match="setup failed"):
        supervise(start)
    assert children[0].process is not None and children[0].process.poll() is not None


def test_a_worker_process_runs_its_queue_with_its_own_metrics_port() -> None:
    child = worker_child(TaskQueue.DEVICE, 1, 9466, {"DATABASE_URL": "postgresql://x"})
    assert child.name == "worker-device-2"
    assert child.argv == [sys.executable, "-m", "cli.main", "worker", "--queue", "device"]
    assert child.env == {"DATABASE_URL": "postgresql://x", "FLEETFLOW_METRICS_PORT": "9466"}
    assert child.tier == 1
