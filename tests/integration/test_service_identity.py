"""Service identity through Temporal headers: forged, missing or foreign identities are refused
by the workers before anything runs; a valid one reaches the activity, tenant and all."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio import client as temporal_client
from temporalio import worker as temporal_worker
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

from fleetflow import identity
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import RevokeCredential
from fleetflow.contracts.system import ProbeRequest, SystemCheckRequest
from fleetflow.db import Pool
from fleetflow.keys import KeyRing
from fleetflow.security import ServiceActor, issue_service_token, issue_token
from tests.integration.flows import active_device
from tests.support import TEST_KEYS

QUEUE = "identity-tests"


class _Forge(temporal_client.Interceptor, temporal_worker.Interceptor):
    """Puts a fixed identity header (or none) on client calls and on what a workflow schedules."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def _headers(self, headers: Any) -> dict[str, Any]:
        rest = {k: v for k, v in headers.items() if k != identity.HEADER}
        return rest if self.token is None else identity._with_token(rest, self.token)

    def intercept_client(
        self, next: temporal_client.OutboundInterceptor
    ) -> temporal_client.OutboundInterceptor:
        forge = self

        class Outbound(temporal_client.OutboundInterceptor):
            async def start_workflow(
                self, input: temporal_client.StartWorkflowInput
            ) -> temporal_client.WorkflowHandle[Any, Any]:
                input.headers = forge._headers(input.headers)
                return await super().start_workflow(input)

        return Outbound(next)

    def workflow_interceptor_class(
        self, input: temporal_worker.WorkflowInterceptorClassInput
    ) -> type[temporal_worker.WorkflowInboundInterceptor]:
        forge = self

        class Outbound(temporal_worker.WorkflowOutboundInterceptor):
            def start_activity(
                self, input: temporal_worker.StartActivityInput
            ) -> workflow.ActivityHandle[Any]:
                input.headers = forge._headers(input.headers)
                return super().start_activity(input)

        class Inbound(temporal_worker.WorkflowInboundInterceptor):
            def init(self, outbound: temporal_worker.WorkflowOutboundInterceptor) -> None:
                super().init(Outbound(outbound))

        return Inbound


class Call(BaseModel):
    activity: str
    queue: str
    arg: dict[str, Any]


@workflow.defn(sandboxed=False)
class CallActivity:
    """Calls one activity once and returns what it returned."""

    @workflow.run
    async def run(self, call: Call) -> Any:
        return await workflow.execute_activity(
            call.activity, call.arg, task_queue=call.queue,
            start_to_close_timeout=timedelta(seconds=10), retry_policy=RetryPolicy(maximum_attempts=2),
        )  # fmt: skip


@activity.defn(name="identity.whoami")
async def whoami(_: dict[str, Any]) -> dict[str, Any]:
    """What the activity sees of its caller."""
    return identity.current().model_dump()


def _with_interceptors(client: Client, interceptors: list[Any]) -> Client:
    config = client.config()
    config["interceptors"] = interceptors
    return Client(**config)


@pytest.fixture(scope="module")
async def checked_worker(client: Client) -> AsyncIterator[None]:
    """A worker built on the session's client: it signs and checks like every platform worker."""
    async with Worker(client, task_queue=QUEUE, workflows=[CallActivity], activities=[whoami]):
        yield


def _foreign(tmp_path: Path) -> str:
    return issue_service_token(KeyRing(tmp_path), service="api", actor=ServiceActor(subject="mallory"))


def _expired() -> str:
    past = datetime.now(UTC) - timedelta(hours=1)
    return issue_service_token(TEST_KEYS, service="api", actor=ServiceActor(subject="op"), now=past)


def _api_token() -> str:
    return issue_token(TEST_KEYS, subject="op", tenant="acme", scopes=["admin"], ttl=timedelta(minutes=5))


FORGERIES: dict[str, tuple[Callable[[Path], str | None], str]] = {
    "missing": (lambda tmp: None, "no fleetflow-identity header"),
    "garbage": (lambda tmp: "not-a-token", "malformed"),
    "foreign-key": (_foreign, "unknown or retired key"),
    "expired": (lambda tmp: _expired(), "expired"),
    "api-token": (lambda tmp: _api_token(), "audience"),
}


