"""Settings, tokens and configuration schemas: the kernel's rules, without servers."""

from __future__ import annotations

import pytest

from fleetflow import config_schema
from fleetflow.errors import StartupError
from fleetflow.settings import load_settings, redact_dsn


def test_settings_defaults_and_bad_values_name_the_variable() -> None:
    settings = load_settings({})
    assert settings.temporal_address == "127.0.0.1:7233" and settings.api_port == 8000
    for env, name in [
        ({"FLEETFLOW_API_PORT": "abc"}, "FLEETFLOW_API_PORT"),
        ({"FLEETFLOW_API_PORT": "70000"}, "FLEETFLOW_API_PORT"),
        ({"TEMPORAL_ADDRESS": "nowhere"}, "TEMPORAL_ADDRESS"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"FLEETFLOW_LOG_LEVEL": "LOUD"}, "FLEETFLOW_LOG_LEVEL"),
    ]:
        with pytest.raises(StartupError, match=name):
            load_settings(env)


def test_dsn_password_is_never_printed() -> None:
    assert redact_dsn("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact_dsn("postgresql://u@db/x") == "postgresql://u@db/x"


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
