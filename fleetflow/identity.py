"""Service identity through Temporal: every call carries a signed, short-lived service token.

A client puts a token naming its process and the actor it works for (the API's caller, or
the process itself) into the `fleetflow-identity` header of every workflow start, signal,
update and query. Each token is bound to its call (`ServiceCall`: the workflow id and the
operation, e.g. `signal:report`, plus the run and the update id where the signer knows
them), so a header copied out of one history is refused anywhere else. The worker side
checks every path in before any workflow or activity code runs:

- a workflow checks the token of its start against the time the server took the start;
- a signal, update or query is checked before its handler: a signal with no valid token, or
  whose payload names another actor than its token, is dropped with a warning (a signal
  cannot be refused; it must not change state); an update is rejected by its validator
  (and, for an update without a validator, fails in its handler); a query fails;
- a workflow signs a fresh token for each activity, child workflow, signal and
  continue-as-new it schedules (ES256 is deterministic here, and the time is the
  workflow's, so replay signs the same token), naming itself and the actor it was started
  for;
- an activity checks its token against the time it was first scheduled and refuses an actor
  of one tenant acting on another tenant's data, nested inputs included; the verified
  identity is then `current()` for the activity, for audit and tenant scoping.

Every check made inside a workflow is a function of the token, a moment the server recorded
(the start time, the workflow task's time) and the key set, so replay reaches the verdict the
first run reached: a key counts as retired only from its retirement on. The same rule lets
an activity retry, or a compensation's, that was scheduled before a key was retired finish
after it (issue 12.10), while anything the server takes after the retirement is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio import client as temporal_client
from temporalio import worker as temporal_worker
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError

from fleetflow.keys import KeyRing
from fleetflow.security import (
    AuthError,
    ServiceActor,
    ServiceCall,
    ServiceIdentity,
    issue_service_token,
    verify_service_token,
)

HEADER = "fleetflow-identity"
REFUSED = "Unauthenticated"
_SIGN = "__fleetflow_sign_identity"
_VERIFY = "__fleetflow_verify_identity"
_CONVERTER = PayloadConverter.default
# a client reuses a token this long for the same actor and call (it is valid for 5 minutes)
_REUSE = timedelta(minutes=1)
# A signal (or update) can wait in history for a worker (an outage, a deploy), and the
# workflow task's time, the only moment its handler can know deterministically, is later
# than its sending by that wait: its token is still taken this long after it expired. The
# token is bound to its workflow and signal name, so the allowance is no open door. An
# update's validator takes no grace (see handle_update_validator).
DELIVERY_GRACE = timedelta(hours=24)
# how deep the tenant guard looks into an activity's input (models in models, lists of them)
_NESTING = 8

_acting_for: ContextVar[ServiceActor | None] = ContextVar("fleetflow_acting_for", default=None)
_current: ContextVar[ServiceIdentity | None] = ContextVar("fleetflow_identity", default=None)


def act_for(actor: ServiceActor) -> None:
    """Make the Temporal calls of the current task carry `actor` (the API sets its caller)."""
    _acting_for.set(actor)


@contextmanager
def acting_for(actor: ServiceActor) -> Iterator[None]:
    """Temporal calls made inside the block carry `actor`."""
    token = _acting_for.set(actor)
    try:
        yield
    finally:
        _acting_for.reset(token)


def current() -> ServiceIdentity:
    """The verified identity of the running activity."""
    identity = _current.get()
    if identity is None:
        raise RuntimeError("no verified service identity in this context")
    return identity


def acting_tenant() -> str | None:
    """The tenant of the running activity's verified actor (None: a platform actor, or no
    activity), to scope what the activity touches."""
    identity = _current.get()
    return identity.actor.tenant if identity is not None else None


def refused(reason: str) -> ApplicationError:
    """The error of a call without a valid identity: never retried, says why."""
    return ApplicationError(f"service identity refused: {reason}", type=REFUSED, non_retryable=True)


def _token_of(headers: Mapping[str, Payload]) -> str | None:
    payload = headers.get(HEADER)
    if payload is None:
        return None
    try:
        value = _CONVERTER.from_payloads([payload])[0]
    except Exception:  # an unsealed header the codec refused, or garbage: no token
        return None
    return value if isinstance(value, str) else None


def _with_token(headers: Mapping[str, Payload], token: str) -> dict[str, Payload]:
    return {**headers, HEADER: _CONVERTER.to_payloads([token])[0]}


def foreign_tenant(args: Sequence[Any], tenant: str) -> str | None:
    """The first tenant other than `tenant` that an input names: a `tenant` field of the
    input, or of a model nested in it (lists of models included, e.g. every event of an
    EventBatch). Free-form dicts (configs, metadata, event data) are data, not addresses,
    and are not searched."""
    stack: list[tuple[Any, int]] = [(arg, 0) for arg in args]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, BaseModel):
            named = getattr(value, "tenant", None)
            if isinstance(named, str) and named != tenant:
                return named
            if depth < _NESTING:
                stack.extend((getattr(value, field), depth + 1) for field in type(value).model_fields)
        elif isinstance(value, list | tuple) and depth < _NESTING:
            stack.extend((item, depth + 1) for item in value)
    return None


def actor_mismatch(args: Sequence[Any], actor: ServiceActor) -> str | None:
    """Why a message's payload does not name the actor its verified token names (None when
    it does, or names none): a handler must see the verified actor, never a claimed one. A
    payload actor may hold fewer scopes than the token's, never more."""
    for arg in args:
        named = getattr(arg, "actor", None)
        if named is None:
            continue
        if isinstance(named, str):
            if named != actor.subject:
                return f"the payload names actor {named!r}, its identity {actor.subject!r}"
            continue
        subject, tenant = getattr(named, "subject", None), getattr(named, "tenant", None)
        scopes = set(getattr(named, "scopes", ()) or ())
        if subject != actor.subject or tenant != actor.tenant:
            return (
                f"the payload names actor {subject!r} of tenant {tenant!r}, its identity "
                f"{actor.subject!r} of tenant {actor.tenant!r}"
            )
        extra = scopes - set(actor.scopes)
        if extra:
            return f"the payload claims scopes its identity lacks: {', '.join(sorted(extra))}"
    return None


