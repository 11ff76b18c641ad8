"""Firmware images of the device service: their content on disk (named by digest) and their
metadata in `device.firmware`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fleetflow.contracts.rollouts import FirmwareView
from fleetflow.db import Pool


class FirmwareConflict(Exception):
    """The same version of a device type was uploaded before with other content."""


class FirmwareStore:
    """Firmware storage (a part of DeviceService, which the API asks through it)."""

    def __init__(self, pool: Pool, firmware_dir: Path) -> None:
        self.pool = pool
        self.firmware_dir = firmware_dir

    async def put_firmware(
        self, tenant: str, device_type: str, version: str, image: bytes
    ) -> tuple[FirmwareView, bool]:
        """Store an image (idempotent for the same content); FirmwareConflict for other content."""
        digest = hashlib.sha256(image).hexdigest()
        firmware_id = f"{device_type}-{version}"
        existing = await self.firmware(tenant, firmware_id)
        if existing is not None:
            if existing.sha256 != digest:
                raise FirmwareConflict(f"{device_type} {version} was uploaded with other content")
            return existing, False
        self.firmware_dir.mkdir(parents=True, exist_ok=True)
        path = self.firmware_dir / digest
        if not path.exists():
            tmp = path.with_suffix(".part")
            tmp.write_bytes(image)
            tmp.replace(path)
        row = await self.pool.fetchrow(
            """INSERT INTO device.firmware (tenant, firmware_id, device_type, version, sha256, size, path)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING *""",
            tenant,
            firmware_id,
            device_type,
            version,
            digest,
            len(image),
            str(path),
        )
        if row is None:  # a concurrent upload won: same rules
            return await self.put_firmware(tenant, device_type, version, image)
        return FirmwareView.model_validate({k: row[k] for k in FirmwareView.model_fields}), True

    async def firmware(self, tenant: str, firmware_id: str) -> FirmwareView | None:
        """A firmware image's metadata."""
        row = await self.pool.fetchrow(
            "SELECT * FROM device.firmware WHERE tenant = $1 AND firmware_id = $2", tenant, firmware_id
        )
        return (
            None
            if row is None
            else FirmwareView.model_validate({k: row[k] for k in FirmwareView.model_fields})
        )

    async def firmware_path(self, tenant: str, firmware_id: str) -> Path | None:
        """Where the image of a firmware is kept."""
        path = await self.pool.fetchval(
            "SELECT path FROM device.firmware WHERE tenant = $1 AND firmware_id = $2", tenant, firmware_id
        )
        return None if path is None else Path(path)
