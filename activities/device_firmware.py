"""Firmware images of the device service: metadata in `device.firmware`, bytes in a blob store
shared by every API host (activities/device_firmware_blobs.py: PostgreSQL by default, S3 when
configured)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import asyncpg

from activities.device_firmware_blobs import CHUNK_BYTES, FirmwareBlobs, PostgresBlobs
from fleetflow.contracts.rollouts import FirmwareView
from fleetflow.db import Pool

log = logging.getLogger(__name__)

# an upload that wrote nothing for this long is taken for dead (its client or API process was
# killed): the next upload or API start removes what it left
ABANDONED_AFTER_S = 600


class FirmwareConflict(Exception):
    """The same version of a device type was uploaded before with other content."""


class FirmwareTooLarge(Exception):
    """An image over the size limit (nothing of it is kept)."""


class FirmwareEmpty(Exception):
    """An image of no bytes."""


class FirmwareAbandoned(LookupError):
    """The upload stalled so long that a sweep took it for dead and removed it."""


class FirmwareStore:
    """Firmware storage (a part of DeviceService, which the API asks through it)."""

    def __init__(self, pool: Pool, blobs: FirmwareBlobs | None = None) -> None:
        self.pool = pool
        self.blobs: FirmwareBlobs = blobs or PostgresBlobs(pool)
        # blobs written before the store was switched stay readable where they are
        self.readers: dict[str, FirmwareBlobs] = {"postgres": PostgresBlobs(pool)}
        self.readers[self.blobs.kind] = self.blobs

    async def put_firmware(
        self,
        tenant: str,
        device_type: str,
        version: str,
        image: AsyncIterable[bytes],
        max_bytes: int,
    ) -> tuple[FirmwareView, bool]:
        """Store an image streamed in pieces (idempotent for the same content).

        FirmwareConflict for other content, FirmwareTooLarge past max_bytes, FirmwareEmpty.
        """
        await self.sweep_abandoned()
        blob_id = uuid.uuid4().hex
        await self.pool.execute(
            "INSERT INTO device.firmware_blobs (tenant, blob_id, store) VALUES ($1, $2, $3)",
            tenant,
            blob_id,
            self.blobs.kind,
        )
        try:
            digest, size = await self._write(tenant, blob_id, image, max_bytes)
            return await self._commit(tenant, device_type, version, blob_id, digest, size)
        except BaseException:
            await self._drop(tenant, blob_id)
            raise

    async def _write(
        self, tenant: str, blob_id: str, image: AsyncIterable[bytes], max_bytes: int
    ) -> tuple[str, int]:
        writer = await self.blobs.writer(tenant, blob_id)
        if writer.upload_ref:
            await self._touch(tenant, blob_id, 0, writer.upload_ref)
        hasher = hashlib.sha256()
        size = unreported = 0
        async for data in image:
            size += len(data)
            if size > max_bytes:
                raise FirmwareTooLarge(f"an image is at most {max_bytes} bytes")
            hasher.update(data)
            try:
                await writer.write(data)
            except asyncpg.ForeignKeyViolationError:  # its blob row is gone: swept
                raise FirmwareAbandoned(f"upload {blob_id} was abandoned") from None
            unreported += len(data)
            if unreported >= CHUNK_BYTES:
                await self._touch(tenant, blob_id, unreported, writer.upload_ref)
                unreported = 0
        if size == 0:
            raise FirmwareEmpty("the image is empty")
        try:
            await writer.finish()
        except asyncpg.ForeignKeyViolationError:
            raise FirmwareAbandoned(f"upload {blob_id} was abandoned") from None
        return hasher.hexdigest(), size

    async def _touch(self, tenant: str, blob_id: str, added: int, upload_ref: str | None) -> None:
        alive = await self.pool.fetchval(
            """UPDATE device.firmware_blobs SET touched_at = now(), size = size + $3,
                      upload_ref = coalesce($4, upload_ref)
               WHERE tenant = $1 AND blob_id = $2 AND state = 'uploading' RETURNING true""",
            tenant,
            blob_id,
            added,
            upload_ref,
        )
        if not alive:  # a sweep took this upload for dead and removed it
            raise FirmwareAbandoned(f"upload {blob_id} was abandoned")

    async def _commit(
        self, tenant: str, device_type: str, version: str, blob_id: str, digest: str, size: int
    ) -> tuple[FirmwareView, bool]:
        firmware_id = f"{device_type}-{version}"
        async with self.pool.acquire() as conn, conn.transaction():
            existing = await conn.fetchrow(
                "SELECT * FROM device.firmware WHERE tenant = $1 AND firmware_id = $2 FOR UPDATE",
                tenant,
                firmware_id,
            )
            if existing is None:
                completed = await conn.fetchval(
                    """UPDATE device.firmware_blobs SET state = 'complete', size = $3, sha256 = $4
                       WHERE tenant = $1 AND blob_id = $2 AND state = 'uploading' RETURNING true""",
                    tenant,
                    blob_id,
                    size,
                    digest,
                )
                if not completed:
                    raise FirmwareAbandoned(f"upload {blob_id} was abandoned")
                row = await conn.fetchrow(
                    """INSERT INTO device.firmware
                           (tenant, firmware_id, device_type, version, sha256, size, blob_id)
                       VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING *""",
                    tenant,
                    firmware_id,
                    device_type,
                    version,
                    digest,
                    size,
                    blob_id,
                )
                if row is not None:
                    return _view(row), True
        # the version exists (or a concurrent upload just won): this blob is not needed
        await self._drop(tenant, blob_id)
        view = await self.firmware(tenant, firmware_id)
        if view is not None and (view.device_type, view.version) != (device_type, version):
            # `a-b` 1.0 and `a` b-1.0 name one id: never answer with the other type's image
            raise FirmwareConflict(
                f"firmware id {firmware_id!r} is taken by {view.device_type} {view.version}; "
                f"choose another version for {device_type}"
            )
        if view is None or view.sha256 != digest:
            raise FirmwareConflict(f"{device_type} {version} was uploaded with other content")
        return view, False

    async def _drop(self, tenant: str, blob_id: str) -> None:
        """Remove a blob that no image refers to (one that an image refers to stays whole)."""
        # under the blob row's lock: a commit naming this blob (which locks the row too) either
        # landed before (then it is referred to, and kept) or fails after (it is 'deleting').
        # An upload cancelled after its commit reached the server (the reply lost) must not
        # delete the bytes of the image it just stored.
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT store, upload_ref FROM device.firmware_blobs
                   WHERE tenant = $1 AND blob_id = $2 FOR UPDATE""",
                tenant,
                blob_id,
            )
            if row is None:
                return
            used = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM device.firmware WHERE tenant = $1 AND blob_id = $2)",
                tenant,
                blob_id,
            )
            if used:
                return
            await conn.execute(
                "UPDATE device.firmware_blobs SET state = 'deleting' WHERE tenant = $1 AND blob_id = $2",
                tenant,
                blob_id,
            )
        if row["store"] in self.readers:
            await self.readers[row["store"]].delete(tenant, blob_id, row["upload_ref"])
        await self.pool.execute(
            """DELETE FROM device.firmware_blobs WHERE tenant = $1 AND blob_id = $2
               AND NOT EXISTS (SELECT 1 FROM device.firmware f WHERE f.tenant = $1 AND f.blob_id = $2)""",
            tenant,
            blob_id,
        )

    async def sweep_abandoned(self, older_than_s: float = ABANDONED_AFTER_S) -> int:
        """Remove uploads that stopped writing long ago (killed client or API process)."""
        # claimed first ('deleting'): an upload finishing now cannot complete a blob whose bytes
        # are going; a sweep killed midway leaves 'deleting' rows the next one takes up
        rows = await self.pool.fetch(
            """UPDATE device.firmware_blobs SET state = 'deleting'
               WHERE state = 'deleting'
                  OR (state = 'uploading' AND touched_at < now() - make_interval(secs => $1))
               RETURNING tenant, blob_id""",
            older_than_s,
        )
        for row in rows:
            try:
                await self._drop(row["tenant"], row["blob_id"])
            except Exception:
                log.warning("could not remove abandoned firmware upload %s", row["blob_id"], exc_info=True)
        return len(rows)

    async def firmware(self, tenant: str, firmware_id: str) -> FirmwareView | None:
        """A firmware image's metadata."""
        row = await self.pool.fetchrow(
            "SELECT * FROM device.firmware WHERE tenant = $1 AND firmware_id = $2", tenant, firmware_id
        )
        return None if row is None else _view(row)

    async def firmware_bytes(
        self, tenant: str, firmware_id: str, start: int, end: int
    ) -> AsyncIterator[bytes] | None:
        """The bytes [start, end) of an image, or None when there is no such image."""
        row = await self.pool.fetchrow(
            """SELECT f.blob_id, f.path, b.store FROM device.firmware f
               LEFT JOIN device.firmware_blobs b ON b.tenant = f.tenant AND b.blob_id = f.blob_id
               WHERE f.tenant = $1 AND f.firmware_id = $2""",
            tenant,
            firmware_id,
        )
        if row is None:
            return None
        if row["blob_id"] is not None and row["store"] in self.readers:
            return self.readers[row["store"]].read(tenant, row["blob_id"], start, end)
        if row["path"] and Path(row["path"]).is_file():  # an earlier version's file, not yet imported
            return _file_range(Path(row["path"]), start, end)
        return None

    async def import_local_images(self) -> int:
        """Move images an earlier version kept on this host's disk into the store (at API start)."""
        rows = await self.pool.fetch(
            "SELECT tenant, firmware_id, path, sha256 FROM device.firmware WHERE blob_id IS NULL"
        )
        moved = 0
        for row in rows:
            path = Path(row["path"] or "")
            if not path.is_file():
                continue  # another host's disk: that host imports it
            tenant, blob_id = row["tenant"], uuid.uuid4().hex
            await self.pool.execute(
                "INSERT INTO device.firmware_blobs (tenant, blob_id, store) VALUES ($1, $2, $3)",
                tenant,
                blob_id,
                self.blobs.kind,
            )
            try:
                size = path.stat().st_size
                digest, _ = await self._write(tenant, blob_id, _file_range(path, 0, size), size)
                if digest != row["sha256"]:
                    raise ValueError(f"{path}: content does not match its sha256")
                async with self.pool.acquire() as conn, conn.transaction():
                    completed = await conn.fetchval(
                        """UPDATE device.firmware_blobs SET state = 'complete', sha256 = $3
                           WHERE tenant = $1 AND blob_id = $2 AND state = 'uploading' RETURNING true""",
                        tenant,
                        blob_id,
                        digest,
                    )
                    if not completed:  # a sweep took it for abandoned: never refer to it
                        raise FirmwareAbandoned(f"upload {blob_id} was abandoned")
                    taken = await conn.fetchval(
                        """UPDATE device.firmware SET blob_id = $3
                           WHERE tenant = $1 AND firmware_id = $2 AND blob_id IS NULL RETURNING true""",
                        tenant,
                        row["firmware_id"],
                        blob_id,
                    )
            except Exception:
                log.warning("could not import firmware file %s", path, exc_info=True)
                taken = False
            if taken:
                moved += 1
            else:  # another API process imported it first, or the import failed
                await self._drop(tenant, blob_id)
        return moved


def _view(row: asyncpg.Record) -> FirmwareView:
    return FirmwareView.model_validate({k: row[k] for k in FirmwareView.model_fields})


async def _file_range(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        file.seek(start)
        position = start
        while position < end:
            data = file.read(min(CHUNK_BYTES, end - position))
            if not data:
                raise LookupError(f"{path} is shorter than its recorded size")
            position += len(data)
            yield data