class ServiceIdentityInterceptor(temporal_client.Interceptor, temporal_worker.Interceptor):
    """Signs outgoing calls as `service` and checks incoming ones against the key ring."""

    def __init__(self, ring: KeyRing, service: str, issuer: str = "fleetflow") -> None:
        self.ring = ring
        self.service = service
        self.issuer = issuer
        self._tokens: dict[tuple[ServiceActor, ServiceCall | None], tuple[str, str, datetime]] = {}

    # --- signing ---------------------------------------------------------------

    def token(self, call: ServiceCall | None = None) -> str:
        """A token for the current actor (the process itself when none is set), for `call`."""
        actor = _acting_for.get() or ServiceActor(subject=f"service:{self.service}")
        now = datetime.now(UTC)
        kid = self.ring.signing_key().kid
        cache = call is None or call.update_id is None  # an update id is never used twice
        cached = self._tokens.get((actor, call)) if cache else None
        if cached is not None and cached[1] == kid and now - cached[2] < _REUSE:
            return cached[0]
        token = issue_service_token(
            self.ring, service=self.service, actor=actor, call=call, issuer=self.issuer, now=now
        )
        if cache:
            if len(self._tokens) > 10_000:  # one entry per recent caller and call; bounded
                self._tokens.clear()
            self._tokens[(actor, call)] = (token, kid, now)
        return token

    def verify(
        self,
        token: str | None,
        at: datetime | None,
        *,
        call: ServiceCall | None = None,
        grace: timedelta = timedelta(0),
    ) -> ServiceIdentity:
        """The identity in token, valid at `at` (now when None) and made for `call`;
        AuthError when missing or invalid."""
        if token is None:
            raise AuthError(f"no {HEADER} header")
        return verify_service_token(self.ring, token, self.issuer, at=at, grace=grace, call=call)

    # --- the workflow's externs (run outside the sandbox) ---------------------

    def _sign_for_workflow(
        self, service: str, actor: dict[str, Any], at: datetime, call: dict[str, Any]
    ) -> str:
        return issue_service_token(
            self.ring, service=service, actor=ServiceActor.model_validate(actor),
            call=ServiceCall.model_validate(call), issuer=self.issuer, now=at,
        )  # fmt: skip

    def _verify_for_workflow(
        self, token: str | None, at: datetime | None, call: dict[str, Any], grace_s: float = 0.0
    ) -> dict[str, Any] | str:
        # a function of the token, `at` (a time the server recorded) and the key set only, so
        # a replay reaches the first run's verdict, even after a key was retired
        try:
            identity = self.verify(
                token, at, call=ServiceCall.model_validate(call), grace=timedelta(seconds=grace_s)
            )
        except AuthError as exc:
            return str(exc)
        return identity.model_dump()

    # --- interceptor hooks -----------------------------------------------------

    def intercept_client(
        self, next: temporal_client.OutboundInterceptor
    ) -> temporal_client.OutboundInterceptor:
        """Sign every start, signal, update and query."""
        return _SigningClient(next, self)

    def intercept_activity(
        self, next: temporal_worker.ActivityInboundInterceptor
    ) -> temporal_worker.ActivityInboundInterceptor:
        """Check every activity before it runs."""
        return _CheckedActivity(next, self)

    def workflow_interceptor_class(
        self, input: temporal_worker.WorkflowInterceptorClassInput
    ) -> type[temporal_worker.WorkflowInboundInterceptor]:
        """Check every workflow's start, signal, update and query; sign what it schedules."""
        input.unsafe_extern_functions.update(
            {_SIGN: self._sign_for_workflow, _VERIFY: self._verify_for_workflow}
        )
        return _CheckedWorkflow


