"""The `fleetflow` subcommands other than `up` and `api`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

from fleetflow.contracts.system import SystemCheckRequest, SystemReport
from fleetflow.db import create_pool, migrate
from fleetflow.embedded_pg import database_url
from fleetflow.errors import StartupError
from fleetflow.keys import keyring
from fleetflow.security import issue_token, verify_token
from fleetflow.settings import Settings
from fleetflow.system_report import run_system_check
from fleetflow.temporal import connect


def format_report(report: SystemReport) -> str:
    """The system report as a table."""
    lines = [
        f"temporal: {'ok' if report.temporal_ok else report.temporal_error}",
        f"database: {'ok' if report.database_ok else 'FAILING'}",
        f"{'service':<14}{'answered':<10}{'pollers':<9}{'latency':<10}detail",
    ]
    for s in report.services:
        latency = f"{s.latency_ms:.0f} ms" if s.latency_ms is not None else "-"
        pollers = "?" if s.pollers is None else str(s.pollers)
        detail = s.error or (s.worker or "")
        lines.append(f"{s.service:<14}{'yes' if s.answered else 'NO':<10}{pollers:<9}{latency:<10}{detail}")
    lines.append("all services answered" if report.ok else "SYSTEM CHECK FAILED")
    return "\n".join(lines)


async def check(settings: Settings, timeout_s: float) -> int:
    """`fleetflow check`: exit 0 when every service answered."""
    client = await connect(settings, service="cli")
    report = await run_system_check(client, SystemCheckRequest(timeout_s=timeout_s))
    print(format_report(report))
    return 0 if report.ok else 1


async def migrate_database(settings: Settings) -> int:
    """`fleetflow migrate`."""
    pool = await create_pool(database_url(settings), size=2)
    try:
        applied = await migrate(pool)
    finally:
        await pool.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


async def issue_token_command(settings: Settings, args: argparse.Namespace) -> int:
    """`fleetflow token issue`: prints the token alone, for scripts."""
    scopes = [s.strip() for s in str(args.scopes).split(",") if s.strip()]
    try:
        token = issue_token(
            keyring(settings),
            subject=args.subject,
            tenant=args.tenant,
            scopes=scopes,
            ttl=args.ttl,
            issuer=settings.jwt_issuer,
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    print(token)
    # stderr, so `TOKEN=$(fleetflow token issue ...)` keeps the token alone
    jti = verify_token(keyring(settings), token, settings.jwt_issuer).jti
    print(f"jti {jti} (fleetflow token revoke {jti} --tenant {args.tenant})", file=sys.stderr)
    return 0


def _token(settings: Settings, given: str | None) -> str:
    import os

    token = given or os.environ.get("FLEETFLOW_TOKEN")
    if token:
        return token
    dev = settings.data_dir / "admin-token"
    if dev.exists():
        return dev.read_text().strip()
    raise StartupError("no API token: pass --token or set FLEETFLOW_TOKEN")


async def import_devices(settings: Settings, args: argparse.Namespace) -> int:
    """`fleetflow devices import FILE`: bulk onboarding with a progress bar and a failure table."""
    path = Path(args.file)
    if not path.is_file():
        raise StartupError(f"{path}: no such file")
    headers = {
        "Authorization": f"Bearer {_token(settings, args.token)}",
        "Content-Type": "text/csv",
    }
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=60, headers=headers) as http:
        try:
            response = await http.post("/v1/devices:bulk", content=path.read_bytes())
        except httpx.HTTPError as exc:
            raise StartupError(f"cannot reach the API at {settings.api_url}: {exc}") from None
        if response.status_code >= 400:
            print(f"fleetflow: import refused ({response.status_code}):", file=sys.stderr)
            for problem in _problems(response):
                print(f"  {problem}", file=sys.stderr)
            return 1
        accepted = response.json()
        status_url = accepted["status_url"]
        started = time.monotonic()
        while True:
            progress = (await http.get(status_url)).json()
            _bar(progress, time.monotonic() - started)
            if progress["status"] not in ("running", "compensating"):
                break
            await asyncio.sleep(0.5)
    print()
    failures = progress.get("failures", [])
    print(f"{progress['status']}: {progress['onboarded']} onboarded, {progress['failed']} failed")
    if failures:
        print(f"{'row':<7}{'device_id':<32}reason")
        for f in failures:
            print(f"{f['index'] + 1 if f['index'] >= 0 else '-':<7}{f['device_id']:<32}{f['reason']}")
    print(f"credentials: GET {settings.api_url}/v1/bulk-onboardings/{accepted['bulk_id']}/credentials")
    return 0 if progress["status"] == "completed" and not failures else 1


def _problems(response: httpx.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return [response.text[:500]]
    detail = body.get("errors") or body.get("detail", body)  # a problem: errors name the fields
    if isinstance(detail, list):
        return [f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail[:50]]
    return [str(detail)]


def _bar(progress: dict[str, int | str], elapsed: float) -> None:
    total = int(progress["total"]) or 1
    done = int(progress["processed"])
    filled = int(30 * done / total)
    sys.stdout.write(
        f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}  "
        f"ok {progress['onboarded']}  failed {progress['failed']}  {elapsed:.1f}s"
    )
    sys.stdout.flush()


async def reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """`fleetflow reconcile`: run a Reconciliation now (POST /v1/consistency:run), wait for it and
    print its findings per type (exit 1 when some were only reported, not repaired)."""
    headers = {"Authorization": f"Bearer {_token(settings, args.token)}"}
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=60, headers=headers) as http:
        try:
            response = await http.post("/v1/consistency:run")
        except httpx.HTTPError as exc:
            raise StartupError(f"cannot reach the API at {settings.api_url}: {exc}") from None
        if response.status_code >= 400:
            print(f"fleetflow: reconciliation refused ({response.status_code}):", file=sys.stderr)
            for problem in _problems(response):
                print(f"  {problem}", file=sys.stderr)
            return 1
        run_id = response.json()["workflow_id"]
        print(f"started {run_id}", flush=True)
        deadline = time.monotonic() + args.timeout
        while True:
            report = (await http.get("/v1/consistency")).json()
            if report.get("run_id") == run_id:
                break
            if time.monotonic() > deadline:
                print(f"fleetflow: {run_id} has not finished; see the Web UI", file=sys.stderr)
                return 1
            await asyncio.sleep(1.0)
    print(f"{report['devices_checked']} devices checked")
    print(f"{'finding':<24}{'count':>8}  {'':<9}sample")
    for group in report["findings"]:
        sample = group["samples"][0] if group["samples"] else None
        shown = f"{sample['tenant']}/{sample['device_id']}: {sample['detail']}" if sample else ""
        action = "repaired" if group["repaired"] else "reported"
        print(f"{group['type']:<24}{group['count']:>8}  {action:<9}{shown}")
    return 1 if any(not g["repaired"] for g in report["findings"]) else 0
