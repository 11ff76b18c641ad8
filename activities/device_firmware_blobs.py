"""Where the device service keeps firmware image bytes, shared by every API host.

`FirmwareBlobs` is the interface; `PostgresBlobs` (the default) keeps an image as 1 MiB rows
of `device.firmware_chunks`, `S3Blobs` (activities/device_firmware_s3.py) in an
S3-compatible bucket. Every blob is named by (tenant, blob_id); `device.firmware_blobs`
registers each one from its first byte, so an upload killed midway is found and removed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from fleetflow.db import Pool

CHUNK_BYTES = 1024 * 1024  # PostgreSQL rows: every chunk but the last holds exactly this much


class BlobWriter(Protocol):
    """One blob being written, in order; nothing is visible before `finish`."""

    upload_ref: str | None  # what a sweep needs to drop it unfinished (S3: the multipart upload)

    async def write(self, data: bytes) -> None:
        """Append bytes (any size; buffered up to one chunk or part)."""

    async def finish(self) -> None:
        """Flush what is buffered and make the blob readable."""


class FirmwareBlobs(Protocol):
    """A firmware image store: blobs by (tenant, blob_id), range reads."""

    kind: str  # recorded with each blob, so a sweep knows where it lives

    async def writer(self, tenant: str, blob_id: str) -> BlobWriter:
        """Start a blob (its `device.firmware_blobs` row exists already)."""

    def read(self, tenant: str, blob_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes [start, end) of a finished blob, a piece at a time."""

    async def delete(self, tenant: str, blob_id: str, upload_ref: str | None) -> None:
        """Remove a blob, finished or not (idempotent)."""


class PostgresBlobs:
    """Blobs as chunk rows in the device schema: no other server to run."""

    kind = "postgres"

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def writer(self, tenant: str, blob_id: str) -> BlobWriter:
        return _ChunkWriter(self.pool, tenant, blob_id)

    async def read(self, tenant: str, blob_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        # one chunk per query: memory stays at one chunk whatever the range; substring() cuts
        # the first and last chunk in the server (data is stored uncompressed, so it is cheap)
        position = start
        while position < end:
            seq, offset = divmod(position, CHUNK_BYTES)
            length = min(CHUNK_BYTES - offset, end - position)
            data = await self.pool.fetchval(
                """SELECT substring(data FROM $4 FOR $5) FROM device.firmware_chunks
                   WHERE tenant = $1 AND blob_id = $2 AND seq = $3""",
                tenant,
                blob_id,
                seq,
                offset + 1,
                length,
            )
            if not data:
                raise LookupError(f"firmware blob {tenant}/{blob_id} lacks chunk {seq}")
            yield bytes(data)
            position += len(data)

    async def delete(self, tenant: str, blob_id: str, upload_ref: str | None) -> None:
        await self.pool.execute(
            "DELETE FROM device.firmware_chunks WHERE tenant = $1 AND blob_id = $2", tenant, blob_id
        )


class _ChunkWriter:
    def __init__(self, pool: Pool, tenant: str, blob_id: str) -> None:
        self.pool = pool
        self.tenant = tenant
        self.blob_id = blob_id
        self.upload_ref: str | None = None
        self.buffer = bytearray()
        self.seq = 0

    async def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= CHUNK_BYTES:
            await self._flush(bytes(self.buffer[:CHUNK_BYTES]))
            del self.buffer[:CHUNK_BYTES]

    async def finish(self) -> None:
        if self.buffer:
            await self._flush(bytes(self.buffer))
            self.buffer.clear()

    async def _flush(self, chunk: bytes) -> None:
        # the foreign key to the blob's row fails this insert once a sweep took the upload for dead
        await self.pool.execute(
            "INSERT INTO device.firmware_chunks (tenant, blob_id, seq, data) VALUES ($1, $2, $3, $4)",
            self.tenant,
            self.blob_id,
            self.seq,
            chunk,
        )
        self.seq += 1
