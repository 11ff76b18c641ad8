"""`fleetflow up`'s admin token: no codec:decode, a file only its owner ever reads, and a banner
whose example command works when pasted."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from fleetflow.settings import Settings
from workers import devstack
from workers.devstack import DEV_ADMIN_SCOPES, UpOptions, banner, write_secret


def test_the_dev_admin_token_cannot_decode_payloads() -> None:
    assert "codec:decode" not in DEV_ADMIN_SCOPES
    assert "admin" in DEV_ADMIN_SCOPES and "system:read" in DEV_ADMIN_SCOPES


def test_the_token_file_is_never_readable_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mode 0600 when its first byte is written, even over an old file that others could read."""
    path = tmp_path / "admin-token"
    path.write_text("old\n")
    path.chmod(0o644)
    modes: list[int] = []
    real_write = os.write

    def watched(fd: int, data: bytes) -> int:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", watched)
    os.umask(old := os.umask(0))  # the most permissive umask
    try:
        write_secret(path, "secret\n")
    finally:
        os.umask(old)
    assert modes and set(modes) == {0o600}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "secret\n"
    assert [p.name for p in tmp_path.iterdir()] == ["admin-token"]  # no temporary left behind


def test_the_banner_example_sends_the_token(tmp_path: Path) -> None:
    """The banner's `try:` lines, pasted into a shell, send the token file's token."""
    data_dir = tmp_path / "my data"
    data_dir.mkdir()
    token_file = data_dir / "admin-token"
    token_file.write_text("tok-123\n")
    text = banner(Settings(data_dir=data_dir), UpOptions(), token_file)
    assert "tok-123" not in text  # the token is in the file, not in terminal scrollback or logs
    example = text.split("try:", 1)[1].split("Ctrl-C", 1)[0]
    script = "curl() { printf '%s\\n' \"$@\"; }\n" + example
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert "Authorization: Bearer tok-123" in out.splitlines(), out
    assert re.search(r"/v1/services$", out.strip())


def test_the_banner_says_how_to_get_a_codec_token() -> None:
    text = banner(Settings(), UpOptions(), Path(".fleetflow/admin-token"))
    assert "--scopes codec:decode" in text
    assert devstack.DEV_ADMIN_SCOPES == sorted(DEV_ADMIN_SCOPES)
