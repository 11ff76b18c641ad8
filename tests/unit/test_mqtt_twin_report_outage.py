"""A `twin/reported` publish while Temporal cannot take it (gateway/twin_push.py): not
acknowledged, so it comes again. Over a bridge the broker had acknowledged it to the device
already, and the bridge acknowledged it to the broker: the report was lost."""

from __future__ import annotations

from typing import Any, cast

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from fleetflow.mqtt_topics import Published, Topic
from fleetflow.security import DeviceClaims
from gateway import codec
from gateway.bridge import _Sender
from gateway.twin_push import TwinPush


class _Handle:
    def __init__(self, status: RPCStatusCode) -> None:
        self.status = status

    async def query(self, *_args: Any, **_kwargs: Any) -> Any:
        raise RPCError("temporal says no", self.status, b"")


class _Temporal:
    def __init__(self, status: RPCStatusCode) -> None:
        self.status = status

    def get_workflow_handle(self, _workflow_id: str) -> _Handle:
        return _Handle(self.status)


async def _report(status: RPCStatusCode) -> tuple[int, _Sender]:
    push = TwinPush(cast("Client", _Temporal(status)), cast("Any", None))
    sender = _Sender(DeviceClaims(tenant="acme", device_id="d1", jti=""))
    target = Published(kind=Topic.TWIN_REPORTED)
    code = await push.reported(cast("Any", sender), target, b'{"temp": 21}')
    return code, sender


async def test_a_report_temporal_cannot_take_now_is_not_acknowledged() -> None:
    code, sender = await _report(RPCStatusCode.UNAVAILABLE)
    assert sender.unavailable  # the bridge keeps it unacknowledged; the gateway ends the connection
    assert code == codec.RC5_UNSPECIFIED


async def test_a_report_of_a_device_without_twin_is_answered() -> None:
    # refused for good: redelivering it would hold it (and the broker's receive maximum) for ever
    code, sender = await _report(RPCStatusCode.NOT_FOUND)
    assert not sender.unavailable
    assert code == codec.RC5_UNSPECIFIED
