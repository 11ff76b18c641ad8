"""DeviceOnboarding: the onboarding saga of one device (id `onboard-{tenant}-{device_id}`).

validate → register → [approval] → issue credential → store configuration →
wait for first contact → activate → record `DeviceOnboarded`. Any failure,
rejection, timeout or cancellation undoes what was done, in reverse. Without approval, the
steps up to the configuration are one activity (one transaction of the device service).

Each run is one attempt and owns what it writes (`<workflow id>/<first run id>`), so a
device can be onboarded again after a failed attempt. A cancel waits for the step in
flight to end before the undo, and the undo finishes whatever arrives meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError
from temporalio.types import MethodAsyncSingleParam
from temporalio.workflow import ActivityCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import DomainEvent, tenant_scoped_id
    from fleetflow.contracts.devices import (
        ApprovalDecision,
        DeviceStatus,
        DeviceTransition,
        FirstContact,
        IssueCredential,
        IssuedCredential,
        OnboardingInput,
        OnboardingProgress,
        OnboardingResult,
        OnboardingStep,
        ProvisionDevice,
        ProvisionedDevice,
        RegisterDevice,
        RevokeCredential,
        StoreConfig,
        ValidatedOnboarding,
        ValidateOnboarding,
        attempt_owner,
    )
    from fleetflow.contracts.events import DEVICE_ONBOARDED, EventBatch, RetractEvent
    from fleetflow.contracts.twin import EndTwin, TwinInput
    from fleetflow.interfaces.device import DeviceActivities
    from fleetflow.interfaces.notification import NotificationActivities
    from fleetflow.temporal import device_search_attributes
    from workflows import calls
    from workflows.device_twin import DeviceTwin, twin_id
    from workflows.options import (
        COMPENSATION_START_TO_CLOSE,
        STEP_RETRY,
        STEP_SCHEDULE_TO_CLOSE,
        STEP_START_TO_CLOSE,
    )
    from workflows.saga import COMPENSATION_RETRY, Saga, finish_then_cancel, run_to_end

P = TypeVar("P")
R = TypeVar("R")

CREDENTIAL_LIFETIME = timedelta(days=365)
APPROVE_SCOPE = "devices:approve"
# runs started before it: the workflow id owned the device (a failed device could never be
# onboarded again), a cancel cut a step short and could interrupt compensation
ATTEMPTS_PATCH = "onboarding-attempts"
# the credential's lifetime comes from the device type (runs recorded before: 365 days)
LIFETIME_PATCH = "credential-lifetime-per-type"
# fewer workflow tasks on the hot path: validate and register in one activity, the twin start and
# the `DeviceOnboarded` event in one task (runs recorded before: one task per step)
MERGED_STEPS_PATCH = "onboarding-merged-steps"
# fewer round trips: the credential and the configuration in one workflow task (runs recorded
# before: one after the other)
TOGETHER_PATCH = "onboarding-steps-together"
# one activity task to the credential: validation, registration, credential and configuration in
# one transaction of the device service when the type needs no approval (runs recorded before:
# validate_and_register, then the credential and the configuration together)
ONE_STEP_PATCH = "onboarding-one-step-provision"


class OnboardingAborted(Exception):
    """Ends the forward path with a reason a user can read."""


def onboarding_id(tenant: str, device_id: str) -> str:
    """The business id of a device's onboarding workflow."""
    return tenant_scoped_id("onboard", tenant, device_id)


