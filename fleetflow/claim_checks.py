"""Claim checks (fleetflow.claim_checks): a large request body stored once, carried through
workflow history by its id. The one module that reads and writes the table: the API stores
(and discards) a body, the device service reads it back in slices.

Every call names the tenant with the claim id, so one tenant can never read another's body.
"""

from __future__ import annotations

from typing import Any


async def store(db: Any, claim_id: str, tenant: str, kind: str, body: Any) -> bool:
    """Keep `body` under `claim_id` (a pool or a connection); False when it was already there
    (the same id again is the same body: ids are digests of the tenant and the body)."""
    result = await db.execute(
        """INSERT INTO fleetflow.claim_checks (claim_id, tenant, kind, body)
           VALUES ($1, $2, $3, $4) ON CONFLICT (claim_id) DO NOTHING""",
        claim_id,
        tenant,
        kind,
        body,
    )
    return bool(result == "INSERT 0 1")


async def discard(db: Any, claim_id: str, tenant: str) -> None:
    """Remove a body no workflow will read."""
    await db.execute(
        "DELETE FROM fleetflow.claim_checks WHERE claim_id = $1 AND tenant = $2", claim_id, tenant
    )


async def array_slice(db: Any, claim_id: str, tenant: str, offset: int, limit: int) -> list[Any] | None:
    """Items offset+1 .. offset+limit of a stored JSON array, in order; None when the claim is
    missing or holds nothing in that range."""
    items = await db.fetchval(
        """SELECT jsonb_agg(e ORDER BY i) FROM fleetflow.claim_checks c,
               jsonb_array_elements(c.body) WITH ORDINALITY AS t(e, i)
           WHERE c.claim_id = $1 AND c.tenant = $2 AND i > $3 AND i <= $3 + $4""",
        claim_id,
        tenant,
        offset,
        limit,
    )
    return None if items is None else list(items)


async def texts(db: Any, claim_id: str, tenant: str) -> list[str] | None:
    """A stored JSON array of strings (e.g. a rollout's target device ids); None when missing."""
    items = await db.fetchval(
        """SELECT ARRAY(SELECT jsonb_array_elements_text(c.body)) FROM fleetflow.claim_checks c
           WHERE c.claim_id = $1 AND c.tenant = $2""",
        claim_id,
        tenant,
    )
    return None if items is None else list(items)
