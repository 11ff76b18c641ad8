"""The event bus on the real servers: signed webhooks in seq order, retries, dead letters,
redelivery, continue-as-new, and the subscriptions API's validation and tenant isolation."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

from activities.notifications import NotificationService
from activities.subscriptions import Subscriptions
from fleetflow.contracts.common import DomainEvent, TaskQueue
from fleetflow.contracts.events import DeliveryInput, DeliverySummary, EventBatch, delivery_workflow_id
from fleetflow.db import Pool
from fleetflow.handles import handle_for
from fleetflow.payload_codec import SEALED, payload_keys
from fleetflow.settings import Settings
from tests.support import bearer, eventually, free_port
from workflows.event_delivery import EventDelivery

SECRET = "s3cret-" + "k" * 20


class Receiver:
    """A webhook receiver (on 127.0.0.1 unless told): keeps every POST (headers, body) and
    answers 200; a subclass answers otherwise by overriding `answer`."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port or free_port()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """Where the subscription points."""
        return f"http://{self.host}:{self.port}/hook"

    def events(self) -> list[dict[str, Any]]:
        """The bodies received so far, in arrival order."""
        return [json.loads(body) for _, body in self.requests]

    async def received(self) -> list[dict[str, Any]]:
        """events(), as a probe for `eventually`."""
        return self.events()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):  # keep-alive connections of the sender's client
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((headers, body))
                if not await self.answer(reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender closed its connection
        finally:
            self._writers.discard(writer)
            writer.close()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer the request just kept; False ends the connection."""
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        return True


