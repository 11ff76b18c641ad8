"""Service identity through Temporal headers: forged, missing or foreign identities are refused
by the workers before anything runs; a valid one reaches the activity, tenant and all."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio import client as temporal_client
from temporalio import worker as temporal_worker
from temporalio.api.common.v1 import Payload
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import RetryPolicy
from temporalio.converter import PayloadCodec
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

from fleetflow import identity
from fleetflow.contracts.common import Actor, DomainEvent, TaskQueue
from fleetflow.contracts.devices import RevokeCredential
from fleetflow.contracts.events import EventBatch, RetractEvent, RetractEvents
from fleetflow.contracts.system import ProbeRequest, SystemCheckRequest
from fleetflow.db import Pool
from fleetflow.keys import KeyRing
from fleetflow.security import ServiceActor, ServiceCall, issue_service_token, issue_token
from fleetflow.temporal import interceptors
from tests.integration.flows import active_device
from tests.support import TEST_KEYS, eventually

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

            async def signal_workflow(self, input: temporal_client.SignalWorkflowInput) -> None:
                input.headers = forge._headers(input.headers)
                await super().signal_workflow(input)

            async def query_workflow(self, input: temporal_client.QueryWorkflowInput) -> Any:
                input.headers = forge._headers(input.headers)
                return await super().query_workflow(input)

            async def start_workflow_update(
                self, input: temporal_client.StartWorkflowUpdateInput
            ) -> temporal_client.WorkflowUpdateHandle[Any]:
                input.headers = forge._headers(input.headers)
                return await super().start_workflow_update(input)

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
            call.activity,
            call.arg,
            task_queue=call.queue,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=2),
        )


class Bump(BaseModel):
    amount: int
    actor: str | None = None


class SetTotal(BaseModel):
    total: int
    actor: Actor | None = None


@workflow.defn(sandboxed=False)
class Tally:
    """A counter that signals, updates (with and without a validator) and a query reach."""

    def __init__(self) -> None:
        self.total = 0
        self.stopped = False

    @workflow.run
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.stopped)
        return self.total

    @workflow.signal
    def add(self, bump: Bump) -> None:
        self.total += bump.amount

    @workflow.signal
    def stop(self) -> None:
        self.stopped = True

    @workflow.update
    def set_total(self, request: SetTotal) -> int:
        self.total = request.total
        return self.total

    @set_total.validator
    def _check_total(self, request: SetTotal) -> None:
        if request.total < 0:
            raise ApplicationError("negative", type="BadTotal")

    @workflow.update
    def add_unchecked(self, bump: Bump) -> int:
        """An update without a validator: the identity is checked before its handler."""
        self.total += bump.amount
        return self.total

    @workflow.query
    def get(self) -> int:
        return self.total


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
    async with Worker(client, task_queue=QUEUE, workflows=[CallActivity, Tally], activities=[whoami]):
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
            "SystemCheck",
            SystemCheckRequest(timeout_s=5),
            id=f"forged-{uuid.uuid4().hex[:8]}",
            task_queue=TaskQueue.ORCHESTRATION.value,
            execution_timeout=timedelta(seconds=30),
        )
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
                CallActivity.run,
                call,
                id=f"forged-activity-{uuid.uuid4().hex[:8]}",
                task_queue=queue,
                execution_timeout=timedelta(seconds=30),
            )
    refusal = _activity_refusal(failed.value)
    assert "activity device.ping" in refusal.message and reason in refusal.message


async def test_the_activity_sees_the_workflow_and_the_actor_it_runs_for(
    client: Client, checked_worker: None
) -> None:
    with identity.acting_for(ServiceActor(subject="op-1", tenant="acme", scopes=("devices:write",))):
        seen = await client.execute_workflow(
            CallActivity.run,
            Call(activity="identity.whoami", queue=QUEUE, arg={}),
            id=f"whoami-{uuid.uuid4().hex[:8]}",
            task_queue=QUEUE,
            execution_timeout=timedelta(seconds=30),
        )
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
            CallActivity.run,
            call,
            id=f"cross-tenant-{uuid.uuid4().hex[:8]}",
            task_queue=QUEUE,
            execution_timeout=timedelta(seconds=30),
        )
    refusal = _activity_refusal(failed.value)
    assert "tenant 'globex' may not act on tenant 'acme'" in refusal.message
    revoked = await pool.fetchval("SELECT revoked_at FROM device.credentials WHERE jti = $1", jti)
    assert revoked is None


# --- signals, updates and queries --------------------------------------------------------


async def _tally(client: Client) -> temporal_client.WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        Tally.run,
        id=f"tally-{uuid.uuid4().hex[:8]}",
        task_queue=QUEUE,
        execution_timeout=timedelta(seconds=60),
    )


def _bound(workflow_id: str, op: str, update_id: str | None = None) -> str:
    """A valid token, as a history holds one, made for `op` on `workflow_id`."""
    call = ServiceCall(workflow_id=workflow_id, ops=(op,), update_id=update_id)
    return issue_service_token(TEST_KEYS, service="api", actor=ServiceActor(subject="op"), call=call)


def _ignoring_workflow(make: Callable[[Path], str | None]) -> Callable[[Path, str], str | None]:
    return lambda tmp, wid: make(tmp)


# the forgeries of FORGERIES, plus valid headers copied from another workflow or operation
MESSAGE_FORGERIES: dict[str, tuple[Callable[[Path, str], str | None], str]] = {
    **{name: (_ignoring_workflow(make), reason) for name, (make, reason) in FORGERIES.items()},
    "copied-from-another-workflow": (
        lambda tmp, wid: _bound("tally-elsewhere", "signal:add"),
        "another workflow",
    ),
    "copied-from-another-operation": (lambda tmp, wid: _bound(wid, "signal:stop"), "not signal:add"),
}


async def _total_once_counted(handle: temporal_client.WorkflowHandle[Any, Any]) -> int:
    total: int = await eventually(lambda: handle.query(Tally.get), lambda t: t != 0)
    return total


@pytest.mark.parametrize("case", list(MESSAGE_FORGERIES))
async def test_a_signal_without_a_valid_identity_changes_nothing(
    client: Client, checked_worker: None, tmp_path: Path, case: str
) -> None:
    handle = await _tally(client)
    make, _ = MESSAGE_FORGERIES[case]
    forger = _with_interceptors(client, [_Forge(make(tmp_path, handle.id))])
    await forger.get_workflow_handle(handle.id).signal(Tally.add, Bump(amount=1000))
    await handle.signal(Tally.add, Bump(amount=1))  # handled after the forged one
    assert await _total_once_counted(handle) == 1
    await handle.signal(Tally.stop)
    assert await handle.result() == 1
    # the closed run replays from its history to answer: the checks reach the same verdicts
    assert await handle.query(Tally.get) == 1


async def test_a_signal_whose_payload_names_another_actor_is_dropped(
    client: Client, checked_worker: None
) -> None:
    handle = await _tally(client)
    with identity.acting_for(ServiceActor(subject="op-1", tenant="acme")):
        await handle.signal(Tally.add, Bump(amount=1000, actor="admin"))
        await handle.signal(Tally.add, Bump(amount=1, actor="op-1"))
    assert await _total_once_counted(handle) == 1
    await handle.signal(Tally.stop)


@pytest.mark.parametrize("case", ["missing", "foreign-key", "expired", "api-token"])
async def test_an_update_without_a_valid_identity_is_rejected(
    client: Client, checked_worker: None, tmp_path: Path, case: str
) -> None:
    handle = await _tally(client)
    make, reason = FORGERIES[case]
    forged = _with_interceptors(client, [_Forge(make(tmp_path))]).get_workflow_handle(handle.id)
    with pytest.raises(WorkflowUpdateFailedError) as validated:
        await forged.execute_update(Tally.set_total, SetTotal(total=1000))
    with pytest.raises(WorkflowUpdateFailedError) as handled:  # no validator: refused before the handler
        await forged.execute_update(Tally.add_unchecked, Bump(amount=1000))
    for failed in (validated.value, handled.value):
        assert isinstance(failed.cause, ApplicationError) and failed.cause.type == identity.REFUSED
        assert reason in failed.cause.message
    assert await handle.query(Tally.get) == 0
    await handle.signal(Tally.stop)


async def test_an_update_header_copied_from_another_update_is_rejected(
    client: Client, checked_worker: None
) -> None:
    """A token names its update id: copied into an update with another id it is refused (the
    same id again is the same update, which Temporal never runs twice)."""
    handle = await _tally(client)
    copied = _bound(handle.id, "update:set_total", update_id="the-first-update")
    forged = _with_interceptors(client, [_Forge(copied)]).get_workflow_handle(handle.id)
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await forged.execute_update(Tally.set_total, SetTotal(total=1000), id="another-update")
    assert isinstance(failed.value.cause, ApplicationError) and "another update" in failed.value.cause.message
    assert await handle.execute_update(Tally.set_total, SetTotal(total=7)) == 7
    await handle.signal(Tally.stop)
    assert await handle.result() == 7
    assert await handle.query(Tally.get) == 7  # replayed: the update's handler check passes again


async def test_an_update_header_older_than_its_token_is_rejected(
    client: Client, checked_worker: None
) -> None:
    """Temporal deduplicates an update id within one run only: the same update (header, sealed
    payload and id) copied out of an earlier run's history reaches a later run as a new one.
    An update's sender waits for its answer, so it has no reason to be taken after its token
    expired (before: taken for 24 hours, the grace meant for signals)."""
    handle = await _tally(client)
    past = datetime.now(UTC) - timedelta(minutes=30)
    call = ServiceCall(workflow_id=handle.id, ops=("update:set_total",), update_id="u-of-an-earlier-run")
    copied = issue_service_token(
        TEST_KEYS, service="api", actor=ServiceActor(subject="op"), now=past, call=call
    )
    forged = _with_interceptors(client, [_Forge(copied)]).get_workflow_handle(handle.id)
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await forged.execute_update(Tally.set_total, SetTotal(total=1000), id="u-of-an-earlier-run")
    assert isinstance(failed.value.cause, ApplicationError) and "expired" in failed.value.cause.message
    assert await handle.query(Tally.get) == 0
    await handle.signal(Tally.stop)
    assert await handle.result() == 0


async def test_an_update_payload_actor_must_be_the_verified_one(client: Client, checked_worker: None) -> None:
    handle = await _tally(client)
    claimed = Actor(subject="op-1", tenant="acme", scopes=["admin"])
    with identity.acting_for(ServiceActor(subject="op-1", tenant="acme", scopes=("devices:read",))):
        with pytest.raises(WorkflowUpdateFailedError) as failed:
            await handle.execute_update(Tally.set_total, SetTotal(total=1000, actor=claimed))
        assert isinstance(failed.value.cause, ApplicationError)
        assert "scopes its identity lacks: admin" in failed.value.cause.message
        honest = claimed.model_copy(update={"scopes": ["devices:read"]})
        assert await handle.execute_update(Tally.set_total, SetTotal(total=5, actor=honest)) == 5
    await handle.signal(Tally.stop)


@pytest.mark.parametrize("case", ["missing", "foreign-key", "api-token"])
async def test_a_query_without_a_valid_identity_fails(
    client: Client, checked_worker: None, tmp_path: Path, case: str
) -> None:
    handle = await _tally(client)
    make, _ = FORGERIES[case]
    forged = _with_interceptors(client, [_Forge(make(tmp_path))]).get_workflow_handle(handle.id)
    # (the reason travels encrypted, like every failure: the client sees "Encoded failure")
    with pytest.raises(WorkflowQueryFailedError):
        await forged.query(Tally.get)
    with pytest.raises(WorkflowQueryFailedError):
        await (
            _with_interceptors(client, [_Forge(_bound("tally-elsewhere", "query:get"))])
            .get_workflow_handle(handle.id)
            .query(Tally.get)
        )
    assert await handle.query(Tally.get) == 0
    await handle.signal(Tally.stop)


async def test_a_start_header_copied_from_another_workflow_is_refused(client: Client, workers: None) -> None:
    wid = f"forged-{uuid.uuid4().hex[:8]}"
    copied = _bound("system-check-elsewhere", "start:SystemCheck")
    with pytest.raises(WorkflowFailureError) as failed:
        await _with_interceptors(client, [_Forge(copied)]).execute_workflow(
            "SystemCheck",
            SystemCheckRequest(timeout_s=5),
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
            execution_timeout=timedelta(seconds=30),
        )
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and "another workflow" in cause.message


async def test_a_workflow_started_while_no_worker_polls_runs_once_one_does(client: Client) -> None:
    """The start is judged at the moment the server took it, not at the first workflow task:
    a run accepted during a worker outage longer than its token's life (5 minutes; here a
    few seconds) is not refused when the workers come back (before: failed, "token expired")."""
    queue, wid = f"outage-{uuid.uuid4().hex[:8]}", f"outage-{uuid.uuid4().hex[:8]}"
    issued = datetime.now(UTC)
    short = issue_service_token(
        TEST_KEYS,
        service="api",
        actor=ServiceActor(subject="op"),
        now=issued,
        ttl=timedelta(seconds=10),
        call=ServiceCall(workflow_id=wid, ops=("start:Tally",)),
    )
    expires = issued + timedelta(seconds=10)
    handle = await _with_interceptors(client, [_Forge(short)]).start_workflow(
        Tally.run, id=wid, task_queue=queue, execution_timeout=timedelta(minutes=2)
    )
    taken = (await handle.describe()).start_time
    assert taken is not None and taken < expires, "the server took the start after the token expired"
    # the token has expired before any worker sees the run
    past = expires + timedelta(seconds=1)
    await eventually(lambda: asyncio.sleep(0.5, datetime.now(UTC)), lambda now: now > past)
    async with Worker(client, task_queue=queue, workflows=[Tally]):
        await client.get_workflow_handle(wid).signal(Tally.stop)
        assert await client.get_workflow_handle(wid).result() == 0


# --- retiring a key while runs are in flight (issue 12.10) ---------------------------------


@workflow.defn(sandboxed=False)
class RetiringSaga:
    """A step that fails once, a step that fails for good, and the compensation, which fails
    once too: every first attempt retires the key that signed it."""

    def __init__(self) -> None:
        self.done: list[str] = []

    @workflow.run
    async def run(self) -> list[str]:
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=3)
        timeout = timedelta(seconds=10)
        self.done.append(
            await workflow.execute_activity("saga.step", start_to_close_timeout=timeout, retry_policy=retry)
        )
        try:
            await workflow.execute_activity("saga.fail", start_to_close_timeout=timeout, retry_policy=retry)
        except ActivityError:
            self.done.append(
                await workflow.execute_activity(
                    "saga.undo", start_to_close_timeout=timeout, retry_policy=retry
                )
            )
        return self.done

    @workflow.query
    def steps(self) -> list[str]:
        return self.done


async def test_retiring_the_signing_key_does_not_fail_retries_in_flight(
    client: Client, tmp_path: Path
) -> None:
    """An activity's retry and a compensation's retry that were scheduled before their signing
    key was retired complete after it; a replay of the run (a query after it closed) too."""
    ring = KeyRing(tmp_path / "keys")
    ours = _with_interceptors(client, interceptors(ring, "tests"))
    retired: list[str] = []

    def retire_on_first_attempt(name: str) -> str:
        if activity.info().attempt == 1:
            kid = ring.signing_key().kid  # the key that signed this activity's token
            ring.rotate()
            ring.retire(kid)
            retired.append(kid)
            raise ApplicationError(f"{name}: a transient failure")
        return name

    @activity.defn(name="saga.step")
    async def step() -> str:
        return retire_on_first_attempt("step")

    @activity.defn(name="saga.fail")
    async def fail() -> str:
        raise ApplicationError("the operation fails for good", non_retryable=True)

    @activity.defn(name="saga.undo")
    async def undo() -> str:
        return retire_on_first_attempt("undo")

    queue = f"saga-{uuid.uuid4().hex[:6]}"
    async with Worker(ours, task_queue=queue, workflows=[RetiringSaga], activities=[step, fail, undo]):
        handle = await ours.start_workflow(
            RetiringSaga.run,
            id=f"saga-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            execution_timeout=timedelta(seconds=60),
        )
        assert await handle.result() == ["step", "undo"]
        assert len(retired) == 2 and all(ring.get(kid) is None for kid in retired)
        # the closed run replays (its start was signed by a key retired since) to answer
        assert await handle.query(RetiringSaga.steps) == ["step", "undo"]


# --- the tenant guard looks inside what an activity is given (issue 18.11) -----------------


def _event(tenant: str) -> DomainEvent:
    return DomainEvent(
        event_id=f"{tenant}/guard-{uuid.uuid4().hex[:8]}",
        tenant=tenant,
        type="test.guard",
        occurred_at=datetime.now(UTC),
        actor="tester",
    )


async def _call(client: Client, activity_name: str, arg: BaseModel) -> Any:
    call = Call(activity=activity_name, queue=TaskQueue.NOTIFICATION.value, arg=arg.model_dump(mode="json"))
    return await client.execute_workflow(
        CallActivity.run,
        call,
        id=f"guard-{uuid.uuid4().hex[:8]}",
        task_queue=QUEUE,
        execution_timeout=timedelta(seconds=30),
    )


async def test_an_actor_cannot_record_events_for_another_tenant_inside_a_batch(
    client: Client, pool: Pool, workers: None, checked_worker: None
) -> None:
    ours, theirs = _event("acme"), _event("globex")
    with identity.acting_for(ServiceActor(subject="intruder", tenant="acme")):
        with pytest.raises(WorkflowFailureError) as failed:
            await _call(client, "notification.record_events", EventBatch(events=[ours, theirs]))
    assert "tenant 'acme' may not act on tenant 'globex'" in _activity_refusal(failed.value).message
    ids = [ours.event_id, theirs.event_id]
    assert await pool.fetchval("SELECT count(*) FROM notification.events WHERE event_id = ANY($1)", ids) == 0


async def test_an_actor_cannot_retract_another_tenants_event(
    client: Client, pool: Pool, workers: None, checked_worker: None
) -> None:
    theirs = _event("globex")
    with identity.acting_for(ServiceActor(subject="service:ingestion")):  # a platform actor
        assert await _call(client, "notification.record_events", EventBatch(events=[theirs])) == 1
    with identity.acting_for(ServiceActor(subject="intruder", tenant="acme")):
        await _call(client, "notification.retract_event", RetractEvent(event_id=theirs.event_id))
        with pytest.raises(WorkflowFailureError) as failed:
            await _call(
                client, "notification.retract_event", RetractEvent(event_id=theirs.event_id, tenant="globex")
            )
    assert "may not act on tenant 'globex'" in _activity_refusal(failed.value).message
    exists = "SELECT count(*) FROM notification.events WHERE event_id = $1"
    assert await pool.fetchval(exists, theirs.event_id) == 1
    with identity.acting_for(ServiceActor(subject="owner", tenant="globex")):
        await _call(client, "notification.retract_event", RetractEvent(event_id=theirs.event_id))
    assert await pool.fetchval(exists, theirs.event_id) == 0


async def test_an_actor_cannot_retract_another_tenants_bulk_events(
    client: Client, pool: Pool, workers: None, checked_worker: None
) -> None:
    theirs = _event("globex")
    with identity.acting_for(ServiceActor(subject="service:ingestion")):
        assert await _call(client, "notification.record_events", EventBatch(events=[theirs])) == 1
    retract = RetractEvents(tenant="globex", type=theirs.type, id_prefix=theirs.event_id)
    with identity.acting_for(ServiceActor(subject="intruder", tenant="acme")):
        with pytest.raises(WorkflowFailureError) as failed:
            await _call(client, "notification.retract_events", retract)
        mine = retract.model_copy(update={"tenant": "acme"})
        assert await _call(client, "notification.retract_events", mine) == 0
    assert "may not act on tenant 'globex'" in _activity_refusal(failed.value).message
    exists = "SELECT count(*) FROM notification.events WHERE event_id = $1"
    assert await pool.fetchval(exists, theirs.event_id) == 1


# --- unsealed payloads (issue 18.6) ---------------------------------------------------------


class _SealsOnlyTheIdentity(PayloadCodec):
    """A client's codec that seals its identity header but sends its payloads in clear: a
    client with a valid identity but without the platform's codec."""

    def __init__(self, sealing: PayloadCodec) -> None:
        self.sealing = sealing

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [(await self.sealing.encode([p]))[0] if p.data.startswith(b'"ey') else p for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.sealing.decode(payloads)


async def test_unsealed_signal_and_update_payloads_never_reach_the_workflow(
    client: Client, checked_worker: None
) -> None:
    handle = await _tally(client)
    config = client.config()
    assert client.data_converter.payload_codec is not None
    config["data_converter"] = dataclasses.replace(
        client.data_converter, payload_codec=_SealsOnlyTheIdentity(client.data_converter.payload_codec)
    )
    in_clear = Client(**config).get_workflow_handle(handle.id)
    await in_clear.signal(Tally.add, Bump(amount=1000))
    with pytest.raises(WorkflowUpdateFailedError):
        await in_clear.execute_update(Tally.add_unchecked, Bump(amount=1000))
    await handle.signal(Tally.add, Bump(amount=1))
    assert await _total_once_counted(handle) == 1
    await handle.signal(Tally.stop)
