"""DeviceOnboarding's timers and compensation order, on the time-skipping test server.

Activities are stubs that record what ran: this is the workflow's logic alone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from fleetflow.contracts.common import Actor, TaskQueue
from fleetflow.contracts.devices import (
    ApprovalDecision,
    DeviceTransition,
    IssueCredential,
    IssuedCredential,
    OnboardDeviceRequest,
    OnboardingInput,
    ProvisionDevice,
    ProvisionedDevice,
    RegisterDevice,
    RevokeCredential,
    StoreConfig,
    ValidatedOnboarding,
    ValidateOnboarding,
)
from fleetflow.contracts.events import EventBatch, RetractEvent
from workflows.device_onboarding import DeviceOnboarding

CALLS: list[str] = []
NEEDS_APPROVAL = {"value": False}
GATES: dict[str, asyncio.Event] = {}  # step -> released when set; the stub waits for it
FAIL_AT: set[str] = set()


async def step(name: str) -> None:
    """Record a stub step; a gated one records its start, then waits for its gate."""
    if name in GATES:
        CALLS.append(f"{name}:start")
        await GATES[name].wait()
    CALLS.append(name)
    if name in FAIL_AT:
        raise ApplicationError(f"injected failure at {name}", non_retryable=True)


@activity.defn(name="device.validate_onboarding")
async def validate(request: ValidateOnboarding) -> ValidatedOnboarding:
    CALLS.append("validate")
    return ValidatedOnboarding(config={}, requires_approval=NEEDS_APPROVAL["value"])


@activity.defn(name="device.register")
async def register(request: RegisterDevice) -> None:
    await step("register")


@activity.defn(name="device.validate_and_register")
async def validate_and_register(request: RegisterDevice) -> ValidatedOnboarding:
    validated = await validate(ValidateOnboarding(tenant=request.tenant, spec=request.spec))
    await register(request)
    return validated


@activity.defn(name="device.provision_device")
async def provision(request: ProvisionDevice) -> ProvisionedDevice:
    """The one transaction: validate, register, then (no approval) credential and configuration;
    a failure at a step (FAIL_AT) fails it."""
    register_step = RegisterDevice(
        tenant=request.tenant, spec=request.spec, onboarding_id=request.onboarding_id, actor=request.actor
    )
    validated = await validate_and_register(register_step)
    if validated.requires_approval:
        return ProvisionedDevice(validated=validated)
    await step("issue_credential")
    await step("store_config")
    credential = IssuedCredential(jti=request.jti, token="t", expires_at=request.expires_at)
    return ProvisionedDevice(validated=validated, credential=credential)


@activity.defn(name="device.issue_credential")
async def issue(request: IssueCredential) -> IssuedCredential:
    await step("issue_credential")
    return IssuedCredential(jti=request.jti, token="t", expires_at=request.expires_at)


@activity.defn(name="device.store_config")
async def store(request: StoreConfig) -> None:
    await step("store_config")


@activity.defn(name="device.mark_failed")
async def mark_failed(request: DeviceTransition) -> None:
    await step("undo:mark_failed")
    CALLS[-1] = f"undo:mark_failed:{request.reason}"


@activity.defn(name="device.revoke_credential")
async def revoke(request: RevokeCredential) -> None:
    await step("undo:revoke_credential")


@activity.defn(name="device.remove_config")
async def remove(request: DeviceTransition) -> None:
    CALLS.append("undo:remove_config")


@activity.defn(name="device.activate")
async def activate(request: DeviceTransition) -> None:
    CALLS.append("activate")


@activity.defn(name="notification.record_events")
async def record(batch: EventBatch) -> int:
    return 1


@activity.defn(name="notification.retract_event")
async def retract(request: RetractEvent) -> None:
    CALLS.append("undo:retract_event")


def onboarding_input(**request: int) -> OnboardingInput:
    return OnboardingInput(
        tenant="acme",
        actor=Actor(subject="op", tenant="acme", scopes=["admin"]),
        request=OnboardDeviceRequest(device_id="d1", device_type="thermostat", **request),
        request_hash="h",
    )


@asynccontextmanager
async def workers(env: WorkflowEnvironment) -> AsyncIterator[None]:
    CALLS.clear()
    device_activities: list[Callable[..., Any]] = [
        validate,
        register,
        validate_and_register,
        provision,
        issue,
        store,
        mark_failed,
        revoke,
        remove,
        activate,
    ]
    async with (
        # no cache: every activation replays the history, evictions included (the shielded steps)
        Worker(
            env.client,
            task_queue=TaskQueue.ORCHESTRATION.value,
            workflows=[DeviceOnboarding],
            max_cached_workflows=0,
        ),
        Worker(env.client, task_queue=TaskQueue.DEVICE.value, activities=device_activities),
        Worker(env.client, task_queue=TaskQueue.NOTIFICATION.value, activities=[record, retract]),
    ):
        yield


async def start(env: WorkflowEnvironment, **request: int) -> WorkflowHandle[Any, Any]:
    return await env.client.start_workflow(
        DeviceOnboarding.run,
        onboarding_input(**request),
        id=f"onboard-{uuid.uuid4()}",
        task_queue=TaskQueue.ORCHESTRATION.value,
    )


async def run_onboarding(env: WorkflowEnvironment, **request: int) -> str:
    async with workers(env):
        with pytest.raises(WorkflowFailureError) as failure:
            await (await start(env, **request)).result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "OnboardingFailed"
    return cause.message


async def until_called(name: str) -> None:
    for _ in range(600):
        if name in CALLS:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never ran; calls: {CALLS}")


async def cancel_and_settle(handle: WorkflowHandle[Any, Any]) -> None:
    """Cancel the run and wait until a workflow task has handled the cancel request."""
    await handle.cancel()
    for _ in range(600):
        kinds = [e.event_type for e in (await handle.fetch_history()).events]
        if EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED in kinds:
            after = kinds[kinds.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED) :]
            if EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in after:
                return
        await asyncio.sleep(0.01)
    raise AssertionError("the cancel was never handled")


async def approve(handle: WorkflowHandle[Any, Any]) -> None:
    """Approve once the run awaits approval: its credential and configuration are steps of their
    own then, run at once."""
    for _ in range(600):
        if (await handle.query(DeviceOnboarding.progress)).status == "awaiting_approval":
            break
        await asyncio.sleep(0.01)
    approver = Actor(subject="op", tenant="acme", scopes=["devices:approve"])
    await handle.execute_update(DeviceOnboarding.approve, ApprovalDecision(actor=approver))


@pytest.fixture
def gates() -> Iterator[dict[str, asyncio.Event]]:
    yield GATES
    for gate in GATES.values():
        gate.set()
    GATES.clear()
    FAIL_AT.clear()
    NEEDS_APPROVAL["value"] = False


async def test_cancel_during_a_step_waits_for_it_then_undoes_it(
    env: WorkflowEnvironment, gates: dict[str, asyncio.Event]
) -> None:
    gates["register"] = asyncio.Event()
    async with workers(env):
        handle = await start(env)
        await until_called("register:start")
        await cancel_and_settle(handle)
        assert "undo:mark_failed:onboarding cancelled by an operator" not in CALLS  # register still runs
        gates["register"].set()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    # the step committed after the cancel (registration, credential, configuration) is undone,
    # not left pending
    assert CALLS == [
        "validate",
        "register:start",
        "register",
        "issue_credential",
        "store_config",
        "undo:remove_config",
        "undo:revoke_credential",
        "undo:mark_failed:onboarding cancelled by an operator",
    ]


async def test_a_cancel_does_not_interrupt_compensation(
    env: WorkflowEnvironment, gates: dict[str, asyncio.Event]
) -> None:
    gates["undo:revoke_credential"] = asyncio.Event()
    FAIL_AT.add("store_config")
    async with workers(env):
        handle = await start(env)
        await until_called("undo:revoke_credential:start")
        await cancel_and_settle(handle)
        gates["undo:revoke_credential"].set()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "OnboardingFailed"
    assert CALLS[-4:] == [
        "undo:remove_config",
        "undo:revoke_credential:start",
        "undo:revoke_credential",
        # one transaction: its failure is named after the registration it carries
        "undo:mark_failed:register failed: injected failure at store_config",
    ]


async def test_first_contact_timeout_undoes_everything_in_reverse(env: WorkflowEnvironment) -> None:
    reason = await run_onboarding(env, first_contact_timeout_s=900)
    assert reason == "no first contact within 900 s"
    assert CALLS[:4] == ["validate", "register", "issue_credential", "store_config"]  # one step
    assert CALLS[4:] == [
        "undo:remove_config",
        "undo:revoke_credential",
        "undo:mark_failed:no first contact within 900 s",
    ]


async def test_a_failed_step_waits_for_the_step_beside_it_before_the_undo(
    env: WorkflowEnvironment, gates: dict[str, asyncio.Event]
) -> None:
    """After an approval the credential and the configuration run at once: when one fails, the
    undo waits until the other has finished, so a credential issued after the failure is still
    revoked."""
    gates["issue_credential"] = asyncio.Event()
    FAIL_AT.add("store_config")
    NEEDS_APPROVAL["value"] = True
    async with workers(env):
        handle = await start(env)
        await approve(handle)
        await until_called("store_config")
        await asyncio.sleep(0.3)  # the failure reaches the workflow
        assert not [c for c in CALLS if c.startswith("undo:")]  # the credential is still running
        gates["issue_credential"].set()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.message == "store_config failed: injected failure at store_config"
    assert CALLS.index("issue_credential") < CALLS.index("undo:remove_config")
    assert CALLS[-3:] == [
        "undo:remove_config",
        "undo:revoke_credential",
        "undo:mark_failed:store_config failed: injected failure at store_config",
    ]


async def test_approval_timeout_issues_no_credential(env: WorkflowEnvironment) -> None:
    NEEDS_APPROVAL["value"] = True
    try:
        reason = await run_onboarding(env, approval_timeout_s=3600)
    finally:
        NEEDS_APPROVAL["value"] = False
    assert reason == "no approval within 3600 s"
    assert CALLS == ["validate", "register", "undo:mark_failed:no approval within 3600 s"]


async def test_a_cancel_right_after_a_failed_step_still_waits_for_the_step_beside_it(
    env: WorkflowEnvironment, gates: dict[str, asyncio.Event]
) -> None:
    """The configuration failed and the credential is still being issued when the cancel comes:
    the undo still waits for the credential, so it is revoked, not left live."""
    gates["issue_credential"] = asyncio.Event()
    FAIL_AT.add("store_config")
    NEEDS_APPROVAL["value"] = True
    async with workers(env):
        handle = await start(env)
        await approve(handle)
        await until_called("store_config")
        await cancel_and_settle(handle)
        assert not [c for c in CALLS if c.startswith("undo:")]  # the credential is still running
        gates["issue_credential"].set()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    assert CALLS.index("issue_credential") < CALLS.index("undo:remove_config")
    assert CALLS[-3:] == [
        "undo:remove_config",
        "undo:revoke_credential",
        "undo:mark_failed:onboarding cancelled by an operator",
    ]
