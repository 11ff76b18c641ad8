"""S3Blobs' range reads when the object store ignores the Range header (answers 200, the
whole object): the bytes asked for are still the ones served."""

from __future__ import annotations

import httpx

from activities.device_firmware_s3 import S3Blobs, S3Config

OBJECT = bytes(range(256)) * 40  # 10,240 bytes


def _store(honours_range: bool) -> S3Blobs:
    def answer(request: httpx.Request) -> httpx.Response:
        first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
        if honours_range:
            return httpx.Response(206, content=OBJECT[int(first) : int(last) + 1])
        return httpx.Response(200, content=OBJECT)

    config = S3Config(url="http://s3.test", bucket="firmware", access_key="k", secret_key="s")
    return S3Blobs(config, httpx.AsyncClient(transport=httpx.MockTransport(answer)))


async def _read(store: S3Blobs, start: int, end: int) -> bytes:
    return b"".join([piece async for piece in store.read("acme", "blob", start, end)])


async def test_a_store_ignoring_range_still_gives_the_bytes_asked_for() -> None:
    store = _store(honours_range=False)
    assert await _read(store, 5000, 6000) == OBJECT[5000:6000]
    assert await _read(store, 0, 10) == OBJECT[:10]
    assert await _read(store, 10_000, len(OBJECT)) == OBJECT[10_000:]


async def test_a_store_honouring_range_is_passed_through() -> None:
    store = _store(honours_range=True)
    assert await _read(store, 5000, 6000) == OBJECT[5000:6000]
