"""Credential renewal and rotation, a part of the device service (`device` schema).

A device's new credential has the jti `<rotation id>:<device id>`, so a retried step (or a
device repeating a renewal whose answer it lost) finds it and signs the same token again
(ES256 signatures here are deterministic). The credentials it replaces keep working until
`valid_until` (the moment they are replaced + overlap), which the credential check honours:
the end of the overlap needs no timer and no process to be alive. Only hashes are stored; a token is
re-signed from its row when it is handed out.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from activities.device_state import refuse
from fleetflow import claim_checks
from fleetflow.contracts.devices import (
    DEFAULT_CREDENTIAL_LIFETIME_DAYS,
    DeviceStatus,
    RotateChunk,
    RotateCredentials,
    RotatedChunk,
)
from fleetflow.db import Pool
from fleetflow.keys import KeyRing
from fleetflow.security import issue_device_credential, kid_of, token_hash


def new_jti(rotation_id: str, device_id: str) -> str:
    """The jti of a device's credential from a rotation (one per rotation and device)."""
    return f"{rotation_id}:{device_id}"


class CredentialRotations:
    """Renew and rotate device credentials; read a rotation's outcomes and new credentials."""

    def __init__(self, pool: Pool, keys: KeyRing, issuer: str, overlap_s: int) -> None:
        self.pool, self.keys, self.issuer, self.overlap_s = pool, keys, issuer, overlap_s

    async def rotate_credentials(self, chunk: RotateChunk) -> RotatedChunk:
        """The next chunk of selected devices (by device id, after `after`), each in one step."""
        req = chunk.request
        if req.issued_at is None:
            raise ValueError("issued_at is set by the workflow")
        async with self.pool.acquire() as conn, conn.transaction():
            device_ids = req.device_ids
            if req.ids_claim is not None:
                device_ids = await claim_checks.texts(conn, req.ids_claim, req.tenant)
                if device_ids is None:
                    raise refuse(f"the device list {req.ids_claim} is missing", "ClaimMissing")
            devices = await conn.fetch(
                """SELECT d.device_id, d.status, d.device_type, t.credential_lifetime_days,
                          t.credential_overlap_s
                   FROM device.devices d
                   LEFT JOIN LATERAL (SELECT credential_lifetime_days, credential_overlap_s
                       FROM device.device_types WHERE name = d.device_type AND tenant IN ('', d.tenant)
                       ORDER BY tenant DESC LIMIT 1) t ON true
                   WHERE d.tenant = $1 AND d.device_id > $2
                     AND ($3::text[] IS NULL OR d.device_id = ANY($3))
                     AND ($4::text IS NULL OR d.device_type = $4)
                     AND d.tags @> $5::text[]
                     AND ($3::text[] IS NOT NULL OR d.status = 'active')
                   ORDER BY d.device_id LIMIT $6
                   FOR UPDATE OF d""",
                req.tenant,
                req.after,
                device_ids,
                req.device_type,
                req.tags,
                chunk.limit,
            )
            rotated = skipped = 0
            for d in devices:
                reason = await self._rotate_one(conn, req, d)
                await conn.execute(
                    """INSERT INTO device.credential_rotations (tenant, rotation_id, device_id, outcome,
                           reason, jti)
                       VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
                    req.tenant,
                    req.rotation_id,
                    d["device_id"],
                    "skipped" if reason else "rotated",
                    reason,
                    None if reason else new_jti(req.rotation_id, d["device_id"]),
                )
                if reason:
                    skipped += 1
                else:
                    rotated += 1
            if device_ids is not None:  # ids nobody has in this tenant: say so, once each
                found = {d["device_id"] for d in devices}
                last = devices[-1]["device_id"] if len(devices) == chunk.limit else None
                missing = [i for i in device_ids if i not in found and i > req.after]
                missing = [i for i in missing if last is None or i < last]
                for device_id in missing:
                    await conn.execute(
                        """INSERT INTO device.credential_rotations (tenant, rotation_id, device_id,
                               outcome, reason) VALUES ($1, $2, $3, 'skipped', 'no such device')
                           ON CONFLICT DO NOTHING""",
                        req.tenant,
                        req.rotation_id,
                        device_id,
                    )
                skipped += len(missing)
        last_id = devices[-1]["device_id"] if devices else ""
        return RotatedChunk(rotated=rotated, skipped=skipped, last=last_id, done=len(devices) < chunk.limit)

    async def _rotate_one(self, conn: Any, req: RotateCredentials, d: Any) -> str | None:
        """Issue the device's new credential and bound its others; the reason it was skipped."""
        assert req.issued_at is not None
        if d["status"] != DeviceStatus.ACTIVE:
            return f"device is {d['status']}"
        jti = new_jti(req.rotation_id, d["device_id"])
        if await conn.fetchval(
            "SELECT 1 FROM device.credentials WHERE jti = $1 AND tenant = $2", jti, req.tenant
        ):
            return None  # this step (or this renewal, repeated after a lost answer) ran already
        if req.from_jti is not None:
            presented = await conn.fetchval(
                """SELECT 1 FROM device.credentials WHERE jti = $1 AND tenant = $2 AND device_id = $3
                     AND revoked_at IS NULL AND expires_at > now() AND valid_until IS NULL""",
                req.from_jti,
                req.tenant,
                d["device_id"],
            )
            if not presented:
                # a replaced credential (in its overlap) renews nothing: whoever still holds it
                # would otherwise get a fresh credential and cut the operator's new one short
                return "the presented credential is revoked, expired or replaced"
        days = d["credential_lifetime_days"] or DEFAULT_CREDENTIAL_LIFETIME_DAYS
        overlap = req.overlap_s
        if overlap is None:
            overlap = d["credential_overlap_s"] if d["credential_overlap_s"] is not None else self.overlap_s
        expires_at = req.issued_at + timedelta(days=days)
        kid = self.keys.signing_key().kid
        token = self._sign(req.tenant, d["device_id"], jti, req.issued_at, expires_at, kid)
        await conn.execute(
            """INSERT INTO device.credentials (jti, tenant, device_id, token_hash, issued_at, expires_at, kid)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            jti,
            req.tenant,
            d["device_id"],
            token_hash(token),
            req.issued_at,
            expires_at,
            kid_of(token),
        )
        # the others stay valid for the overlap from now (never longer than they would have
        # anyway): from the run's issued_at, a fleet's later chunks (or a step retried after
        # an outage) would end the devices' credentials before anyone had the new ones
        await conn.execute(
            """UPDATE device.credentials
               SET valid_until = LEAST(expires_at, COALESCE(valid_until, 'infinity'),
                                       now() + make_interval(secs => $4)),
                   replaced_by = COALESCE(replaced_by, $3)
               WHERE tenant = $1 AND device_id = $2 AND jti <> $3 AND revoked_at IS NULL
                 AND (valid_until IS NULL OR valid_until > now() + make_interval(secs => $4))""",
            req.tenant,
            d["device_id"],
            jti,
            float(overlap),
        )
        return None

    def _sign(
        self,
        tenant: str,
        device_id: str,
        jti: str,
        issued_at: datetime,
        expires_at: datetime,
        kid: str | None,
    ) -> str:
        return issue_device_credential(
            self.keys,
            tenant=tenant,
            device_id=device_id,
            jti=jti,
            issued_at=issued_at,
            expires_at=expires_at,
            issuer=self.issuer,
            kid=kid,
        )

    # --- reads (the API) ------------------------------------------------------------

    async def rotation_outcomes(
        self, tenant: str, rotation_id: str, *, after: str = "", limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Per-device outcomes of a rotation, by device id."""
        rows = await self.pool.fetch(
            """SELECT device_id, outcome, reason, at FROM device.credential_rotations
               WHERE tenant = $1 AND rotation_id = $2 AND device_id > $3 ORDER BY device_id LIMIT $4""",
            tenant,
            rotation_id,
            after,
            limit,
        )
        return [dict(r.items()) for r in rows]

    async def rotation_counts(self, tenant: str, rotation_id: str) -> dict[str, int]:
        """How many devices a rotation rotated and skipped so far."""
        rows = await self.pool.fetch(
            """SELECT outcome, count(*) AS n FROM device.credential_rotations
               WHERE tenant = $1 AND rotation_id = $2 GROUP BY outcome""",
            tenant,
            rotation_id,
        )
        return {r["outcome"]: int(r["n"]) for r in rows}

    async def rotated_credentials(
        self, tenant: str, rotation_id: str, device_id: str | None = None
    ) -> list[tuple[str, str, datetime]]:
        """(device id, new credential, expiry) of a rotation's devices whose new credential is
        still live, re-signed from their rows."""
        rows = await self.pool.fetch(
            """SELECT c.device_id, c.jti, c.issued_at, c.expires_at, c.kid
               FROM device.credential_rotations r JOIN device.credentials c ON c.jti = r.jti
               WHERE r.tenant = $1 AND r.rotation_id = $2 AND c.tenant = $1
                 AND ($3::text IS NULL OR r.device_id = $3)
                 AND c.revoked_at IS NULL AND (c.valid_until IS NULL OR c.valid_until > now())
               ORDER BY c.device_id""",
            tenant,
            rotation_id,
            device_id,
        )
        return [
            (
                r["device_id"],
                self._sign(tenant, r["device_id"], r["jti"], r["issued_at"], r["expires_at"], r["kid"]),
                r["expires_at"],
            )
            for r in rows
        ]
