"""Abuse-proof webhook edges on the real servers: no request forgery into the platform's own
network, no answer read back, tenants never share event ids, a tenant's slow receivers never
stall another tenant, and secrets rotate with an overlap."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from temporalio import workflow
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.notifications import NotificationService
from activities.webhook_delivery import WebhookDeliveryService
from cli.simulate import Options, simulate
from fleetflow.contracts.common import DomainEvent, TaskQueue
from fleetflow.contracts.events import DeliverPending, DeliveryProgress, EventBatch
from fleetflow.db import Pool
from fleetflow.migrations import MIGRATIONS
from fleetflow.payload_codec import payload_keys
from fleetflow.settings import Settings
from fleetflow.webhook_network import AddressPolicy, webhook_client
from tests.integration.test_event_bus import SECRET, Receiver, has, new_tenant, probe_events, subscribe
from tests.support import bearer, eventually, free_port


class Answering(Receiver):
    """A receiver that answers every request with a fixed response, or holds it unanswered
    (`hang`) and counts the connections the sender closed meanwhile."""

    def __init__(self, host: str = "127.0.0.1", answer: bytes = b"", hang: bool = False) -> None:
        super().__init__(host=host)
        self.response, self.hang = answer, hang
        self.closed_by_sender = 0

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if self.hang:
            if await reader.read(1) == b"":
                self.closed_by_sender += 1
            return False
        writer.write(self.response)
        await writer.drain()
        return True


async def dead_letters(api: httpx.AsyncClient, auth: dict[str, str]) -> list[dict[str, Any]]:
    """The tenant's dead letters."""
    body: dict[str, Any] = (await api.get("/v1/dead-letters", headers=auth)).json()
    return list(body["items"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:8233/api/v1/namespaces",  # loopback (the tests allow 127.0.0.1 only)
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::1]:7233/",
        "http://0.0.0.0:5432/",
        "http://224.0.0.251/",
    ],
)
async def test_internal_addresses_are_refused_with_422_naming_the_url(
    api: httpx.AsyncClient, url: str
) -> None:
    _, auth = new_tenant()
    body = {"url": url, "event_types": ["*"], "secret": SECRET}
    response = await api.post("/v1/subscriptions", json=body, headers=auth)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == ["body", "url"] and "public addresses only" in error["msg"]
    assert (await api.get("/v1/subscriptions", headers=auth)).json() == []


async def test_a_host_name_dns_cannot_encode_is_422_not_500(api: httpx.AsyncClient) -> None:
    _, auth = new_tenant()
    body = {"url": f"https://{'a' * 70}.example.com/hook", "event_types": ["*"], "secret": SECRET}
    response = await api.post("/v1/subscriptions", json=body, headers=auth)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", "url"]


