"""The client and activity interceptors of service identity (see `fleetflow.identity`).

`ServiceIdentityInterceptor` signs every start, signal, update and query a client sends,
checks every activity's token and tenant before it runs, and hands workflows the checks of
`fleetflow.identity_workflow`, whose signing and verifying it runs outside the sandbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio import client as temporal_client
from temporalio import worker as temporal_worker
from temporalio.api.common.v1 import Payload

from fleetflow.identity import (
    _SIGN,
    _VERIFY,
    HEADER,
    _acting_for,
    _current,
    _token_of,
    _with_token,
    foreign_tenant,
    refused,
)
from fleetflow.identity_workflow import _CheckedWorkflow
from fleetflow.keys import KeyRing
from fleetflow.security import (
    AuthError,
    ServiceActor,
    ServiceCall,
    ServiceIdentity,
    issue_service_token,
    verify_service_token,
)

_REUSE = timedelta(minutes=1)


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
            self.ring,
            service=service,
            actor=ServiceActor.model_validate(actor),
            call=ServiceCall.model_validate(call),
            issuer=self.issuer,
            now=at,
        )

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
            workflow_id=info.workflow_id or "",
            ops=(f"activity:{info.activity_type}",),
            run_id=info.workflow_run_id,
        )
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
