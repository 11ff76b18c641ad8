"""Workflow and activity payloads encrypted with AES-256-GCM before they reach Temporal.

Device credentials, configurations and everything else a workflow carries sit in Temporal's
history only as ciphertext; the Web UI shows them to an operator through the API's /codec
endpoint. Each payload names the key that sealed it (`encryption-key-id`), so a rotated key
keeps decrypting what it sealed while the newest key seals from now on.

An unsealed payload is refused: whoever reaches Temporal without the platform's codec (its
CLI, the Web UI's start and signal forms, a client of its own) cannot hand a worker input.
Decoding turns it into a payload no converter reads (`REFUSED_ENCODING`), so the SDK drops
such a signal, rejects such an update and fails such a start or activity, and nothing it
carried reaches workflow code. Runs begun before encryption carry unsealed payloads in their
histories: FLEETFLOW_ACCEPT_PLAIN_PAYLOADS=true lets them pass while those runs finish (a
migration setting; off by default).

Keys come from FLEETFLOW_PAYLOAD_KEYS (`kid:base64key,...`, the first one encrypts) or, when
that is unset, from `payload-keys.json` in the key directory, made on first use and shared
by every process of a platform like the signing keys. The same keys seal secrets a service
must keep at rest (`seal_text`, e.g. webhook secrets).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec

from fleetflow.errors import Refusal
from fleetflow.keys import KeySetError, file_stamp, key_file_lock, write_key_file
from fleetflow.settings import Settings, parse_payload_keys

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEYS_FILE = "payload-keys.json"
NONCE_BYTES = 12
log = logging.getLogger(__name__)
REFUSED_ENCODING = b"binary/unsealed-refused"
REFUSED_NOTE = "fleetflow-refused"


class PayloadKeyError(Refusal, ValueError):
    """A payload that cannot be decrypted: its key is unknown here, or it was tampered with."""


@dataclass(frozen=True)
class PayloadKey:
    """One AES-256-GCM key."""

    kid: str
    secret: bytes = dataclasses.field(repr=False)

    @functools.cached_property
    def _aead(self) -> AESGCM:
        # made once per key: a history replay opens thousands of payloads
        return AESGCM(self.secret)

    def seal(self, plain: bytes, purpose: str = "") -> bytes:
        """nonce || ciphertext+tag; the kid (and purpose) are authenticated too, so a payload
        cannot be relabelled to another key, nor a sealed value moved to another use."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plain, (self.kid + purpose).encode())

    def open(self, sealed: bytes, purpose: str = "") -> bytes:
        """The plaintext of seal()'s output; PayloadKeyError when it does not authenticate."""
        try:
            aad = (self.kid + purpose).encode()
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        except InvalidTag:
            raise PayloadKeyError(f"a payload sealed with key {self.kid!r} fails authentication") from None


class PayloadKeys:
    """The payload keys: configured ones, or the key directory's file (re-read when it changes)."""

    def __init__(self, directory: Path, configured: str | None = None) -> None:
        self.path = directory / KEYS_FILE
        self.configured = configured is not None
        self._keys: list[PayloadKey] = (
            [PayloadKey(kid, secret) for kid, secret in parse_payload_keys(configured)]
            if configured is not None
            else []
        )
        self._by_kid = {k.kid: k for k in self._keys}
        self._stamp: tuple[int, int] | None = None

    def keys(self) -> list[PayloadKey]:
        """Every key, the encrypting one first."""
        self._refresh()
        return list(self._keys)

    def current(self) -> PayloadKey:
        """The key that encrypts; the first key is made when there is none."""
        self._refresh()
        if self._keys:
            return self._keys[0]
        with key_file_lock(self.path.parent):
            self._refresh(force=True)
            if not self._keys:
                self._write([_new_key()])
        return self.current()

    def get(self, kid: str) -> PayloadKey | None:
        """The key with that kid, if this process has it. Payload keys are never withdrawn, so
        a key once read needs no look at the file (a replay opens thousands of payloads)."""
        key = self._by_kid.get(kid)
        if key is None and not self.configured:  # another process may have rotated a moment ago
            self._refresh(force=True)
            key = self._by_kid.get(kid)
        return key

    def rotate(self) -> PayloadKey:
        """A new key that encrypts from now on; the older ones keep decrypting."""
        if self.configured:
            raise KeySetError(
                "payload keys come from FLEETFLOW_PAYLOAD_KEYS: put a new kid:key first in it instead"
            )
        with key_file_lock(self.path.parent):
            self._refresh(force=True)
            key = _new_key()
            self._write([key, *self._keys])
        return key

    def _refresh(self, force: bool = False) -> None:
        if self.configured:
            return
        stamp = file_stamp(self.path)
        if stamp is None:
            self._keys, self._stamp = [], None
        elif force or stamp != self._stamp:
            entries = json.loads(self.path.read_text())
            self._keys = [PayloadKey(e["kid"], base64.b64decode(e["key"])) for e in entries]
            self._by_kid = {k.kid: k for k in self._keys}
            self._stamp = stamp

    def _write(self, keys: list[PayloadKey]) -> None:
        now = datetime.now(UTC).isoformat()
        write_key_file(
            self.path,
            [
                {"kid": k.kid, "alg": "A256GCM", "key": base64.b64encode(k.secret).decode(), "saved_at": now}
                for k in keys
            ],
        )
        self._refresh(force=True)