class _SigningClient(temporal_client.OutboundInterceptor):
    def __init__(self, next: temporal_client.OutboundInterceptor, root: ServiceIdentityInterceptor) -> None:
        super().__init__(next)
        self.root = root

    def _sign(self, headers: Mapping[str, Payload], call: ServiceCall) -> dict[str, Payload]:
        return _with_token(headers, self.root.token(call))

    async def start_workflow(
        self, input: temporal_client.StartWorkflowInput
    ) -> temporal_client.WorkflowHandle[Any, Any]:
        # signal-with-start sends one header for both
        ops = (f"start:{input.workflow}",) + ((f"signal:{input.start_signal}",) if input.start_signal else ())
        input.headers = self._sign(input.headers, ServiceCall(workflow_id=input.id, ops=ops))
        return await super().start_workflow(input)

    async def signal_workflow(self, input: temporal_client.SignalWorkflowInput) -> None:
        call = ServiceCall(workflow_id=input.id, ops=(f"signal:{input.signal}",))
        input.headers = self._sign(input.headers, call)
        await super().signal_workflow(input)

    async def query_workflow(self, input: temporal_client.QueryWorkflowInput) -> Any:
        call = ServiceCall(workflow_id=input.id, ops=(f"query:{input.query}",))
        input.headers = self._sign(input.headers, call)
        return await super().query_workflow(input)

    async def start_workflow_update(
        self, input: temporal_client.StartWorkflowUpdateInput
    ) -> temporal_client.WorkflowUpdateHandle[Any]:
        input.update_id = input.update_id or str(uuid.uuid4())
        call = ServiceCall(workflow_id=input.id, ops=(f"update:{input.update}",), update_id=input.update_id)
        input.headers = self._sign(input.headers, call)
        return await super().start_workflow_update(input)

    async def start_update_with_start_workflow(
        self, input: temporal_client.StartWorkflowUpdateWithStartInput
    ) -> temporal_client.WorkflowUpdateHandle[Any]:
        start, update = input.start_workflow_input, input.update_workflow_input
        start.headers = self._sign(
            start.headers, ServiceCall(workflow_id=start.id, ops=(f"start:{start.workflow}",))
        )
        update.update_id = update.update_id or str(uuid.uuid4())
        call = ServiceCall(workflow_id=start.id, ops=(f"update:{update.update}",), update_id=update.update_id)
        update.headers = self._sign(update.headers, call)
        return await super().start_update_with_start_workflow(input)


class _CheckedActivity(temporal_worker.ActivityInboundInterceptor):
    def __init__(
        self, next: temporal_worker.ActivityInboundInterceptor, root: ServiceIdentityInterceptor
    ) -> None:
        super().__init__(next)
        self.root = root

    async def execute_activity(self, input: temporal_worker.ExecuteActivityInput) -> Any:
        info = activity.info()
        call = ServiceCall(
            workflow_id=info.workflow_id or "", ops=(f"activity:{info.activity_type}",),
            run_id=info.workflow_run_id,
        )  # fmt: skip
        try:
            # checked at the first schedule (the server's time), so a retry hours later, or
            # after the signing key was retired, gets the verdict the first attempt got
            identity = self.root.verify(_token_of(input.headers), info.scheduled_time, call=call)
        except AuthError as exc:
            raise refused(f"activity {info.activity_type}: {exc}") from None
        tenant = identity.actor.tenant
        if tenant is not None:
            other = foreign_tenant(input.args, tenant)
            if other is not None:
                raise refused(f"an actor of tenant {tenant!r} may not act on tenant {other!r}")
        identity_token = _current.set(identity)
        # calls this activity makes to Temporal carry the same actor
        actor_token = _acting_for.set(identity.actor)
        try:
            return await super().execute_activity(input)
        finally:
            _acting_for.reset(actor_token)
            _current.reset(identity_token)


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
            raise refused(f"workflow {info.workflow_type} started without a valid identity: {verdict}")
        self.identity = verdict
        return await super().execute_workflow(input)

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
