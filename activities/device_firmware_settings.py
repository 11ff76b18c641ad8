"""Which firmware blob store a process uses: S3 when configured, else PostgreSQL."""

from __future__ import annotations

from activities.device_firmware_blobs import FirmwareBlobs, PostgresBlobs
from activities.device_firmware_s3 import S3Blobs, S3Config
from fleetflow.db import Pool
from fleetflow.settings import Settings


def firmware_blobs(pool: Pool, settings: Settings) -> FirmwareBlobs:
    """The store new images go to (every process of a platform must be configured alike)."""
    if settings.firmware_s3_url and settings.firmware_s3_access_key and settings.firmware_s3_secret_key:
        return S3Blobs(
            S3Config(
                url=settings.firmware_s3_url,
                bucket=settings.firmware_s3_bucket,
                access_key=settings.firmware_s3_access_key,
                secret_key=settings.firmware_s3_secret_key,
                region=settings.firmware_s3_region,
            )
        )
    return PostgresBlobs(pool)