class EncryptionCodec(PayloadCodec):
    """Seals every payload with the current key; opens what any known key sealed; refuses
    unsealed payloads unless `accept_plain` (the migration setting)."""

    def __init__(self, keys: PayloadKeys, *, accept_plain: bool = False) -> None:
        self.keys = keys
        self.accept_plain = accept_plain

    def for_reading(self) -> EncryptionCodec:
        """The same keys, letting unsealed payloads through as they are: for showing
        payloads to an operator (the Web UI's /codec), never for a worker's input."""
        return EncryptionCodec(self.keys, accept_plain=True)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload (its metadata and data together)."""
        key = self.keys.current()
        kid = key.kid.encode()
        return [
            Payload(metadata={"encoding": ENCODING, KEY_ID: kid}, data=key.seal(p.SerializeToString()))
            for p in payloads
        ]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt the encrypted payloads; others come back refused (unreadable), or as they
        are when plain payloads are accepted."""
        out: list[Payload] = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                out.append(payload if self.accept_plain else _refused(payload))
                continue
            kid = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
            key = self.keys.get(kid)
            if key is None:
                raise PayloadKeyError(
                    f"a payload is sealed with payload key {kid!r}, which this process does not have"
                )
            out.append(Payload.FromString(key.open(payload.data)))
        return out


def _refused(payload: Payload) -> Payload:
    """An unsealed payload made unreadable: no payload converter knows REFUSED_ENCODING, so
    converting it fails where its value would have been used. Not raised here: a decode
    error fails the whole workflow task, again on every retry, and one unsealed signal would
    then stop its workflow for good."""
    log.warning("an unsealed payload was refused (FLEETFLOW_ACCEPT_PLAIN_PAYLOADS is off)")
    note = b"unsealed payload refused: only the platform's clients may send input"
    return Payload(metadata={"encoding": REFUSED_ENCODING, REFUSED_NOTE: note}, data=payload.data)


SEALED = "sealed:"


def seal_text(keys: PayloadKeys, plain: str, purpose: str) -> str:
    """plain sealed for storage at rest, as `sealed:<kid>:<base64>`; purpose (say
    "webhook-secret") is authenticated with it."""
    key = keys.current()
    return f"{SEALED}{key.kid}:{base64.b64encode(key.seal(plain.encode(), purpose)).decode()}"


def open_text(keys: PayloadKeys, stored: str, purpose: str) -> str:
    """What seal_text sealed; a value stored before sealing comes back as it is."""
    if not stored.startswith(SEALED):
        return stored
    kid, _, data = stored.removeprefix(SEALED).partition(":")
    key = keys.get(kid)
    if key is None:
        raise PayloadKeyError(f"a stored value is sealed with payload key {kid!r}, which this process lacks")
    return key.open(base64.b64decode(data), purpose).decode()


_KEYS: dict[tuple[Path, str | None], PayloadKeys] = {}


def payload_keys(settings: Settings) -> PayloadKeys:
    """The process's payload keys for these settings (one set per key directory)."""
    place = (settings.key_directory.resolve(), settings.payload_keys)
    keys = _KEYS.get(place)
    if keys is None:
        keys = _KEYS[place] = PayloadKeys(*place)
    return keys


def data_converter(settings: Settings) -> DataConverter:
    """The platform's converter: pydantic values, encrypted payloads, and failures whose
    message and stack trace travel encrypted too."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(payload_keys(settings), accept_plain=settings.accept_plain_payloads),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def _new_key() -> PayloadKey:
    return PayloadKey(f"{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}", AESGCM.generate_key(256))
