"""Firmware images in the shared store (PostgreSQL): uploaded through this process's API,
downloaded (whole, by range, resumed) through a `fleetflow api` process with a data directory
of its own, as an API on another host would be; tenancy, size limit and abandoned uploads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from activities.device_firmware import FirmwareAbandoned, FirmwareConflict, FirmwareStore, FirmwareTooLarge
from activities.device_firmware_blobs import CHUNK_BYTES
from fleetflow.contracts.rollouts import FirmwareView
from fleetflow.db import Pool
from fleetflow.settings import ENVIRONMENT, Settings
from tests.e2e.stack import FLEETFLOW, clean_env, pdeathsig_prefix
from tests.integration.flows import AUTH, fleet, upload
from tests.integration.test_tenant_isolation import GLOBEX
from tests.support import free_port

START_DEADLINE_S = 90.0
# 2.5 chunks: a range can cross a chunk boundary, the last chunk is a short one
IMAGE = os.urandom(2 * CHUNK_BYTES + CHUNK_BYTES // 2)


class OtherHost:
    """A `fleetflow api` process on the session's servers with a data directory of its own."""

    def __init__(self, settings: Settings, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "api.log"
        values = {name: getattr(settings, field) for name, (field, _) in ENVIRONMENT.items()}
        values |= {
            "FLEETFLOW_DATA_DIR": data_dir / "data",
            "FLEETFLOW_API_PORT": self.port,
            "FLEETFLOW_LOG_FORMAT": "text",
            "FLEETFLOW_METRICS_PORT": 0,
        }
        self.env = clean_env(**{k: str(v) for k, v in values.items() if v is not None})
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [*pdeathsig_prefix(), FLEETFLOW, "api"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )

    async def start(self) -> None:
        self.process = self._spawn()
        deadline = asyncio.get_running_loop().time() + START_DEADLINE_S
        async with httpx.AsyncClient(base_url=self.url) as http:
            while True:
                assert self.process.poll() is None, f"api exited:\n{self.log.read_text(errors='replace')}"
                try:
                    if (await http.get("/openapi.json")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "fleetflow api did not start"
                await asyncio.sleep(0.2)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # setpriv execs the API in place, so this pid is the API's own
        self.process.send_signal(sig)
        try:
            await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)


@pytest.fixture(scope="module")
async def other_host(
    settings: Settings, workers: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OtherHost]:
    host = OtherHost(settings, Path(tmp_path_factory.mktemp("host-b")))
    await host.start()
    try:
        yield host
    finally:
        await host.stop()
        print(host.log.read_text(errors="replace")[-5000:])


async def test_an_image_uploaded_on_one_host_downloads_whole_and_resumed_on_another(
    api: httpx.AsyncClient, other_host: OtherHost, settings: Settings
) -> None:
    version = f"7.{uuid.uuid4().int % 100000}.0"
    uploaded = await upload(api, version, IMAGE)
    assert uploaded.status_code == 201, uploaded.text
    view = uploaded.json()
    assert view["size"] == len(IMAGE) and view["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    assert not (settings.data_dir / "firmware").exists()  # nothing on this host's disk
    credential = next(iter((await fleet(api, 1)).values()))
    auth = {"Authorization": f"Bearer {credential}"}
    url = f"/v1/device/firmware/{view['firmware_id']}"
    async with httpx.AsyncClient(base_url=other_host.url, headers=auth, timeout=60) as b:
        whole = await b.get(url)
        assert whole.status_code == 200 and whole.content == IMAGE
        etag = whole.headers["etag"]
        assert etag == f'"{view["sha256"]}"' and whole.headers["accept-ranges"] == "bytes"
        # across the first chunk boundary
        edge = await b.get(url, headers={"Range": f"bytes={CHUNK_BYTES - 5}-{CHUNK_BYTES + 4}"})
        assert edge.status_code == 206 and edge.content == IMAGE[CHUNK_BYTES - 5 : CHUNK_BYTES + 5]
        assert edge.headers["content-range"] == f"bytes {CHUNK_BYTES - 5}-{CHUNK_BYTES + 4}/{len(IMAGE)}"
        # a download cut after 1.5 MiB, resumed where it stopped
        cut = CHUNK_BYTES + CHUNK_BYTES // 2
        first = await b.get(url, headers={"Range": f"bytes=0-{cut - 1}"})
        rest = await b.get(url, headers={"Range": f"bytes={cut}-", "If-Range": etag})
        assert first.status_code == rest.status_code == 206
        assert hashlib.sha256(first.content + rest.content).hexdigest() == view["sha256"]
        tail = await b.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == IMAGE[-10:]
        # the image changed since (another ETag): the whole image, not a piece of the new one
        stale = await b.get(url, headers={"Range": f"bytes={cut}-", "If-Range": '"0000"'})
        assert stale.status_code == 200 and stale.content == IMAGE
        assert (await b.get(url, headers={"If-None-Match": etag})).status_code == 304
        # If-None-Match compares weakly, and `*` names any image (RFC 9110 §13.1.2)
        for held in (f"W/{etag}", "*", f'"0000", {etag}'):
            assert (await b.get(url, headers={"If-None-Match": held})).status_code == 304, held
        past = await b.get(url, headers={"Range": f"bytes={len(IMAGE)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(IMAGE)}"
        overlong = await b.get(url, headers={"Range": f"bytes={len(IMAGE) - 3}-{len(IMAGE) + 100}"})
        assert overlong.status_code == 206 and overlong.content == IMAGE[-3:]


async def test_two_tenants_with_the_same_firmware_id_each_read_their_own(
    api: httpx.AsyncClient, other_host: OtherHost
) -> None:
    version = f"8.{uuid.uuid4().int % 100000}.0"
    acme_image, globex_image = b"acme" * 1000, b"globex" * 1000
    assert (await upload(api, version, acme_image)).status_code == 201
    assert (await upload(api, version, globex_image, auth=GLOBEX)).status_code == 201
    acme_device = next(iter((await fleet(api, 1)).values()))
    globex_device = next(iter((await fleet(api, 1, auth=GLOBEX)).values()))
    url = f"/v1/device/firmware/sensor-{version}"
    async with httpx.AsyncClient(base_url=other_host.url, timeout=60) as b:
        mine = await b.get(url, headers={"Authorization": f"Bearer {acme_device}"})
        theirs = await b.get(url, headers={"Authorization": f"Bearer {globex_device}"})
        assert mine.content == acme_image and theirs.content == globex_image
    # an id only globex has is no one else's
    only = f"9.{uuid.uuid4().int % 100000}.0"
    assert (await upload(api, only, globex_image, auth=GLOBEX)).status_code == 201
    async with httpx.AsyncClient(base_url=other_host.url, timeout=60) as b:
        stranger = await b.get(
            f"/v1/device/firmware/sensor-{only}", headers={"Authorization": f"Bearer {acme_device}"}
        )
        assert stranger.status_code == 404


async def _pieces(image: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(image), size):
        yield image[start : start + size]


async def _leftovers(pool: Pool) -> tuple[int, int]:
    blobs = await pool.fetchval(
        """SELECT count(*) FROM device.firmware_blobs b WHERE NOT EXISTS
           (SELECT 1 FROM device.firmware f WHERE f.tenant = b.tenant AND f.blob_id = b.blob_id)"""
    )
    chunks = await pool.fetchval(
        """SELECT count(*) FROM device.firmware_chunks c WHERE NOT EXISTS
           (SELECT 1 FROM device.firmware f WHERE f.tenant = c.tenant AND f.blob_id = c.blob_id)"""
    )
    return int(blobs), int(chunks)


async def test_an_image_over_the_limit_leaves_nothing(pool: Pool, api: httpx.AsyncClient) -> None:
    store = FirmwareStore(pool)
    before = await _leftovers(pool)
    with pytest.raises(FirmwareTooLarge):
        await store.put_firmware("acme", "sensor", "big-1", _pieces(IMAGE), 2 * CHUNK_BYTES)
    assert await _leftovers(pool) == before
    assert await store.firmware("acme", "sensor-big-1") is None


class _ReplyLost(FirmwareStore):
    """The commit of an upload reaches the server, then its task is cancelled (the client went
    away while the COMMIT's reply was on its way)."""

    async def _commit(
        self, tenant: str, device_type: str, version: str, blob_id: str, digest: str, size: int
    ) -> tuple[FirmwareView, bool]:
        await super()._commit(tenant, device_type, version, blob_id, digest, size)
        raise asyncio.CancelledError


async def test_an_upload_cancelled_after_its_commit_keeps_the_stored_image(
    pool: Pool, api: httpx.AsyncClient
) -> None:
    """The image is stored (its metadata says so): its bytes must stay readable, whatever the
    uploading task does next (its clean-up used to delete the bytes of the stored image)."""
    version = f"4.{uuid.uuid4().int % 100000}.0"
    with pytest.raises(asyncio.CancelledError):
        await _ReplyLost(pool).put_firmware("acme", "sensor", version, _pieces(IMAGE), len(IMAGE))
    store = FirmwareStore(pool)
    view = await store.firmware("acme", f"sensor-{version}")
    assert view is not None and view.size == len(IMAGE)
    body = await store.firmware_bytes("acme", f"sensor-{version}", 0, len(IMAGE))
    assert body is not None
    assert b"".join([piece async for piece in body]) == IMAGE


async def test_a_firmware_id_two_device_types_spell_alike_is_not_shared(pool: Pool) -> None:
    """`cam-pro` 1.0 and `cam` pro-1.0 both make the id `cam-pro-1.0`: the second upload is a
    conflict naming the first, not an answer with the other type's image (same content: 200
    with device_type cam-pro, which no `cam` device could download)."""
    store = FirmwareStore(pool)
    version = f"{uuid.uuid4().int % 100000}.0"
    image = os.urandom(1000)
    view, created = await store.put_firmware("acme", "cam-pro", version, _pieces(image), len(image))
    assert created and view.device_type == "cam-pro"
    before = await _leftovers(pool)
    for content in (image, image[:-1]):
        with pytest.raises(FirmwareConflict, match="taken by cam-pro"):
            await store.put_firmware("acme", "cam", f"pro-{version}", _pieces(content), len(content))
    assert await _leftovers(pool) == before


async def test_an_upload_swept_while_stalled_fails_as_abandoned(pool: Pool) -> None:
    """A client stalls past the sweep's threshold, then sends on: its upload is refused as
    abandoned (a 408 over HTTP), not a database error (a 500), and nothing of it stays."""
    store = FirmwareStore(pool)
    version = f"3.{uuid.uuid4().int % 100000}.0"
    stalled, resume = asyncio.Event(), asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield IMAGE[: CHUNK_BYTES + 1]
        stalled.set()
        await resume.wait()
        yield IMAGE[CHUNK_BYTES + 1 :]

    uploading = asyncio.create_task(store.put_firmware("acme", "sensor", version, stalls(), len(IMAGE)))
    await stalled.wait()
    blob = await pool.fetchval(
        """UPDATE device.firmware_blobs SET touched_at = now() - interval '1 hour'
           WHERE tenant = 'acme' AND state = 'uploading' AND touched_at > now() - interval '1 minute'
           RETURNING blob_id"""
    )
    assert blob is not None
    assert await store.sweep_abandoned() >= 1
    resume.set()
    with pytest.raises(FirmwareAbandoned):
        await uploading
    assert await pool.fetchval("SELECT count(*) FROM device.firmware_chunks WHERE blob_id = $1", blob) == 0
    assert await store.firmware("acme", f"sensor-{version}") is None


async def test_the_same_version_again_keeps_one_copy(pool: Pool, api: httpx.AsyncClient) -> None:
    version = f"6.{uuid.uuid4().int % 100000}.0"
    before = await _leftovers(pool)
    assert (await upload(api, version, IMAGE)).status_code == 201
    assert (await upload(api, version, IMAGE)).status_code == 200
    assert (await upload(api, version, IMAGE[:-1])).status_code == 409
    assert await _leftovers(pool) == before


async def test_an_upload_killed_midway_is_swept(
    pool: Pool, settings: Settings, workers: None, tmp_path: Path
) -> None:
    """The API process dies with 2 MiB of an image written: its chunks stay until a sweep takes
    the upload for abandoned (here: its last write moved back past the threshold)."""
    host = OtherHost(settings, tmp_path)
    await host.start()
    version = f"5.{uuid.uuid4().int % 100000}.0"
    written = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield IMAGE[: 2 * CHUNK_BYTES + 1]
        written.set()
        await asyncio.sleep(3600)  # the rest never comes
        yield b""

    async with httpx.AsyncClient(base_url=host.url, headers=AUTH, timeout=60) as b:
        sending = asyncio.create_task(
            b.post("/v1/firmware", params={"device_type": "sensor", "version": version}, content=slow_body())
        )
        await written.wait()

        async def stored() -> int:
            return int(
                await pool.fetchval(
                    """SELECT count(*) FROM device.firmware_chunks c JOIN device.firmware_blobs b
                       USING (tenant, blob_id) WHERE b.state = 'uploading'"""
                )
            )

        for _ in range(600):
            if await stored() >= 2:
                break
            await asyncio.sleep(0.1)
        assert await stored() >= 2
        await host.stop(signal.SIGKILL)
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
    leftover = await _leftovers(pool)
    assert leftover[1] >= 2  # the dead process's chunks are still there
    store = FirmwareStore(pool)
    assert await store.sweep_abandoned() == 0  # too recent: it might be a slow client
    await pool.execute(
        "UPDATE device.firmware_blobs SET touched_at = now() - interval '1 hour' WHERE state = 'uploading'"
    )
    assert await store.sweep_abandoned() >= 1
    assert await _leftovers(pool) == (0, 0)
    assert await store.firmware("acme", f"sensor-{version}") is None


async def test_an_image_an_earlier_version_kept_on_disk_moves_into_the_store(
    pool: Pool, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A row of the disk-era layout (path, no blob) is served from its file, then imported."""
    image = os.urandom(CHUNK_BYTES + 10)
    digest = hashlib.sha256(image).hexdigest()
    path = tmp_path / "firmware" / digest
    path.parent.mkdir()
    path.write_bytes(image)
    version = f"1.{uuid.uuid4().int % 100000}.0"
    await pool.execute(
        """INSERT INTO device.firmware (tenant, firmware_id, device_type, version, sha256, size, path)
           VALUES ('acme', $1, 'sensor', $2, $3, $4, $5)""",
        f"sensor-{version}",
        version,
        digest,
        len(image),
        str(path),
    )
    store = FirmwareStore(pool)

    async def read(start: int, end: int) -> bytes:
        body = await store.firmware_bytes("acme", f"sensor-{version}", start, end)
        assert body is not None
        return b"".join([piece async for piece in body])

    assert await read(5, CHUNK_BYTES + 3) == image[5 : CHUNK_BYTES + 3]  # from the file
    assert await store.import_local_images() >= 1
    path.unlink()  # the disk is gone (another host, a rebuilt container): the store has it
    assert await read(0, len(image)) == image
    assert await store.import_local_images() == 0


def _peak_rss_mib(pid: int) -> float:
    """The process's resident-set high-water mark (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_a_large_upload_never_sits_whole_in_the_api_memory(
    api: httpx.AsyncClient, other_host: OtherHost
) -> None:
    """64 MiB through the other host's API: its peak memory grows by far less than the image
    (a body read whole, as before, raised it by the image's size at least)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc to read the API process's peak memory from")
    assert other_host.process is not None
    size_mib = 64
    piece = os.urandom(CHUNK_BYTES)
    digest = hashlib.sha256(piece * size_mib).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size_mib):
            yield piece

    before = _peak_rss_mib(other_host.process.pid)
    version = f"2.{uuid.uuid4().int % 100000}.0"
    async with httpx.AsyncClient(base_url=other_host.url, headers=AUTH, timeout=600) as b:
        params = {"device_type": "sensor", "version": version}
        stored = await b.post("/v1/firmware", params=params, content=body())
    assert stored.status_code == 201, stored.text
    assert stored.json()["sha256"] == digest and stored.json()["size"] == size_mib * CHUNK_BYTES
    grown = _peak_rss_mib(other_host.process.pid) - before
    print(f"peak RSS of the API grew by {grown:.1f} MiB for a {size_mib} MiB upload")
    assert grown < size_mib / 2
