"""Webhook signatures are Standard Webhooks: the reference verifier (`standardwebhooks`) accepts
them, for a `whsec_` secret and for a plain one, with either secret during a rotation, and
refuses a replay once its timestamp is old or altered."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from fleetflow.webhook_signing import secret_key, signed_headers, verify

BODY = b'{"event_id":"e-1","type":"AlertRaised"}'
PLAIN = "plain-secret-of-some-length"
WHSEC = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(("secret", "verifier"), [(WHSEC, Webhook(WHSEC)), (PLAIN, Webhook(PLAIN.encode()))])
def test_the_reference_verifier_accepts_our_signature(secret: str, verifier: Webhook) -> None:
    headers = signed_headers([secret], "acme/e-1", BODY)
    assert verifier.verify(BODY, headers) == {"event_id": "e-1", "type": "AlertRaised"}
    assert verify(secret, headers, BODY)


def test_both_secrets_verify_during_a_rotation() -> None:
    headers = signed_headers([WHSEC, PLAIN], "acme/e-1", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(WHSEC).verify(BODY, headers)
    Webhook(PLAIN.encode()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(BODY, headers)


def test_a_replayed_or_altered_delivery_is_refused() -> None:
    old = signed_headers([WHSEC], "acme/e-1", BODY, now=time.time() - 3600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(WHSEC).verify(BODY, old)
    assert not verify(WHSEC, old, BODY)
    fresh = signed_headers([WHSEC], "acme/e-1", BODY)
    restamped = {**old, "webhook-timestamp": fresh["webhook-timestamp"]}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(WHSEC).verify(BODY, restamped)
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(BODY + b" ", fresh)
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(BODY, {**fresh, "webhook-id": "other/e-1"})


def test_a_whsec_secret_must_decode() -> None:
    assert secret_key(WHSEC) == b"k" * 32
    with pytest.raises(ValueError, match="base64"):
        secret_key("whsec_not*base64!")
    with pytest.raises(ValueError, match="16 bytes"):
        secret_key("whsec_" + base64.b64encode(b"short").decode())


@pytest.mark.parametrize("stored", ["whsec_not base64 at all!", "whsec_c2hvcnQta2V5"])
def test_a_stored_whsec_secret_that_does_not_decode_still_signs_with_its_bytes(stored: str) -> None:
    """Secrets stored before the API checked `whsec_` (any 16 characters) keep signing, as their
    UTF-8 bytes (what they signed with before); an error would hold the queue, uncounted."""
    headers = signed_headers([stored], "acme/e-1", BODY)
    assert Webhook(stored.encode()).verify(BODY, headers) == {"event_id": "e-1", "type": "AlertRaised"}
    assert verify(stored, headers, BODY)
