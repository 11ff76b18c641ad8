"""The MQTT TLS listener's settings: what `fleetflow mqtt` and `fleetflow up` say, in one line
and before anything starts, about a certificate or key they cannot use."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetflow.errors import StartupError
from fleetflow.settings import load_settings
from gateway.tls import server_context
from tests.support import free_port
from tests.tls_support import make_ca

ROOT = Path(__file__).resolve().parents[2]


def fleetflow(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETFLOW_", "DATABASE_URL"))}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv],
        env={**keep, "FLEETFLOW_DATA_DIR": str(tmp_path / "data"), **env},
        cwd=ROOT,
        stdin=subprocess.DEVNULL,  # a passphrase prompt would find nothing to read
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip()
    assert line.startswith("fleetflow: ") and "\n" not in line, line
    for word in words:
        assert word in line, line


def test_missing_certificate_is_one_line_for_mqtt_and_up(tmp_path: Path) -> None:
    env = {"FLEETFLOW_MQTT_TLS_CERT": str(tmp_path / "nope.pem"), "FLEETFLOW_MQTT_TLS_KEY": "/etc/hostname"}
    one_line_error(fleetflow(tmp_path, "mqtt", **env), "FLEETFLOW_MQTT_TLS_CERT", "nope.pem")
    up = fleetflow(
        tmp_path,
        *("up", "--api-port", str(free_port()), "--mqtt-port", str(free_port())),
        *("--mqtt-tls-port", str(free_port())),
        **env,
    )
    one_line_error(up, "FLEETFLOW_MQTT_TLS_CERT", "nope.pem")
    assert not (tmp_path / "data" / "postgres").exists()  # nothing was started


def test_key_of_another_certificate_is_one_line(tmp_path: Path) -> None:
    ours, other = make_ca(tmp_path / "a"), make_ca(tmp_path / "b")
    env = {"FLEETFLOW_MQTT_TLS_CERT": str(ours.cert), "FLEETFLOW_MQTT_TLS_KEY": str(other.key)}
    one_line_error(fleetflow(tmp_path, "mqtt", **env), "FLEETFLOW_MQTT_TLS_KEY", str(other.key))


def test_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    made = make_ca(tmp_path / "a")
    locked = tmp_path / "locked.pem"
    key = serialization.load_pem_private_key(made.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    env = {"FLEETFLOW_MQTT_TLS_CERT": str(made.cert), "FLEETFLOW_MQTT_TLS_KEY": str(locked)}
    one_line_error(fleetflow(tmp_path, "mqtt", **env), "FLEETFLOW_MQTT_TLS_KEY", "encrypted")


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"FLEETFLOW_MQTT_TLS_CERT": "c.pem"}, ["set both or neither"]),
        ({"FLEETFLOW_MQTT_TLS_CA": "ca.pem"}, ["FLEETFLOW_MQTT_TLS_CA needs"]),
        (
            {
                "FLEETFLOW_MQTT_TLS_CERT": "c",
                "FLEETFLOW_MQTT_TLS_KEY": "k",
                "FLEETFLOW_MQTT_TLS_PORT": "1883",
            },
            ["must differ"],
        ),
        ({"FLEETFLOW_MQTT_TLS_PORT": "0"}, ["FLEETFLOW_MQTT_TLS_PORT"]),
    ],
)
def test_inconsistent_tls_settings_name_the_variables(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(StartupError) as caught:
        load_settings(env)
    for word in words:
        assert word in str(caught.value)


def test_no_listener_at_all_is_one_line(tmp_path: Path) -> None:
    one_line_error(fleetflow(tmp_path, "mqtt", "--port", "0"), "no MQTT listener")


def test_client_ca_makes_a_client_certificate_required(tmp_path: Path) -> None:
    made = make_ca(tmp_path / "a")
    env = {"FLEETFLOW_MQTT_TLS_CERT": str(made.cert), "FLEETFLOW_MQTT_TLS_KEY": str(made.key)}
    plain = server_context(load_settings(env))
    assert plain is not None and plain.verify_mode == ssl.CERT_NONE
    mutual = server_context(load_settings({**env, "FLEETFLOW_MQTT_TLS_CA": str(made.ca)}))
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED
    assert server_context(load_settings({})) is None
