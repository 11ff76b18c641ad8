"""The platform's signing key set: ES256 keys with a `kid`, rotated and retired by operators.

The newest key that is not retired signs; every key that is not retired verifies, so a
rotation never breaks tokens already handed out, and retiring a key refuses at once
everything it signed that is presented from then on. A Temporal call the server took before
the retirement (an activity's retry, a history's replay) is judged at the moment the server
took it, when the key was still good (`get(..., active_at=)`). The set lives in one JSON
file (mode 0600) that every process of a platform shares; processes notice a rotation or
retirement on their next verification.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fleetflow.settings import Settings

ALGORITHM = "ES256"
KEYS_FILE = "signing-keys.json"


class KeySetError(LookupError):
    """An operation on the key set that cannot be done (unknown kid, last active key)."""


@dataclass(frozen=True)
class SigningKey:
    """One key of the set."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey
    created_at: datetime
    retired_at: datetime | None = None

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The half that verifies."""
        return self.private_key.public_key()

    def sign(self, message: bytes) -> bytes:
        """A JWS ES256 signature (r || s), deterministic (RFC 6979): the same claims signed
        twice give the same token, so re-issuing a credential is idempotent."""
        der = self.private_key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class KeyRing:
    """The key set stored in `directory`; re-read when the file changes."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / KEYS_FILE
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, SigningKey] = {}

    # --- reading ---------------------------------------------------------------

    def keys(self) -> list[SigningKey]:
        """Every key, newest first, retired ones included."""
        self._refresh()
        return sorted(self._keys.values(), key=lambda k: k.created_at, reverse=True)

    def signing_key(self) -> SigningKey:
        """The newest active key; the first key is made when the set is empty."""
        active = [k for k in self.keys() if k.retired_at is None]
        if active:
            return active[0]
        with self._locked():
            self._refresh(force=True)
            if not any(k.retired_at is None for k in self._keys.values()):
                self._write([*self._keys.values(), _new_key()])
        return self.signing_key()

    def get(
        self, kid: str, *, allow_retired: bool = False, active_at: datetime | None = None
    ) -> SigningKey | None:
        """The key with that kid when it may verify: not retired (or, with `active_at`, not
        retired before that moment; a retirement time never changes, so the answer for a
        given moment is the same every time it is asked)."""
        self._refresh()
        key = self._keys.get(kid)
        if key is None or key.retired_at is None or allow_retired:
            return key
        if active_at is not None and active_at < key.retired_at:
            return key
        return None

    def jwks(self) -> dict[str, Any]:
        """The public halves of every key that still verifies (RFC 7517 JSON Web Key Set),
        rotated-but-not-retired ones included, so others can verify fleetflow tokens."""
        return {"keys": [public_jwk(k) for k in self.keys() if k.retired_at is None]}

    # --- changing --------------------------------------------------------------

    def rotate(self) -> SigningKey:
        """Add a new key that signs from now on; older ones keep verifying until retired."""
        with self._locked():
            self._refresh(force=True)
            key = _new_key()
            self._write([*self._keys.values(), key])
        return key

    def retire(self, kid: str) -> SigningKey:
        """Stop accepting what kid signed; the newest active key cannot be retired."""
        with self._locked():
            self._refresh(force=True)
            key = self._keys.get(kid)
            if key is None:
                raise KeySetError(f"no key {kid!r}")
            active = sorted(
                (k for k in self._keys.values() if k.retired_at is None),
                key=lambda k: k.created_at,
                reverse=True,
            )
            if active and active[0].kid == kid:
                raise KeySetError(f"key {kid!r} signs new tokens: rotate first, then retire it")
            if key.retired_at is None:
                key = SigningKey(key.kid, key.private_key, key.created_at, datetime.now(UTC))
                self._write([key if k.kid == kid else k for k in self._keys.values()])
        return key

    # --- storage ---------------------------------------------------------------

    def _refresh(self, force: bool = False) -> None:
        stamp = file_stamp(self.path)
        if stamp is None:
            self._keys, self._stamp = {}, None
        elif force or stamp != self._stamp:
            self._keys = {e["kid"]: _from_json(e) for e in json.loads(self.path.read_text())}
            self._stamp = stamp

    def _write(self, keys: list[SigningKey]) -> None:
        write_key_file(self.path, [_to_json(k) for k in keys])
        self._refresh(force=True)

    def _locked(self) -> AbstractContextManager[None]:
        return key_file_lock(self.path.parent)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """What changes when a key file is rewritten (None: no file yet)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def write_key_file(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace a key file atomically, readable by its owner only (0600 in a 0700 directory)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(entries, out, indent=1)
    os.replace(tmp, path)


@contextmanager
def key_file_lock(directory: Path) -> Iterator[None]:
    """Hold the key directory's lock: processes that start together must agree on one first key."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(directory / ".keys.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_RINGS: dict[Path, KeyRing] = {}


def keyring(settings: Settings) -> KeyRing:
    """The process's key ring for the settings' key directory (one per directory)."""
    directory = settings.key_directory.resolve()
    ring = _RINGS.get(directory)
    if ring is None:
        ring = _RINGS[directory] = KeyRing(directory)
    return ring


def public_jwk(key: SigningKey) -> dict[str, str]:
    """A key's public half as a JWK (EC P-256, for ES256 signatures)."""
    numbers = key.public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
        "kid": key.kid,
        "alg": ALGORITHM,
        "use": "sig",
    }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_key() -> SigningKey:
    now = datetime.now(UTC)
    kid = f"{now:%Y%m%d}-{secrets.token_hex(4)}"
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), now)


def _to_json(key: SigningKey) -> dict[str, Any]:
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "kid": key.kid,
        "alg": ALGORITHM,
        "created_at": key.created_at.isoformat(),
        "retired_at": key.retired_at.isoformat() if key.retired_at else None,
        "private_key": pem.decode(),
    }


def _from_json(entry: dict[str, Any]) -> SigningKey:
    private = serialization.load_pem_private_key(entry["private_key"].encode(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ValueError(f"key {entry['kid']!r} is not an EC key")
    retired = entry.get("retired_at")
    return SigningKey(
        entry["kid"],
        private,
        datetime.fromisoformat(entry["created_at"]),
        datetime.fromisoformat(retired) if retired else None,
    )