def _activity_refusal(failed: WorkflowFailureError) -> ApplicationError:
    """The identity check's refusal that failed the workflow's activity."""
    assert isinstance(failed.cause, ActivityError)
    refusal = failed.cause.cause
    assert isinstance(refusal, ApplicationError) and refusal.type == identity.REFUSED
    return refusal


@pytest.mark.parametrize("case", list(FORGERIES))
async def test_a_workflow_started_without_a_valid_identity_fails_clearly(
    client: Client, workers: None, tmp_path: Path, case: str
) -> None:
    make, reason = FORGERIES[case]
    forger = _with_interceptors(client, [_Forge(make(tmp_path))])
    with pytest.raises(WorkflowFailureError) as failed:
        await forger.execute_workflow(
            "SystemCheck", SystemCheckRequest(timeout_s=5), id=f"forged-{uuid.uuid4().hex[:8]}",
            task_queue=TaskQueue.ORCHESTRATION.value, execution_timeout=timedelta(seconds=30),
        )  # fmt: skip
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == identity.REFUSED
    assert "SystemCheck started without a valid identity" in cause.message and reason in cause.message


@pytest.mark.parametrize("case", ["missing", "foreign-key", "api-token"])
async def test_a_forged_activity_header_is_refused_by_the_worker(
    client: Client, workers: None, tmp_path: Path, case: str
) -> None:
    """A workflow on a worker that forges its activities' headers reaches the real device
    service's worker, which refuses before the activity runs."""
    make, reason = FORGERIES[case]
    forger = _with_interceptors(client, [_Forge(make(tmp_path))])
    queue = f"forger-{uuid.uuid4().hex[:6]}"
    call = Call(activity="device.ping", queue=TaskQueue.DEVICE.value, arg=ProbeRequest().model_dump())
    async with Worker(forger, task_queue=queue, workflows=[CallActivity]):
        with pytest.raises(WorkflowFailureError) as failed:
            await forger.execute_workflow(
                CallActivity.run, call, id=f"forged-activity-{uuid.uuid4().hex[:8]}", task_queue=queue,
                execution_timeout=timedelta(seconds=30),
            )  # fmt: skip
    refusal = _activity_refusal(failed.value)
    assert "activity device.ping" in refusal.message and reason in refusal.message


async def test_the_activity_sees_the_workflow_and_the_actor_it_runs_for(
    client: Client, checked_worker: None
) -> None:
    with identity.acting_for(ServiceActor(subject="op-1", tenant="acme", scopes=("devices:write",))):
        seen = await client.execute_workflow(
            CallActivity.run, Call(activity="identity.whoami", queue=QUEUE, arg={}),
            id=f"whoami-{uuid.uuid4().hex[:8]}", task_queue=QUEUE, execution_timeout=timedelta(seconds=30),
        )  # fmt: skip
    assert seen == {
        "service": "workflow:CallActivity",
        "actor": {"subject": "op-1", "tenant": "acme", "scopes": ["devices:write"]},
    }


async def test_an_actor_of_one_tenant_cannot_act_on_another(
    client: Client, api: Any, pool: Pool, checked_worker: None
) -> None:
    device_id, _ = await active_device(api)  # a device of tenant acme
    jti = await pool.fetchval("SELECT jti FROM device.credentials WHERE device_id = $1", device_id)
    revoke = RevokeCredential(tenant="acme", device_id=device_id, jti=jti, reason="intrusion")
    call = Call(
        activity="device.revoke_credential", queue=TaskQueue.DEVICE.value, arg=revoke.model_dump(mode="json")
    )
    intruder = ServiceActor(subject="intruder", tenant="globex")
    with identity.acting_for(intruder), pytest.raises(WorkflowFailureError) as failed:
        await client.execute_workflow(
            CallActivity.run, call, id=f"cross-tenant-{uuid.uuid4().hex[:8]}", task_queue=QUEUE,
            execution_timeout=timedelta(seconds=30),
        )  # fmt: skip
    refusal = _activity_refusal(failed.value)
    assert "tenant 'globex' may not act on tenant 'acme'" in refusal.message
    revoked = await pool.fetchval("SELECT revoked_at FROM device.credentials WHERE jti = $1", jti)
    assert revoked is None
