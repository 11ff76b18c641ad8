"""The test hosts' clean-up (bench/netns_hosts.py), with `ip` replaced: it removes every
namespace, link and bridge and kills every process it started, whatever fails on the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bench.netns_hosts as netns_hosts


class FakeIp:
    """Records the `ip` commands; `ip netns pids` hangs (times out) or lists nothing."""

    def __init__(self, pids_hang: bool) -> None:
        self.pids_hang = pids_hang
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args[:2] == ("netns", "pids") and self.pids_hang:
            raise subprocess.TimeoutExpired(["ip", *args], 30)
        return subprocess.CompletedProcess(["ip", *args], 0, "", "")


def _removed(ip: FakeIp, hosts: netns_hosts.TestHosts) -> set[tuple[str, ...]]:
    wanted: set[tuple[str, ...]] = {("link", "del", hosts.bridge)}
    for host in hosts.hosts.values():
        wanted |= {("netns", "del", host.namespace), ("link", "del", host.link)}
    return wanted - set(ip.calls)


def test_a_stuck_ip_while_killing_still_removes_every_namespace_link_and_bridge(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ip = FakeIp(pids_hang=True)
    monkeypatch.setattr(netns_hosts, "_ip", ip)
    hosts = netns_hosts.TestHosts(["a", "b", "c"], tmp_path)
    hosts.close()
    assert _removed(ip, hosts) == set()


def test_a_process_not_yet_in_its_namespace_is_killed_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`ip netns exec` runs in the caller's namespace until its setns(): `ip netns pids` does
    not list it, and it would outlive the hosts."""
    ip = FakeIp(pids_hang=False)
    monkeypatch.setattr(netns_hosts, "_ip", ip)
    hosts = netns_hosts.TestHosts(["a"], tmp_path)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    hosts["a"].processes.append(process)
    try:
        hosts.close()
        assert process.poll() is not None
    finally:
        process.kill()
        process.wait()
