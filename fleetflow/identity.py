"""Service identity through Temporal: every call carries a signed, short-lived service token.

A client puts a token naming its process and the actor it works for (the API's caller, or
the process itself) into the `fleetflow-identity` header of every workflow start, signal,
update and query. The worker side checks it before anything runs:

- a workflow checks the token of its start against its own start time (the check gives the
  same answer on replay) and fails with `Unauthenticated` when it is missing or invalid;
- a workflow signs a fresh token for each activity, child workflow and continue-as-new it
  schedules (ES256 is deterministic here, and the time is the workflow's, so replay signs
  the same token), naming itself and the actor it was started for;
- an activity checks its token against the time it was first scheduled (retries hours later
  stay valid) and refuses an actor of one tenant acting on another tenant's data; the
  verified identity is then `current()` for the activity, for audit and tenant scoping.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

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
    ServiceIdentity,
    issue_service_token,
    verify_service_token,
)

HEADER = "fleetflow-identity"
REFUSED = "Unauthenticated"
_SIGN = "__fleetflow_sign_identity"
_VERIFY = "__fleetflow_verify_identity"
_CONVERTER = PayloadConverter.default
# a client reuses a token this long for the same actor (it is valid for 5 minutes)
_REUSE = timedelta(minutes=1)

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


def refused(reason: str) -> ApplicationError:
    """The error of a call without a valid identity: never retried, says why."""
    return ApplicationError(f"service identity refused: {reason}", type=REFUSED, non_retryable=True)


def _token_of(headers: Mapping[str, Payload]) -> str | None:
    payload = headers.get(HEADER)
    if payload is None:
        return None
    value = _CONVERTER.from_payloads([payload])[0]
    return value if isinstance(value, str) else None


def _with_token(headers: Mapping[str, Payload], token: str) -> dict[str, Payload]:
    return {**headers, HEADER: _CONVERTER.to_payloads([token])[0]}


class ServiceIdentityInterceptor(temporal_client.Interceptor, temporal_worker.Interceptor):
    """Signs outgoing calls as `service` and checks incoming ones against the key ring."""

    def __init__(self, ring: KeyRing, service: str, issuer: str = "fleetflow") -> None:
        self.ring = ring
        self.service = service
        self.issuer = issuer
        self._tokens: dict[ServiceActor, tuple[str, str, datetime]] = {}

    # --- signing ---------------------------------------------------------------

    def token(self) -> str:
        """A token for the current actor (the process itself when none is set)."""
        actor = _acting_for.get() or ServiceActor(subject=f"service:{self.service}")
        now = datetime.now(UTC)
        kid = self.ring.signing_key().kid
        cached = self._tokens.get(actor)
        if cached is not None and cached[1] == kid and now - cached[2] < _REUSE:
            return cached[0]
        token = issue_service_token(self.ring, service=self.service, actor=actor, issuer=self.issuer, now=now)
        if len(self._tokens) > 10_000:  # one entry per recent caller; never grows without bound
            self._tokens.clear()
        self._tokens[actor] = (token, kid, now)
        return token

    def verify(self, token: str | None, at: datetime, *, allow_retired: bool = False) -> ServiceIdentity:
        """The identity in token, valid at `at`; AuthError when missing or invalid."""
        if token is None:
            raise AuthError(f"no {HEADER} header")
        return verify_service_token(self.ring, token, self.issuer, at=at, allow_retired=allow_retired)

    # --- the workflow's externs (run outside the sandbox) ---------------------

    def _sign_for_workflow(self, service: str, actor: dict[str, Any], at: datetime) -> str:
        return issue_service_token(
            self.ring, service=service, actor=ServiceActor.model_validate(actor), issuer=self.issuer, now=at
        )

    def _verify_for_workflow(self, token: str | None, at: datetime, replaying: bool) -> dict[str, Any] | str:
        try:
            # a replay must reach the same verdict as the first run, even after a key was retired
            return self.verify(token, at, allow_retired=replaying).model_dump()
        except AuthError as exc:
            return str(exc)

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
        """Check every workflow's start; sign what it schedules."""
        input.unsafe_extern_functions.update(
            {_SIGN: self._sign_for_workflow, _VERIFY: self._verify_for_workflow}
        )
        return _CheckedWorkflow


