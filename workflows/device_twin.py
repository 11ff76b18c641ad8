"""DeviceTwin: one long-running entity workflow per device (id `twin-{tenant}-{device_id}`).

Desired state is written at once (update `set_desired`), the device reports what
it applied (signal `report`), and the delta shows what has not converged yet. The
workflow's history is the twin's event store: replaying it rebuilds any past state.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from fleetflow import config_schema
    from fleetflow.contracts.common import tenant_scoped_id
    from fleetflow.contracts.twin import DesiredSet, EndTwin, ReportState, SetDesired, TwinInput, TwinState
    from fleetflow.twin_state import delta, merge_patch

WRITE_SCOPE = "devices:write"


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
            tenant=inp.tenant, device_id=inp.device_id, desired=inp.initial_desired,
            desired_version=1 if inp.initial_desired else 0, offline_after_s=inp.offline_after_s,
            reported=inp.initial_reported,
        )  # fmt: skip

    @workflow.run
    async def run(self, inp: TwinInput) -> TwinState:
        """Live until ended; continue as new, carrying the state, before the history grows large."""
        state = self._current()
        await workflow.wait_condition(lambda: state.ended or self._history_full(inp))
        await workflow.wait_condition(workflow.all_handlers_finished)
        if not state.ended:
            workflow.continue_as_new(inp.model_copy(update={"state": state}))
        return state

    def _history_full(self, inp: TwinInput) -> bool:
        info = workflow.info()
        return info.get_current_history_length() >= inp.history_limit or info.is_continue_as_new_suggested()

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
        try:
            config_schema.validate(merge_patch(state.desired, request.patch), self._schema, "desired")
        except config_schema.ConfigError as exc:
            raise ApplicationError(str(exc), exc.path, exc.reason, type="InvalidDocument") from None

    @workflow.signal
    def report(self, report: ReportState) -> None:
        """The device reports what it applied (and that it is alive)."""
        state = self._current()
        if state.ended:
            return
        state.reported = merge_patch(state.reported, report.patch)
        state.reported_version += 1
        if state.last_seen is None or report.at > state.last_seen:
            state.last_seen = report.at

    @workflow.signal
    def end(self, request: EndTwin) -> None:
        """The device is retired: the twin completes with its final state."""
        state = self._current()
        state.ended, state.end_reason = True, request.reason
