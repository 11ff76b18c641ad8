"""Settings, tokens and configuration schemas: the kernel's rules, without servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleetflow import config_schema
from fleetflow.errors import StartupError
from fleetflow.security import (
    AuthError,
    issue_device_credential,
    issue_token,
    verify_device_credential,
    verify_token,
)
from fleetflow.settings import load_settings, redact_dsn

SECRET = "k" * 40


def test_settings_defaults_and_bad_values_name_the_variable() -> None:
    settings = load_settings({})
    assert settings.temporal_address == "127.0.0.1:7233" and settings.api_port == 8000
    for env, name in [
        ({"FLEETFLOW_API_PORT": "abc"}, "FLEETFLOW_API_PORT"),
        ({"FLEETFLOW_API_PORT": "70000"}, "FLEETFLOW_API_PORT"),
        ({"TEMPORAL_ADDRESS": "nowhere"}, "TEMPORAL_ADDRESS"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"FLEETFLOW_JWT_SECRET": "short"}, "FLEETFLOW_JWT_SECRET"),
    ]:
        with pytest.raises(StartupError, match=name):
            load_settings(env)


def test_dsn_password_is_never_printed() -> None:
    assert redact_dsn("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact_dsn("postgresql://u@db/x") == "postgresql://u@db/x"


def test_generated_secret_is_kept_in_the_data_dir(tmp_path: object) -> None:
    settings = load_settings({"FLEETFLOW_DATA_DIR": str(tmp_path)})
    assert settings.secret() == settings.secret() and len(settings.secret()) >= 32


def test_api_token_checks() -> None:
    token = issue_token(
        SECRET, subject="op", tenant="acme", scopes=["devices:read"], ttl=timedelta(minutes=1)
    )
    claims = verify_token(SECRET, token)
    assert (claims.tenant, claims.scopes) == ("acme", ("devices:read",))
    with pytest.raises(AuthError, match="signature"):
        verify_token("z" * 40, token)
    with pytest.raises(AuthError, match="issuer"):
        verify_token(SECRET, token, issuer="someone-else")
    old = issue_token(SECRET, subject="op", tenant="acme", scopes=[], ttl=timedelta(seconds=-1))
    with pytest.raises(AuthError, match="expired"):
        verify_token(SECRET, old)
    with pytest.raises(AuthError, match="malformed"):
        verify_token(SECRET, "not-a-jwt")
    with pytest.raises(ValueError, match="unknown scope"):
        issue_token(SECRET, subject="op", tenant="acme", scopes=["root"], ttl=timedelta(minutes=1))


def test_device_credentials_are_deterministic_and_not_api_tokens() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    args = {"tenant": "acme", "device_id": "d1", "jti": "j1", "issued_at": now,
            "expires_at": now + timedelta(days=3650)}  # fmt: skip
    credential = issue_device_credential(SECRET, **args)  # type: ignore[arg-type]
    assert credential == issue_device_credential(SECRET, **args)  # type: ignore[arg-type]
    assert verify_device_credential(SECRET, credential).device_id == "d1"
    with pytest.raises(AuthError, match="audience"):
        verify_token(SECRET, credential)
    api_token = issue_token(SECRET, subject="d1", tenant="acme", scopes=[], ttl=timedelta(minutes=1))
    with pytest.raises(AuthError, match="audience"):
        verify_device_credential(SECRET, api_token)


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["site"],
    "properties": {
        "site": {"type": "string", "minLength": 1, "maxLength": 8},
        "rate": {"type": "integer", "minimum": 1, "maximum": 10},
        "mode": {"enum": ["a", "b"]},
        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
    },
}


@pytest.mark.parametrize(
    ("document", "path"),
    [
        ({}, "config.site"),
        ({"site": ""}, "config.site"),
        ({"site": "x", "rate": 0}, "config.rate"),
        ({"site": "x", "rate": True}, "config.rate"),
        ({"site": "x", "rate": 1.5}, "config.rate"),
        ({"site": "x", "mode": "c"}, "config.mode"),
        ({"site": "x", "tags": ["a", 1]}, "config.tags[1]"),
        ({"site": "x", "tags": ["a", "b", "c"]}, "config.tags"),
        ({"site": "x", "extra": 1}, "config.extra"),
    ],
)
def test_config_schema_names_the_bad_field(document: dict[str, object], path: str) -> None:
    with pytest.raises(config_schema.ConfigError) as error:
        config_schema.validate(document, SCHEMA)
    assert error.value.path == path


def test_config_defaults_are_merged_then_validated() -> None:
    merged = config_schema.resolve({"rate": 3}, {"site": "hq", "rate": 1}, SCHEMA)
    assert merged == {"site": "hq", "rate": 3}
