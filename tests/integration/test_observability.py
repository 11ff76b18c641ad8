"""Observability on the real servers: one request is one trace, /metrics shows the platform's
figures and the Temporal SDK's, and workflow logs carry the workflow, device and trace."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from cli.status import gather, render
from fleetflow import observability
from fleetflow.contracts.common import TaskQueue
from fleetflow.db import Pool
from fleetflow.logs import JsonFormatter
from fleetflow.settings import ENVIRONMENT, Settings
from tests.integration.conftest import FAULTS
from tests.integration.flows import active_device, new_id, onboard, progress_until
from tests.integration.test_event_bus import Receiver, subscribe
from tests.integration.test_event_bus import onboard as onboard_to_the_end
from tests.integration.test_telemetry import device_auth, readings, send, stored
from tests.support import SpanRecorder, bearer, eventually, free_port

# validation, registration, credential and configuration are one activity since the
# `onboarding-one-step-provision` patch
DEVICE_STEPS = ("provision_device", "activate")


@pytest.fixture
def recorded(telemetry: SpanRecorder) -> Iterator[SpanRecorder]:
    """The session's span recorder, recording for this test only."""
    telemetry.clear()
    telemetry.recording = True
    yield telemetry
    telemetry.recording = False
    telemetry.clear()


class Tree:
    """Finished spans, navigable by name and parent."""

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        self.spans = list(spans)
        self.by_id = {s.context.span_id: s for s in self.spans if s.context is not None}

    def named(self, name: str, trace_id: int | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name and (trace_id is None or trace_of(s) == trace_id)]

    def one(self, name: str, trace_id: int | None = None) -> ReadableSpan:
        found = self.named(name, trace_id)
        assert len(found) == 1, f"{len(found)} spans named {name!r}: {sorted({s.name for s in self.spans})}"
        return found[0]

    def parent(self, span: ReadableSpan) -> ReadableSpan | None:
        return self.by_id.get(span.parent.span_id) if span.parent is not None else None

    def children(self, span: ReadableSpan) -> list[ReadableSpan]:
        return [s for s in self.spans if self.parent(s) is span]

    def ancestors(self, span: ReadableSpan) -> list[ReadableSpan]:
        """span's parent, its parent, ... up to the root of the recorded tree."""
        chain = []
        while (parent := self.parent(span)) is not None:
            chain.append(parent)
            span = parent
        return chain

    def descendants(self, span: ReadableSpan) -> list[ReadableSpan]:
        found = self.children(span)
        for child in list(found):
            found += self.descendants(child)
        return found

    def sql(self, span: ReadableSpan) -> list[str]:
        """The statements of the asyncpg spans under span (at any depth)."""
        return [
            str((s.attributes or {}).get("db.statement"))
            for s in self.descendants(span)
            if (s.attributes or {}).get("db.system") == "postgresql"
        ]


def trace_of(span: ReadableSpan) -> int:
    assert span.context is not None
    trace_id: int = span.context.trace_id
    return trace_id


