"""Service identity inside workflows (see `fleetflow.identity`): the inbound interceptor
checks a workflow's start, signals, updates and queries; the outbound one signs each
activity, child workflow, signal and continue-as-new the workflow schedules. Signing and
verifying run outside the sandbox, as externs `ServiceIdentityInterceptor` registers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from temporalio import worker as temporal_worker
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

from fleetflow.contracts.retention import ScheduledRun, ScheduledRunVerdict
from fleetflow.identity import (
    _SIGN,
    _VERIFY,
    DELIVERY_GRACE,
    HEADER,
    _token_of,
    _with_token,
    actor_mismatch,
    refused,
)
from fleetflow.schedules import SCHEDULABLE, SCHEDULED_BY
from fleetflow.security import ServiceActor, ServiceCall, ServiceIdentity

# how long a scheduled run waits for its schedule to record having started it
SCHEDULED_PROOF_TIMEOUT = timedelta(minutes=2)


def _verify_in_workflow(
    headers: Mapping[str, Payload], at: datetime | None, call: ServiceCall, grace: timedelta = timedelta(0)
) -> ServiceIdentity | str:
    """The verified identity of a call into this workflow, or why it is refused."""
    # cryptography imports lazily; inside the sandbox it must be the host's modules
    with workflow.unsafe.imports_passed_through():
        verdict = workflow.extern_functions()[_VERIFY](
            _token_of(headers), at, call.model_dump(), grace.total_seconds()
        )
    return verdict if isinstance(verdict, str) else ServiceIdentity.model_validate(verdict)


def _message_refusal(
    headers: Mapping[str, Payload],
    op: str,
    args: Sequence[Any],
    update_id: str | None = None,
    grace: timedelta = DELIVERY_GRACE,
) -> str | None:
    """Why a signal or update may not reach its handler (None: it may). Checked at the
    workflow task's time, which replay sees again, so replay gives the same answer."""
    call = ServiceCall(workflow_id=workflow.info().workflow_id, ops=(op,), update_id=update_id)
    verdict = _verify_in_workflow(headers, workflow.now(), call, grace)
    if isinstance(verdict, str):
        return verdict
    return actor_mismatch(args, verdict.actor)


def scheduled_run() -> ScheduledRun | None:
    """This run as a schedule's (its type schedulable, `TemporalScheduledById` set), or None."""
    info = workflow.info()
    schedule_id = info.typed_search_attributes.get(SCHEDULED_BY)
    if info.workflow_type not in SCHEDULABLE or not schedule_id:
        return None
    return ScheduledRun(
        schedule_id=schedule_id,
        workflow_id=info.workflow_id,
        run_id=info.run_id,
        workflow_type=info.workflow_type,
    )


async def prove_scheduled_run(run: ScheduledRun) -> ScheduledRunVerdict:
    """`data.verify_scheduled_run` for this run: the schedule's description must list it."""
    try:
        verdict: ScheduledRunVerdict = await workflow.execute_activity(
            "data.verify_scheduled_run",
            run,
            task_queue="data",
            result_type=ScheduledRunVerdict,
            schedule_to_close_timeout=SCHEDULED_PROOF_TIMEOUT,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=5)
            ),
        )
    except ActivityError as exc:
        raise refused(f"scheduled run of {run.workflow_type} not proved: {exc.cause or exc}") from None
    return verdict


class ScheduledRunProof(temporal_worker.Interceptor):
    """For replayers without the identity interceptor (they hold no signing keys), e.g.
    tests/replay: issues the proof step a scheduled run (one with no identity header) takes
    before its workflow's code, so recorded scheduled runs replay."""

    def workflow_interceptor_class(
        self, input: temporal_worker.WorkflowInterceptorClassInput
    ) -> type[temporal_worker.WorkflowInboundInterceptor]:
        """The inbound interceptor that proves scheduled runs."""
        return _ProvedOnReplay


class _ProvedOnReplay(temporal_worker.WorkflowInboundInterceptor):
    async def execute_workflow(self, input: temporal_worker.ExecuteWorkflowInput) -> Any:
        run = scheduled_run()
        if run is not None and HEADER not in input.headers:
            await prove_scheduled_run(run)
        return await super().execute_workflow(input)


