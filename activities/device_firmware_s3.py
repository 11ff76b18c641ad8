"""Firmware blobs in an S3-compatible bucket (MinIO, AWS S3, ...), over httpx with SigV4.

Object key `firmware/<tenant>/<blob_id>` (tenant percent-encoded): every key names its tenant.
An upload is a multipart upload of 8 MiB parts, so an image never sits whole in memory;
reads pass the byte range on to a ranged GET.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from activities.device_firmware_blobs import BlobWriter
from fleetflow.sigv4 import EMPTY_SHA256, canonical_query, sign, uri_encode

PART_BYTES = 8 * 1024 * 1024  # S3 wants parts of at least 5 MiB but the last
_UPLOAD_ID = re.compile(rb"<UploadId>([^<]+)</UploadId>")
_UPLOAD = re.compile(rb"<Upload>(.*?)</Upload>", re.DOTALL)  # Key and UploadId in either order
_KEY = re.compile(rb"<Key>([^<]*)</Key>")


@dataclass(frozen=True)
class S3Config:
    """Where the bucket is and the keys to it."""

    url: str  # endpoint, e.g. http://minio:9000 (path-style addressing)
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


class S3Error(Exception):
    """The object store refused a request."""


class S3Blobs:
    """Blobs as objects of one bucket."""

    kind = "s3"

    def __init__(self, config: S3Config, http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        self.host = urlsplit(self.base).netloc
        self.prefix = urlsplit(self.base).path
        self.http = http or httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    def key(self, tenant: str, blob_id: str) -> str:
        """The object's key: the tenant is a path segment of its own."""
        return f"firmware/{uri_encode(tenant)}/{uri_encode(blob_id)}"

    def _request(
        self,
        method: str,
        key: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> httpx.Request:
        path = f"{self.prefix}/{uri_encode(self.config.bucket)}/{key}"
        query = dict(query or {})
        signed = sign(
            method=method,
            host=self.host,
            path=path,
            query=query,
            headers=dict(headers or {}),
            payload_sha256=hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
            access_key=self.config.access_key,
            secret_key=self.config.secret_key,
            region=self.config.region,
        )
        url = f"{self.base.removesuffix(self.prefix)}{path}"
        if query:
            url += "?" + canonical_query(query)
        return self.http.build_request(method, url, headers={**(headers or {}), **signed}, content=body)

    async def _send(self, request: httpx.Request, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        response = await self.http.send(request)
        if response.status_code not in ok:
            problem = f"{response.status_code} {response.text[:200]}"
            raise S3Error(f"{request.method} {request.url.path}: {problem}")
        return response

    async def writer(self, tenant: str, blob_id: str) -> BlobWriter:
        key = self.key(tenant, blob_id)
        created = await self._send(self._request("POST", key, query={"uploads": ""}))
        found = _UPLOAD_ID.search(created.content)
        if found is None:
            raise S3Error("CreateMultipartUpload answered without an UploadId")
        return _PartWriter(self, key, found.group(1).decode())

    async def read(self, tenant: str, blob_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        request = self._request(
            "GET", self.key(tenant, blob_id), headers={"range": f"bytes={start}-{end - 1}"}
        )
        response = await self.http.send(request, stream=True)
        try:
            if response.status_code not in (200, 206):
                await response.aread()
                raise S3Error(f"GET {request.url.path}: {response.status_code}")
            # 200: a store that ignored the Range sends the whole object; cut [start, end) from
            # it, or a resumed download would get the image's first bytes at its offset
            position = start if response.status_code == 206 else 0
            async for data in response.aiter_bytes():
                piece = data[max(0, start - position) : max(0, end - position)]
                position += len(data)
                if piece:
                    yield piece
                if position >= end:
                    break
        finally:
            await response.aclose()

    async def delete(self, tenant: str, blob_id: str, upload_ref: str | None) -> None:
        key = self.key(tenant, blob_id)
        # no upload_ref: the process may have died between CreateMultipartUpload and recording
        # its id; the bucket lists it (its parts would otherwise be kept, and billed, for ever)
        for upload_id in [upload_ref] if upload_ref else await self._uploads_of(key):
            await self._send(self._request("DELETE", key, query={"uploadId": upload_id}), ok=(200, 204, 404))
        await self._send(self._request("DELETE", key), ok=(200, 204, 404))

    async def _uploads_of(self, key: str) -> list[str]:
        """The unfinished multipart uploads of exactly this key."""
        listed = await self._send(self._request("GET", "", query={"uploads": "", "prefix": key}))
        found = []
        for upload in _UPLOAD.findall(listed.content):
            named, upload_id = _KEY.search(upload), _UPLOAD_ID.search(upload)
            if named is not None and upload_id is not None and named.group(1).decode() == key:
                found.append(upload_id.group(1).decode())
        return found


class _PartWriter:
    def __init__(self, store: S3Blobs, key: str, upload_id: str) -> None:
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self.upload_ref: str | None = upload_id
        self.buffer = bytearray()
        self.etags: list[str] = []

    async def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= PART_BYTES:
            await self._part(bytes(self.buffer[:PART_BYTES]))
            del self.buffer[:PART_BYTES]

    async def finish(self) -> None:
        if self.buffer or not self.etags:
            await self._part(bytes(self.buffer))
            self.buffer.clear()
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
            for n, etag in enumerate(self.etags, start=1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        done = await self.store._send(
            self.store._request("POST", self.key, query={"uploadId": self.upload_id}, body=body)
        )
        if b"<Error>" in done.content:  # S3 may answer 200 and report the failure in the body
            raise S3Error(f"CompleteMultipartUpload failed: {done.text[:200]}")

    async def _part(self, data: bytes) -> None:
        number = str(len(self.etags) + 1)
        response = await self.store._send(
            self.store._request(
                "PUT", self.key, query={"partNumber": number, "uploadId": self.upload_id}, body=data
            )
        )
        self.etags.append(response.headers.get("etag", ""))
