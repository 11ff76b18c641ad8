"""Payload encryption: what reaches Temporal is ciphertext naming its key; rotation keeps old
payloads readable; a wrong key, a tampered payload or a bad configuration is refused clearly."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from fleetflow.contracts.common import Actor
from fleetflow.errors import StartupError
from fleetflow.keys import KeySetError
from fleetflow.payload_codec import (
    ENCODING,
    KEY_ID,
    REFUSED_ENCODING,
    EncryptionCodec,
    PayloadKeyError,
    PayloadKeys,
    data_converter,
    open_text,
    seal_text,
)
from fleetflow.settings import Settings, load_settings

SECRET = "device-credential-eyJhbGciOiJFUzI1NiJ9"
KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()


def _plain(text: str = SECRET) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())


async def test_encoded_payloads_are_ciphertext_naming_their_key(tmp_path: Path) -> None:
    codec = EncryptionCodec(PayloadKeys(tmp_path))
    [sealed] = await codec.encode([_plain()])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID].decode() == codec.keys.current().kid
    assert SECRET.encode() not in sealed.SerializeToString()
    assert await codec.decode([sealed]) == [_plain()]
    # the same value sealed twice differs (fresh nonce), so equal inputs cannot be spotted
    assert (await codec.encode([_plain()]))[0].data != sealed.data


async def test_unsealed_payloads_are_refused_unless_the_migration_setting_allows_them(
    tmp_path: Path,
) -> None:
    """Whoever reaches Temporal without the platform's codec (its CLI, the Web UI's forms)
    cannot hand a worker a value: the payload comes out of decoding unreadable, so the SDK
    drops such a signal, rejects such an update and fails such a start or activity."""
    converter = data_converter(Settings(keys_dir=tmp_path))
    assert converter.payload_codec is not None
    [refused] = await converter.payload_codec.decode([_plain()])
    assert refused.metadata["encoding"] == REFUSED_ENCODING
    with pytest.raises(KeyError, match="Unknown payload encoding"):
        converter.payload_converter.from_payloads([refused])
    with pytest.raises(KeyError):
        await converter.decode([_plain()])
    # runs begun before encryption: FLEETFLOW_ACCEPT_PLAIN_PAYLOADS lets them finish
    migrating = load_settings(
        {"FLEETFLOW_KEYS_DIR": str(tmp_path), "FLEETFLOW_ACCEPT_PLAIN_PAYLOADS": "true"}
    )
    assert await data_converter(migrating).decode([_plain()]) == [SECRET]
    assert await EncryptionCodec(PayloadKeys(tmp_path), accept_plain=True).decode([_plain()]) == [_plain()]


async def test_rotation_encrypts_with_the_new_key_and_old_payloads_still_decode(tmp_path: Path) -> None:
    keys = PayloadKeys(tmp_path)
    codec = EncryptionCodec(keys)
    [old] = await codec.encode([_plain("old")])
    # another process of the platform rotates: this one notices on its next use
    new_kid = PayloadKeys(tmp_path).rotate().kid
    [new] = await codec.encode([_plain("new")])
    assert new.metadata[KEY_ID].decode() == new_kid != old.metadata[KEY_ID].decode()
    assert await codec.decode([old, new]) == [_plain("old"), _plain("new")]


async def test_key_file_is_private(tmp_path: Path) -> None:
    keys = PayloadKeys(tmp_path)
    keys.current()
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600


async def test_a_payload_of_an_unknown_key_is_refused_naming_the_kid(tmp_path: Path) -> None:
    [sealed] = await EncryptionCodec(PayloadKeys(tmp_path / "one")).encode([_plain()])
    with pytest.raises(PayloadKeyError, match=sealed.metadata[KEY_ID].decode()):
        await EncryptionCodec(PayloadKeys(tmp_path / "other")).decode([sealed])


async def test_tampered_or_relabelled_payloads_are_refused() -> None:
    codec = EncryptionCodec(PayloadKeys(Path("/nonexistent"), f"a:{KEY_A},b:{KEY_B}"))
    [sealed] = await codec.encode([_plain()])
    flipped = Payload(metadata=sealed.metadata, data=sealed.data[:-1] + bytes([sealed.data[-1] ^ 1]))
    with pytest.raises(PayloadKeyError, match="fails authentication"):
        await codec.decode([flipped])
    relabelled = Payload(metadata={**sealed.metadata, KEY_ID: b"b"}, data=sealed.data)
    with pytest.raises(PayloadKeyError, match="fails authentication"):
        await codec.decode([relabelled])


async def test_configured_keys_encrypt_with_the_first_and_decrypt_with_any() -> None:
    first = EncryptionCodec(PayloadKeys(Path("/nonexistent"), f"b:{KEY_B},a:{KEY_A}"))
    [sealed_b] = await first.encode([_plain()])
    assert sealed_b.metadata[KEY_ID] == b"b"
    older = EncryptionCodec(PayloadKeys(Path("/nonexistent"), f"a:{KEY_A}"))
    [sealed_a] = await older.encode([_plain()])
    assert await first.decode([sealed_a, sealed_b]) == [_plain(), _plain()]
    with pytest.raises(KeySetError, match="FLEETFLOW_PAYLOAD_KEYS"):
        first.keys.rotate()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("no-colon", "entry 1 must be kid:base64key"),
        (f"a:{KEY_A},b:not base64!", "entry 2 (b): the key is not base64"),
        (f"a:{base64.b64encode(b'short').decode()}", "entry 1 (a): the key must be 32 bytes"),
        (f"a:{KEY_A},a:{KEY_B}", "entry 2: kid a appears twice"),
    ],
)
def test_bad_payload_key_configuration_is_named_without_the_key(value: str, reason: str) -> None:
    with pytest.raises(StartupError) as refused:
        load_settings({"FLEETFLOW_PAYLOAD_KEYS": value})
    message = str(refused.value)
    assert message.startswith("FLEETFLOW_PAYLOAD_KEYS") and reason in message
    assert KEY_A not in message and KEY_B not in message


async def test_the_platform_converter_round_trips_contracts_through_ciphertext(tmp_path: Path) -> None:
    converter: DataConverter = data_converter(Settings(keys_dir=tmp_path))
    actor = Actor(subject=SECRET, tenant="acme", scopes=["devices:write"])
    payloads = await converter.encode([actor])
    assert all(p.metadata["encoding"] == ENCODING for p in payloads)
    assert SECRET.encode() not in b"".join(p.SerializeToString() for p in payloads)
    assert await converter.decode(payloads, [Actor]) == [actor]


def test_text_sealed_at_rest_opens_for_its_purpose_only(tmp_path: Path) -> None:
    keys = PayloadKeys(tmp_path)
    sealed = seal_text(keys, SECRET, "webhook-secret")
    assert sealed.startswith(f"sealed:{keys.current().kid}:") and SECRET not in sealed
    assert open_text(keys, sealed, "webhook-secret") == SECRET
    with pytest.raises(PayloadKeyError, match="fails authentication"):
        open_text(keys, sealed, "another-use")
    assert open_text(keys, "stored-before-sealing", "webhook-secret") == "stored-before-sealing"
    with pytest.raises(PayloadKeyError, match="lacks"):
        open_text(PayloadKeys(tmp_path / "other"), sealed, "webhook-secret")