async def test_connect_time_check_refuses_an_address_that_changed_after_subscribing(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    """What DNS rebinding does: the host checked at subscribe time later leads to an address the
    policy refuses. The delivery never connects there."""
    tenant, auth = new_tenant()
    async with Answering("127.0.0.2", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") as inside:
        sub = await subscribe(
            api, auth, f"http://127.0.0.1:{inside.port}/hook", max_attempts=1, event_types=["Probe"]
        )
        await pool.execute(
            "UPDATE notification.subscriptions SET url = $2 WHERE subscription_id = $1",
            sub["subscription_id"],
            inside.url,
        )
        await NotificationService(pool, client).record_events(probe_events(tenant, "dev-1", 1))
        [letter] = await eventually(lambda: dead_letters(api, auth), lambda items: len(items) == 1)
    assert inside.requests == []
    assert "127.0.0.2 is a loopback address" in letter["last_error"]


async def test_answers_are_not_stored_and_redirects_are_not_followed(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    leak = b"postgres password=hunter2 " * 1000
    teller = b"HTTP/1.1 500 Oops\r\ncontent-length: %d\r\n\r\n%s" % (len(leak), leak)
    async with Receiver() as target, Answering(answer=teller) as talker:
        redirect = f"HTTP/1.1 302 Found\r\nlocation: {target.url}\r\ncontent-length: 0\r\n\r\n".encode()
        async with Answering(answer=redirect) as redirector:
            for url in (talker.url, redirector.url):
                await subscribe(api, auth, url, max_attempts=1, event_types=["Probe"])
            await NotificationService(pool, client).record_events(probe_events(tenant, "dev-1", 1))
            letters = await eventually(lambda: dead_letters(api, auth), lambda items: len(items) == 2)
    assert sorted(letter["last_error"] for letter in letters) == ["HTTP 302", "HTTP 500"]
    assert "hunter2" not in (await api.get("/v1/dead-letters", headers=auth)).text
    assert target.requests == []  # the redirect was not followed


def same_ids(tenant: str, value: float) -> EventBatch:
    """The alert event two tenants' analytics produce for the same device and rule id in one
    window (its id does not name the tenant)."""
    event = DomainEvent(
        event_id="w-1/th-1/hot/AlertRaised",
        tenant=tenant,
        device_id="th-1",
        type="AlertRaised",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        actor="analytics",
        data={"rule_id": "hot", "value": value},
    )
    return EventBatch(events=[event])


async def test_two_tenants_with_the_same_event_ids_each_keep_and_receive_their_event(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    (one, auth_one), (two, auth_two) = new_tenant(), new_tenant()
    service = NotificationService(pool, client)
    async with Receiver() as hook_one, Receiver() as hook_two:
        await subscribe(api, auth_one, hook_one.url, event_types=["AlertRaised"])
        await subscribe(api, auth_two, hook_two.url, event_types=["AlertRaised"])
        assert await service.record_events(same_ids(one, 41.0)) == 1
        assert await service.record_events(same_ids(two, 42.0)) == 1
        assert await service.record_events(same_ids(two, 42.0)) == 0  # a retry: already there
        await eventually(hook_one.received, has(1))
        await eventually(hook_two.received, has(1))
    assert hook_one.events()[0]["data"]["value"] == 41.0 and hook_two.events()[0]["data"]["value"] == 42.0
    ids = {hook_one.requests[0][0]["webhook-id"], hook_two.requests[0][0]["webhook-id"]}
    assert ids == {f"{one}/w-1/th-1/hot/AlertRaised", f"{two}/w-1/th-1/hot/AlertRaised"}
    for auth in (auth_one, auth_two):
        events = (await api.get("/v1/events", headers=auth)).json()["items"]
        assert [e["event_id"] for e in events] == ["w-1/th-1/hot/AlertRaised"]


async def test_another_event_reusing_an_id_is_kept_not_dropped(client: Client, pool: Pool) -> None:
    tenant, _ = new_tenant()
    service = NotificationService(pool, client)
    assert await service.record_events(same_ids(tenant, 41.0)) == 1
    assert await service.record_events(same_ids(tenant, 50.0)) == 1
    assert await service.record_events(same_ids(tenant, 50.0)) == 0  # its retry is recognised
    stored = await service.list_events(tenant)
    assert [e.data["value"] for e in stored] == [41.0, 50.0]
    assert stored[0].event_id == "w-1/th-1/hot/AlertRaised"
    assert stored[1].event_id.startswith("w-1/th-1/hot/AlertRaised#")


async def test_a_tenant_with_slow_receivers_does_not_stall_another_tenant(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    """20 subscriptions of one tenant whose receiver never answers: another tenant's event is
    still delivered while every one of those connections is still held open (so not because
    they timed out and gave their worker slots back)."""
    (slow, slow_auth), (quick, quick_auth) = new_tenant(), new_tenant()
    service = NotificationService(pool, client)
    async with Answering(hang=True) as sink, Receiver() as hook:
        subs = [await subscribe(api, slow_auth, sink.url, event_types=["Probe"]) for _ in range(20)]
        await service.record_events(probe_events(slow, "dev-1", 1))

        async def held() -> int:
            return len(sink.requests)

        await eventually(held, lambda n: n >= 4)
        await subscribe(api, quick_auth, hook.url, event_types=["Probe"])
        await service.record_events(probe_events(quick, "dev-1", 1))
        await eventually(hook.received, has(1))
        assert sink.closed_by_sender == 0, "the quick tenant waited for the slow one's timeouts"
        for sub in subs:
            await api.delete(f"/v1/subscriptions/{sub['subscription_id']}", headers=slow_auth)


async def test_a_rotated_secret_signs_beside_the_new_one_until_the_overlap_ends(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    new_secret = "whsec_" + "bmV3LXNlY3JldC1vZi0zMi1ieXRlcy1sb25nLi4uLg=="
    service = NotificationService(pool, client)
    async with Receiver() as hook:
        sub = await subscribe(api, auth, hook.url, event_types=["Probe"])
        path = f"/v1/subscriptions/{sub['subscription_id']}/rotate-secret"
        assert (await api.post(path, json={"secret": "short"}, headers=auth)).status_code == 422
        _, other = new_tenant()
        assert (await api.post(path, json={"secret": new_secret}, headers=other)).status_code == 404
        rotated = await api.post(path, json={"secret": new_secret, "overlap_s": 3600}, headers=auth)
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["rotation_overlap_until"] is not None and "whsec" not in rotated.text
        stored = await pool.fetchrow(
            "SELECT secret, previous_secret FROM notification.subscriptions WHERE subscription_id = $1",
            sub["subscription_id"],
        )
        assert stored is not None
        assert all(v.startswith("sealed:") and "whsec" not in v and SECRET not in v for v in stored.values())
        await service.record_events(probe_events(tenant, "dev-1", 1))
        await eventually(hook.received, has(1))
        headers, body = hook.requests[0]
        Webhook(SECRET.encode()).verify(body, headers)  # receivers not switched yet
        Webhook(new_secret).verify(body, headers)  # receivers already switched

        ended = await api.post(path, json={"secret": new_secret, "overlap_s": 0}, headers=auth)
        assert ended.json()["rotation_overlap_until"] is None
        await service.record_events(probe_events(tenant, "dev-1", 1))
        await eventually(hook.received, has(2))
    headers, body = hook.requests[1]
    assert len(headers["webhook-signature"].split(" ")) == 1
    Webhook(new_secret).verify(body, headers)


@workflow.defn(name="PreWebhookQueueDeliveryLoop", sandboxed=False)
class PreWebhookQueueDeliveryLoop:
    """What an `EventDelivery` run started before the webhook queue schedules (its recorded
    commands keep it): `notification.deliver_pending` on the notification queue."""

    @workflow.run
    async def run(self, subscription_id: str) -> DeliveryProgress:
        progress: DeliveryProgress = await workflow.execute_activity(
            "notification.deliver_pending",
            DeliverPending(subscription_id=subscription_id),
            task_queue=TaskQueue.NOTIFICATION.value,
            result_type=DeliveryProgress,
            start_to_close_timeout=timedelta(minutes=1),
        )
        return progress


async def test_runs_started_before_the_webhook_queue_still_deliver(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    async with Receiver() as hook:
        sub = await subscribe(api, auth, hook.url, event_types=["Probe"])
        await client.get_workflow_handle(sub["workflow_id"]).terminate("the old run stands in for it")
        # the event is queued for the subscription, as an upgraded platform finds it
        await NotificationService(pool).record_events(probe_events(tenant, "dev-1", 1))
        queue = f"old-loop-{uuid.uuid4().hex[:8]}"
        async with Worker(client, task_queue=queue, workflows=[PreWebhookQueueDeliveryLoop]):
            progress = await client.execute_workflow(
                PreWebhookQueueDeliveryLoop.run,
                sub["subscription_id"],
                id=queue,
                task_queue=queue,
                execution_timeout=timedelta(minutes=1),
            )
        assert progress.delivered == 1
    assert hook.events()[0]["type"] == "Probe"


async def test_the_simulator_runs_on_when_the_platform_refuses_its_receiver(api: httpx.AsyncClient) -> None:
    """The receiver on an address the platform does not allow (the tests allow 127.0.0.1
    only): the run says so and goes on, and nothing counts as rejected."""
    out = io.StringIO()
    options = Options(devices=2, rate=4, duration_s=1, webhook_host="127.0.0.2", settle_s=10, seed=3)
    summary = await simulate(api, bearer("acme"), options, out)
    assert summary.webhook_refused and summary.exit_code == 0, summary.render()
    assert "refuses webhooks to 127.0.0.2" in out.getvalue()
    assert "not counted" in summary.render()


async def test_a_failing_delivery_waits_its_own_backoff_however_often_its_tenant_was_busy(
    api: httpx.AsyncClient, pool: Pool, client: Client, settings: Settings
) -> None:
    """Each time a tenant is at its slot limit, its other subscriptions' activities are turned
    away (TenantBusy), and each turn counts as an activity attempt. Temporal's backoff grows
    with that count: after a busy spell, a webhook's first failure waited `max_backoff_s`
    (here 10 minutes) instead of `backoff_s`. The wait follows the delivery's own attempts."""
    tenant, auth = new_tenant()
    failing = b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"
    async with Answering(answer=failing) as hook:
        sub = await subscribe(
            api, auth, hook.url, event_types=["Probe"], max_attempts=10, backoff_s=2, max_backoff_s=600
        )
        await client.get_workflow_handle(sub["workflow_id"]).terminate("the test calls the activity")
        await NotificationService(pool).record_events(probe_events(tenant, "dev-1", 1))
        policy = AddressPolicy.from_settings(settings)
        async with webhook_client(policy) as http:
            service = WebhookDeliveryService(pool, payload_keys(settings), policy, http)
            env = ActivityEnvironment()
            # the 13th attempt: twelve turns away at the slot limit came before it
            env.info = dataclasses.replace(env.info, attempt=13)
            waits, pending = [], DeliverPending(subscription_id=sub["subscription_id"])
            for _ in range(3):
                with pytest.raises(ApplicationError) as failed:
                    await env.run(service.deliver_pending, pending)
                assert failed.value.type == "DeliveryFailed"
                waits.append(failed.value.next_retry_delay)
    assert waits == [timedelta(seconds=2), timedelta(seconds=4), timedelta(seconds=8)]
    assert len(hook.requests) == 3


async def test_an_answer_that_is_not_http_is_not_stored_either(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    """A service on a network the operator allows (here 127.0.0.1) that answers a POST with
    something not quite HTTP: the parser's error quoted the answer, and the dead letter kept it
    for the tenant to read."""
    tenant, auth = new_tenant()
    garbled = b"HTTP/1.1 200 OK\r\nX-Config: postgres password=hunter2\x00\r\n\r\n"
    async with Answering(answer=garbled) as talker:
        await subscribe(api, auth, talker.url, max_attempts=1, event_types=["Probe"])
        await NotificationService(pool, client).record_events(probe_events(tenant, "dev-1", 1))
        [letter] = await eventually(lambda: dead_letters(api, auth), lambda items: len(items) == 1)
    assert letter["last_error"].startswith("RemoteProtocolError")
    assert "hunter2" not in (await api.get("/v1/dead-letters", headers=auth)).text


async def test_dead_letters_kept_before_lose_their_quoted_answers(pool: Pool) -> None:
    """Migration 0120 on the rows that held a quote: the parser's reason stays, the quote goes."""
    [(_, scrub)] = [m for m in MIGRATIONS if m[0].startswith("0120_")]
    kept = [
        "RemoteProtocolError: illegal header line: bytearray(b'X: password=hunter2')",
        "RemoteProtocolError: Server disconnected without sending a response.",
        "HTTP 500",
    ]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("CREATE TEMP TABLE old_letters (n int, last_error text) ON COMMIT DROP")
        await conn.executemany("INSERT INTO old_letters VALUES ($1, $2)", list(enumerate(kept)))
        await conn.execute(scrub.replace("notification.deliveries", "old_letters"))
        after = [r["last_error"] for r in await conn.fetch("SELECT last_error FROM old_letters ORDER BY n")]
    assert after == ["RemoteProtocolError: illegal header line", *kept[1:]]


async def test_nothing_more_is_posted_once_the_subscription_is_deleted(
    api: httpx.AsyncClient, pool: Pool, client: Client, settings: Settings
) -> None:
    """A tenant deletes a subscription (its URL is no longer theirs) while a batch of its
    deliveries is being posted: the batch stops, instead of posting the rest of it."""
    tenant, auth = new_tenant()
    posts = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(
                    int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                posts += 1
                if posts == 1:  # the tenant deletes the subscription meanwhile
                    assert (
                        await api.delete(f"/v1/subscriptions/{sub['subscription_id']}", headers=auth)
                    ).status_code == 204
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    port = free_port()
    server = await asyncio.start_server(answer, "127.0.0.1", port)
    try:
        sub = await subscribe(api, auth, f"http://127.0.0.1:{port}/hook", event_types=["Probe"])
        await client.get_workflow_handle(sub["workflow_id"]).terminate("the test calls the activity")
        await NotificationService(pool).record_events(probe_events(tenant, "dev-1", 3))
        policy = AddressPolicy.from_settings(settings)
        async with webhook_client(policy) as http:
            service = WebhookDeliveryService(pool, payload_keys(settings), policy, http)
            pending = DeliverPending(subscription_id=sub["subscription_id"])
            progress = await ActivityEnvironment().run(service.deliver_pending, pending)
    finally:
        server.close()
    assert posts == 1
    assert progress.gone


async def test_another_tenant_cannot_rotate_read_redeliver_or_delete_a_subscription(
    api: httpx.AsyncClient, pool: Pool, client: Client
) -> None:
    """Tenant two knows tenant one's subscription and dead letter ids: every route answers 404
    and nothing of tenant one's changes (its secret still signs alone)."""
    (one, auth_one), (_, auth_two) = new_tenant(), new_tenant()
    failing = b"HTTP/1.1 500 No\r\ncontent-length: 0\r\n\r\n"
    async with Answering(answer=failing) as hook:
        sub = await subscribe(api, auth_one, hook.url, max_attempts=1, event_types=["Probe"])
        await NotificationService(pool, client).record_events(probe_events(one, "dev-1", 1))
        [letter] = await eventually(lambda: dead_letters(api, auth_one), lambda items: len(items) == 1)
    sid, did = sub["subscription_id"], letter["delivery_id"]
    secret_of = "SELECT secret FROM notification.subscriptions WHERE subscription_id = $1"
    before = await pool.fetchval(secret_of, sid)
    rotation = {"secret": "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY", "overlap_s": 0}
    answers = [
        await api.post(f"/v1/subscriptions/{sid}/rotate-secret", json=rotation, headers=auth_two),
        await api.get(f"/v1/subscriptions/{sid}", headers=auth_two),
        await api.post(f"/v1/dead-letters/{did}/redeliver", headers=auth_two),
        await api.delete(f"/v1/subscriptions/{sid}", headers=auth_two),
    ]
    assert [a.status_code for a in answers] == [404] * 4
    assert (await api.get(f"/v1/dead-letters?subscription_id={sid}", headers=auth_two)).json()["items"] == []
    mine = (await api.get(f"/v1/subscriptions/{sid}", headers=auth_one)).json()
    assert mine["rotation_overlap_until"] is None and mine["dead_letters"] == 1
    assert await pool.fetchval(secret_of, sid) == before
