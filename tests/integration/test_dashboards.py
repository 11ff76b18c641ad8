"""The Fleet dashboard's queries (deploy/grafana/dashboards/fleet.json), variables and Grafana
macros substituted, run on the real schema as the read-only role Grafana logs in as."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from fleetflow.db import DASHBOARD_ROLE, Pool, _dashboard_login
from fleetflow.settings import Settings

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/fleet.json"
VARIABLES = {
    "$__interval_ms": "60000",
    "$tenant": "acme",
    "$device": "dev-1",
    "$metric": "temperature",
}


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard["templating"]["list"]:
        yield f"variable {variable['name']}", variable["query"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']}", target["rawSql"]


def _substituted(sql: str) -> str:
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN now() - interval '6 hours' AND now()", sql)
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        sql = sql.replace(name, value)
    assert "$" not in sql.replace("$$", ""), f"unsubstituted macro or variable in {sql}"
    return sql


def _as_role(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{DASHBOARD_ROLE}:{password}@{host}"))


async def test_every_dashboard_query_runs_as_the_read_only_role(pool: Pool, settings: Settings) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(_queries(dashboard))
    assert len(queries) >= 7  # three variables, four panels
    async with pool.acquire() as conn:
        await _dashboard_login(conn, "test-dashboard-password")
    assert settings.database_url
    reader = await asyncpg.connect(_as_role(settings.database_url, "test-dashboard-password"))
    try:
        assert await reader.fetchval("SELECT current_user") == DASHBOARD_ROLE
        for name, sql in queries:
            try:
                await reader.fetch(_substituted(sql))
            except asyncpg.PostgresError as exc:
                pytest.fail(f"{name}: {exc}")
        # read-only, and nothing beyond what the dashboard charts
        for forbidden in ("SELECT * FROM device.credentials", "SELECT * FROM data.ingest_batches"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.fetch(forbidden)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("UPDATE device.devices SET status = 'failed' WHERE false")
    finally:
        await reader.close()
