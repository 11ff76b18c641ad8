"""A device's MQTT login: client id = username = device id, password = its device credential
(valid signature and expiry, not revoked, its device not retired). Shared by the embedded
gateway and the broker hooks of the API (`POST /v1/mqtt/auth`)."""

from __future__ import annotations

import asyncpg

from activities.devices import DeviceService
from fleetflow.contracts.devices import DeviceStatus
from fleetflow.keys import keyring
from fleetflow.security import AuthError, DeviceClaims, verify_device_credential
from fleetflow.settings import Settings

CONNECTING_DEVICES = (DeviceStatus.PENDING, DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE)


class LoginUnavailable(Exception):
    """The database could not be asked: neither allowed nor refused."""


async def device_login(
    settings: Settings, devices: DeviceService, client_id: str, username: str | None, password: bytes | None
) -> tuple[DeviceClaims, str] | None:
    """(claims, credential) when the device may connect; None when it may not."""
    if password is None or username is None:
        return None
    try:
        token = password.decode()
        claims = verify_device_credential(keyring(settings), token, settings.jwt_issuer)
    except (AuthError, UnicodeDecodeError):
        return None
    if username != claims.device_id or client_id != claims.device_id:
        return None
    try:
        if not await devices.credential_active(claims.tenant, claims.device_id, claims.jti, token):
            return None
        device = await devices.get_device(claims.tenant, claims.device_id)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise LoginUnavailable(str(exc)) from None
    if device is None or device.status not in CONNECTING_DEVICES:
        return None
    return claims, token
