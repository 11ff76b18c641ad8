"""TLS, mTLS and API-key options of every Temporal client fleetflow makes.

They are read by the Temporal SDK's own environment configuration loader
(`temporalio.envconfig`), so the variables are Temporal's: TEMPORAL_TLS,
TEMPORAL_TLS_SERVER_CA_CERT_PATH/_DATA, TEMPORAL_TLS_CLIENT_CERT_PATH/_DATA,
TEMPORAL_TLS_CLIENT_KEY_PATH/_DATA, TEMPORAL_TLS_SERVER_NAME, TEMPORAL_API_KEY and
TEMPORAL_GRPC_META_<NAME>. (TEMPORAL_ADDRESS and TEMPORAL_NAMESPACE are fleetflow settings
of the same names.) Everything is read and checked once, at start: a missing file, a file
that is not PEM, an expired client certificate, a key that does not match its certificate or
a contradiction (TEMPORAL_TLS=false with certificates or an API key) is a StartupError
naming the variable. Nothing ever falls back to plaintext: TLS is on as soon as anything
TLS-related or an API key is set, and then only a verified TLS connection is made.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field
from temporalio.envconfig import ClientConfigProfile
from temporalio.service import TLSConfig

from fleetflow.errors import StartupError

# (profile attribute, variable stem): the SDK reads <stem>_PATH or <stem>_DATA
_SOURCES = {
    "server_root_ca_cert": "TEMPORAL_TLS_SERVER_CA_CERT",
    "client_cert": "TEMPORAL_TLS_CLIENT_CERT",
    "client_private_key": "TEMPORAL_TLS_CLIENT_KEY",
}
_TRUE, _FALSE = ("true", "1"), ("false", "0")


class TemporalClientOptions(BaseModel):
    """What a Temporal client needs beyond address and namespace (all checked at load)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tls: bool = False
    server_name: str | None = None
    server_ca_cert: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = Field(default=None, repr=False)
    api_key: str | None = Field(default=None, repr=False)
    rpc_metadata: dict[str, str] = Field(default_factory=dict, repr=False)

    def connect_tls(self) -> bool | TLSConfig:
        """The `tls` argument of Client.connect."""
        if not self.tls:
            return False
        return TLSConfig(
            domain=self.server_name,
            server_root_ca_cert=self.server_ca_cert,
            client_cert=self.client_cert,
            client_private_key=self.client_key,
        )

    def describe(self) -> str:
        """How the client connects, for error messages (never a secret)."""
        if not self.tls:
            return "plaintext"
        parts = ["TLS"]
        if self.client_cert:
            parts.append("client certificate")
        if self.api_key:
            parts.append("API key")
        if self.server_name:
            parts.append(f"server name {self.server_name}")
        return ", ".join(parts)


def _variable(env: Mapping[str, str], stem: str) -> str:
    return f"{stem}_PATH" if env.get(f"{stem}_PATH") else f"{stem}_DATA"


def _read(source: object, variable: str) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, Path):
        try:
            return source.read_bytes()
        except OSError as exc:
            raise StartupError(f"{variable}: cannot read {source}: {exc.strerror or exc}") from None
    if isinstance(source, str):
        return source.encode()
    assert isinstance(source, bytes)
    return source


def _certificates(data: bytes, variable: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise StartupError(f"{variable}: not a PEM certificate") from None


def _check_client_pair(cert: bytes, key: bytes, cert_var: str, key_var: str) -> None:
    leaf = _certificates(cert, cert_var)[0]
    now = dt.datetime.now(dt.UTC)
    stamp = "%Y-%m-%d %H:%M UTC"
    if leaf.not_valid_after_utc < now:
        raise StartupError(
            f"{cert_var}: the client certificate expired on {leaf.not_valid_after_utc:{stamp}}"
        )
    if leaf.not_valid_before_utc > now:
        raise StartupError(
            f"{cert_var}: the client certificate is not valid before {leaf.not_valid_before_utc:{stamp}}"
        )
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise StartupError(f"{key_var}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if private.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise StartupError(f"{key_var}: the key does not belong to the certificate of {cert_var}")


def load_client_options(env: Mapping[str, str]) -> TemporalClientOptions:
    """TLS and API-key options from Temporal's environment variables in `env` (profile
    files are refused); StartupError naming the variable when something is wrong."""
    flag = env.get("TEMPORAL_TLS", "").strip().lower()
    if flag and flag not in _TRUE + _FALSE:
        raise StartupError("TEMPORAL_TLS: must be true or false")
    if env.get("TEMPORAL_TLS_DISABLE_HOST_VERIFICATION", "").strip().lower() in _TRUE:
        raise StartupError(
            "TEMPORAL_TLS_DISABLE_HOST_VERIFICATION: not supported; give the server's CA "
            "(TEMPORAL_TLS_SERVER_CA_CERT_PATH) and name (TEMPORAL_TLS_SERVER_NAME) instead"
        )
    for name in ("TEMPORAL_CONFIG_FILE", "TEMPORAL_PROFILE"):
        if env.get(name):
            # a profile file would be ignored, or half used: refuse rather than connect otherwise
            raise StartupError(
                f"{name}: fleetflow reads Temporal's environment variables only, not profile files"
            )
    try:
        profile = ClientConfigProfile.load(disable_file=True, override_env_vars=dict(env))
    except Exception as exc:  # the bridge's ConfigError: "Cannot specify both ..._PATH and ..._DATA"
        raise StartupError(f"Temporal client configuration: {exc}") from None

    tls = profile.tls
    data: dict[str, bytes | None] = {}
    names: dict[str, str] = {}
    for attribute, stem in _SOURCES.items():
        names[attribute] = _variable(env, stem)
        data[attribute] = _read(getattr(tls, attribute) if tls else None, names[attribute])
    api_key = profile.api_key or None
    server_name = (tls.server_name if tls else None) or None
    material = [names[a] for a, value in data.items() if value] + (
        ["TEMPORAL_TLS_SERVER_NAME"] if server_name else []
    )
    if api_key:
        material.append("TEMPORAL_API_KEY")

    if flag in _FALSE:
        if material:
            # a credential or certificate on a plaintext connection is a mistake, never a fallback
            raise StartupError(
                f"TEMPORAL_TLS=false contradicts {', '.join(material)}: unset one or the other"
            )
        return TemporalClientOptions(rpc_metadata=dict(profile.grpc_meta))

    cert, key = data["client_cert"], data["client_private_key"]
    cert_var, key_var = names["client_cert"], names["client_private_key"]
    if bool(cert) != bool(key):
        missing, given = (key_var, cert_var) if cert else (cert_var, key_var)
        raise StartupError(f"{given} is set but {missing.replace('_DATA', '_PATH')} is not: both are needed")
    if cert and key:
        _check_client_pair(cert, key, cert_var, key_var)
    if data["server_root_ca_cert"]:
        _certificates(data["server_root_ca_cert"], names["server_root_ca_cert"])

    return TemporalClientOptions(
        tls=flag in _TRUE or bool(material),
        server_name=server_name,
        server_ca_cert=data["server_root_ca_cert"],
        client_cert=cert,
        client_key=key,
        api_key=api_key,
        rpc_metadata=dict(profile.grpc_meta),
    )
