"""The twin over MQTT: `twin/desired` (retained: the whole desired document and its version, sent
at SUBSCRIBE and on every change) and `twin/delta` (pushed on every change), and the device's
`twin/reported` publishes (the twin's `report` signal, with the HTTP route's limits).

A change of desired reaches the gateway as a NOTIFY on `twin_desired_changed` (payload
`tenant/device_id`), sent by the API once the twin accepted the update; the gateway asks the
twin for its state and pushes it. A change of reported (over HTTP or MQTT) is a NOTIFY on
`twin_reported_changed`: the delta is pushed when it changed. A device that was away gets the
desired document when it subscribes again.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.device_mqtt import notify_twin_changed
from fleetflow.contracts.twin import ReportState, TwinState
from fleetflow.db import Pool
from fleetflow.mqtt_topics import Published, Topic, filter_matches, topic
from fleetflow.twin_state import change_breach, delta, document_breach, merge_patch
from gateway import codec
from workflows.device_twin import DeviceTwin, twin_id

if TYPE_CHECKING:
    from gateway.connection import Connection

log = logging.getLogger(__name__)


# Temporal's answers that say it could not take the call now (not: no such twin)
TEMPORAL_AWAY = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.ABORTED,
    }
)


class TwinPush:
    """Pushes twin documents to subscribed connections; takes reported publishes."""

    def __init__(self, temporal: Client, pool: Pool) -> None:
        self.temporal = temporal
        self.pool = pool

    async def _state(self, tenant: str, device_id: str) -> TwinState | None:
        try:
            state: TwinState = await self.temporal.get_workflow_handle(twin_id(tenant, device_id)).query(
                DeviceTwin.get
            )
        except RPCError:
            return None  # no twin (yet): nothing to push
        return state

    async def push(
        self, conn: Connection, kinds: tuple[Topic, ...] = (Topic.TWIN_DESIRED, Topic.TWIN_DELTA)
    ) -> None:
        """Send the twin's desired document and delta to conn, where it subscribed to them."""
        claims = conn.claims
        if claims is None:
            return
        wanted = [k for k in kinds if self._subscribed(conn, topic(claims.tenant, claims.device_id, k))]
        if not wanted:
            return
        docs = await self.documents(claims.tenant, claims.device_id)
        if docs is None:
            return
        desired, body = docs
        for kind in wanted:
            name = topic(claims.tenant, claims.device_id, kind)
            if kind is Topic.TWIN_DESIRED:
                conn.push(name, desired, retain=True)
            else:
                if kinds == (Topic.TWIN_DELTA,) and body == conn.last_delta:
                    continue  # a change of reported that left the delta as it was
                conn.last_delta = body
                conn.push(name, body)

    async def documents(self, tenant: str, device_id: str) -> tuple[bytes, bytes] | None:
        """The `twin/desired` and `twin/delta` payloads of the device's twin; None: no twin."""
        state = await self._state(tenant, device_id)
        if state is None:
            return None
        desired: dict[str, Any] = {"desired": state.desired, "version": state.desired_version}
        doc = {"delta": delta(state.desired, state.reported), "version": state.desired_version}
        return json.dumps(desired).encode(), json.dumps(doc).encode()

    @staticmethod
    def _subscribed(conn: Connection, name: str) -> bool:
        return any(filter_matches(f, name) for f in conn.subscriptions)

    async def reported(self, conn: Connection, _target: Published, payload: bytes) -> int:
        """A `twin/reported` publish: the PUBACK reason code (0x99 for a document the HTTP route
        would refuse, nothing recorded)."""
        claims = conn.claims
        assert claims is not None
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return codec.RC5_PAYLOAD_INVALID
        if isinstance(doc, dict) and set(doc) == {"reported"}:
            doc = doc["reported"]  # the HTTP body's shape
        if not isinstance(doc, dict) or document_breach(doc, "reported") is not None:
            return codec.RC5_PAYLOAD_INVALID
        handle = self.temporal.get_workflow_handle(twin_id(claims.tenant, claims.device_id))
        try:
            before: TwinState = await handle.query(DeviceTwin.get)
            if change_breach(before, before.desired, merge_patch(before.reported, doc)) is not None:
                return codec.RC5_PAYLOAD_INVALID
            await handle.signal(DeviceTwin.report, ReportState(patch=doc, at=datetime.now(UTC)))
        except RPCError as exc:
            log.warning("report of %s/%s not delivered: %s", claims.tenant, claims.device_id, exc)
            if exc.status in TEMPORAL_AWAY:
                # not recorded, and it may be once Temporal is back: no PUBACK (the connection
                # ends; the device, or the broker's session of a bridge, sends it again), not
                # an answer that 3.1.1 (no failure code) and a broker's device take as done
                conn.close(codec.RC5_SERVER_UNAVAILABLE, "temporal unavailable")
            return codec.RC5_UNSPECIFIED
        # every connection of the device (on any gateway) gets the delta, if it changed
        await notify_twin_changed(self.pool, claims.tenant, claims.device_id, reported=True)
        return 0
