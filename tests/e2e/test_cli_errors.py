"""Bad input to the `fleetflow` command: one clear line, exit status 2, nothing left running."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.stack import FLEETFLOW, clean_env, cmdline, mentioning, port, temporal_port, wait_gone

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Run:
    """Where one `fleetflow up` may put things: its data directory and ports."""

    data_dir: Path
    api_port: int
    temporal_port: int
    ui_port: int
    mqtt_port: int

    def up_args(self, *, api_port: int | None = None, mqtt_port: int | None = None) -> list[str]:
        return [
            "up",
            "--data-dir",
            str(self.data_dir),
            "--api-port",
            str(api_port or self.api_port),
            "--temporal-port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            "--mqtt-port",
            str(mqtt_port or self.mqtt_port),
        ]

    def marks(self) -> tuple[str, ...]:
        """Command-line fragments by which a process of this run is known."""
        return (str(self.data_dir), f"--port {self.temporal_port} ")


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    """A data directory and ports; afterwards, no process of this run may remain."""
    spot = Run(tmp_path / "data", port(), temporal_port(), port(), port())
    yield spot
    left = wait_gone(mentioning(*spot.marks()), deadline_s=10)
    assert left == [], [cmdline(p) for p in left]


def fleetflow(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a clean environment plus env."""
    return subprocess.run(
        [FLEETFLOW, *args],
        env=clean_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, one `fleetflow:` line on stderr, no traceback; that line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleetflow:"), result.stderr
    return lines[0]


def assert_nothing_started(run: Run) -> None:
    """No temporal server, postgres or worker of this run runs (now or a moment later)."""
    left = wait_gone(mentioning(*run.marks()), deadline_s=10)
    assert left == [], [cmdline(p) for p in left]
    pid_file = run.data_dir / "postgres" / "postmaster.pid"
    assert not pid_file.exists()


def test_unknown_option(run: Run, tmp_path: Path) -> None:
    line = assert_one_line_error(fleetflow(["up", "--bogus", *run.up_args()[1:]], tmp_path))
    assert "--bogus" in line
    assert_nothing_started(run)
    assert not run.data_dir.exists()


def test_api_port_in_use(run: Run, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        line = assert_one_line_error(fleetflow(run.up_args(api_port=busy), tmp_path))
    assert str(busy) in line and "in use" in line, line
    assert "API" in line or "api-port" in line, line
    assert_nothing_started(run)


def test_mqtt_port_in_use(run: Run, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        line = assert_one_line_error(fleetflow(run.up_args(mqtt_port=busy), tmp_path))
    assert str(busy) in line and "in use" in line and "mqtt-port" in line, line
    assert_nothing_started(run)


def test_unreachable_database_url_is_named_without_password(run: Run, tmp_path: Path) -> None:
    url = f"postgresql://u:s3cret@127.0.0.1:{port()}/db"
    result = fleetflow(run.up_args(), tmp_path, DATABASE_URL=url)
    line = assert_one_line_error(result)
    assert "s3cret" not in result.stderr + result.stdout
    assert url.replace("s3cret", "***") in line, line
    # the Temporal dev server was started before the database was tried: it must be gone
    assert_nothing_started(run)


def test_unreachable_temporal_address_for_check(run: Run, tmp_path: Path) -> None:
    address = f"127.0.0.1:{port()}"
    line = assert_one_line_error(fleetflow(["check"], tmp_path, TEMPORAL_ADDRESS=address))
    assert address in line and "TEMPORAL_ADDRESS" in line, line
    assert_nothing_started(run)


def test_invalid_setting_is_named(run: Run, tmp_path: Path) -> None:
    line = assert_one_line_error(fleetflow(run.up_args(), tmp_path, FLEETFLOW_API_PORT="abc"))
    assert "FLEETFLOW_API_PORT" in line, line
    assert_nothing_started(run)
    assert not run.data_dir.exists()
