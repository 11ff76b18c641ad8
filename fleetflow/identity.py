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

This module holds the header, the acting-actor context and the checks; the interceptors
that apply them live in `fleetflow.identity_interceptors` (client, activity) and
`fleetflow.identity_workflow` (inside workflows).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError

from fleetflow.security import ServiceActor, ServiceIdentity

HEADER = "fleetflow-identity"
REFUSED = "Unauthenticated"
_SIGN = "__fleetflow_sign_identity"
_VERIFY = "__fleetflow_verify_identity"
_CONVERTER = PayloadConverter.default
# a client reuses a token this long for the same actor and call (it is valid for 5 minutes)
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
