"""`fleetflow tenants profile`: show or change a tenant's profile (its limits) in the database."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from fleetflow.contracts.tenants import TenantProfile
from fleetflow.db import create_pool, migrate
from fleetflow.embedded_pg import database_url
from fleetflow.errors import StartupError
from fleetflow.settings import Settings
from fleetflow.tenant_profiles import read_profile, write_profile


def changed_profile(profile: TenantProfile, assignments: list[str], reset: bool) -> TenantProfile:
    """profile with `name=value` assignments applied (`name=default` drops the override);
    StartupError naming a bad one."""
    values = {} if reset else profile.model_dump(exclude_none=True)
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or name not in TenantProfile.model_fields:
            known = ", ".join(TenantProfile.model_fields)
            raise StartupError(f"{assignment!r}: expected name=value with name one of {known}")
        if value == "default":
            values.pop(name, None)
        else:
            values[name] = value
    try:
        return TenantProfile.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise StartupError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


async def tenant_profile_command(settings: Settings, args: argparse.Namespace) -> int:
    """Print the tenant's profile and limits; with assignments (or --reset), change it first."""
    pool = await create_pool(database_url(settings), size=2)
    try:
        await migrate(pool)
        profile = await read_profile(pool, args.tenant)
        if args.assignments or args.reset:
            profile = changed_profile(profile, args.assignments, args.reset)
            await write_profile(pool, args.tenant, profile, "cli")
    finally:
        await pool.close()
    limits = profile.over(settings.quotas)
    overridden = profile.model_dump(exclude_none=True)
    print(f"tenant {args.tenant} (API processes apply a change within 5 s; 0 = unlimited)")
    for name, value in limits.model_dump().items():
        print(f"  {name:<24}{value:<14}{'profile' if name in overridden else 'default'}")
    return 0
