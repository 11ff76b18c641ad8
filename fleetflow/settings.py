"""Process settings, read from environment variables and validated at start.

Every setting has a documented default so `fleetflow up` works on a fresh machine;
the README's configuration table mirrors `ENVIRONMENT`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetflow.contracts.tenants import TenantLimits, parse_limits
from fleetflow.errors import StartupError
from fleetflow.temporal_tls import TemporalClientOptions, load_client_options

# env var -> (settings field, default shown in docs)
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "FLEETFLOW_DATA_DIR": ("data_dir", ".fleetflow"),
    "DATABASE_URL": ("database_url", "embedded PostgreSQL in $FLEETFLOW_DATA_DIR/postgres"),
    "TEMPORAL_ADDRESS": ("temporal_address", "127.0.0.1:7233"),
    "TEMPORAL_NAMESPACE": ("temporal_namespace", "default"),
    "TEMPORAL_UI_URL": ("temporal_ui_url", "http://127.0.0.1:8233"),
    "FLEETFLOW_API_HOST": ("api_host", "127.0.0.1"),
    "FLEETFLOW_API_PORT": ("api_port", "8000"),
    "FLEETFLOW_MQTT_HOST": ("mqtt_host", "127.0.0.1"),
    "FLEETFLOW_MQTT_PORT": ("mqtt_port", "1883 (0: no plain MQTT listener)"),
    "FLEETFLOW_MQTT_TLS_PORT": ("mqtt_tls_port", "8883 (served when the certificate and key are set)"),
    "FLEETFLOW_MQTT_TLS_CERT": ("mqtt_tls_cert", "unset: no MQTT over TLS (PEM certificate chain)"),
    "FLEETFLOW_MQTT_TLS_KEY": ("mqtt_tls_key", "unset (PEM private key of the certificate)"),
    "FLEETFLOW_MQTT_TLS_CA": ("mqtt_tls_ca", "unset: no client certificate asked (PEM CA bundle)"),
    "FLEETFLOW_MQTT_BROKER_URL": (
        "mqtt_broker_url",
        "unset: `fleetflow mqtt-bridge` needs it (mqtt://host:1883)",
    ),
    "FLEETFLOW_MQTT_BRIDGE_TOKEN": (
        "mqtt_bridge_token",
        "unset: an API token with mqtt:bridge (the bridge's password)",
    ),
    "FLEETFLOW_MQTT_BRIDGE_ID": ("mqtt_bridge_id", "fleetflow-bridge-{hostname}"),
    "FLEETFLOW_EMQX_API_URL": ("emqx_api_url", "unset: revoked devices are not kicked from the broker"),
    "FLEETFLOW_EMQX_API_KEY": ("emqx_api_key", "unset"),
    "FLEETFLOW_EMQX_API_SECRET": ("emqx_api_secret", "unset"),
    "FLEETFLOW_PUBLIC_URL": ("public_url", "http://{api_host}:{api_port}"),
    "FLEETFLOW_KEYS_DIR": ("keys_dir", "$FLEETFLOW_DATA_DIR/keys"),
    "FLEETFLOW_PAYLOAD_KEYS": ("payload_keys", "unset: generated into $FLEETFLOW_KEYS_DIR"),
    "FLEETFLOW_ACCEPT_PLAIN_PAYLOADS": ("accept_plain_payloads", "false"),
    "FLEETFLOW_JWT_ISSUER": ("jwt_issuer", "fleetflow"),
    "FLEETFLOW_DB_POOL_SIZE": ("db_pool_size", "10"),
    "FLEETFLOW_INGEST_SHARDS": ("ingest_shards", "2"),
    "FLEETFLOW_LOG_LEVEL": ("log_level", "INFO"),
    "FLEETFLOW_LOG_FORMAT": ("log_format", "json"),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("otlp_endpoint", "unset: tracing off"),
    "FLEETFLOW_TRACE_SAMPLE_RATIO": ("trace_sample_ratio", "1.0"),
    "FLEETFLOW_METRICS_PORT": ("metrics_port", "9464"),
    "FLEETFLOW_METRICS_HOST": ("metrics_host", "127.0.0.1"),
    "FLEETFLOW_QUOTAS": ("quotas", "the built-in tenant limits (README: Quotas)"),
    "FLEETFLOW_WEBHOOK_ALLOW_NETWORKS": ("webhook_allow_networks", "unset: public addresses only"),
    "FLEETFLOW_WEBHOOK_SLOTS": ("webhook_slots", "32"),
    "FLEETFLOW_WEBHOOK_TENANT_SLOTS": ("webhook_tenant_slots", "4"),
    "FLEETFLOW_CREDENTIAL_OVERLAP_S": ("credential_overlap_s", "86400"),
    "FLEETFLOW_WORKFLOW_WAIT_S": ("workflow_wait_s", "30"),
    "FLEETFLOW_FIRMWARE_S3_URL": ("firmware_s3_url", "unset: firmware images in PostgreSQL"),
    "FLEETFLOW_FIRMWARE_S3_BUCKET": ("firmware_s3_bucket", "fleetflow-firmware"),
    "FLEETFLOW_FIRMWARE_S3_ACCESS_KEY": ("firmware_s3_access_key", "required with the URL"),
    "FLEETFLOW_FIRMWARE_S3_SECRET_KEY": ("firmware_s3_secret_key", "required with the URL"),
    "FLEETFLOW_FIRMWARE_S3_REGION": ("firmware_s3_region", "us-east-1"),
}

_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class Settings(BaseModel):
    """Validated settings of one fleetflow process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Path(".fleetflow")
    database_url: str | None = None
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_ui_url: str = "http://127.0.0.1:8233"
    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    mqtt_host: str = "127.0.0.1"
    mqtt_port: Annotated[int, Field(ge=0, le=65535)] = 1883
    # MQTT over TLS on a second port, served when a certificate and its key are set; a CA bundle
    # makes a client certificate signed by it required too (the credential still logs in)
    mqtt_tls_port: Annotated[int, Field(ge=1, le=65535)] = 8883
    mqtt_tls_cert: Path | None = None
    mqtt_tls_key: Path | None = None
    mqtt_tls_ca: Path | None = None
    # `fleetflow mqtt-bridge`: the external broker (EMQX), the bridge's login and MQTT client
    # id (stable per process: its persistent session), and EMQX's REST API for kicking devices
    mqtt_broker_url: str | None = None
    mqtt_bridge_token: str | None = None
    mqtt_bridge_id: str | None = None
    emqx_api_url: str | None = None
    emqx_api_key: str | None = None
    emqx_api_secret: str | None = None
    public_url: str | None = None
    # signing key set (ES256, with kid) and payload keys; shared by every process of a platform
    keys_dir: Path | None = None
    # "kid:base64key,kid:base64key": AES-256-GCM payload keys, the first one encrypts
    payload_keys: str | None = None
    # migration only: let unsealed payloads (runs begun before payload encryption) through
    accept_plain_payloads: bool = False
    jwt_issuer: str = "fleetflow"
    db_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    ingest_shards: Annotated[int, Field(ge=1, le=64)] = 2
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    otlp_endpoint: str | None = None
    # fraction of new traces recorded; a sampled request keeps its whole tree (parent-based)
    trace_sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    # a worker's /metrics port (the first of a range when one command starts several); 0: none
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    metrics_host: str = "127.0.0.1"
    # every tenant's limits unless its profile overrides them; "name=value,..." in the environment
    quotas: TenantLimits = TenantLimits()
    # "cidr,cidr": networks webhooks may reach besides public addresses (loopback, private,
    # link-local, multicast and unspecified ones are refused unless named here)
    webhook_allow_networks: str | None = None
    # concurrent deliveries of one webhook worker process, and of one tenant within it
    webhook_slots: Annotated[int, Field(ge=1, le=1000)] = 32
    webhook_tenant_slots: Annotated[int, Field(ge=1, le=1000)] = 4
    # how long a renewed or rotated device credential stays valid beside its successor, unless
    # the device type says otherwise
    credential_overlap_s: Annotated[int, Field(ge=0, le=90 * 86400)] = 86400
    # TLS / mTLS / API key of the Temporal client, from Temporal's own variables (temporal_tls.py)
    temporal_client: TemporalClientOptions = Field(default_factory=TemporalClientOptions)
    # how long a route that answers with its workflow's outcome (acknowledge, clear, renew,
    # rotate one device) waits for it before answering 503 with a link (no worker running)
    workflow_wait_s: Annotated[float, Field(gt=0, le=300)] = 30.0
    # firmware images in an S3-compatible bucket (path-style URL, e.g. http://minio:9000) shared
    # by every API host; unset: in PostgreSQL (activities/device_firmware_blobs.py)
    firmware_s3_url: str | None = None
    firmware_s3_bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")] = (
        "fleetflow-firmware"
    )
    firmware_s3_access_key: str | None = None
    firmware_s3_secret_key: str | None = None
    firmware_s3_region: str = "us-east-1"

    @field_validator("firmware_s3_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value or None

    @model_validator(mode="after")
    def _s3_keys(self) -> Settings:
        if self.firmware_s3_url and not (self.firmware_s3_access_key and self.firmware_s3_secret_key):
            raise ValueError(
                "FLEETFLOW_FIRMWARE_S3_URL needs FLEETFLOW_FIRMWARE_S3_ACCESS_KEY and"
                " FLEETFLOW_FIRMWARE_S3_SECRET_KEY"
            )
        return self

    @field_validator("temporal_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not _ADDRESS.match(value):
            raise ValueError("must be host:port")
        return value

    @field_validator("database_url")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a postgresql:// URL")
        return value or None

    @field_validator("payload_keys")
    @classmethod
    def _payload_keys(cls, value: str | None) -> str | None:
        if value and value.strip():
            parse_payload_keys(value)
            return value.strip()
        return None

    @field_validator("quotas", mode="before")
    @classmethod
    def _quotas(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        try:
            return parse_limits(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks(cls, value: str | None) -> str | None:
        if value and value.strip():
            parse_networks(value)
            return value.strip()
        return None

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @field_validator("log_format", mode="before")
    @classmethod
    def _format(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _mqtt_tls(self) -> Settings:
        if (self.mqtt_tls_cert is None) != (self.mqtt_tls_key is None):
            raise ValueError("FLEETFLOW_MQTT_TLS_CERT and FLEETFLOW_MQTT_TLS_KEY: set both or neither")
        if self.mqtt_tls_ca is not None and self.mqtt_tls_cert is None:
            raise ValueError("FLEETFLOW_MQTT_TLS_CA needs FLEETFLOW_MQTT_TLS_CERT and FLEETFLOW_MQTT_TLS_KEY")
        if self.mqtt_tls and self.mqtt_port == self.mqtt_tls_port:
            raise ValueError("FLEETFLOW_MQTT_PORT and FLEETFLOW_MQTT_TLS_PORT must differ")
        return self

    @property
    def mqtt_tls(self) -> bool:
        """Whether MQTT over TLS is served (a certificate and its key are set)."""
        return self.mqtt_tls_cert is not None

    @property
    def mqtt_on(self) -> bool:
        """Whether the MQTT endpoint runs at all (plain, TLS or both listeners)."""
        return bool(self.mqtt_port) or self.mqtt_tls

    @property
    def api_url(self) -> str:
        """Where clients reach the API."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host
        return f"http://{host}:{self.api_port}"

    @property
    def key_directory(self) -> Path:
        """Where the signing and payload keys live."""
        return self.keys_dir or self.data_dir / "keys"


_KID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_payload_keys(text: str) -> list[tuple[str, bytes]]:
    """`kid:base64key,...` as (kid, 32-byte key) pairs, the encrypting one first. A bad entry is
    a ValueError naming its position and kid, never the key."""
    keys: list[tuple[str, bytes]] = []
    for position, entry in enumerate(text.split(","), start=1):
        kid, sep, encoded = entry.strip().partition(":")
        if not sep or not _KID.match(kid):
            raise ValueError(f"entry {position} must be kid:base64key (kid: letters, digits, _ . -)")
        try:
            secret = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            raise ValueError(f"entry {position} ({kid}): the key is not base64") from None
        if len(secret) != 32:
            raise ValueError(f"entry {position} ({kid}): the key must be 32 bytes (AES-256)")
        if any(kid == seen for seen, _ in keys):
            raise ValueError(f"entry {position}: kid {kid} appears twice")
        keys.append((kid, secret))
    return keys


def parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """`cidr,cidr,...` as networks; a bad entry is a ValueError naming its position."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for position, entry in enumerate(text.split(","), start=1):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"entry {position} ({entry.strip()!r}) is not an address or network") from None
    return networks


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read settings from the environment; raise StartupError naming the bad variable."""
    source = os.environ if env is None else env
    values: dict[str, object] = {f: source[n] for n, (f, _) in ENVIRONMENT.items() if source.get(n)}
    values["temporal_client"] = load_client_options(source)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        names = {field: name for name, (field, _) in ENVIRONMENT.items()}
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across settings: its message names them
            raise StartupError(str(first["msg"]).removeprefix("Value error, ")) from None
        field = str(first["loc"][0])
        raise StartupError(f"{names.get(field, field)}: {first['msg']}") from None


def redact_dsn(dsn: str) -> str:
    """A DSN safe to print: the password replaced by ***."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
