"""`fleetflow token revoke`: what it revokes, from a token or a jti, and what it refuses."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from cli.key_commands import _revocation_of
from cli.main import build_parser
from fleetflow.errors import StartupError
from fleetflow.keys import KeyRing
from fleetflow.security import issue_token, verify_token


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["token", "revoke", *argv])


def test_every_api_token_has_its_own_id(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    made = [
        issue_token(ring, subject="op", tenant="acme", scopes=[], ttl=timedelta(minutes=1)) for _ in range(2)
    ]
    first, second = (verify_token(ring, token).jti for token in made)
    assert first and second and first != second


def test_a_token_names_its_tenant_jti_and_expiry(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    token = issue_token(ring, subject="op", tenant="acme", scopes=[], ttl=timedelta(hours=1), jti="j-42")
    tenant, jti, expires = _revocation_of(_args(token))
    assert (tenant, jti) == ("acme", "j-42")
    assert expires == verify_token(ring, token).expires_at
    with pytest.raises(StartupError, match="not 'globex'"):
        _revocation_of(_args(token, "--tenant", "globex"))


def test_a_jti_needs_its_tenant() -> None:
    assert _revocation_of(_args("j-42", "--tenant", "acme")) == ("acme", "j-42", None)
    with pytest.raises(StartupError, match="--tenant"):
        _revocation_of(_args("j-42"))
