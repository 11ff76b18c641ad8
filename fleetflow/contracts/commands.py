"""Contracts of device commands (durable RPC): the DeviceCommand workflow's input and the device
service's command rows. The API's bodies are in `api/models/commands.py`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from fleetflow.contracts.common import Actor, Contract, TenantId
from fleetflow.contracts.limits import ID_PATTERN, MAX_SPEC_DEPTH

# a command's name: a verb a device understands (`reboot`, `set_interval`, `diag.dump`)
CommandName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")]
CommandId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
MAX_COMMAND_PARAMS_BYTES = 8192
MAX_COMMAND_RESULT_BYTES = 16384
MAX_COMMAND_DEPTH = 16
MAX_COMMAND_TIMEOUT_S = 86400
MAX_COMMAND_EXPIRES_S = 30 * 86400
MAX_COMMAND_WAIT_S = 60

CommandStatus = Literal["pending", "delivered", "succeeded", "failed", "expired", "timed_out", "cancelled"]
# pending → delivered → succeeded | failed (the device's answer) | timed_out (no answer in timeout_s);
# pending → expired (never delivered before expires_s); pending | delivered → cancelled (the
# device was decommissioned)
TERMINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "expired", "timed_out", "cancelled")
OPEN_STATUSES: tuple[str, ...] = ("pending", "delivered")
COMMAND_OFFERED_CHANNEL = "device_command_offered"  # NOTIFY payload: {"tenant", "device_id", "command_id"}
COMMAND_SETTLED_CHANNEL = "device_command_settled"  # the same payload, once a command is terminal
DEVICE_COMMAND_FINISHED = "DeviceCommandFinished"


def _too_deep(value: Any, limit: int) -> bool:
    """True when value nests objects/arrays more than limit deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            if level > limit:
                return True
            stack.extend((v, level + 1) for v in (node.values() if isinstance(node, dict) else node))
    return False


def bounded_json(value: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """value, when it nests at most MAX_COMMAND_DEPTH deep and is at most max_bytes as JSON."""
    if _too_deep(value, min(MAX_COMMAND_DEPTH, MAX_SPEC_DEPTH)):
        raise ValueError(f"must nest at most {MAX_COMMAND_DEPTH} levels deep")
    if len(json.dumps(value, separators=(",", ":")).encode()) > max_bytes:
        raise ValueError(f"must be at most {max_bytes} bytes as JSON")
    return value


class CommandSpec(Contract):
    """What an operator asks a device to do (the API's body is its strict form)."""

    name: CommandName
    params: dict[str, Any] = Field(default_factory=dict)
    timeout_s: Annotated[int, Field(ge=1, le=MAX_COMMAND_TIMEOUT_S)] = 30
    expires_s: Annotated[int, Field(ge=1, le=MAX_COMMAND_EXPIRES_S)] = 3600

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        return bounded_json(value, MAX_COMMAND_PARAMS_BYTES)


class CampaignCommand(Contract):
    """The command of a command campaign (FirmwareRollout's machinery): each targeted device
    gets it as one of its commands, and its answer is the device's job outcome."""

    name: CommandName
    params: dict[str, Any] = Field(default_factory=dict)
    timeout_s: Annotated[int, Field(ge=1, le=MAX_COMMAND_TIMEOUT_S)] = 30

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        return bounded_json(value, MAX_COMMAND_PARAMS_BYTES)


class CommandInput(Contract):
    """Input of DeviceCommand (id `command-{tenant}-{device_id}/{command_id}`): ids and the
    deadlines only; the name and params live in the command's row (written before the start)."""

    tenant: TenantId
    device_id: str
    command_id: str
    actor: Actor
    timeout_s: int
    expires_at: datetime
    delivered_at: datetime | None = None  # its answer is due timeout_s after this


class CommandRef(Contract):
    """One command of one device of one tenant."""

    tenant: TenantId
    device_id: str
    command_id: str


class SettleCommand(Contract):
    """Input of `device.settle_command`: end the command with `status` if it is still in `when`."""

    tenant: TenantId
    device_id: str
    command_id: str
    status: Literal["expired", "timed_out"]
    when: Literal["pending", "delivered"]


class CommandState(Contract):
    """Output of `device.settle_command` and the signals: where a command stands."""

    status: CommandStatus
    delivered_at: datetime | None = None


class CommandView(Contract):
    """A command as the operator and the device see it."""

    command_id: str
    device_id: str
    name: str
    params: dict[str, Any]
    status: CommandStatus
    result: dict[str, Any] | None = None
    timeout_s: int
    created_at: datetime
    expires_at: datetime
    delivered_at: datetime | None = None
    finished_at: datetime | None = None
    campaign_id: str | None = None
    workflow_id: str | None = None


class DeviceCommandView(Contract):
    """A command as the device receives it (`GET /v1/device/commands`)."""

    command_id: str
    name: str
    params: dict[str, Any]
    timeout_s: int
    expires_at: datetime
    delivered_at: datetime | None = None  # its answer is due timeout_s after this