async def test_one_onboarding_is_one_trace_down_to_the_sql(
    api: httpx.AsyncClient, recorded: SpanRecorder
) -> None:
    tenant = f"obs-{uuid.uuid4().hex[:8]}"
    auth = bearer(tenant)
    async with Receiver() as receiver:
        subscription = await subscribe(api, auth, receiver.url, event_types=["DeviceOnboarded"])
        device_id = new_id()
        await onboard_to_the_end(api, auth, device_id)
        await eventually(receiver.received, lambda events: len(events) == 1)

        async def finished() -> Tree:  # the delivery's spans end a moment after the POST
            return Tree(recorded.get_finished_spans())

        tree = await eventually(
            finished,
            lambda t: any(
                c.name == "POST"
                for s in t.named("RunActivity:notification.deliver_pending")
                for c in t.children(s)
            ),
        )
        (
            await api.delete(f"/v1/subscriptions/{subscription['subscription_id']}", headers=auth)
        ).raise_for_status()

    # API request → client start → workflow → activities → SQL, all one trace
    request = tree.one("POST /v1/devices")
    trace_id = trace_of(request)
    start = tree.one("StartWorkflow:DeviceOnboarding", trace_id)
    # FastAPI's own spans: the request, and the endpoint that starts the workflow
    assert [s.name for s in tree.ancestors(start)] == ["fastapi.endpoint", "POST /v1/devices"]
    assert tree.parent(tree.one("RunWorkflow:DeviceOnboarding", trace_id)) is start
    for step in DEVICE_STEPS:
        scheduled = tree.one(f"StartActivity:device.{step}", trace_id)
        ran = tree.one(f"RunActivity:device.{step}", trace_id)
        assert tree.parent(scheduled) is start and tree.parent(ran) is scheduled
        assert tree.sql(ran), f"no asyncpg span under {ran.name}"
    register = tree.one("RunActivity:device.provision_device", trace_id)
    assert any(s.startswith("INSERT INTO device.devices") for s in tree.sql(register))
    # the device's first contact (another request) reaches the same run as a signal
    assert tree.parent(tree.one("HandleSignal:first_contact", trace_id)) is start
    assert tree.parent(tree.one("RunWorkflow:DeviceTwin", trace_id)) is not None

    # recording the event wakes the subscription's delivery workflow: its start is part of
    # this trace, but the delivery loop lives on in traces of its own (DetachedTraces)
    recorded_events = tree.one("RunActivity:notification.record_events", trace_id)
    nudge = tree.one("SignalWithStartWorkflow:EventDelivery", trace_id)
    assert tree.parent(nudge) is recorded_events
    delivery = next(
        s
        for s in tree.named("RunActivity:notification.deliver_pending")
        if any(c.name == "POST" for c in tree.children(s))
    )
    assert tree.parent(delivery) is None and trace_of(delivery) != trace_id
    post = next(c for c in tree.children(delivery) if c.name == "POST")
    assert (
        str((post.attributes or {}).get("url.full", (post.attributes or {}).get("http.url"))) == receiver.url
    )
    # the webhook carries that trace onward, so a subscriber can join it
    headers, _ = receiver.requests[0]
    assert headers["traceparent"].split("-")[1] == format(trace_of(delivery), "032x")


