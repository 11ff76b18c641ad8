"""Tokens and the key ring: what is accepted, what is refused and why, rotation and retirement."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from fleetflow.keys import KeyRing, KeySetError
from fleetflow.security import (
    AuthError,
    ServiceActor,
    ServiceCall,
    _sign,
    issue_device_credential,
    issue_service_token,
    issue_token,
    verify_device_credential,
    verify_service_token,
    verify_token,
)

MINUTE = timedelta(minutes=1)


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(tmp_path / "keys")


def _token(ring: KeyRing, **overrides: object) -> str:
    args: dict[str, object] = {"subject": "op", "tenant": "acme", "scopes": ["devices:read"], "ttl": MINUTE}
    return issue_token(ring, **(args | overrides))  # type: ignore[arg-type]


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_valid_token_gives_its_claims(ring: KeyRing) -> None:
    claims = verify_token(ring, _token(ring))
    assert (claims.subject, claims.tenant, claims.scopes) == ("op", "acme", ("devices:read",))
    header = jwt.get_unverified_header(_token(ring))
    assert header["alg"] == "ES256" and header["kid"] == ring.signing_key().kid


def test_the_key_file_is_private(ring: KeyRing) -> None:
    ring.signing_key()
    assert ring.path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ring: "not-a-jwt", "malformed"),
        (lambda ring: "a.b.c", "malformed"),
        (lambda ring: _token(ring, ttl=timedelta(seconds=-1)), "expired"),
        (lambda ring: _token(ring, issuer="someone-else"), "issuer"),
        (lambda ring: _token(KeyRing(ring.path.parent / "other")), "unknown or retired key"),
    ],
    ids=["garbage", "three-dots", "expired", "wrong-issuer", "foreign-key"],
)
def test_refused_tokens_say_why(ring: KeyRing, make: object, reason: str) -> None:
    with pytest.raises(AuthError, match=reason):
        verify_token(ring, make(ring))  # type: ignore[operator]


def test_wrong_audience_is_refused(ring: KeyRing) -> None:
    now = datetime.now(UTC)
    credential = issue_device_credential(
        ring, tenant="acme", device_id="d1", jti="j1", issued_at=now, expires_at=now + MINUTE
    )
    with pytest.raises(AuthError, match="audience"):
        verify_token(ring, credential)
    with pytest.raises(AuthError, match="audience"):
        verify_device_credential(ring, _token(ring))


def test_alg_none_is_refused(ring: KeyRing) -> None:
    claims = jwt.decode(_token(ring), options={"verify_signature": False})
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': ring.signing_key().kid})}.{_b64(claims)}."
    with pytest.raises(AuthError, match="algorithm 'none'"):
        verify_token(ring, unsigned)


def test_hs256_signed_with_the_public_key_is_refused(ring: KeyRing) -> None:
    key = ring.signing_key()
    public_pem = key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = jwt.decode(_token(ring), options={"verify_signature": False})
    # the classic confusion attack: the public key used as an HMAC secret
    forged = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': key.kid})}.{_b64(claims)}"
    signature = hmac.new(public_pem, forged.encode(), hashlib.sha256).digest()
    forged += "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    with pytest.raises(AuthError, match="algorithm 'HS256'"):
        verify_token(ring, forged)


def test_a_tampered_claim_breaks_the_signature(ring: KeyRing) -> None:
    header, _, signature = _token(ring).split(".")
    claims = jwt.decode(_token(ring), options={"verify_signature": False}) | {"tenant": "globex"}
    with pytest.raises(AuthError, match="signature"):
        verify_token(ring, f"{header}.{_b64(claims)}.{signature}")


def test_unknown_scopes_and_malformed_tenants_cannot_be_issued(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        _token(ring, scopes=["root"])
    with pytest.raises(ValueError, match="tenant"):
        _token(ring, tenant="Acme Corp")


def test_a_signed_token_with_a_malformed_tenant_is_refused(ring: KeyRing) -> None:
    claims = jwt.decode(_token(ring), options={"verify_signature": False}) | {"tenant": "x'; DROP"}
    with pytest.raises(AuthError, match="tenant"):
        verify_token(ring, _sign(ring, claims))


def test_rotation_keeps_old_tokens_until_their_key_is_retired(ring: KeyRing) -> None:
    old_token = _token(ring)
    old_kid = ring.signing_key().kid
    new = ring.rotate()
    assert ring.signing_key().kid == new.kid != old_kid
    assert verify_token(ring, old_token).subject == "op"
    new_token = _token(ring)
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid
    ring.retire(old_kid)
    with pytest.raises(AuthError, match="unknown or retired key"):
        verify_token(ring, old_token)
    assert verify_token(ring, new_token).subject == "op"


def test_another_process_sees_a_rotation_and_a_retirement(ring: KeyRing) -> None:
    token = _token(ring)
    other = KeyRing(ring.path.parent)  # what the CLI holds while the API runs
    assert verify_token(other, token).tenant == "acme"
    old_kid = ring.signing_key().kid
    other.rotate()
    other.retire(old_kid)
    with pytest.raises(AuthError, match="retired"):
        verify_token(ring, token)


def test_the_signing_key_cannot_be_retired(ring: KeyRing) -> None:
    with pytest.raises(KeySetError, match="rotate first"):
        ring.retire(ring.signing_key().kid)
    with pytest.raises(KeySetError, match="no key"):
        ring.retire("nope")


def test_device_credentials_are_deterministic_per_key(ring: KeyRing) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    args = {
        "tenant": "acme",
        "device_id": "d1",
        "jti": "j1",
        "issued_at": now,
        "expires_at": now + timedelta(days=3650),
    }
    credential = issue_device_credential(ring, **args)  # type: ignore[arg-type]
    first_kid = ring.signing_key().kid
    ring.rotate()
    # re-issued with the key that signed it first: the same token, so the stored hash matches
    assert credential == issue_device_credential(ring, kid=first_kid, **args)  # type: ignore[arg-type]
    assert credential != issue_device_credential(ring, **args)  # type: ignore[arg-type]
    assert verify_device_credential(ring, credential).device_id == "d1"


def test_service_tokens_are_checked_at_a_given_time(ring: KeyRing) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    actor = ServiceActor(subject="op", tenant="acme", scopes=("devices:write",))
    token = issue_service_token(ring, service="api", actor=actor, now=start)
    identity = verify_service_token(ring, token, at=start + MINUTE)
    assert (identity.service, identity.actor) == ("api", actor)
    with pytest.raises(AuthError, match="expired"):
        verify_service_token(ring, token, at=start + timedelta(hours=1))
    with pytest.raises(AuthError, match="audience"):
        verify_service_token(ring, _token(ring))


def _call(**overrides: object) -> ServiceCall:
    args: dict[str, object] = {"workflow_id": "twin-acme-d1", "ops": ("signal:report",)}
    return ServiceCall.model_validate(args | overrides)


def test_a_service_token_is_good_only_for_the_call_it_was_made_for(ring: KeyRing) -> None:
    """A header copied out of one history is refused for another workflow, operation, run
    or update."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    actor = ServiceActor(subject="op", tenant="acme")
    made_for = _call(run_id="run-1", update_id="u-1", ops=("update:set_desired",))
    token = issue_service_token(ring, service="api", actor=actor, call=made_for, now=start)
    assert verify_service_token(ring, token, at=start, call=made_for).actor == actor
    for other, reason in [
        (made_for.model_copy(update={"workflow_id": "twin-acme-d2"}), "another workflow"),
        (made_for.model_copy(update={"ops": ("update:cancel",)}), "not update:cancel"),
        (made_for.model_copy(update={"run_id": "run-2"}), "another run"),
        (made_for.model_copy(update={"update_id": "u-2"}), "another update"),
    ]:
        with pytest.raises(AuthError, match=reason):
            verify_service_token(ring, token, at=start, call=other)
    # signal-with-start: one header, good for both of its operations
    both = _call(ops=("start:EventDelivery", "signal:nudge"))
    token = issue_service_token(ring, service="api", actor=actor, call=both, now=start)
    verify_service_token(ring, token, at=start, call=_call(ops=("signal:nudge",)))