def has(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    """A `done` for `eventually`: exactly count events received."""
    return lambda events: len(events) == count


def new_tenant() -> tuple[str, dict[str, str]]:
    tenant = f"bus-{uuid.uuid4().hex[:8]}"
    return tenant, bearer(tenant)


def probe_events(tenant: str, device_id: str, count: int, kind: str = "Probe") -> EventBatch:
    run = uuid.uuid4().hex[:8]
    return EventBatch(
        events=[
            DomainEvent(
                event_id=f"test/{run}/{i}",
                tenant=tenant,
                device_id=device_id,
                type=kind,
                occurred_at=datetime.now(UTC),
                actor="tester",
                data={"n": i},
            )
            for i in range(count)
        ]
    )


async def subscribe(api: httpx.AsyncClient, auth: dict[str, str], url: str, **body: Any) -> dict[str, Any]:
    response = await api.post(
        "/v1/subscriptions", json={"url": url, "event_types": ["*"], "secret": SECRET, **body}, headers=auth
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def onboard(api: httpx.AsyncClient, auth: dict[str, str], device_id: str) -> None:
    """Onboard a thermostat of the token's tenant to the end (DeviceOnboarded is recorded)."""
    body = {"device_id": device_id, "device_type": "thermostat"}
    assert (await api.post("/v1/devices", json=body, headers=auth)).status_code == 202

    async def progress() -> dict[str, Any]:
        result: dict[str, Any] = (await api.get(f"/v1/onboardings/{device_id}", headers=auth)).json()
        return result

    waiting = await eventually(progress, lambda p: p.get("status") == "awaiting_first_contact")
    device = {"Authorization": f"Bearer {waiting['credential']}"}
    assert (await api.post("/v1/device-contact", json={}, headers=device)).status_code == 202
    await eventually(progress, lambda p: p.get("status") == "completed")


def signature_ok(headers: dict[str, str], body: bytes, secret: str = SECRET) -> bool:
    """The reference Standard Webhooks verifier accepts the delivery (a plain secret's key is
    its UTF-8 bytes)."""
    try:
        Webhook(secret.encode()).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


async def test_subscribers_receive_signed_events_in_seq_order(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    async with Receiver() as everything, Receiver() as onboardings:
        created = await subscribe(api, auth, everything.url)
        assert "secret" not in created and created["workflow_id"].startswith(f"deliveries-{tenant}-")
        await subscribe(api, auth, onboardings.url, event_types=["DeviceOnboarded"])

        device_id = f"dev-{uuid.uuid4().hex[:8]}"
        await onboard(api, auth, device_id)
        service = NotificationService(pool, client)
        for _ in range(3):  # several batches, each nudging the delivery workflow
            await service.record_events(probe_events(tenant, device_id, 10))

        await eventually(everything.received, has(31))
        await eventually(onboardings.received, has(1))

    for headers, body in everything.requests + onboardings.requests:
        assert signature_ok(headers, body)
        event = json.loads(body)
        assert headers["webhook-id"] == f"{tenant}/{event['event_id']}"
        assert headers["x-fleetflow-event-type"] == event["type"]
    received = everything.events()
    assert [e["seq"] for e in received] == sorted(e["seq"] for e in received)
    assert received[0]["type"] == "DeviceOnboarded" and received[0]["device_id"] == device_id
    assert [e["data"]["n"] for e in received[1:]] == list(range(10)) * 3
    assert onboardings.events()[0]["event_id"] == received[0]["event_id"]

    page = (await api.get("/v1/events", params={"type": "Probe", "limit": 25}, headers=auth)).json()
    rest = (await api.get("/v1/events", params={"after": page["next_after"]}, headers=auth)).json()
    assert [e["seq"] for e in page["items"] + rest["items"]] == [e["seq"] for e in received[1:]]
    assert rest["next_after"] is None
    mine = (await api.get("/v1/events", params={"device_id": device_id}, headers=auth)).json()
    assert len(mine["items"]) == 31
    assert (await api.get("/v1/events", headers=bearer(tenant, ["devices:read"]))).status_code == 403
    listed = (await api.get("/v1/subscriptions", headers=auth)).json()
    assert [(s["pending"], s["dead_letters"]) for s in listed] == [(0, 0), (0, 0)]


async def test_unreachable_webhook_is_retried_dead_lettered_and_redelivered_when_asked(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    port = free_port()  # nothing listens here yet
    sub = await subscribe(
        api,
        auth,
        f"http://127.0.0.1:{port}/hook",
        event_types=["Probe"],
        max_attempts=3,
        backoff_s=1,
        max_backoff_s=1,
    )
    service = NotificationService(pool, client)
    first = probe_events(tenant, "dev-1", 1)
    await service.record_events(first)

    async def dead() -> list[dict[str, Any]]:
        body: dict[str, Any] = (await api.get("/v1/dead-letters", headers=auth)).json()
        return list(body["items"])

    [letter] = await eventually(dead, lambda items: len(items) == 1)
    assert letter["subscription_id"] == sub["subscription_id"] and letter["status"] == "dead"
    assert letter["attempts"] == 3 and "ConnectError" in letter["last_error"]
    assert letter["event"]["event_id"] == first.events[0].event_id
    [view] = (await api.get("/v1/subscriptions", headers=auth)).json()
    assert (view["pending"], view["dead_letters"]) == (0, 1)

    async with Receiver(port) as hook:
        # the queue moves on: a later event is delivered, the dead letter is not
        later = probe_events(tenant, "dev-1", 1)
        await service.record_events(later)
        await eventually(hook.received, has(1))
        assert hook.events()[0]["event_id"] == later.events[0].event_id

        url = f"/v1/dead-letters/{letter['delivery_id']}/redeliver"
        assert (await api.post(url, headers=bearer("someone-else"))).status_code == 404
        accepted = await api.post(url, headers=auth)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["status"] == "pending" and accepted.json()["attempts"] == 0
        await eventually(hook.received, has(2))

    assert hook.events()[1]["event_id"] == first.events[0].event_id
    assert signature_ok(*hook.requests[1])
    assert await dead() == []
    again = await api.post(url, headers=auth)
    assert again.status_code == 409 and "delivered" in again.text


async def test_delivery_loop_continues_as_new_and_keeps_order(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    service = NotificationService(pool, client)
    async with Receiver() as hook:
        sub = await subscribe(api, auth, hook.url)
        # the same loop with a short history, so a few deliveries take it past continue-as-new
        wid = delivery_workflow_id(tenant, sub["subscription_id"])
        handle = await client.start_workflow(
            EventDelivery.run,
            DeliveryInput(
                tenant=tenant, subscription_id=sub["subscription_id"], idle_poll_s=1, history_limit=50
            ),
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_conflict_policy=WorkflowIDConflictPolicy.TERMINATE_EXISTING,
        )
        for n in range(1, 9):
            await service.record_events(probe_events(tenant, "dev-1", 1, kind=f"Step{n}"))
            await eventually(hook.received, has(n))

        latest = handle_for(client, EventDelivery.run, wid)
        assert (await latest.describe()).run_id != handle.result_run_id
        # the hook sees the 8th event while its activity still runs: the count follows it
        summary = await eventually(lambda: latest.query(EventDelivery.summary), lambda s: s.delivered >= 8)
        assert summary.delivered == 8
    assert [e["type"] for e in hook.events()] == [f"Step{n}" for n in range(1, 9)]
    assert (await api.delete(f"/v1/subscriptions/{sub['subscription_id']}", headers=auth)).status_code == 204
    assert await latest.result() == DeliverySummary(
        subscription_id=sub["subscription_id"], delivered=8, dead_lettered=0
    )


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"url": "ftp://example.com/hook"}, ["body", "url"]),
        ({"url": "not a url"}, ["body", "url"]),
        ({"event_types": []}, ["body", "event_types"]),
        ({"event_types": ["*", "DeviceOnboarded"]}, ["body", "event_types"]),
        ({"event_types": ["no spaces allowed"]}, ["body", "event_types", 0]),
        ({"secret": "short"}, ["body", "secret"]),
        ({"max_attempts": 0}, ["body", "max_attempts"]),
        ({"backoff_s": 10, "max_backoff_s": 1}, ["body", "max_backoff_s"]),
        ({"backoff_s": 0.1}, ["body", "backoff_s"]),  # the floor: one dead receiver, one busy slot
        ({"secret": "whsec_not base64 at all"}, ["body", "secret"]),
        ({"color": "red"}, ["body", "color"]),
        ({"circuit_threshold": 0}, ["body", "circuit_threshold"]),
        ({"circuit_threshold": 101}, ["body", "circuit_threshold"]),
        ({"circuit_probe_s": 0.5}, ["body", "circuit_probe_s"]),
        ({"circuit_probe_s": 60, "circuit_max_probe_s": 30}, ["body", "circuit_max_probe_s"]),
        ({"circuit_max_probe_s": 86401}, ["body", "circuit_max_probe_s"]),
    ],
)
async def test_bad_subscriptions_get_422_naming_the_field(
    change: dict[str, Any], loc: list[str | int], api: httpx.AsyncClient
) -> None:
    _, auth = new_tenant()
    body = {"url": "https://example.com/hook", "event_types": ["*"], "secret": SECRET, **change}
    response = await api.post("/v1/subscriptions", json=body, headers=auth)
    assert response.status_code == 422, response.text
    assert any(error["loc"] == loc for error in response.json()["errors"]), response.text
    assert (await api.get("/v1/subscriptions", headers=auth)).json() == []


async def test_subscriptions_are_tenant_scoped(api: httpx.AsyncClient, client: Client) -> None:
    tenant, auth = new_tenant()
    _, other = new_tenant()
    sub = await subscribe(api, auth, "https://example.com/hook")
    path = f"/v1/subscriptions/{sub['subscription_id']}"
    assert (await api.get(path, headers=auth)).json() == sub
    assert (await api.get(path, headers=other)).status_code == 404
    assert (await api.delete(path, headers=other)).status_code == 404
    assert (await api.get("/v1/subscriptions", headers=other)).json() == []
    assert (await api.get("/v1/dead-letters", headers=other)).json()["items"] == []
    reader = bearer(tenant, ["events:read"])
    assert (await api.post("/v1/subscriptions", json={}, headers=reader)).status_code == 403
    assert "secret" not in (await api.get("/v1/subscriptions", headers=auth)).text

    assert (await api.delete(path, headers=auth)).status_code == 204
    assert (await api.get(path, headers=auth)).status_code == 404
    assert (await api.delete(path, headers=auth)).status_code == 404
    handle = handle_for(client, EventDelivery.run, sub["workflow_id"])
    assert (await handle.result()).subscription_id == sub["subscription_id"]


async def test_secrets_are_sealed_at_rest_and_older_plain_ones_are_sealed_at_start(
    api: httpx.AsyncClient, client: Client, pool: Pool, settings: Settings
) -> None:
    """A database dump holds no webhook secret; deliveries are still signed with it, including
    a subscription stored before sealing existed (sealed when a process starts)."""
    tenant, auth = new_tenant()
    async with Receiver() as hook:
        sub = await subscribe(api, auth, hook.url, event_types=["Probe"])
        sid = sub["subscription_id"]
        stored = await pool.fetchval(
            "SELECT secret FROM notification.subscriptions WHERE subscription_id = $1", sid
        )
        assert stored.startswith(SEALED) and SECRET not in stored
        # as an upgraded platform finds it: the secret in clear
        await pool.execute(
            "UPDATE notification.subscriptions SET secret = $2 WHERE subscription_id = $1", sid, SECRET
        )
        keys = payload_keys(settings)
        assert await Subscriptions(pool, keys=keys).seal_stored_secrets() >= 1
        resealed = await pool.fetchval(
            "SELECT secret FROM notification.subscriptions WHERE subscription_id = $1", sid
        )
        assert resealed.startswith(SEALED) and SECRET not in resealed
        assert await Subscriptions(pool, keys=keys).seal_stored_secrets() == 0

        await NotificationService(pool, client).record_events(probe_events(tenant, "dev-1", 2))
        await eventually(hook.received, has(2))
    assert all(signature_ok(headers, body) for headers, body in hook.requests)
