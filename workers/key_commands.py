"""`fleetflow keys`: list, rotate and retire the platform's signing (and payload) keys."""

from __future__ import annotations

import argparse

from fleetflow.errors import StartupError
from fleetflow.keys import KeySetError, keyring
from fleetflow.payload_codec import payload_keys
from fleetflow.settings import Settings


def keys_command(settings: Settings, args: argparse.Namespace) -> int:
    """Dispatch `fleetflow keys list|rotate|retire`."""
    ring = keyring(settings)
    if args.keys_command == "rotate":
        if args.payload:
            try:
                kid = payload_keys(settings).rotate().kid
            except KeySetError as exc:
                raise StartupError(str(exc)) from None
            print(f"payload key {kid} encrypts from now on; older payload keys keep decrypting")
            return 0
        old = ring.signing_key().kid
        key = ring.rotate()
        print(f"signing key {key.kid} signs from now on")
        print(f"tokens signed by {old} stay valid until `fleetflow keys retire {old}`")
        return 0
    if args.keys_command == "retire":
        try:
            key = ring.retire(args.kid)
        except KeySetError as exc:
            raise StartupError(str(exc)) from None
        print(f"signing key {key.kid} retired: tokens and device credentials it signed are refused")
        return 0
    signing = ring.signing_key().kid
    print(f"{'KID':<20}{'CREATED':<22}STATUS")
    for key in ring.keys():
        state = "signing" if key.kid == signing else "retired" if key.retired_at else "verifying"
        print(f"{key.kid:<20}{key.created_at:%Y-%m-%d %H:%M:%SZ}  {state}")
    payload = payload_keys(settings)
    source = "FLEETFLOW_PAYLOAD_KEYS" if payload.configured else str(payload.path)
    print(f"\npayload keys (AES-256-GCM, from {source}):")
    payload.current()  # made on first use, like the signing key
    for index, pkey in enumerate(payload.keys()):
        print(f"{pkey.kid:<20}{'encrypting' if index == 0 else 'decrypting'}")
    return 0
