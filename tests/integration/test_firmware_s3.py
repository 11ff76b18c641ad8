"""The firmware store's S3 backend against an S3 emulator (moto's server: MinIO is neither on
PyPI nor in Debian): multipart upload, ranged reads, tenant-named keys, abandoned uploads, and
an API process configured with FLEETFLOW_FIRMWARE_S3_*."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from activities.device_firmware import FirmwareStore
from activities.device_firmware_s3 import PART_BYTES, S3Blobs, S3Config
from fleetflow.db import Pool
from fleetflow.settings import Settings
from tests.integration.flows import fleet, upload
from tests.integration.test_firmware_store import OtherHost
from tests.support import free_port

BUCKET = "fleetflow-firmware"
IMAGE = os.urandom(PART_BYTES + PART_BYTES // 8)  # two parts, the last a short one


@pytest.fixture(scope="module")
async def s3_url() -> AsyncIterator[str]:
    """A moto S3 server on a free port, with the bucket."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    process = _spawn([server, "-H", "127.0.0.1", "-p", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                try:
                    await http.get(url)
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
        blobs = _blobs(url)
        made = await blobs.http.send(blobs._request("PUT", ""))
        assert made.status_code == 200, made.text
        yield url
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _blobs(url: str) -> S3Blobs:
    return S3Blobs(S3Config(url=url, bucket=BUCKET, access_key="test", secret_key="test-secret"))


async def _pieces(image: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(image), size):
        yield image[start : start + size]


async def _keys(blobs: S3Blobs, prefix: str) -> list[str]:
    listed = await blobs.http.send(blobs._request("GET", "", query={"list-type": "2", "prefix": prefix}))
    return [k.split("</Key>")[0] for k in listed.text.split("<Key>")[1:]]


async def _open_uploads(blobs: S3Blobs) -> int:
    listed = await blobs.http.send(blobs._request("GET", "", query={"uploads": ""}))
    return listed.text.count("<UploadId>")


async def _read(store: FirmwareStore, tenant: str, firmware_id: str, start: int, end: int) -> bytes:
    body = await store.firmware_bytes(tenant, firmware_id, start, end)
    assert body is not None
    return b"".join([piece async for piece in body])


async def test_an_image_in_s3_reads_whole_and_by_range(pool: Pool, s3_url: str) -> None:
    blobs = _blobs(s3_url)
    store = FirmwareStore(pool, blobs)
    tenant, version = "acme", f"3.{uuid.uuid4().int % 100000}.0"
    view, created = await store.put_firmware(tenant, "sensor", version, _pieces(IMAGE), len(IMAGE))
    assert created and view.sha256 == hashlib.sha256(IMAGE).hexdigest()
    assert await _read(store, tenant, view.firmware_id, 0, len(IMAGE)) == IMAGE
    edge = (PART_BYTES - 7, PART_BYTES + 9)  # across the parts
    assert await _read(store, tenant, view.firmware_id, *edge) == IMAGE[edge[0] : edge[1]]
    # the object's key names the tenant; nothing went to PostgreSQL's chunks
    blob_id = await pool.fetchval(
        "SELECT blob_id FROM device.firmware WHERE tenant = $1 AND firmware_id = $2", tenant, view.firmware_id
    )
    assert await _keys(blobs, f"firmware/{tenant}/{blob_id}") == [f"firmware/{tenant}/{blob_id}"]
    chunks = "SELECT count(*) FROM device.firmware_chunks WHERE tenant = $1 AND blob_id = $2"
    assert await pool.fetchval(chunks, tenant, blob_id) == 0
    # the same again: no second object stays behind
    objects = len(await _keys(blobs, f"firmware/{tenant}/"))
    assert (await store.put_firmware(tenant, "sensor", version, _pieces(IMAGE), len(IMAGE)))[1] is False
    assert len(await _keys(blobs, f"firmware/{tenant}/")) == objects


