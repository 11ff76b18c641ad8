"""Which firmware store a process uses, from its settings."""

from __future__ import annotations

from typing import Any, cast

import pytest

from activities.device_firmware_blobs import PostgresBlobs
from activities.device_firmware_s3 import S3Blobs
from activities.device_firmware_settings import firmware_blobs
from fleetflow.errors import StartupError
from fleetflow.settings import load_settings

S3 = {
    "FLEETFLOW_FIRMWARE_S3_URL": "http://minio:9000",
    "FLEETFLOW_FIRMWARE_S3_ACCESS_KEY": "fleetflow",
    "FLEETFLOW_FIRMWARE_S3_SECRET_KEY": "secret",
}
POOL = cast(Any, object())  # not used to choose


def test_postgresql_unless_a_bucket_is_configured() -> None:
    assert isinstance(firmware_blobs(POOL, load_settings({})), PostgresBlobs)
    chosen = firmware_blobs(POOL, load_settings(S3))
    assert isinstance(chosen, S3Blobs)
    assert chosen.config.bucket == "fleetflow-firmware"
    assert chosen.key("acme/x", "b1") == "firmware/acme%2Fx/b1"  # the tenant is one segment


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"FLEETFLOW_FIRMWARE_S3_URL": "http://minio:9000"}, "FLEETFLOW_FIRMWARE_S3_ACCESS_KEY"),
        ({**S3, "FLEETFLOW_FIRMWARE_S3_URL": "minio:9000"}, "FLEETFLOW_FIRMWARE_S3_URL"),
        ({**S3, "FLEETFLOW_FIRMWARE_S3_BUCKET": "Bad_Bucket"}, "FLEETFLOW_FIRMWARE_S3_BUCKET"),
    ],
)
def test_an_incomplete_s3_configuration_stops_the_start(env: dict[str, str], says: str) -> None:
    with pytest.raises(StartupError, match=says):
        load_settings(env)