async def test_ingestion_is_acknowledged_in_one_trace_and_stored_in_others(
    api: httpx.AsyncClient, pool: Pool, recorded: SpanRecorder
) -> None:
    device_id, credential = await active_device(api)
    recorded.clear()
    accepted = await send(api, device_auth(credential), readings(device_id, [20.5, 21.0, 21.5]))
    assert accepted.status_code == 202
    await eventually(lambda: stored(pool, device_id), lambda n: n == 3)

    async def finished() -> Tree:  # the activity's span ends a moment after its commit
        return Tree(recorded.get_finished_spans())

    tree = await eventually(finished, lambda t: bool(t.named("RunActivity:data.store_window")))

    # the request's trace ends at the durable insert: no workflow runs per request
    request = tree.one("POST /v1/telemetry")
    assert any(s.startswith("INSERT INTO data.ingest_batches") for s in tree.sql(request))
    assert not [s for s in tree.spans if trace_of(s) == trace_of(request) and ":" in s.name]

    # a shard's window is stored by activities that each start a trace (sampled on its own),
    # not by children of a shard workflow whose trace would never end
    assert not tree.named("RunWorkflow:TelemetryIngestion")
    windows = [
        s
        for s in tree.named("RunActivity:data.store_window")
        if any(q.startswith("INSERT INTO data.readings") for q in tree.sql(s))
    ]
    assert windows, "no store_window span stored readings"
    for window in windows:
        assert window.parent is None
        assert str((window.attributes or {}).get("temporalWorkflowID", "")).startswith("ingest-")
    assert all(s.parent is None for s in tree.named("RunActivity:analytics.evaluate"))


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of name whose labels include labels."""
    return sum(v for n, ls, v in samples(text) if n == name and labels.items() <= ls.items())


async def test_metrics_show_http_business_and_temporal_figures(api: httpx.AsyncClient, pool: Pool) -> None:
    device_id, credential = await active_device(api)
    assert (await send(api, device_auth(credential), readings(device_id, [1.0, 2.0]))).status_code == 202
    await eventually(lambda: stored(pool, device_id), lambda n: n == 2)

    async def scrape() -> str:
        response = await api.get("/metrics")  # no token: Prometheus scrapes it
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return response.text

    def complete(text: str) -> bool:
        return (
            value(text, "fleetflow_readings_stored_total") >= 2
            and value(
                text, "temporal_activity_execution_latency_seconds_count", activity_type="data.store_window"
            )
            >= 1
            # (one worker a process in production; with five here, the SDK exporter keeps one's gauges)
            and "temporal_worker_task_slots_available" in text
            and value(text, "fleetflow_devices", status="active") >= 1
        )

    text = await eventually(scrape, complete, timeout_s=20)
    assert value(text, "fleetflow_readings_accepted_total") >= 2
    assert (
        value(
            text,
            "http_server_request_duration_seconds_count",
            http_route="/v1/telemetry",
            http_request_method="POST",
            http_response_status_code="202",
        )
        >= 1
    )
    assert value(
        text,
        "http_server_request_duration_seconds_bucket",
        http_route="/v1/devices/{device_id}/twin",
        le="+Inf",
    ) == value(text, "http_server_request_duration_seconds_count", http_route="/v1/devices/{device_id}/twin")
    for gauge in ("fleetflow_alerts_open", "fleetflow_ingest_backlog", "fleetflow_webhooks_dead_letters"):
        assert gauge in {n for n, _, _ in samples(text)}, gauge
    assert 'service_name="fleetflow-tests"' in text  # target_info names the process


async def test_a_worker_serves_metrics_on_its_own_port_and_survives_a_taken_one() -> None:
    port = free_port()
    server = observability.serve_metrics("127.0.0.1", port)
    assert server is not None
    try:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        assert "fleetflow_readings_stored_total" in response.text
        assert "temporal_request_total" in response.text
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            assert observability.serve_metrics("127.0.0.1", taken.getsockname()[1]) is None
    finally:
        server.shutdown()
        server.server_close()


class Collect(logging.Handler):
    """Formats records as they are logged (in the workflow's context, as a real handler does)."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_workflow_logs_are_json_with_workflow_device_and_trace(api: httpx.AsyncClient) -> None:
    device_id = new_id("log")
    FAULTS[device_id] = "store_config"
    handler = Collect(JsonFormatter("fleetflow-worker-orchestration"))
    logging.getLogger("temporalio.workflow").addHandler(handler)
    try:
        assert (await onboard(api, device_id)).status_code == 202
        await progress_until(api, device_id, "failed")
    finally:
        logging.getLogger("temporalio.workflow").removeHandler(handler)
    lines = [line for line in handler.lines if device_id in line]
    assert len(lines) == 1  # logged once, though the workflow task may be replayed
    line: dict[str, Any] = json.loads(lines[0])
    assert line["message"].startswith(f"onboarding of {device_id} undone")
    assert line["workflow_id"] == f"onboard-acme-{device_id}" and line["workflow_type"] == "DeviceOnboarding"
    assert line["device_id"] == device_id and line["run_id"]
    assert len(line["trace_id"]) == 32 and line["service"] == "fleetflow-worker-orchestration"


async def test_status_shows_queues_workflows_ingestion_alerts_and_rollouts(
    api: httpx.AsyncClient, client: Client, pool: Pool, settings: Settings
) -> None:
    status = await gather(client, pool, settings.ingest_shards)
    by_queue = {q.queue: q for q in status.queues}
    assert set(by_queue) == {q.value for q in TaskQueue}
    assert all(q.error is None and (q.pollers or 0) >= 1 for q in status.queues), status.queues
    assert by_queue["data"].backlog is not None  # DescribeTaskQueue's stats
    assert status.running["TelemetryIngestion"] == settings.ingest_shards
    assert all(progress is not None for _, progress in status.shards)
    screen = render(status, settings)
    for part in (
        "pollers",
        "backlog",
        "running workflows",
        "TelemetryIngestion",
        "ingestion: waiting",
        "shard 0:",
        "open alerts:",
        "rollouts in progress:",
    ):
        assert part in screen, part


@pytest.mark.parametrize("unreachable", ["Temporal", "PostgreSQL"])
def test_status_says_in_one_line_what_it_cannot_reach(unreachable: str, settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    env["TEMPORAL_ADDRESS"] = settings.temporal_address
    env["DATABASE_URL"] = str(settings.database_url)
    if unreachable == "Temporal":
        env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{free_port()}"
    else:
        env["DATABASE_URL"] = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fleetflow: cannot reach {unreachable} at"), done.stderr