@workflow.defn
class DeviceOnboarding:
    """The onboarding saga; query `progress`, updates `approve`/`reject`, signal `first_contact`."""

    def __init__(self) -> None:
        self._tenant = ""
        self._device_id = ""
        self._status = "running"
        self._step: OnboardingStep | None = None
        self._completed: list[OnboardingStep] = []
        self._saga = Saga()
        self._reason: str | None = None
        self._approved: bool | None = None
        self._decided_by: str | None = None
        self._contact: FirstContact | None = None
        self._credential: IssuedCredential | None = None
        self._attempts = False  # ATTEMPTS_PATCH
        self._owner = ""
        self._merged = False  # MERGED_STEPS_PATCH
        self._together = False  # TOGETHER_PATCH
        self._one_step = False  # ONE_STEP_PATCH

    @workflow.run
    async def run(self, inp: OnboardingInput) -> OnboardingResult:
        """Run the saga; fails with a clear reason after compensating."""
        self._tenant, self._device_id = inp.tenant, inp.request.device_id
        info = workflow.info()
        self._attempts = workflow.patched(ATTEMPTS_PATCH)
        self._merged = self._attempts and workflow.patched(MERGED_STEPS_PATCH)
        self._together = self._merged and workflow.patched(TOGETHER_PATCH)
        self._one_step = self._together and workflow.patched(ONE_STEP_PATCH)
        # the device rows this run writes are owned by this attempt, not by the device's workflow
        # id: a later attempt (after a failure, rejection or cancel) must not take them for its own
        wid, first_run = info.workflow_id, info.first_execution_run_id
        self._owner = attempt_owner(wid, first_run) if self._attempts else wid
        try:
            return await self._forward(inp)
        except asyncio.CancelledError:
            await self._compensate("cancelled", "onboarding cancelled by an operator", inp)
            raise
        except (ActivityError, ApplicationError, OnboardingAborted, TimeoutError) as exc:
            reason = self._reason_of(exc)
            await self._compensate("failed", reason, inp)
            raise ApplicationError(reason, type="OnboardingFailed", non_retryable=True) from None

    async def _forward(self, inp: OnboardingInput) -> OnboardingResult:
        req, actor = inp.request, inp.actor.subject
        owner = self._owner
        change = DeviceTransition(
            tenant=inp.tenant, device_id=req.device_id, onboarding_id=owner, actor=actor
        )

        register = RegisterDevice(tenant=inp.tenant, spec=req, onboarding_id=owner, actor=actor)
        provisioned: ProvisionedDevice | None = None
        if self._one_step:
            provisioned = await self._provision(inp, register, change)
            validated = provisioned.validated
        elif self._merged:
            validated = await self._validate_and_register(register, change)
        else:
            validated = await self._run_step(
                OnboardingStep.VALIDATE,
                DeviceActivities.validate_onboarding,
                ValidateOnboarding(tenant=inp.tenant, spec=req),
            )
            self._add_mark_failed(change)
            await self._run_step(OnboardingStep.REGISTER, DeviceActivities.register, register)

        if validated.requires_approval:
            self._begin(OnboardingStep.AWAIT_APPROVAL, "awaiting_approval")
            await self._wait(lambda: self._approved is not None, req.approval_timeout_s, "approval")
            if not self._approved:
                raise OnboardingAborted(
                    f"rejected by {self._decided_by}: {self._reason or 'no reason given'}"
                )
            self._finish(OnboardingStep.AWAIT_APPROVAL)

        if provisioned is not None and provisioned.credential is not None:
            jti = provisioned.credential.jti
        else:
            jti = await self._issue_and_store(inp, validated, change)
        return await self._after_provisioning(inp, validated, change, jti)

    async def _issue_and_store(
        self, inp: OnboardingInput, validated: ValidatedOnboarding, change: DeviceTransition
    ) -> str:
        """The credential and the configuration, as steps of their own; the credential's jti."""
        req, actor, owner = inp.request, inp.actor.subject, self._owner
        issued = workflow.now()
        lifetime = CREDENTIAL_LIFETIME
        if workflow.patched(LIFETIME_PATCH) and validated.credential_lifetime_days is not None:
            lifetime = timedelta(days=validated.credential_lifetime_days)
        jti = str(workflow.uuid4())
        revoke = RevokeCredential(
            tenant=inp.tenant, device_id=req.device_id, jti=jti, reason="onboarding undone"
        )
        self._saga.add("revoke_credential", lambda: self._undo(DeviceActivities.revoke_credential, revoke))
        credential = IssueCredential(
            tenant=inp.tenant,
            device_id=req.device_id,
            onboarding_id=owner,
            jti=jti,
            issued_at=issued,
            expires_at=issued + lifetime,
        )
        config = StoreConfig(
            tenant=inp.tenant,
            device_id=req.device_id,
            onboarding_id=owner,
            config=validated.config,
            actor=actor,
        )
        if self._together:
            # independent writes of the same registration: both undos are registered first
            self._saga.add("remove_config", lambda: self._undo(DeviceActivities.remove_config, change))
            issuing = self._issue(self._start_step(DeviceActivities.issue_credential, credential))
            storing = self._start_step(DeviceActivities.store_config, config)
            await self._together_steps(
                (OnboardingStep.ISSUE_CREDENTIAL, issuing, True),
                (OnboardingStep.STORE_CONFIG, storing, True),
            )
        else:
            self._credential = await self._run_step(
                OnboardingStep.ISSUE_CREDENTIAL, DeviceActivities.issue_credential, credential
            )
            self._saga.add("remove_config", lambda: self._undo(DeviceActivities.remove_config, change))
            await self._run_step(OnboardingStep.STORE_CONFIG, DeviceActivities.store_config, config)
        return jti

    async def _after_provisioning(
        self, inp: OnboardingInput, validated: ValidatedOnboarding, change: DeviceTransition, jti: str
    ) -> OnboardingResult:
        """First contact, activation, the twin and `DeviceOnboarded`."""
        req, actor, wid = inp.request, inp.actor.subject, workflow.info().workflow_id
        self._begin(OnboardingStep.AWAIT_FIRST_CONTACT, "awaiting_first_contact")
        await self._wait(lambda: self._contact is not None, req.first_contact_timeout_s, "first contact")
        self._finish(OnboardingStep.AWAIT_FIRST_CONTACT)
        contact = self._contact
        assert contact is not None

        activation = change.model_copy(update={"firmware_version": contact.firmware_version})
        # before DeviceOnboarded, even with TOGETHER_PATCH: a webhook already sent for a device
        # whose activation then failed (decommissioned meanwhile) could not be taken back
        await self._run_step(OnboardingStep.ACTIVATE, DeviceActivities.activate, activation)

        if not self._merged and workflow.patched("start-device-twin"):
            self._saga.add("end_twin", lambda: self._end_twin(inp))
            if self._attempts:  # a cancel waits for the start, so end_twin finds the twin
                await finish_then_cancel(self._start_twin(inp, validated), forward=False)
            else:
                await self._start_twin(inp, validated)

        event = DomainEvent(
            event_id=f"{wid}/{workflow.info().run_id}/{DEVICE_ONBOARDED}",
            tenant=inp.tenant,
            device_id=req.device_id,
            type=DEVICE_ONBOARDED,
            occurred_at=workflow.now(),
            actor=actor,
            source_workflow=wid,
            data={"device_type": req.device_type, "credential_jti": jti},
        )
        retract = RetractEvent(event_id=event.event_id)
        if self._merged:
            self._saga.add("end_twin", lambda: self._end_twin(inp))
            self._saga.add("retract_event", lambda: self._undo(NotificationActivities.retract_event, retract))
            await self._twin_and_event(inp, validated, EventBatch(events=[event]))
        else:
            self._saga.add("retract_event", lambda: self._undo(NotificationActivities.retract_event, retract))
            await self._run_step(
                OnboardingStep.RECORD_EVENT,
                NotificationActivities.record_events,
                EventBatch(events=[event]),
            )

        self._status, self._step, self._credential = "completed", None, None
        return OnboardingResult(
            tenant=inp.tenant,
            device_id=req.device_id,
            status=DeviceStatus.ACTIVE,
            credential_jti=jti,
        )

    # --- steps and compensation ------------------------------------------------

    def _add_mark_failed(self, change: DeviceTransition) -> None:
        self._saga.add(
            "mark_registration_failed",
            lambda: self._undo(
                DeviceActivities.mark_failed, change.model_copy(update={"reason": self._reason})
            ),
        )

    async def _validate_and_register(
        self, register: RegisterDevice, change: DeviceTransition
    ) -> ValidatedOnboarding:
        """Validation and registration in one activity task (MERGED_STEPS_PATCH).

        The registration's undo is registered first, as for any step; a first attempt refused
        at validation (detail "validate") registered nothing, so its undo is dropped again.
        """
        self._add_mark_failed(change)
        try:
            validated = await self._run_step(
                OnboardingStep.VALIDATE, DeviceActivities.validate_and_register, register
            )
        except ActivityError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.details[:1] == (OnboardingStep.VALIDATE.value,):
                self._saga.discard("mark_registration_failed")
            else:
                self._step = OnboardingStep.REGISTER  # the reason names the step that failed
            raise
        self._completed.append(OnboardingStep.REGISTER)
        return validated

    async def _provision(
        self, inp: OnboardingInput, register: RegisterDevice, change: DeviceTransition
    ) -> ProvisionedDevice:
        """Validation, registration, credential and configuration in one activity (ONE_STEP_PATCH).

        The undos of all three writes are registered first (a commit can be followed by a lost
        report); a first attempt refused at validation (detail "validate") wrote nothing, so they
        are dropped again, and so are those of the credential and the configuration when the type
        needs approval (then only the registration was written; both come after the approval).
        """
        req = inp.request
        issued = workflow.now()
        jti = str(workflow.uuid4())
        revoke = RevokeCredential(
            tenant=inp.tenant, device_id=req.device_id, jti=jti, reason="onboarding undone"
        )
        self._add_mark_failed(change)
        self._saga.add("revoke_credential", lambda: self._undo(DeviceActivities.revoke_credential, revoke))
        self._saga.add("remove_config", lambda: self._undo(DeviceActivities.remove_config, change))
        step = ProvisionDevice(
            tenant=inp.tenant,
            spec=req,
            onboarding_id=register.onboarding_id,
            actor=register.actor,
            jti=jti,
            issued_at=issued,
            expires_at=issued + CREDENTIAL_LIFETIME,
        )
        try:
            provisioned = await self._run_step(
                OnboardingStep.VALIDATE, DeviceActivities.provision_device, step
            )
        except ActivityError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.details[:1] == (OnboardingStep.VALIDATE.value,):
                for name in ("remove_config", "revoke_credential", "mark_registration_failed"):
                    self._saga.discard(name)
            else:
                self._step = OnboardingStep.REGISTER  # the reason names the step that failed
            raise
        self._completed.append(OnboardingStep.REGISTER)
        if provisioned.credential is None:
            self._saga.discard("remove_config")
            self._saga.discard("revoke_credential")
        else:
            self._credential = provisioned.credential
            self._completed += [OnboardingStep.ISSUE_CREDENTIAL, OnboardingStep.STORE_CONFIG]
        return provisioned

    async def _twin_and_event(
        self, inp: OnboardingInput, validated: ValidatedOnboarding, events: EventBatch
    ) -> None:
        """Start the twin and record `DeviceOnboarded` in the same workflow task (MERGED_STEPS_PATCH).

        Both undos are registered before. A cancel asks the recording to stop, never the twin's
        start, and waits for both outcomes, so the undo finds whatever either did.
        """
        twin = asyncio.ensure_future(self._start_twin(inp, validated))
        record = asyncio.ensure_future(
            self._run_step(OnboardingStep.RECORD_EVENT, NotificationActivities.record_events, events)
        )

        async def both() -> None:
            for outcome in await asyncio.gather(twin, record, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome

        pair = asyncio.ensure_future(both())
        if await run_to_end(pair, on_cancel=record.cancel):
            if not pair.cancelled():
                pair.exception()  # retrieved: the cancel decides the outcome
            raise asyncio.CancelledError
        pair.result()

    async def _start_twin(self, inp: OnboardingInput, validated: ValidatedOnboarding) -> None:
        """Start the device's twin; it outlives this workflow (ABANDON)."""
        device_id = inp.request.device_id
        try:
            await workflow.start_child_workflow(
                DeviceTwin.run,
                TwinInput(
                    tenant=inp.tenant,
                    device_id=device_id,
                    config_schema=validated.config_schema,
                    initial_desired=validated.config,
                ),
                id=twin_id(inp.tenant, device_id),
                task_queue=workflow.info().task_queue,
                parent_close_policy=ParentClosePolicy.ABANDON,
                search_attributes=device_search_attributes(inp.tenant, "twin", device_id),
            )
        except WorkflowAlreadyStartedError:
            pass  # a twin from an earlier attempt: keep it

    async def _end_twin(self, inp: OnboardingInput) -> None:
        twin = workflow.get_external_workflow_handle(twin_id(inp.tenant, inp.request.device_id))
        try:
            await twin.signal(DeviceTwin.end, EndTwin(reason="onboarding undone", actor=inp.actor.subject))
        except ApplicationError:
            pass  # no twin to end

    def _begin(self, step: OnboardingStep, status: str = "running") -> None:
        self._step, self._status = step, status

    def _finish(self, step: OnboardingStep) -> None:
        self._completed.append(step)
        self._step, self._status = None, "running"

    async def _run_step(self, step: OnboardingStep, activity: MethodAsyncSingleParam[Any, P, R], arg: P) -> R:
        """Run one forward step on its service's queue; the progress query shows it meanwhile."""
        self._begin(step)
        if self._attempts:
            # a cancel asks the step to stop and waits for its outcome: a commit that lands
            # after the undo ran would leave a registration or a live credential behind
            result = await finish_then_cancel(self._start_step(activity, arg))
        else:
            result = await calls.execute(
                activity,
                arg,
                start_to_close_timeout=STEP_START_TO_CLOSE,
                schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE,
                retry_policy=STEP_RETRY,
            )
        self._finish(step)
        return result

    def _start_step(self, activity: MethodAsyncSingleParam[Any, P, R], arg: P) -> Awaitable[R]:
        """Start one forward step on its service's queue; a cancel of it waits for its outcome."""
        return calls.start(
            activity,
            arg,
            start_to_close_timeout=STEP_START_TO_CLOSE,
            schedule_to_close_timeout=STEP_SCHEDULE_TO_CLOSE,
            retry_policy=STEP_RETRY,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    async def _issue(self, issuing: Awaitable[IssuedCredential]) -> None:
        """The credential is shown (progress query) as soon as it is issued: the device may call
        in while its configuration is still being stored."""
        self._credential = await issuing

    async def _together_steps(self, *steps: tuple[OnboardingStep | None, Awaitable[Any], bool]) -> list[Any]:
        """Run independent steps at once (TOGETHER_PATCH); their results, in order.

        Each entry is (step, started work, whether a cancel asks it to stop). Every outcome is
        known before this returns or raises: a failure or a cancel waits for the other steps, so
        the undo finds whatever they did. The first failure in order is raised, naming its step.
        """
        self._begin(next(step for step, _, _ in steps if step is not None))
        tasks = [asyncio.ensure_future(work) for _, work, _ in steps]

        def stop() -> None:
            for (_, _, stoppable), task in zip(steps, tasks, strict=True):
                if stoppable:
                    task.cancel()

        every = asyncio.ensure_future(workflow.wait(tasks))
        cancelled = await run_to_end(every, on_cancel=stop)
        failures = [None if t.cancelled() else t.exception() for t in tasks]  # all retrieved
        if cancelled:
            raise asyncio.CancelledError
        for (step, _, _), task, failure in zip(steps, tasks, failures, strict=True):
            if task.cancelled():
                raise asyncio.CancelledError
            if failure is not None:
                self._step = step or self._step
                raise failure
        for step, _, _ in steps:
            if step is not None:
                self._completed.append(step)
        self._step, self._status = None, "running"
        return [t.result() for t in tasks]

    async def _wait(self, done: Any, timeout_s: int, what: str) -> None:
        try:
            await workflow.wait_condition(done, timeout=timedelta(seconds=timeout_s))
        except TimeoutError:
            if self._attempts and done():
                return  # the decision or contact came in the same task as the timeout: it counts
            raise OnboardingAborted(f"no {what} within {timeout_s} s") from None

    async def _undo(self, activity: MethodAsyncSingleParam[Any, P, object], arg: P) -> None:
        """Run one compensation on its service's queue."""
        await calls.execute(
            activity,
            arg,
            start_to_close_timeout=COMPENSATION_START_TO_CLOSE,
            retry_policy=COMPENSATION_RETRY,
        )

    async def _compensate(self, final_status: str, reason: str, inp: OnboardingInput) -> None:
        self._status, self._reason, self._credential = "compensating", reason, None
        workflow.logger.info("onboarding of %s undone: %s", inp.request.device_id, reason)
        await self._saga.compensate(shielded=self._attempts)
        self._status, self._step = final_status, None

    def _reason_of(self, exc: BaseException) -> str:
        step = self._step.value if self._step else "onboarding"
        if isinstance(exc, OnboardingAborted):
            return str(exc)
        if isinstance(exc, ActivityError) and exc.cause is not None:
            return f"{step} failed: {exc.cause}"
        return f"{step} failed: {exc}"

    # --- messages --------------------------------------------------------------

    @workflow.query
    def progress(self) -> OnboardingProgress:
        """Current step, completed steps, compensations and (until first contact) the credential."""
        return OnboardingProgress(
            workflow_id=workflow.info().workflow_id,
            tenant=self._tenant,
            device_id=self._device_id,
            status=self._status,
            current_step=self._step,
            completed_steps=list(self._completed),
            compensations=list(self._saga.done),
            reason=self._reason,
            decided_by=self._decided_by,
            credential=self._credential.token if self._credential else None,
        )

    @workflow.signal
    def first_contact(self, contact: FirstContact) -> None:
        """The device called in with the credential this onboarding issued."""
        if self._credential is not None and contact.jti == self._credential.jti:
            self._contact = self._contact or contact

    @workflow.update
    def approve(self, decision: ApprovalDecision) -> OnboardingProgress:
        """An operator approves the device; onboarding goes on to its credential."""
        self._approved, self._decided_by = True, decision.actor.subject
        return self.progress()

    @workflow.update
    def reject(self, decision: ApprovalDecision) -> OnboardingProgress:
        """An operator rejects the device; onboarding compensates."""
        self._approved, self._decided_by = False, decision.actor.subject
        self._reason = decision.reason
        return self.progress()

    @approve.validator
    def _check_approve(self, decision: ApprovalDecision) -> None:
        self._check_decision(decision)

    @reject.validator
    def _check_reject(self, decision: ApprovalDecision) -> None:
        self._check_decision(decision)

    def _check_decision(self, decision: ApprovalDecision) -> None:
        if not decision.actor.can(APPROVE_SCOPE) or decision.actor.tenant != self._tenant:
            raise ApplicationError(f"the {APPROVE_SCOPE} scope of this tenant is required", type="Forbidden")
        waiting = self._step == OnboardingStep.AWAIT_APPROVAL and self._status == "awaiting_approval"
        if not waiting or self._approved is not None:  # a timed-out approval is compensating
            raise ApplicationError("this onboarding is not awaiting approval", type="NotAwaitingApproval")
