"""`fleetflow api --processes N` tells its processes how many share a tenant's rates."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetflow.settings import Settings
from workers.processes import api_children


def _shares(processes: int, tmp_path: Path) -> set[str]:
    children = api_children(Settings(data_dir=tmp_path), processes)
    assert len(children) == processes
    return {child.env["FLEETFLOW_API_PROCESSES"] for child in children}


def test_n_processes_on_each_of_several_hosts_hold_one_share_of_the_declared_total(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Three hosts, `--processes 2` each, FLEETFLOW_API_PROCESSES=6 as README says: each
    process holds 1/6 of a tenant's rate (1/2 let the tenant send three times its rate)."""
    monkeypatch.setenv("FLEETFLOW_API_PROCESSES", "6")
    assert _shares(2, tmp_path) == {"6"}


@pytest.mark.parametrize("declared", [None, "1", "nonsense"])
def test_without_a_larger_total_the_processes_share_among_themselves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, declared: str | None
) -> None:
    if declared is None:
        monkeypatch.delenv("FLEETFLOW_API_PROCESSES", raising=False)
    else:
        monkeypatch.setenv("FLEETFLOW_API_PROCESSES", declared)
    assert _shares(3, tmp_path) == {"3"}
