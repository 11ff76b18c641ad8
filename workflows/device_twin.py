"""DeviceTwin: one long-running entity workflow per device (id `twin-{tenant}-{device_id}`).

Desired state is written at once (update `set_desired`), the device reports what
it applied (signal `report`), and the delta shows what has not converged yet. The
workflow's history is the twin's event store: replaying it rebuilds any past state.

The device's long-poll is the update `wait_for_delta`: it completes when there is a delta
(or at its timeout), one waiter per device. Documents stay within the limits of
fleetflow.contracts.twin, so no event of this history carries more than one document (an
update or signal) or the whole bounded state (continue-as-new, the result).
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from fleetflow import config_schema
    from fleetflow.contracts.common import tenant_scoped_id
    from fleetflow.contracts.twin import (
        DeltaView,
        DesiredSet,
        EndTwin,
        ReportState,
        SetDesired,
        TwinInput,
        TwinState,
        WaitForDelta,
    )
    from fleetflow.temporal import REPORTED_FIRMWARE
    from fleetflow.twin_state import change_breach, delta, merge_patch

WRITE_SCOPE = "devices:write"
# the continue-as-new input carries the state only (not the initial documents it replaced)
LEAN_CONTINUE_AS_NEW = "twin-continue-as-new-state-only"
# a report that would take the twin past its limits is dropped (the API refuses it first)
REPORT_LIMITS = "twin-report-limits"
# the reported firmware version is a search attribute (reconciliation reads it from visibility)
FIRMWARE_ATTRIBUTE = "twin-reported-firmware-attribute"
FIRMWARE_ATTRIBUTE_MAX = 128  # longer (or not a string): no attribute, reconciliation asks the twin


def twin_id(tenant: str, device_id: str) -> str:
    """The business id of a device's twin."""
    return tenant_scoped_id("twin", tenant, device_id)