async def test_an_abandoned_s3_upload_is_aborted(pool: Pool, s3_url: str) -> None:
    blobs = _blobs(s3_url)
    store = FirmwareStore(pool, blobs)
    tenant = f"s3-{uuid.uuid4().hex[:6]}"
    reached = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield IMAGE[: PART_BYTES + 1]
        reached.set()
        await asyncio.sleep(3600)
        yield b""

    # a bare write (put_firmware's cleanup left out) stands for an API process killed mid-upload
    await pool.execute(
        "INSERT INTO device.firmware_blobs (tenant, blob_id, store) VALUES ($1, 'dead-upload', 's3')", tenant
    )
    stalled = asyncio.create_task(store._write(tenant, "dead-upload", stalls(), len(IMAGE)))
    await reached.wait()
    before = await _open_uploads(blobs)
    assert before >= 1
    stalled.cancel()
    await asyncio.gather(stalled, return_exceptions=True)
    await pool.execute(
        """UPDATE device.firmware_blobs SET touched_at = now() - interval '1 hour'
           WHERE tenant = $1 AND blob_id = 'dead-upload'""",
        tenant,
    )
    assert await store.sweep_abandoned() >= 1
    assert await _open_uploads(blobs) == before - 1
    assert await pool.fetchval("SELECT count(*) FROM device.firmware_blobs WHERE tenant = $1", tenant) == 0


async def test_an_upload_killed_before_its_upload_id_was_recorded_is_aborted(pool: Pool, s3_url: str) -> None:
    """The process dies right after CreateMultipartUpload, before the upload id reaches its
    blob row: the sweep still finds and aborts that multipart upload (its parts are not kept)."""
    blobs = _blobs(s3_url)
    store = FirmwareStore(pool, blobs)
    tenant = f"s3-{uuid.uuid4().hex[:6]}"
    await pool.execute(
        "INSERT INTO device.firmware_blobs (tenant, blob_id, store) VALUES ($1, 'early-death', 's3')", tenant
    )
    writer = await blobs.writer(tenant, "early-death")  # the upload exists in the bucket only
    await writer.write(IMAGE[: PART_BYTES + 1])  # a part is stored too
    assert await _open_uploads_of(blobs, tenant) == 1
    await pool.execute(
        """UPDATE device.firmware_blobs SET touched_at = now() - interval '1 hour'
           WHERE tenant = $1 AND blob_id = 'early-death'""",
        tenant,
    )
    assert await store.sweep_abandoned() >= 1
    assert await _open_uploads_of(blobs, tenant) == 0
    assert await pool.fetchval("SELECT count(*) FROM device.firmware_blobs WHERE tenant = $1", tenant) == 0


async def _open_uploads_of(blobs: S3Blobs, tenant: str) -> int:
    listed = await blobs.http.send(blobs._request("GET", "", query={"uploads": ""}))
    return listed.text.count(f"<Key>firmware/{tenant}/")


async def test_an_api_configured_for_s3_serves_ranges_from_the_bucket(
    api: httpx.AsyncClient, settings: Settings, s3_url: str, tmp_path: Path, pool: Pool
) -> None:
    s3 = settings.model_copy(
        update={
            "firmware_s3_url": s3_url,
            "firmware_s3_bucket": BUCKET,
            "firmware_s3_access_key": "test",
            "firmware_s3_secret_key": "test-secret",
        }
    )
    host = OtherHost(s3, tmp_path)
    await host.start()
    try:
        version = f"4.{uuid.uuid4().int % 100000}.0"
        credential = next(iter((await fleet(api, 1)).values()))
        async with httpx.AsyncClient(base_url=host.url, timeout=120) as b:
            stored = await upload(b, version, IMAGE)
            assert stored.status_code == 201, stored.text
            url = f"/v1/device/firmware/{stored.json()['firmware_id']}"
            auth = {"Authorization": f"Bearer {credential}"}
            part = await b.get(url, headers={**auth, "Range": f"bytes={PART_BYTES - 2}-{PART_BYTES + 1}"})
            assert part.status_code == 206 and part.content == IMAGE[PART_BYTES - 2 : PART_BYTES + 2]
            whole = await b.get(url, headers=auth)
            assert whole.status_code == 200 and whole.content == IMAGE
        assert await _keys(_blobs(s3_url), "firmware/acme/")
        blob = await pool.fetchval(
            """SELECT b.store FROM device.firmware f JOIN device.firmware_blobs b USING (tenant, blob_id)
               WHERE f.tenant = 'acme' AND f.firmware_id = $1""",
            f"sensor-{version}",
        )
        assert blob == "s3"
    finally:
        await host.stop()