class _SigningClient(temporal_client.OutboundInterceptor):
    def __init__(self, next: temporal_client.OutboundInterceptor, root: ServiceIdentityInterceptor) -> None:
        super().__init__(next)
        self.root = root

    async def start_workflow(
        self, input: temporal_client.StartWorkflowInput
    ) -> temporal_client.WorkflowHandle[Any, Any]:
        input.headers = _with_token(input.headers, self.root.token())
        return await super().start_workflow(input)

    async def signal_workflow(self, input: temporal_client.SignalWorkflowInput) -> None:
        input.headers = _with_token(input.headers, self.root.token())
        await super().signal_workflow(input)

    async def query_workflow(self, input: temporal_client.QueryWorkflowInput) -> Any:
        input.headers = _with_token(input.headers, self.root.token())
        return await super().query_workflow(input)

    async def start_workflow_update(
        self, input: temporal_client.StartWorkflowUpdateInput
    ) -> temporal_client.WorkflowUpdateHandle[Any]:
        input.headers = _with_token(input.headers, self.root.token())
        return await super().start_workflow_update(input)


class _CheckedActivity(temporal_worker.ActivityInboundInterceptor):
    def __init__(
        self, next: temporal_worker.ActivityInboundInterceptor, root: ServiceIdentityInterceptor
    ) -> None:
        super().__init__(next)
        self.root = root

    async def execute_activity(self, input: temporal_worker.ExecuteActivityInput) -> Any:
        info = activity.info()
        try:
            identity = self.root.verify(_token_of(input.headers), info.scheduled_time)
        except AuthError as exc:
            raise refused(f"activity {info.activity_type}: {exc}") from None
        tenant = identity.actor.tenant
        if tenant is not None:
            for arg in input.args:
                other = getattr(arg, "tenant", None)
                if isinstance(other, str) and other != tenant:
                    raise refused(f"an actor of tenant {tenant!r} may not act on tenant {other!r}")
        identity_token = _current.set(identity)
        # calls this activity makes to Temporal carry the same actor
        actor_token = _acting_for.set(identity.actor)
        try:
            return await super().execute_activity(input)
        finally:
            _acting_for.reset(actor_token)
            _current.reset(identity_token)


class _CheckedWorkflow(temporal_worker.WorkflowInboundInterceptor):
    identity: ServiceIdentity | None = None

    def init(self, outbound: temporal_worker.WorkflowOutboundInterceptor) -> None:
        super().init(_SigningWorkflow(outbound, self))

    async def execute_workflow(self, input: temporal_worker.ExecuteWorkflowInput) -> Any:
        info = workflow.info()
        # cryptography imports lazily; inside the sandbox it must be the host's modules
        with workflow.unsafe.imports_passed_through():
            verdict = workflow.extern_functions()[_VERIFY](
                _token_of(input.headers), info.start_time, workflow.unsafe.is_replaying()
            )
        if isinstance(verdict, str):
            raise refused(f"workflow {info.workflow_type} started without a valid identity: {verdict}")
        self.identity = ServiceIdentity.model_validate(verdict)
        return await super().execute_workflow(input)

    def sign(self) -> str:
        """A token naming this workflow and the actor it runs for, at the workflow's time."""
        actor = self.identity.actor if self.identity else ServiceActor(subject="unknown")
        service = f"workflow:{workflow.info().workflow_type}"
        with workflow.unsafe.imports_passed_through():
            token: str = workflow.extern_functions()[_SIGN](service, actor.model_dump(), workflow.now())
        return token


class _SigningWorkflow(temporal_worker.WorkflowOutboundInterceptor):
    def __init__(self, next: temporal_worker.WorkflowOutboundInterceptor, root: _CheckedWorkflow) -> None:
        super().__init__(next)
        self.root = root

    def start_activity(self, input: temporal_worker.StartActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = _with_token(input.headers, self.root.sign())
        return super().start_activity(input)

    def start_local_activity(
        self, input: temporal_worker.StartLocalActivityInput
    ) -> workflow.ActivityHandle[Any]:
        input.headers = _with_token(input.headers, self.root.sign())
        return super().start_local_activity(input)

    async def start_child_workflow(
        self, input: temporal_worker.StartChildWorkflowInput
    ) -> workflow.ChildWorkflowHandle[Any, Any]:
        input.headers = _with_token(input.headers, self.root.sign())
        return await super().start_child_workflow(input)

    def continue_as_new(self, input: temporal_worker.ContinueAsNewInput) -> Any:
        input.headers = _with_token(input.headers, self.root.sign())
        return super().continue_as_new(input)

    async def signal_child_workflow(self, input: temporal_worker.SignalChildWorkflowInput) -> None:
        input.headers = _with_token(input.headers, self.root.sign())
        await super().signal_child_workflow(input)

    async def signal_external_workflow(self, input: temporal_worker.SignalExternalWorkflowInput) -> None:
        input.headers = _with_token(input.headers, self.root.sign())
        await super().signal_external_workflow(input)