@workflow.defn
class DeviceTwin:
    """The twin; query `get`, update `set_desired`, signals `report` and `end`."""

    @workflow.init
    def __init__(self, inp: TwinInput) -> None:
        # set before any handler runs, so an update delivered with the start sees the state
        self._schema = inp.config_schema
        self._state: TwinState | None = inp.state or TwinState(
            tenant=inp.tenant,
            device_id=inp.device_id,
            desired=inp.initial_desired,
            desired_version=1 if inp.initial_desired else 0,
            offline_after_s=inp.offline_after_s,
            reported=inp.initial_reported,
        )
        self._waiting = False  # a wait_for_delta is in flight
        self._released: str | None = None  # the waiter_id of a wait whose device hung up
        self._closing = False  # the run is about to end or continue as new

    @workflow.run
    async def run(self, inp: TwinInput) -> TwinState:
        """Live until ended; continue as new, carrying the state, before the history grows large."""
        state = self._current()
        self._publish_firmware()
        await workflow.wait_condition(lambda: state.ended or self._history_full(inp))
        self._closing = True  # a waiting long-poll answers now, so the handlers can finish
        await workflow.wait_condition(workflow.all_handlers_finished)
        if not state.ended:
            carried: dict[str, Any] = {"state": state}
            if workflow.patched(LEAN_CONTINUE_AS_NEW):
                carried.update(initial_desired={}, initial_reported={})
            workflow.continue_as_new(inp.model_copy(update=carried))
        return state

    def _history_full(self, inp: TwinInput) -> bool:
        info = workflow.info()
        return info.get_current_history_length() >= inp.history_limit or info.is_continue_as_new_suggested()

    def _publish_firmware(self) -> None:
        """Keep the ReportedFirmware search attribute equal to the reported firmware version
        (a run continued as new inherits it, so only a change costs an event)."""
        if not workflow.patched(FIRMWARE_ATTRIBUTE):
            return
        reported = self._current().reported.get("firmware_version")
        value = reported if isinstance(reported, str) and len(reported) <= FIRMWARE_ATTRIBUTE_MAX else None
        if workflow.info().typed_search_attributes.get(REPORTED_FIRMWARE) == value:
            return
        update = REPORTED_FIRMWARE.value_set(value) if value is not None else REPORTED_FIRMWARE.value_unset()
        workflow.upsert_search_attributes([update])

    def _current(self) -> TwinState:
        assert self._state is not None
        return self._state

    @workflow.query
    def get(self) -> TwinState:
        """The twin's state."""
        return self._current()

    @workflow.update
    def set_desired(self, request: SetDesired) -> DesiredSet:
        """Merge the patch into desired; returns the new version and the delta."""
        state = self._current()
        state.desired = merge_patch(state.desired, request.patch)
        state.desired_version += 1
        return DesiredSet(version=state.desired_version, delta=delta(state.desired, state.reported))

    @set_desired.validator
    def _check_desired(self, request: SetDesired) -> None:
        state = self._current()
        if state.ended:
            raise ApplicationError("the twin has ended", type="TwinEnded")
        if request.actor.tenant != state.tenant or not request.actor.can(WRITE_SCOPE):
            raise ApplicationError(f"the {WRITE_SCOPE} scope of this tenant is required", type="Forbidden")
        if request.expected_version is not None and request.expected_version != state.desired_version:
            raise ApplicationError(
                f"desired is at version {state.desired_version}, not {request.expected_version}",
                type="StaleVersion",
            )
        desired = merge_patch(state.desired, request.patch)
        breach = change_breach(state, desired, state.reported)
        if breach is not None:
            raise ApplicationError(str(breach.reason), breach.what, breach.limit, type="TooLarge")
        try:
            config_schema.validate(desired, self._schema, "desired")
        except config_schema.ConfigError as exc:
            raise ApplicationError(str(exc), exc.path, exc.reason, exc.loc, type="InvalidDocument") from None

    @workflow.update
    async def wait_for_delta(self, request: WaitForDelta) -> DeltaView:
        """The device's long-poll: completes when there is a delta, at the timeout, or when the run
        is about to continue as new (the caller then asks the next run)."""
        state = self._current()
        self._waiting = True
        try:
            await workflow.wait_condition(
                lambda: (
                    bool(delta(state.desired, state.reported))
                    or state.ended
                    or self._closing
                    or (bool(request.waiter_id) and self._released == request.waiter_id)
                ),
                timeout=request.timeout_s,
            )
        except TimeoutError:
            pass
        finally:
            self._waiting = False
        return DeltaView(delta=delta(state.desired, state.reported), desired_version=state.desired_version)

    @wait_for_delta.validator
    def _check_waiter(self, request: WaitForDelta) -> None:
        # a refused update leaves no trace in the history: a polling storm costs it nothing
        state = self._current()
        if request.tenant != state.tenant or request.device_id != state.device_id:
            raise ApplicationError("only the device itself may wait on its twin", type="Forbidden")
        if state.ended:
            raise ApplicationError("the twin has ended", type="TwinEnded")
        if self._closing:
            raise ApplicationError("the twin is continuing as new: ask again", type="Restarting")
        if self._waiting:
            raise ApplicationError("this device already has a long-poll waiting", type="WaiterBusy")

    @workflow.signal
    def release_wait(self, waiter_id: str) -> None:
        """The device of a waiting long-poll hung up: its wait ends, so the device may wait again."""
        self._released = waiter_id

    @workflow.signal
    def report(self, report: ReportState) -> None:
        """The device reports what it applied (and that it is alive)."""
        state = self._current()
        if state.ended:
            return
        reported = merge_patch(state.reported, report.patch)
        # runs that took reports before the limits existed replay them as they were
        breach = change_breach(state, state.desired, reported) if workflow.patched(REPORT_LIMITS) else None
        if breach is not None:
            # the API refuses such a report; this one raced another change past the limit
            workflow.logger.warning("report dropped: %s %s", breach.what, breach.reason)
        else:
            state.reported = reported
            state.reported_version += 1
            if "firmware_version" in report.patch:
                self._publish_firmware()
        if state.last_seen is None or report.at > state.last_seen:
            state.last_seen = report.at

    @workflow.signal
    def end(self, request: EndTwin) -> None:
        """The device is retired: the twin completes with its final state."""
        state = self._current()
        state.ended, state.end_reason = True, request.reason