class _CheckedWorkflow(temporal_worker.WorkflowInboundInterceptor):
    identity: ServiceIdentity | None = None

    def init(self, outbound: temporal_worker.WorkflowOutboundInterceptor) -> None:
        super().init(_SigningWorkflow(outbound, self))

    async def execute_workflow(self, input: temporal_worker.ExecuteWorkflowInput) -> Any:
        info = workflow.info()
        call = ServiceCall(workflow_id=info.workflow_id, ops=(f"start:{info.workflow_type}",))
        # judged when the server took the start (`workflow_start_time`), not at the first
        # workflow task (`start_time`): a run accepted while no worker polled for longer than
        # its token lives would otherwise be refused when the workers come back. No patch
        # marker: the two moments give the same verdict to every run but those refused that way
        # (a marker before the workflow's own would also break replays without this interceptor)
        verdict = _verify_in_workflow(input.headers, info.workflow_start_time, call)
        if isinstance(verdict, str):
            scheduled = await self._scheduled_identity()
            if scheduled is None:
                raise refused(f"workflow {info.workflow_type} started without a valid identity: {verdict}")
            verdict = scheduled
        self.identity = verdict
        return await super().execute_workflow(input)

    async def _scheduled_identity(self) -> ServiceIdentity | None:
        """The identity of a run a fleetflow schedule started (fleetflow.schedules), proved by
        the schedule's own description; None when the run is not one (refused as before)."""
        run = scheduled_run()
        if run is None:
            return None
        identity = ServiceIdentity(
            service=f"schedule:{run.schedule_id}", actor=ServiceActor(subject=f"schedule:{run.schedule_id}")
        )
        self.identity = identity  # signs the proof's activity
        try:
            proof = await prove_scheduled_run(run)
        finally:
            self.identity = None
        if not proof.accepted:
            raise refused(f"scheduled run of {run.workflow_type} refused: {proof.reason}")
        return identity

    async def handle_signal(self, input: temporal_worker.HandleSignalInput) -> None:
        reason = _message_refusal(input.headers, f"signal:{input.signal}", input.args)
        if reason is not None:
            # a signal cannot be refused to its sender: it is dropped, and changes nothing
            workflow.logger.warning("signal %s dropped: service identity refused: %s", input.signal, reason)
            return
        await super().handle_signal(input)

    def handle_update_validator(self, input: temporal_worker.HandleUpdateInput) -> None:
        # no delivery grace: the sender waits for the answer, and Temporal deduplicates an
        # update id within one run only, so an update copied from an earlier run's history
        # would be new to a later one. The validator never runs on replay: the handler's
        # check below (with the grace, as before) keeps the verdicts recorded runs reached.
        reason = _message_refusal(
            input.headers, f"update:{input.update}", input.args, input.id, grace=timedelta(0)
        )
        if reason is not None:
            raise refused(f"update {input.update}: {reason}")
        super().handle_update_validator(input)

    async def handle_update_handler(self, input: temporal_worker.HandleUpdateInput) -> Any:
        # again here: an update without a validator is checked only here (the same verdict
        # as the validator's, and on replay too)
        reason = _message_refusal(input.headers, f"update:{input.update}", input.args, input.id)
        if reason is not None:
            raise refused(f"update {input.update}: {reason}")
        return await super().handle_update_handler(input)

    async def handle_query(self, input: temporal_worker.HandleQueryInput) -> Any:
        # the SDK's own queries (__stack_trace, __temporal_workflow_metadata) show code, not data
        if not input.query.startswith("__"):
            call = ServiceCall(workflow_id=workflow.info().workflow_id, ops=(f"query:{input.query}",))
            # a query leaves nothing in history: it is checked against the clock, now
            verdict = _verify_in_workflow(input.headers, None, call)
            if isinstance(verdict, str):
                raise refused(f"query {input.query}: {verdict}")
        return await super().handle_query(input)

    def sign(self, call: ServiceCall) -> str:
        """A token for `call`, naming this workflow and the actor it runs for, at the
        workflow's time."""
        actor = self.identity.actor if self.identity else ServiceActor(subject="unknown")
        service = f"workflow:{workflow.info().workflow_type}"
        with workflow.unsafe.imports_passed_through():
            token: str = workflow.extern_functions()[_SIGN](
                service, actor.model_dump(), workflow.now(), call.model_dump()
            )
        return token


class _SigningWorkflow(temporal_worker.WorkflowOutboundInterceptor):
    def __init__(self, next: temporal_worker.WorkflowOutboundInterceptor, root: _CheckedWorkflow) -> None:
        super().__init__(next)
        self.root = root

    def _sign(
        self, headers: Mapping[str, Payload], workflow_id: str, op: str, run_id: str | None = None
    ) -> dict[str, Payload]:
        return _with_token(
            headers, self.root.sign(ServiceCall(workflow_id=workflow_id, ops=(op,), run_id=run_id))
        )

    def start_activity(self, input: temporal_worker.StartActivityInput) -> workflow.ActivityHandle[Any]:
        info = workflow.info()
        input.headers = self._sign(input.headers, info.workflow_id, f"activity:{input.activity}", info.run_id)
        return super().start_activity(input)

    def start_local_activity(
        self, input: temporal_worker.StartLocalActivityInput
    ) -> workflow.ActivityHandle[Any]:
        info = workflow.info()
        input.headers = self._sign(input.headers, info.workflow_id, f"activity:{input.activity}", info.run_id)
        return super().start_local_activity(input)

    async def start_child_workflow(
        self, input: temporal_worker.StartChildWorkflowInput
    ) -> workflow.ChildWorkflowHandle[Any, Any]:
        input.headers = self._sign(input.headers, input.id, f"start:{input.workflow}")
        return await super().start_child_workflow(input)

    def continue_as_new(self, input: temporal_worker.ContinueAsNewInput) -> Any:
        info = workflow.info()
        input.headers = self._sign(
            input.headers, info.workflow_id, f"start:{input.workflow or info.workflow_type}"
        )
        return super().continue_as_new(input)

    async def signal_child_workflow(self, input: temporal_worker.SignalChildWorkflowInput) -> None:
        input.headers = self._sign(input.headers, input.child_workflow_id, f"signal:{input.signal}")
        await super().signal_child_workflow(input)

    async def signal_external_workflow(self, input: temporal_worker.SignalExternalWorkflowInput) -> None:
        input.headers = self._sign(input.headers, input.workflow_id, f"signal:{input.signal}")
        await super().signal_external_workflow(input)
