"""A circuit breaker per webhook subscription, on the real servers: a receiver that keeps failing
opens its circuit (deliveries pause, nothing is dead-lettered for it, events stay in order), a
probe after a growing back-off closes it; the state shows in the API, the transitions are the
tenant's events, and the delivery loop sleeps instead of spinning while it is open."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import httpx
import pytest
from standardwebhooks import Webhook
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.circuit_breaker import CircuitPolicy
from activities.notifications import NotificationService
from activities.webhook_delivery import WebhookDeliveryService
from api.observability import STATE_GAUGES
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.events import (
    CIRCUIT_CLOSED,
    CIRCUIT_OPENED,
    DeliverPending,
    DeliveryInput,
    DeliverySummary,
    delivery_workflow_id,
)
from fleetflow.db import Pool
from fleetflow.handles import handle_for
from fleetflow.payload_codec import payload_keys
from fleetflow.settings import Settings
from fleetflow.webhook_network import AddressPolicy, webhook_client
from tests.integration.test_event_bus import Receiver, has, new_tenant, probe_events, subscribe
from tests.integration.test_webhook_edges import Answering
from tests.support import eventually, free_port
from workflows.event_delivery import EventDelivery

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
DOWN = b"HTTP/1.1 503 Down\r\ncontent-length: 0\r\n\r\n"
REFUSED = b"HTTP/1.1 400 No\r\ncontent-length: 0\r\n\r\n"


async def breaking(
    api: httpx.AsyncClient,
    auth: dict[str, str],
    url: str,
    threshold: int = 1,
    probe_s: float = 3600,
    max_probe_s: float = 3600,
    **more: Any,
) -> dict[str, Any]:
    """A subscription (to Probe events unless told) whose circuit opens after `threshold`
    failures, probing after probe_s doubled up to max_probe_s."""
    body = {"event_types": ["Probe"], **more}
    return await subscribe(
        api,
        auth,
        url,
        circuit_threshold=threshold,
        circuit_probe_s=probe_s,
        circuit_max_probe_s=max_probe_s,
        **body,
    )


async def view(api: httpx.AsyncClient, auth: dict[str, str], sid: str) -> dict[str, Any]:
    """The subscription as its tenant sees it."""
    body: dict[str, Any] = (await api.get(f"/v1/subscriptions/{sid}", headers=auth)).json()
    return body


async def events_of(api: httpx.AsyncClient, auth: dict[str, str], kind: str) -> list[dict[str, Any]]:
    """The tenant's recorded events of one type."""
    body: dict[str, Any] = (await api.get("/v1/events", params={"type": kind}, headers=auth)).json()
    return list(body["items"])


async def make_due(pool: Pool, sid: str) -> None:
    """What the passing of the back-off does: the probe is due now."""
    await pool.execute(
        "UPDATE notification.circuits SET next_probe_at = now() WHERE subscription_id = $1", sid
    )


async def deliveries(pool: Pool, sid: str) -> list[tuple[str, int]]:
    """(status, attempts) of the subscription's deliveries, in seq order."""
    rows = await pool.fetch(
        "SELECT status, attempts FROM notification.deliveries WHERE subscription_id = $1 ORDER BY event_seq",
        sid,
    )
    return [(r["status"], r["attempts"]) for r in rows]


