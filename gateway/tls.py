"""MQTT over TLS: the server context of the gateway's second listener (FLEETFLOW_MQTT_TLS_*).

Devices log in on it as on the plain listener (credential as password); a CA bundle, when set,
makes a client certificate signed by it required as well. A certificate or key that cannot be
read is a StartupError naming the setting and the file, checked before anything starts.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from fleetflow.errors import StartupError
from fleetflow.settings import Settings


class _Encrypted(Exception):
    """The private key asks for a passphrase (none is configured: no prompt at start)."""


def _no_passphrase() -> str:
    raise _Encrypted


def _readable(path: Path, name: str) -> str:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    return str(path)


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the MQTT TLS listener; None when no certificate is configured."""
    if settings.mqtt_tls_cert is None or settings.mqtt_tls_key is None:
        return None
    cert = _readable(settings.mqtt_tls_cert, "FLEETFLOW_MQTT_TLS_CERT")
    key = _readable(settings.mqtt_tls_key, "FLEETFLOW_MQTT_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise StartupError(
            f"FLEETFLOW_MQTT_TLS_CERT / FLEETFLOW_MQTT_TLS_KEY: {cert} and {key} are not a PEM "
            f"certificate chain and its private key ({exc.reason or exc})"
        ) from None
    except _Encrypted:
        raise StartupError(
            f"FLEETFLOW_MQTT_TLS_KEY: {key} is encrypted; give the gateway an unencrypted key"
        ) from None
    if settings.mqtt_tls_ca is not None:
        ca = _readable(settings.mqtt_tls_ca, "FLEETFLOW_MQTT_TLS_CA")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise StartupError(
                f"FLEETFLOW_MQTT_TLS_CA: {ca} holds no PEM CA certificate ({exc.reason or exc})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
