"""Bodies and views of device commands (`/v1/devices/{id}/commands`, `/v1/device/commands`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from api.models.base import STRICT, Body, View
from fleetflow.contracts.commands import (
    MAX_COMMAND_RESULT_BYTES,
    CommandId,
    CommandSpec,
    CommandView,
    DeviceCommandView,
    bounded_json,
)


class CommandBody(CommandSpec):
    """Body of `POST /v1/devices/{id}/commands`; `command_id` (optional) makes a retry of the
    same request find its first command instead of sending a second."""

    model_config = STRICT

    command_id: CommandId | None = None


class CommandResultBody(Body):
    """Body of `POST /v1/device/commands/{command_id}/result`: the device's answer."""

    status: Literal["succeeded", "failed"]
    result: dict[str, Any] = Field(default_factory=dict)

    @field_validator("result")
    @classmethod
    def _result(cls, value: dict[str, Any]) -> dict[str, Any]:
        return bounded_json(value, MAX_COMMAND_RESULT_BYTES)


class CommandPage(View):
    """A page of a device's commands, newest first; `next` is the cursor of the next page."""

    items: list[CommandView]
    next: str | None = None


class DeviceCommands(View):
    """What `GET /v1/device/commands` hands the device: its commands to run now (maybe none)."""

    commands: Annotated[list[DeviceCommandView], Field(default_factory=list)]