async def test_a_dead_receiver_opens_the_circuit_keeps_its_events_and_a_probe_closes_it(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    """max_attempts 2 would dead-letter the first event after two failures; the circuit opens
    at the second instead, and the events wait, in order, through failed probes, for the
    receiver to come back. A watcher of the same tenant is told both transitions."""
    tenant, auth = new_tenant()
    async with Answering(answer=DOWN) as hook, Receiver() as watcher:
        sub = await breaking(api, auth, hook.url, 2, 1, 1, max_attempts=2, backoff_s=1, max_backoff_s=1)
        sid = sub["subscription_id"]
        assert sub["circuit"] == {
            "state": "closed",
            "consecutive_failures": 0,
            "opened_at": None,
            "next_probe_at": None,
            "last_error": None,
        }
        await subscribe(api, auth, watcher.url, event_types=[CIRCUIT_OPENED, CIRCUIT_CLOSED])
        sent = probe_events(tenant, "dev-1", 3)
        await NotificationService(pool, client).record_events(sent)

        [opened] = await eventually(lambda: events_of(api, auth, CIRCUIT_OPENED), lambda e: len(e) == 1)
        assert opened["data"]["subscription_id"] == sid and opened["data"]["last_error"] == "HTTP 503"
        assert opened["data"]["consecutive_failures"] == 2 and opened["device_id"] is None
        shown = await view(api, auth, sid)
        assert shown["circuit"]["state"] in ("open", "half_open")
        assert shown["circuit"]["consecutive_failures"] >= 2 and shown["circuit"]["opened_at"] is not None
        assert shown["circuit"]["next_probe_at"] is not None and shown["circuit"]["last_error"] == "HTTP 503"
        gauge = next(g for g in STATE_GAUGES if g.name == "fleetflow.webhooks.circuits")
        counts = {r[0]: r[1] for r in await pool.fetch(gauge.sql)}
        assert counts["open"] + counts["half_open"] >= 1

        # probes fail (at least two: the first event has had far more than its 2 attempts)
        await eventually(hook.received, lambda got: len(got) >= 4)
        assert (await view(api, auth, sid))["dead_letters"] == 0
        assert await deliveries(pool, sid) == [("pending", 1), ("pending", 0), ("pending", 0)]
        hook.response = OK
        await eventually(lambda: view(api, auth, sid), lambda v: v["pending"] == 0)
        await eventually(watcher.received, has(2))

    received = hook.events()
    assert all(e["event_id"] == sent.events[0].event_id for e in received[:-3])  # the probes
    assert [e["event_id"] for e in received[-3:]] == [e.event_id for e in sent.events]
    shown = await view(api, auth, sid)
    assert shown["circuit"]["state"] == "closed" and shown["circuit"]["consecutive_failures"] == 0
    assert shown["dead_letters"] == 0
    assert [e["type"] for e in watcher.events()] == [CIRCUIT_OPENED, CIRCUIT_CLOSED]
    [closed] = await events_of(api, auth, CIRCUIT_CLOSED)
    assert closed["data"]["subscription_id"] == sid and closed["event_id"] != opened["event_id"]


async def test_a_receiver_failing_one_time_less_than_the_threshold_keeps_its_circuit_closed(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    answers = iter([DOWN, DOWN])

    class Flaky(Answering):
        async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
            writer.write(next(answers, OK))
            await writer.drain()
            return True

    async with Flaky() as hook:
        sub = await subscribe(
            api, auth, hook.url, event_types=["Probe"], backoff_s=1, max_backoff_s=1, circuit_threshold=3
        )
        sent = probe_events(tenant, "dev-1", 2)
        await NotificationService(pool, client).record_events(sent)
        await eventually(lambda: view(api, auth, sub["subscription_id"]), lambda v: v["pending"] == 0)
    assert [e["event_id"] for e in hook.events()] == [sent.events[0].event_id] * 3 + [sent.events[1].event_id]
    shown = await view(api, auth, sub["subscription_id"])
    assert shown["circuit"]["state"] == "closed" and shown["circuit"]["consecutive_failures"] == 0
    assert await events_of(api, auth, CIRCUIT_OPENED) == []
    assert await deliveries(pool, sub["subscription_id"]) == [("delivered", 3), ("delivered", 1)]


@pytest.fixture
async def delivery(pool: Pool, settings: Settings) -> Any:
    """The webhook delivery service with a short POST deadline, called without Temporal."""
    policy = AddressPolicy.from_settings(settings)
    async with webhook_client(policy) as http:
        yield WebhookDeliveryService(pool, payload_keys(settings), policy, http, post_deadline_s=0.5)


async def quiet(client: Client, sub: dict[str, Any]) -> None:
    """Stop the subscription's own loop: the test calls the activity itself."""
    await client.get_workflow_handle(sub["workflow_id"]).terminate("the test calls the activity")


async def test_a_receiver_that_never_answers_opens_the_circuit_too(
    api: httpx.AsyncClient, client: Client, pool: Pool, delivery: WebhookDeliveryService
) -> None:
    """Timeouts are failures: the second opens the circuit, which then holds no connection."""
    tenant, auth = new_tenant()
    async with Answering(hang=True) as sink:
        sub = await breaking(api, auth, sink.url, threshold=2)
        await quiet(client, sub)
        await NotificationService(pool).record_events(probe_events(tenant, "dev-1", 1))
        pending, env = DeliverPending(subscription_id=sub["subscription_id"]), ActivityEnvironment()
        with pytest.raises(ApplicationError) as failed:
            await env.run(delivery.deliver_pending, pending)
        assert failed.value.type == "DeliveryFailed" and "Timeout" in str(failed.value)
        opened = await env.run(delivery.deliver_pending, pending)
        assert 3500 < opened.probe_in_s <= 3600 and not opened.more
        assert (await env.run(delivery.deliver_pending, pending)).probe_in_s > 3500
        assert len(sink.requests) == 2  # nothing posted while open
    shown = await view(api, auth, sub["subscription_id"])
    assert shown["circuit"]["state"] == "open" and shown["circuit"]["last_error"].startswith("Timeout")
    assert await deliveries(pool, sub["subscription_id"]) == [("pending", 1)]


async def test_failed_probes_back_off_doubling_to_the_cap_and_an_answer_closes_the_circuit(
    api: httpx.AsyncClient, client: Client, pool: Pool, delivery: WebhookDeliveryService
) -> None:
    tenant, auth = new_tenant()
    async with Answering(answer=DOWN) as hook:
        sub = await breaking(api, auth, hook.url, 1, 10, 35, max_attempts=1)
        sid = sub["subscription_id"]
        await quiet(client, sub)
        sent = probe_events(tenant, "dev-1", 2)
        await NotificationService(pool).record_events(sent)
        pending, env = DeliverPending(subscription_id=sid), ActivityEnvironment()
        waits = [(await env.run(delivery.deliver_pending, pending)).probe_in_s]
        opened_at = (await view(api, auth, sid))["circuit"]["opened_at"]
        for _ in range(3):
            assert (await view(api, auth, sid))["circuit"]["state"] == "open"
            await make_due(pool, sid)
            assert (await view(api, auth, sid))["circuit"]["state"] == "half_open"
            waits.append((await env.run(delivery.deliver_pending, pending)).probe_in_s)
        assert waits == [10, 20, 35, 35]
        assert len(hook.requests) == 4  # one failure, three probes, each of the first event
        shown = await view(api, auth, sid)
        assert shown["circuit"]["opened_at"] == opened_at and shown["dead_letters"] == 0
        assert shown["circuit"]["consecutive_failures"] == 4

        hook.response = REFUSED  # up again, and refusing the event: an answer closes the circuit
        await make_due(pool, sid)
        progress = await env.run(delivery.deliver_pending, pending)
        assert progress.dead_lettered == 1 and progress.probe_in_s == 0
        hook.response = OK
        assert (await env.run(delivery.deliver_pending, pending)).delivered == 1
    assert [e["event_id"] for e in hook.events()] == [sent.events[0].event_id] * 5 + [sent.events[1].event_id]
    assert (await view(api, auth, sid))["circuit"]["state"] == "closed"
    assert [len(await events_of(api, auth, kind)) for kind in (CIRCUIT_OPENED, CIRCUIT_CLOSED)] == [1, 1]


async def test_the_loop_sleeps_while_open_and_continues_as_new_with_the_circuit_kept(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    """Nudges (one per recorded event) do not wake an open circuit's loop: no activity runs
    for them. They grow its history until it continues as new; the new run finds the circuit
    where the table keeps it (here: probe due), probes and delivers everything in order."""
    tenant, auth = new_tenant()
    service = NotificationService(pool, client)
    async with Answering(answer=DOWN) as hook:
        sub = await breaking(api, auth, hook.url)
        sid = sub["subscription_id"]
        wid = delivery_workflow_id(tenant, sid)
        first = await client.start_workflow(
            EventDelivery.run,
            DeliveryInput(tenant=tenant, subscription_id=sid, idle_poll_s=1, history_limit=50),
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
            id_conflict_policy=WorkflowIDConflictPolicy.TERMINATE_EXISTING,
        )
        sent = [probe_events(tenant, "dev-1", 1)]
        await service.record_events(sent[0])
        await eventually(lambda: view(api, auth, sid), lambda v: v["circuit"]["state"] == "open")
        hook.response = OK
        await make_due(pool, sid)  # the hour passed; the sleeping run's timer has not
        latest = handle_for(client, EventDelivery.run, wid)
        for _ in range(40):
            if (await latest.describe()).run_id != first.result_run_id:
                break
            sent.append(probe_events(tenant, "dev-1", 1))
            await service.record_events(sent[-1])
        else:
            raise AssertionError("the loop never continued as new")
        await eventually(lambda: view(api, auth, sid), lambda v: v["pending"] == 0)

    scheduled = [
        e
        async for e in client.get_workflow_handle(wid, run_id=first.result_run_id).fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert len(scheduled) == 1, "the open circuit's loop ran the activity for nudges"
    received = [e["event_id"] for e in hook.events()]
    assert received == [sent[0].events[0].event_id] + [b.events[0].event_id for b in sent]
    assert (await view(api, auth, sid))["circuit"]["state"] == "closed"
    assert (await api.delete(f"/v1/subscriptions/{sid}", headers=auth)).status_code == 204
    assert (await latest.result()).delivered == len(sent)


async def test_a_subscription_deleted_while_open_ends_its_loop_and_its_circuit(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    async with Answering(answer=DOWN) as hook:
        sub = await breaking(api, auth, hook.url)
        sid = sub["subscription_id"]
        await NotificationService(pool, client).record_events(probe_events(tenant, "dev-1", 2))
        await eventually(lambda: view(api, auth, sid), lambda v: v["circuit"]["state"] == "open")
        assert (await api.delete(f"/v1/subscriptions/{sid}", headers=auth)).status_code == 204
        handle = handle_for(client, EventDelivery.run, sub["workflow_id"])
        assert await handle.result() == DeliverySummary(subscription_id=sid, delivered=0, dead_lettered=0)
    assert len(hook.requests) == 1
    assert (
        await pool.fetchval("SELECT count(*) FROM notification.circuits WHERE subscription_id = $1", sid) == 0
    )


async def test_a_secret_rotated_while_open_signs_the_deliveries_after_the_probe(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    tenant, auth = new_tenant()
    new_secret = "whsec_" + "bmV3LXNlY3JldC1vZi0zMi1ieXRlcy1sb25nLi4uLg=="
    async with Answering(answer=DOWN) as hook:
        sub = await breaking(api, auth, hook.url, 1, 1, 1)
        sid = sub["subscription_id"]
        sent = probe_events(tenant, "dev-1", 2)
        await NotificationService(pool, client).record_events(sent)
        await eventually(lambda: view(api, auth, sid), lambda v: v["circuit"]["state"] != "closed")
        path = f"/v1/subscriptions/{sid}/rotate-secret"
        rotated = await api.post(path, json={"secret": new_secret, "overlap_s": 0}, headers=auth)
        assert rotated.status_code == 200 and rotated.json()["circuit"]["state"] != "closed"
        # the next probe may have read the subscription before the rotation; the ones after it not
        at_rotation = len(hook.requests)
        await eventually(hook.received, lambda got: len(got) > at_rotation)
        hook.response = OK
        await eventually(lambda: view(api, auth, sid), lambda v: v["pending"] == 0)
    delivered = hook.requests[at_rotation + 1 :]
    assert [json_id(body) for _, body in delivered][-2:] == [e.event_id for e in sent.events]
    for headers, body in delivered:
        Webhook(new_secret).verify(body, headers)
        assert len(headers["webhook-signature"].split(" ")) == 1  # the replaced secret signs no more


def json_id(body: bytes) -> str:
    """The event id of a delivered body."""
    event_id: str = json.loads(body)["event_id"]
    return event_id


async def test_a_dead_receiver_does_not_delay_a_healthy_one_of_the_same_tenant(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    """Each event reaches the healthy receiver before the next is recorded, while the dead
    one (nothing listens) has taken none and its circuit opens; its events wait for it."""
    tenant, auth = new_tenant()
    service = NotificationService(pool, client)
    async with Receiver() as healthy:
        nowhere = f"http://127.0.0.1:{free_port()}/hook"
        dead = await breaking(api, auth, nowhere, threshold=2, backoff_s=1, max_backoff_s=1)
        await subscribe(api, auth, healthy.url, event_types=["Probe"])
        sent = []
        for n in range(1, 6):
            sent.append(probe_events(tenant, "dev-1", 1))
            await service.record_events(sent[-1])
            await eventually(healthy.received, has(n))
        shown = await eventually(
            lambda: view(api, auth, dead["subscription_id"]), lambda v: v["circuit"]["state"] == "open"
        )
    assert [e["event_id"] for e in healthy.events()] == [b.events[0].event_id for b in sent]
    assert shown["pending"] == 5 and shown["dead_letters"] == 0
    assert (await api.delete(f"/v1/subscriptions/{dead['subscription_id']}", headers=auth)).status_code == 204


async def test_two_tenants_circuits_and_their_events_stay_their_own(
    api: httpx.AsyncClient, client: Client, pool: Pool
) -> None:
    """Tenant one's receiver is down, tenant two's is up: only tenant one's circuit opens and
    only tenant one is told. A subscription id is one tenant's: another cannot take it."""
    (one, auth_one), (two, auth_two) = new_tenant(), new_tenant()
    service = NotificationService(pool, client)
    async with Answering(answer=DOWN) as down, Receiver() as up:
        sub_one = await breaking(api, auth_one, down.url, event_types=["*"])
        sub_two = await subscribe(api, auth_two, up.url, event_types=["*"])
        await service.record_events(probe_events(one, "dev-1", 1))
        await service.record_events(probe_events(two, "dev-1", 1))
        await eventually(lambda: events_of(api, auth_one, CIRCUIT_OPENED), lambda e: len(e) == 1)
        await eventually(up.received, has(1))
    assert await events_of(api, auth_two, CIRCUIT_OPENED) == []
    assert [e["type"] for e in up.events()] == ["Probe"]
    assert (await view(api, auth_two, sub_two["subscription_id"]))["circuit"]["state"] == "closed"
    assert (
        await api.get(f"/v1/subscriptions/{sub_one['subscription_id']}", headers=auth_two)
    ).status_code == 404
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute(
            """INSERT INTO notification.subscriptions (subscription_id, tenant, url, event_types,
                   secret, max_attempts, backoff_s, max_backoff_s, created_by)
               SELECT subscription_id, $2, url, event_types, secret, max_attempts, backoff_s,
                   max_backoff_s, created_by FROM notification.subscriptions WHERE subscription_id = $1""",
            sub_one["subscription_id"],
            two,
        )
    assert (
        await api.delete(f"/v1/subscriptions/{sub_one['subscription_id']}", headers=auth_one)
    ).status_code == 204


async def test_a_failure_or_answer_for_a_subscription_deleted_meanwhile_is_dropped(
    api: httpx.AsyncClient, client: Client, pool: Pool, delivery: WebhookDeliveryService
) -> None:
    """A delivery in flight when its subscription is deleted reports to the breaker after the
    row (and its circuit) are gone: nothing is recorded and nothing fails."""
    tenant, auth = new_tenant()
    sub = await subscribe(api, auth, "https://example.com/hook", circuit_threshold=1)
    sid = sub["subscription_id"]
    policy = CircuitPolicy(threshold=1, probe_s=30, max_probe_s=60)
    assert await delivery.breaker.failed(tenant, sid, policy, "HTTP 503") == 30
    assert (await api.delete(f"/v1/subscriptions/{sid}", headers=auth)).status_code == 204
    assert await delivery.breaker.failed(tenant, sid, policy, "HTTP 503") == 0
    await delivery.breaker.answered(tenant, sid)
    circuits = "SELECT count(*) FROM notification.circuits WHERE subscription_id = $1"
    assert await pool.fetchval(circuits, sid) == 0
    recorded = (await api.get("/v1/events", headers=auth)).json()["items"]
    assert [e["type"] for e in recorded] == [CIRCUIT_OPENED]


async def test_a_probe_cut_off_by_a_crash_is_posted_again_by_the_next_call(
    api: httpx.AsyncClient, client: Client, pool: Pool, delivery: WebhookDeliveryService
) -> None:
    """The worker died while posting the probe (the circuit says half-open, the next probe is
    an hour away): the activity's retry posts the probe again instead of waiting that hour."""
    tenant, auth = new_tenant()
    async with Answering(answer=DOWN) as hook:
        sub = await breaking(api, auth, hook.url)
        sid = sub["subscription_id"]
        await quiet(client, sub)
        await NotificationService(pool).record_events(probe_events(tenant, "dev-1", 1))
        pending, env = DeliverPending(subscription_id=sid), ActivityEnvironment()
        assert (await env.run(delivery.deliver_pending, pending)).probe_in_s == 3600
        await pool.execute(
            "UPDATE notification.circuits SET state = 'half_open' WHERE subscription_id = $1", sid
        )
        hook.response = OK
        assert (await env.run(delivery.deliver_pending, pending)).delivered == 1
    assert len(hook.requests) == 2
    assert (await view(api, auth, sid))["circuit"]["state"] == "closed"


async def test_a_subscriptions_own_circuit_events_are_not_queued_for_it(
    api: httpx.AsyncClient, client: Client, pool: Pool, delivery: WebhookDeliveryService
) -> None:
    """A `*` subscription whose receiver fails and answers in turn: were its own circuit's
    events queued for it, each would fail (opening the circuit: one more event), then be probed
    (closing it: another), and one recorded event would feed it events for ever. A watcher
    (another subscription) is still told both transitions."""
    tenant, auth = new_tenant()
    async with Answering(answer=DOWN) as hook, Receiver() as watcher:
        sub = await breaking(api, auth, hook.url, 1, 1, 1, event_types=["*"])
        sid = sub["subscription_id"]
        await quiet(client, sub)
        watching = await subscribe(api, auth, watcher.url, event_types=[CIRCUIT_OPENED, CIRCUIT_CLOSED])
        sent = probe_events(tenant, "dev-1", 1)
        await NotificationService(pool).record_events(sent)
        pending, env = DeliverPending(subscription_id=sid), ActivityEnvironment()
        assert (await env.run(delivery.deliver_pending, pending)).probe_in_s > 0
        await make_due(pool, sid)
        hook.response = OK
        assert (await env.run(delivery.deliver_pending, pending)).delivered == 1
        # the test's delivery service has no Temporal client to nudge the watcher's loop
        await NotificationService(pool, client).subscriptions.nudge([watching["subscription_id"]])
        await eventually(watcher.received, has(2))
    assert await deliveries(pool, sid) == [("delivered", 1)]
    assert (await view(api, auth, sid))["pending"] == 0
    assert [e["type"] for e in watcher.events()] == [CIRCUIT_OPENED, CIRCUIT_CLOSED]


async def test_a_transition_made_by_delivering_a_circuit_event_is_recorded_not_delivered(
    api: httpx.AsyncClient, client: Client, pool: Pool, delivery: WebhookDeliveryService
) -> None:
    """Two subscriptions of a tenant, each told the other's transitions, at receivers that fail
    and answer in turn: delivering one's circuit event opens and closes the other's circuit,
    whose events, were they delivered, would do the same to the first, and so on for ever.
    Every transition is recorded; only those made by other events are delivered."""
    tenant, auth = new_tenant()
    async with Answering(answer=DOWN) as first_hook, Answering(answer=DOWN) as second_hook:
        first = await breaking(api, auth, first_hook.url, 1, 1, 1, event_types=["*"])
        second = await breaking(
            api, auth, second_hook.url, 1, 1, 1, event_types=[CIRCUIT_OPENED, CIRCUIT_CLOSED]
        )
        await quiet(client, first)
        await quiet(client, second)
        await NotificationService(pool).record_events(probe_events(tenant, "dev-1", 1))
        env = ActivityEnvironment()
        for sub, hook in ((first, first_hook), (second, second_hook)):
            sid = sub["subscription_id"]
            hook.response = DOWN
            assert (
                await env.run(delivery.deliver_pending, DeliverPending(subscription_id=sid))
            ).probe_in_s > 0
            await make_due(pool, sid)
            hook.response = OK
            await env.run(delivery.deliver_pending, DeliverPending(subscription_id=sid))
            assert (await view(api, auth, sid))["pending"] == 0
    assert [len(await events_of(api, auth, kind)) for kind in (CIRCUIT_OPENED, CIRCUIT_CLOSED)] == [2, 2]
    assert await deliveries(pool, first["subscription_id"]) == [("delivered", 1)]
    assert [e["type"] for e in second_hook.events()] == [CIRCUIT_OPENED, CIRCUIT_OPENED, CIRCUIT_CLOSED]
