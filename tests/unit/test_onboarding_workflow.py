"""DeviceOnboarding's timers and compensation order, on the time-skipping test server.

Activities are stubs that record what ran: this is the workflow's logic alone.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from fleetflow.contracts.common import Actor, TaskQueue
from fleetflow.contracts.devices import (
    DeviceTransition,
    IssueCredential,
    IssuedCredential,
    OnboardDeviceRequest,
    OnboardingInput,
    RegisterDevice,
    RevokeCredential,
    StoreConfig,
    ValidatedOnboarding,
    ValidateOnboarding,
)
from fleetflow.contracts.events import EventBatch, RetractEvent
from tests.support import TEST_SERVER
from workflows.device_onboarding import DeviceOnboarding

CALLS: list[str] = []
NEEDS_APPROVAL = {"value": False}


@activity.defn(name="device.validate_onboarding")
async def validate(request: ValidateOnboarding) -> ValidatedOnboarding:
    CALLS.append("validate")
    return ValidatedOnboarding(config={}, requires_approval=NEEDS_APPROVAL["value"])


@activity.defn(name="device.register")
async def register(request: RegisterDevice) -> None:
    CALLS.append("register")


@activity.defn(name="device.issue_credential")
async def issue(request: IssueCredential) -> IssuedCredential:
    CALLS.append("issue_credential")
    return IssuedCredential(jti=request.jti, token="t", expires_at=request.expires_at)


@activity.defn(name="device.store_config")
async def store(request: StoreConfig) -> None:
    CALLS.append("store_config")


@activity.defn(name="device.mark_failed")
async def mark_failed(request: DeviceTransition) -> None:
    CALLS.append(f"undo:mark_failed:{request.reason}")


@activity.defn(name="device.revoke_credential")
async def revoke(request: RevokeCredential) -> None:
    CALLS.append("undo:revoke_credential")


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


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(TEST_SERVER), data_converter=pydantic_data_converter
    )
    yield environment
    await environment.shutdown()


async def run_onboarding(env: WorkflowEnvironment, **request: int) -> str:
    CALLS.clear()
    device_activities: list[Callable[..., Any]] = [
        validate,
        register,
        issue,
        store,
        mark_failed,
        revoke,
        remove,
        activate,
    ]
    inp = OnboardingInput(
        tenant="acme",
        actor=Actor(subject="op", tenant="acme", scopes=["admin"]),
        request=OnboardDeviceRequest(device_id="d1", device_type="thermostat", **request),
        request_hash="h",
    )
    async with (
        Worker(env.client, task_queue=TaskQueue.ORCHESTRATION.value, workflows=[DeviceOnboarding]),
        Worker(env.client, task_queue=TaskQueue.DEVICE.value, activities=device_activities),
        Worker(env.client, task_queue=TaskQueue.NOTIFICATION.value, activities=[record, retract]),
    ):
        with pytest.raises(WorkflowFailureError) as failure:
            await env.client.execute_workflow(
                DeviceOnboarding.run, inp, id=f"onboard-{uuid.uuid4()}",
                task_queue=TaskQueue.ORCHESTRATION.value,
            )  # fmt: skip
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "OnboardingFailed"
    return cause.message


async def test_first_contact_timeout_undoes_everything_in_reverse(env: WorkflowEnvironment) -> None:
    reason = await run_onboarding(env, first_contact_timeout_s=900)
    assert reason == "no first contact within 900 s"
    assert CALLS == [
        "validate", "register", "issue_credential", "store_config",
        "undo:remove_config", "undo:revoke_credential",
        "undo:mark_failed:no first contact within 900 s",
    ]  # fmt: skip


async def test_approval_timeout_issues_no_credential(env: WorkflowEnvironment) -> None:
    NEEDS_APPROVAL["value"] = True
    try:
        reason = await run_onboarding(env, approval_timeout_s=3600)
    finally:
        NEEDS_APPROVAL["value"] = False
    assert reason == "no approval within 3600 s"
    assert CALLS == ["validate", "register", "undo:mark_failed:no approval within 3600 s"]
