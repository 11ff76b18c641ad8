"""AWS Signature Version 4 for S3-compatible object stores (the firmware store's S3 backend).

Small on purpose: header-based signing of one request, as AWS documents it
(https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html); the unit
tests check it against AWS's published examples.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def uri_encode(text: str, *, keep_slash: bool = False) -> str:
    """Percent-encoding as SigV4 wants it: everything but A-Z a-z 0-9 - _ . ~ (and '/' in paths)."""
    return quote(text, safe="-_.~/" if keep_slash else "-_.~")


def canonical_query(query: Mapping[str, str]) -> str:
    """Sorted `key=value` pairs, both encoded."""
    pairs = sorted((uri_encode(k), uri_encode(v)) for k, v in query.items())
    return "&".join(f"{k}={v}" for k, v in pairs)


def sign(
    *,
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
    now: datetime | None = None,
    content_header: bool = True,
) -> dict[str, str]:
    """The headers to add to a request: `x-amz-date`, `x-amz-content-sha256`, `Authorization`.

    `path` is already encoded (each key segment through `uri_encode`); `headers` are the other
    headers to sign (e.g. `range`); `host` is signed always, `x-amz-content-sha256` unless
    `content_header` is false (services other than S3).
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    signed: dict[str, str] = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    signed["host"] = host
    signed["x-amz-date"] = amz_date
    if content_header:
        signed["x-amz-content-sha256"] = payload_sha256
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            path or "/",
            canonical_query(query),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    added = {k: v for k, v in signed.items() if k in ("x-amz-date", "x-amz-content-sha256")}
    added["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return added
