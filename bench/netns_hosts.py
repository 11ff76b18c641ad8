"""Test hosts on one machine: network namespaces joined by a bridge on a private subnet.

Each host is a namespace with one veth link to the bridge `ffbr<tag>` in the caller's namespace,
which holds the subnet's last address (so the caller reaches every host, as a client on the
network would). Losing a host SIGKILLs every process in its namespace and takes its link down.
Everything made here is removed by `close`, processes first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why test hosts cannot be made here (no `ip`, no permission), or None."""
    probe = f"ffprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` cannot run: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface of this machine uses."""
    used = _ip("-4", "-o", "addr").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
        if f" {str(net.network_address)[:-1]}" not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test hosts")


@dataclass
class Host:
    """One namespace: its name, address and link (the bridge end of its veth)."""

    name: str
    namespace: str
    address: str
    link: str
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, label: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Run argv inside this host, its output in logs/<host>-<label>.log."""
        log: IO[bytes] = open(self.logs / f"{self.name}-{label}.log", "ab")
        process = subprocess.Popen(
            [IP, "netns", "exec", self.namespace, *argv],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        """Every process running in this host's namespace."""
        listed = _ip("netns", "pids", self.namespace, check=False).stdout.split()
        return [int(p) for p in listed if p.isdigit()]

    def kill_all(self) -> int:
        """SIGKILL every process of the host at once; how many there were."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            # also the ones not (yet) in the namespace: `ip netns exec` before its setns()
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return len(pids)


class TestHosts:
    """Hosts named in `names` on a fresh subnet; use as a context manager."""

    def __init__(self, names: Sequence[str], logs: Path) -> None:
        self.tag = f"{os.getpid() % 10000}{random.randint(0, 99)}"
        self.net = _free_subnet()
        self.bridge = f"ffbr{self.tag}"
        self.logs = logs
        addresses = list(self.net.hosts())
        self.gateway = str(addresses[-1])
        self.hosts = {
            name: Host(name, f"ff{self.tag}{name}", str(addresses[i]), f"ff{self.tag}{name}v", logs)
            for i, name in enumerate(names)
        }

    def __enter__(self) -> TestHosts:
        self.logs.mkdir(parents=True, exist_ok=True)
        prefix = self.net.prefixlen
        try:
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for host in self.hosts.values():
                _ip("netns", "add", host.namespace)
                _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
                _ip("link", "set", host.link, "master", self.bridge)
                _ip("link", "set", host.link, "up")
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0")
                _ip("-n", host.namespace, "link", "set", "eth0", "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def lose(self, name: str) -> int:
        """Host `name` dies: every process SIGKILLed at once, its link cut. Processes killed."""
        host = self.hosts[name]
        killed = host.kill_all()
        _ip("link", "set", host.link, "down", check=False)
        return killed

    def close(self) -> None:
        """Kill every process in the hosts, remove the namespaces, links and bridge: every step
        is tried whatever an earlier one raised (a stuck `ip`, a second Ctrl-C while waiting)."""
        try:
            for host in self.hosts.values():
                with contextlib.suppress(Exception):
                    host.kill_all()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if not any(h.pids() for h in self.hosts.values()):
                        break
                except Exception:
                    break  # cannot tell: remove what can be removed
                time.sleep(0.1)
        finally:
            for host in self.hosts.values():
                with contextlib.suppress(Exception):
                    _ip("link", "del", host.link, check=False)
                with contextlib.suppress(Exception):
                    _ip("netns", "del", host.namespace, check=False)
            with contextlib.suppress(Exception):
                _ip("link", "del", self.bridge, check=False)
