"""Webhook signatures per the Standard Webhooks specification (standardwebhooks.com).

Each delivery carries `webhook-id` (the event's id, the same on every retry), `webhook-timestamp`
(seconds since the epoch, when this attempt was signed) and `webhook-signature`: space-separated
`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one per valid secret (two while a rotated
secret's overlap lasts). The timestamp is signed, so a receiver refuses a replayed delivery
once it is older than its tolerance, and any Standard Webhooks verifier checks them.

A secret written `whsec_<base64>` is the spec's form: its key is the decoded bytes. Any other
secret's key is its UTF-8 bytes (`standardwebhooks.Webhook(secret.encode())` verifies it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

SECRET_PREFIX = "whsec_"
ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "webhook-id", "webhook-timestamp", "webhook-signature"
# what receivers commonly accept (the standardwebhooks libraries use 5 minutes)
TOLERANCE_S = 300
MIN_KEY_BYTES = 16


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret (see the module docstring); ValueError when a `whsec_` secret is
    not base64 of at least 16 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode()
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a whsec_ secret must hold at least {MIN_KEY_BYTES} bytes")
    return key


def signing_key(secret: str) -> bytes:
    """The key a stored secret signs with: its `secret_key`, or its UTF-8 bytes when it is a
    `whsec_` secret that does not decode. Secrets stored before `whsec_` was checked at the API
    (any 16 characters) signed with their UTF-8 bytes then, and must still sign: an error here
    would hold the subscription's queue for ever, uncounted."""
    try:
        return secret_key(secret)
    except ValueError:
        return secret.encode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secrets: Iterable[str], msg_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The three headers of a delivery signed with every secret given."""
    timestamp = int(time.time() if now is None else now)
    signatures = " ".join(signature(signing_key(s), msg_id, timestamp, body) for s in secrets)
    return {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signatures}


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> bool:
    """True when the headers carry a valid signature of body by secret, signed within the
    tolerance (the receiver's side; the simulator's receiver uses it)."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lower.get(h, "") for h in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (msg_id and stamp.isdigit() and signatures):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE_S:
        return False
    expected = signature(signing_key(secret), msg_id, int(stamp), body)
    return any(hmac.compare_digest(expected, given) for given in signatures.split(" "))
