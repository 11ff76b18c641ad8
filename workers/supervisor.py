"""Start child processes, restart the ones that die, stop them all on SIGINT/SIGTERM.

Children get PR_SET_PDEATHSIG, so even a supervisor killed with SIGKILL leaves no
orphan behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own shutdown still stops its children
    # the terminal's Ctrl-C goes to the supervisor only; it stops children in order
    os.setpgrp()


@dataclass
class Child:
    """A process the supervisor keeps running."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = True
    tier: int = 1  # stopped after every child of a higher tier
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        """Spawn (or respawn) the process."""
        self.process = subprocess.Popen(
            self.argv, env={**os.environ, **self.env}, preexec_fn=_die_with_parent
        )


class SupervisorFailed(Exception):
    """A child died too often, or one that must not restart died."""


class Supervisor:
    """Runs children until a stop signal; restarts dead ones (at most 5 a minute each)."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._stopping = False

    def add(self, child: Child) -> Child:
        """Start child now and keep it running."""
        child.start()
        self.children.append(child)
        return child

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM ask for an orderly stop."""

        def request_stop(signum: int, frame: FrameType | None) -> None:
            self._stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stopping

    def run(self, poll_s: float = 0.2) -> None:
        """Supervise until a stop signal; SupervisorFailed when a child cannot be kept up."""
        while not self._stopping:
            for child in self.children:
                assert child.process is not None
                code = child.process.poll()
                if code is None or self._stopping:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if not child.restart or len(child.restarts) > 5:
                    raise SupervisorFailed(f"{child.name} exited with status {code}")
                print(f"fleetflow: {child.name} exited ({code}); restarting", file=sys.stderr)
                child.start()
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM children tier by tier, highest first; SIGKILL what outlives timeout_s."""
        self._stopping = True
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            live = [
                c.process
                for c in self.children
                if c.tier == tier and c.process is not None and c.process.poll() is None
            ]
            for process in live:
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for process in live:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def supervise(start: Callable[[Supervisor], bool]) -> int:
    """Run a supervisor (stopped by SIGINT/SIGTERM) over the children `start` adds; `start`
    returns False to end before running. 0, or 1 with one line on stderr when a child failed for
    good; every child is stopped on the way out, whatever happened."""
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    try:
        if start(supervisor):
            supervisor.run()
        return 0
    except SupervisorFailed as exc:
        print(f"fleetflow: {exc}; stopping", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()
