"""Service boundaries: a service's schema is read and written only by its own modules.

Every module's SQL (its string literals that hold a statement, docstrings aside) is scanned
for schema-qualified names (`device.devices`, `fleetflow.claim_checks`); a module may name
only the schemas of its service, and a kernel table (`fleetflow.<table>`) only from the one
module that owns it. Another service asks the owner: an activity, or the owner's read facade
(`activities/<service>_facade.py`). fleetflow/migrations.py creates every schema and is the
exception.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# gateway/: the MQTT processes call the services (their accept path, presence, facades), own no schema
SCANNED = ("activities", "api", "cli", "fleetflow", "gateway", "workers", "workflows")
SERVICE_SCHEMAS = ("device", "data", "analytics", "notification")
EXEMPT = {"fleetflow/migrations.py"}  # creates and alters every schema

# module (a glob over the path, so a service's new module needs no entry) -> the service whose
# schema it owns; a module that matches none may name no service schema
SERVICE_OF: tuple[tuple[str, str], ...] = (
    ("activities/device*.py", "device"),
    ("activities/telemetry*.py", "data"),
    ("activities/ingest*.py", "data"),
    ("activities/data*.py", "data"),
    ("activities/analytics*.py", "analytics"),
    ("activities/notification*.py", "notification"),
    ("activities/subscription*.py", "notification"),
    ("activities/webhook*.py", "notification"),  # webhook deliveries: the notification service's
    ("activities/event*.py", "notification"),
    ("activities/circuit*.py", "notification"),  # a subscription's circuit breaker
)
# kernel table -> the one module that reads and writes it
KERNEL_OWNER: dict[str, str] = {
    "fleetflow.schema_migrations": "fleetflow/db.py",
    "fleetflow.claim_checks": "fleetflow/claim_checks.py",
    "fleetflow.tenant_profiles": "fleetflow/tenant_profiles.py",
    "fleetflow.revoked_tokens": "api/revocations.py",
}

_STATEMENT = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|FROM|JOIN|TRUNCATE|COPY|ALTER|CREATE)\b", re.I)
_QUALIFIED = re.compile(r"\b(" + "|".join((*SERVICE_SCHEMAS, "fleetflow")) + r")\.([a-z_][a-z0-9_]*)\b")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings or bare string statements (not SQL)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant | ast.JoinedStr)
    }


def _sql_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string literal that reads as SQL; an f-string's holes become `?`."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found: list[tuple[int, str]] = []
    inner: set[int] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                inner.add(id(value))
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    parts.append(value.value)
                else:
                    parts.append("?")
            text = "".join(parts)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner:
            text = node.value
        elif isinstance(node, ast.keyword) and node.arg == "schema_name":  # asyncpg copy_*
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.append((node.value.lineno, f"FROM {node.value.value}.copy_target"))
            continue
        else:
            continue
        if _STATEMENT.search(text):
            found.append((node.lineno, text))
    return found


def _tables() -> set[str]:
    """Every table the migrations create (and the migrations' own ledger)."""
    source = (ROOT / "fleetflow" / "migrations.py").read_text()
    created = re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?([a-z_]+\.[a-z_][a-z0-9_]*)", source)
    return {*created, "fleetflow.schema_migrations"}


TABLES = _tables()


def _strings(source: str) -> list[str]:
    """Every string literal but docstrings; an f-string's holes become `?`."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found: list[str] = []
    inner: set[int] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            inner.update(id(value) for value in node.values)
            found.append("".join(str(v.value) if isinstance(v, ast.Constant) else "?" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner:
            found.append(node.value)
    return found


@cache
def _constants(source: str) -> dict[str, str]:
    """The module-level names bound to a string literal (SQL pieces another module may import)."""
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        targets = node.targets if isinstance(node, ast.Assign) else [target] if target else []
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
    return found


@cache
def _project_module(name: str) -> str | None:
    """The source of a project module (`activities.device_facade`), None for any other."""
    path = ROOT / (name.replace(".", "/") + ".py")
    return path.read_text() if name.split(".")[0] in SCANNED and path.is_file() else None


def _imported_strings(source: str, read: Callable[[str], str | None]) -> list[str]:
    """The string constants the module imports from the project's other modules: a piece of SQL
    kept in another module's constant names its tables where it is run, here."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.module is None or node.level:
            continue
        other = read(node.module)
        if other is None:
            continue
        constants = _constants(other)
        found.extend(constants[alias.name] for alias in node.names if alias.name in constants)
    return found


def tables_named(source: str, read: Callable[[str], str | None] = _project_module) -> set[str]:
    """The schema-qualified tables the module's SQL names: in its SQL statements, in any of its
    strings that is an existing table's name (SQL built from pieces: `TABLE = "device.devices"`),
    and in the string constants it imports from another module."""
    named = {m.group(0) for _, text in _sql_strings(source) for m in _QUALIFIED.finditer(text)}
    # a piece that is a table's name (`"device.devices"`, `"device.devices d"`), not prose about one
    pieces = [m.group(0) for text in _strings(source) if (m := _QUALIFIED.match(text.strip()))]
    named |= {table for table in pieces if table in TABLES}
    imported = _imported_strings(source, read)
    named |= {m.group(0) for text in imported for m in _QUALIFIED.finditer(text) if m.group(0) in TABLES}
    return named


def service_of(module: str) -> str | None:
    """The service whose schema `module` owns, if any."""
    return next((service for pattern, service in SERVICE_OF if fnmatch.fnmatch(module, pattern)), None)


def violations(module: str, source: str, read: Callable[[str], str | None] = _project_module) -> list[str]:
    """What `module` (a path relative to the root) touches that is not its own."""
    if module in EXEMPT:
        return []
    own = service_of(module)
    wrong = []
    for table in sorted(tables_named(source, read)):
        schema = table.split(".", 1)[0]
        if schema == "fleetflow":
            owner = KERNEL_OWNER.get(table)
            if owner != module:
                wrong.append(f"{module} touches {table} (owned by {owner or 'no module: add one'})")
        elif schema != own:
            wrong.append(f"{module} touches {table} ({schema} service; this module is {own or 'no service'})")
    return wrong


def _modules() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py"))


def test_no_module_touches_another_services_schema() -> None:
    problems = [
        problem
        for path in _modules()
        for problem in violations(path.relative_to(ROOT).as_posix(), path.read_text())
    ]
    assert problems == [], "\n".join(problems)


def test_the_check_catches_a_planted_violation() -> None:
    planted = '''
async def evaluate(conn, window_id):
    """Reads data.window_stats (a docstring is not SQL)."""
    return await conn.fetch(
        f"""SELECT w.*, d.device_type FROM data.window_stats w
            JOIN device.devices d USING (tenant, device_id) WHERE w.window_id = {"$1"}""",
        window_id,
    )
'''
    assert violations("activities/analytics.py", planted) == [
        "activities/analytics.py touches data.window_stats (data service; this module is analytics)",
        "activities/analytics.py touches device.devices (device service; this module is analytics)",
    ]
    assert violations("activities/data_facade.py", planted) == [
        "activities/data_facade.py touches device.devices (device service; this module is data)"
    ]
    router = (
        'async def f(pool): await pool.execute("DELETE FROM fleetflow.claim_checks WHERE claim_id = $1", 1)'
    )
    assert violations("api/routers/rollouts.py", router) == [
        "api/routers/rollouts.py touches fleetflow.claim_checks (owned by fleetflow/claim_checks.py)"
    ]
    lowercase = 'ROWS = "select device_type from device.devices where tenant = $1"'
    assert violations("activities/analytics.py", lowercase) == [
        "activities/analytics.py touches device.devices (device service; this module is analytics)"
    ]
    copy = 'async def f(conn): await conn.copy_records_to_table("readings", records=[], schema_name="data")'
    pieces = 'TABLE = "device.devices"\nasync def f(conn): return await conn.fetch(f"SELECT * FROM {TABLE}")'
    assert violations("activities/analytics.py", pieces) == [
        "activities/analytics.py touches device.devices (device service; this module is analytics)"
    ]
    # a query kept in another module's constant is run by the module that imports it
    imported = "from activities.device_reads import DEVICE_ROWS\n"
    facade = {"activities.device_reads": 'DEVICE_ROWS = "SELECT * FROM device.devices WHERE tenant = $1"'}
    assert violations("activities/analytics.py", imported, facade.get) == [
        "activities/analytics.py touches device.devices (device service; this module is analytics)"
    ]
    assert violations("activities/analytics.py", copy) == [
        "activities/analytics.py touches data.copy_target (data service; this module is analytics)"
    ]


def test_activity_names_and_docstrings_are_not_sql() -> None:
    source = '''
"""Writes device.devices."""
NAME = "device.register"
LOG = "fleetflow.quotas"
'''
    assert tables_named(source) == set()


_STATEMENT_SHAPE = re.compile(r"\b(SELECT\s+\S|INSERT\s+INTO|UPDATE\s+[\w.]+\s+SET|DELETE\s+FROM)", re.I)
_POOL_CALL = re.compile(r"\.(pool|conn)\.(fetch|fetchval|fetchrow|execute|executemany|copy_\w+)\(")


def router_sql(source: str) -> list[str]:
    """The SQL statements and direct database calls in a router's source."""
    found = [text for _, text in _sql_strings(source) if _STATEMENT_SHAPE.search(text)]
    return found + [m.group(0) for m in _POOL_CALL.finditer(source)]


def test_routers_hold_no_sql() -> None:
    """A router asks the services (their activities, read models and facades); it holds no SQL."""
    held = {
        path.relative_to(ROOT).as_posix(): sql
        for path in sorted((ROOT / "api" / "routers").glob("*.py"))
        if (sql := router_sql(path.read_text()))
    }
    assert held == {}
    assert router_sql('async def f(state): return await state.pool.fetchval("SELECT 1")') == [
        "SELECT 1",
        ".pool.fetchval(",
    ]
    assert router_sql('HEADERS = {"Access-Control-Allow-Methods": "POST, DELETE"}') == []


def test_every_service_module_has_its_service() -> None:
    """The map covers today's modules (a typo in a pattern would let a module name nothing)."""
    expected = {
        "activities/devices.py": "device",
        "activities/device_facade.py": "device",
        "activities/telemetry.py": "data",
        "activities/telemetry_accept.py": "data",
        "activities/ingest_supervision.py": "data",
        "activities/data_facade.py": "data",
        "activities/analytics.py": "analytics",
        "activities/notifications.py": "notification",
        "activities/subscriptions.py": "notification",
        "activities/webhook_delivery.py": "notification",
        "activities/event_rows.py": "notification",
        "activities/circuit_breaker.py": "notification",
        "activities/poison.py": None,
        "api/routers/telemetry.py": None,
    }
    assert {module: service_of(module) for module in expected} == expected
