"""DeviceCommand: one command to one device (id `command-{tenant}-{device_id}/{command_id}`).

The command's row (device service) is the truth and every move of it is a conditional update;
this workflow holds the deadlines: never delivered by `expires_at` → `expired`, delivered but
not answered within `timeout_s` → `timed_out`. The API signals `moved` when the device takes or
answers the command, so the run ends at once; a lost signal only delays the end to the next
deadline, where `settle_command` reads what happened. Its history is a few events whatever the
command's size: the name and params stay in the row.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.commands import (
        DEVICE_COMMAND_FINISHED,
        TERMINAL_STATUSES,
        CommandInput,
        CommandState,
        SettleCommand,
    )
    from fleetflow.contracts.common import DomainEvent, tenant_scoped_id
    from fleetflow.contracts.events import EventBatch
    from fleetflow.interfaces.device import DeviceActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from workflows import calls
    from workflows.options import STEP_RETRY, STEP_START_TO_CLOSE


def command_workflow_id(tenant: str, device_id: str, command_id: str) -> str:
    """The business id of a command's workflow: tenant, device and command ('/' is in neither id)."""
    return tenant_scoped_id("command", tenant, f"{device_id}/{command_id}")


@workflow.defn
class DeviceCommand:
    """A command's deadlines; signal `moved`, query `state`."""

    def __init__(self) -> None:
        self._state = CommandState(status="pending")

    @workflow.run
    async def run(self, inp: CommandInput) -> CommandState:
        """Wait for delivery until expiry, then for the answer until the timeout."""
        await self._until(inp.expires_at, lambda: self._state.status != "pending")
        if self._state.status == "pending":
            self._state = await self._settle(inp, "expired", "pending")
        if self._state.status == "delivered":
            delivered = self._state.delivered_at or workflow.now()
            await self._until(delivered + timedelta(seconds=inp.timeout_s), self._ended)
            if not self._ended():
                self._state = await self._settle(inp, "timed_out", "delivered")
        await calls.execute(
            NotificationActivities.record_events,
            EventBatch(
                events=[
                    DomainEvent(
                        event_id=f"{workflow.info().workflow_id}/finished",
                        tenant=inp.tenant,
                        device_id=inp.device_id,
                        type=DEVICE_COMMAND_FINISHED,
                        occurred_at=workflow.now(),
                        actor=inp.actor.subject,
                        source_workflow=workflow.info().workflow_id,
                        data={"command_id": inp.command_id, "status": self._state.status},
                    )
                ]
            ),
            start_to_close_timeout=STEP_START_TO_CLOSE,
            retry_policy=STEP_RETRY,
        )
        return self._state

    def _ended(self) -> bool:
        return self._state.status in TERMINAL_STATUSES

    async def _until(self, deadline: datetime, done: Callable[[], bool]) -> None:
        left = (deadline - workflow.now()).total_seconds()
        if left <= 0:
            return
        try:
            await workflow.wait_condition(done, timeout=left)
        except TimeoutError:
            pass

    async def _settle(
        self,
        inp: CommandInput,
        status: Literal["expired", "timed_out"],
        when: Literal["pending", "delivered"],
    ) -> CommandState:
        return await calls.execute(
            DeviceActivities.settle_command,
            SettleCommand(
                tenant=inp.tenant,
                device_id=inp.device_id,
                command_id=inp.command_id,
                status=status,
                when=when,
            ),
            start_to_close_timeout=STEP_START_TO_CLOSE,
            retry_policy=STEP_RETRY,
        )

    @workflow.signal
    def moved(self, state: CommandState) -> None:
        """The device took or answered the command (what its row now says)."""
        order = ("pending", "delivered")
        if self._ended():
            return  # a terminal status stays
        if state.status in TERMINAL_STATUSES or order.index(state.status) >= order.index(self._state.status):
            self._state = state

    @workflow.query
    def state(self) -> CommandState:
        """Where the command stands, as this run knows it."""
        return self._state