def test_a_late_message_gets_the_delivery_grace_but_an_unbound_token_does_not(ring: KeyRing) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    actor = ServiceActor(subject="op")
    late, grace = start + timedelta(hours=2), timedelta(hours=24)
    bound = issue_service_token(ring, service="api", actor=actor, call=_call(), now=start)
    verify_service_token(ring, bound, at=late, grace=grace, call=_call())
    with pytest.raises(AuthError, match="expired"):
        verify_service_token(ring, bound, at=start + grace + timedelta(hours=1), grace=grace, call=_call())
    # a token of the release before calls were bound: taken until it expires, never after
    legacy = issue_service_token(ring, service="api", actor=actor, now=start)
    verify_service_token(ring, legacy, at=start + MINUTE, call=_call())
    with pytest.raises(AuthError, match="expired"):
        verify_service_token(ring, legacy, at=late, grace=grace, call=_call())


def test_a_retired_key_still_verifies_what_the_server_took_before_its_retirement(ring: KeyRing) -> None:
    """An activity retry or a replay is judged at the moment the server first took the call:
    a key retired after that moment does not fail it; anything taken after is refused."""
    old = ring.signing_key()
    scheduled = datetime.now(UTC) - MINUTE
    token = issue_service_token(
        ring, service="wf", actor=ServiceActor(subject="op"), call=_call(), now=scheduled
    )
    ring.rotate()
    ring.retire(old.kid)
    assert verify_service_token(ring, token, at=scheduled, call=_call()).service == "wf"
    with pytest.raises(AuthError, match="retired"):
        verify_service_token(ring, token, at=datetime.now(UTC) + timedelta(seconds=1), call=_call())
    with pytest.raises(AuthError, match="retired"):
        verify_service_token(ring, token, call=_call())  # now
