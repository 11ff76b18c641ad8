"""`fleetflow schedules`: list the platform's Temporal Schedules, or apply their definitions."""

from __future__ import annotations

import argparse
from datetime import datetime

from fleetflow.schedules import apply_schedules, list_schedules
from fleetflow.settings import Settings
from fleetflow.temporal import connect


def _at(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


async def schedules_command(settings: Settings, args: argparse.Namespace) -> int:
    """`fleetflow schedules` (list) or `fleetflow schedules apply`."""
    client = await connect(settings, service="cli")
    if getattr(args, "schedules_command", None) == "apply":
        for line in await apply_schedules(client):
            print(line)
        return 0
    rows = await list_schedules(client)
    print(f"{'id':<16}{'workflow':<16}{'spec':<18}{'last run':<22}{'result':<12}next run")
    for r in rows:
        spec = r.spec + (" (paused)" if r.paused else "")
        print(
            f"{r.id:<16}{r.workflow:<16}{spec:<18}{_at(r.last_run_at):<22}"
            f"{r.last_result or '-':<12}{_at(r.next_run_at)}"
        )
    return 0
