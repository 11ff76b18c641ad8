"""JSON log lines, the metrics port scheme and the business counters, without servers."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from fleetflow.contracts.common import DomainEvent
from fleetflow.contracts.devices import DeviceTransition
from fleetflow.contracts.events import DeliveryProgress
from fleetflow.contracts.telemetry import Evaluated, Stored
from fleetflow.errors import StartupError
from fleetflow.logs import (
    JsonFormatter,
    OneLineRefusals,
    bind_request,
    bound,
    device_of,
    redact,
    unbind_request,
)
from fleetflow.metrics import OUTCOMES
from fleetflow.payload_codec import PayloadKeyError
from fleetflow.settings import load_settings
from workers.processes import metrics_port_of


def line(record: logging.LogRecord) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(JsonFormatter("fleetflow-test").format(record))
    return parsed


def record(msg: str = "hello %s", *args: object, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("fleetflow.test", logging.INFO, __file__, 1, msg, args or ("world",), None)
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_json_object_with_the_essentials() -> None:
    out = line(record())
    assert out["message"] == "hello world" and out["level"] == "INFO"
    assert out["service"] == "fleetflow-test" and out["logger"] == "fleetflow.test"
    assert datetime.fromisoformat(out["ts"]).tzinfo == UTC
    assert "trace_id" not in out and "device_id" not in out


def test_the_current_span_gives_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")  # a local provider: the global one is left alone
    with tracer.start_as_current_span("work") as span:
        out = line(record())
    context = span.get_span_context()
    assert out["trace_id"] == format(context.trace_id, "032x")
    assert out["span_id"] == format(context.span_id, "016x")


def test_bound_fields_extras_and_the_request_device_are_fields() -> None:
    scope: dict[str, Any] = {"type": "http"}
    token = bind_request(scope)
    try:
        scope["path_params"] = {"device_id": "th-1"}  # routing fills this in after the middleware
        with bound(tenant="acme"):
            out = line(record(batch_id="b-1"))
    finally:
        unbind_request(token)
    assert out["device_id"] == "th-1" and out["tenant"] == "acme" and out["batch_id"] == "b-1"
    assert "device_id" not in line(record())  # nothing leaks past the block


def test_workflow_details_become_fields_not_message_text() -> None:
    details = {
        "workflow_id": "onboard-acme-th-1",
        "run_id": "r1",
        "workflow_type": "DeviceOnboarding",
        "task_queue": "orchestration",
        "attempt": 1,
        "namespace": "default",
    }
    out = line(record(temporal_workflow=details))
    assert out["workflow_id"] == "onboard-acme-th-1" and out["workflow_type"] == "DeviceOnboarding"
    assert "temporal_workflow" not in out and "namespace" not in out


def test_exceptions_are_kept_in_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    out = line(rec)
    assert "ValueError: boom" in out["exc"] and "\n" not in json.dumps(out).strip("\n")


def test_the_device_of_an_activity_input() -> None:
    assert (
        device_of(DeviceTransition(tenant="acme", device_id="th-1", onboarding_id="o1", actor="t")) == "th-1"
    )
    assert device_of(object()) is None


def test_metrics_ports_are_a_base_plus_the_process_index() -> None:
    assert [metrics_port_of(9464, k) for k in range(5)] == [9464, 9465, 9466, 9467, 9468]
    assert metrics_port_of(0, 3) == 0  # 0: no endpoint anywhere
    with pytest.raises(StartupError, match="FLEETFLOW_METRICS_PORT"):
        metrics_port_of(65535, 1)


def test_observability_settings_are_validated_with_the_variable_named() -> None:
    settings = load_settings({"FLEETFLOW_LOG_FORMAT": "TEXT", "FLEETFLOW_TRACE_SAMPLE_RATIO": "0.01"})
    assert settings.log_format == "text" and settings.trace_sample_ratio == 0.01
    with pytest.raises(StartupError, match="FLEETFLOW_TRACE_SAMPLE_RATIO"):
        load_settings({"FLEETFLOW_TRACE_SAMPLE_RATIO": "2"})
    with pytest.raises(StartupError, match="FLEETFLOW_METRICS_PORT"):
        load_settings({"FLEETFLOW_METRICS_PORT": "70000"})


def test_activity_outcomes_count_what_the_results_report(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: dict[str, float] = {}

    class Counter:
        def __init__(self, name: str) -> None:
            self.name = name

        def add(self, amount: float, attributes: object = None) -> None:
            counted[self.name] = counted.get(self.name, 0) + amount

    import fleetflow.metrics as m

    for name in (
        "READINGS_STORED",
        "READINGS_QUARANTINED",
        "ALERTS_RAISED",
        "ALERTS_CLEARED",
        "WEBHOOKS_DELIVERED",
        "WEBHOOKS_DEAD_LETTERED",
        "EVENTS_RECORDED",
    ):
        monkeypatch.setattr(m, name, Counter(name))
    OUTCOMES["data.store_window"](Stored(window_id="w", stored=7, quarantined=2, by_tenant={}))
    now = datetime.now(UTC)
    events = [
        DomainEvent(event_id=f"e{i}", tenant="acme", type=kind, occurred_at=now, actor="analytics")
        for i, kind in enumerate(("AlertRaised", "AlertRaised", "AlertCleared"))
    ]
    OUTCOMES["analytics.evaluate"](Evaluated(events=events))
    OUTCOMES["notification.deliver_pending"](DeliveryProgress(delivered=4, dead_lettered=1))
    OUTCOMES["notification.record_events"](3)
    assert counted == {
        "READINGS_STORED": 7,
        "READINGS_QUARANTINED": 2,
        "ALERTS_RAISED": 2,
        "ALERTS_CLEARED": 1,
        "WEBHOOKS_DELIVERED": 4,
        "WEBHOOKS_DEAD_LETTERED": 1,
        "EVENTS_RECORDED": 3,
    }


def test_workflow_code_logs_only_through_workflow_logger() -> None:
    """workflow.logger is silent on replay; a plain logger or print would repeat every line."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "logging" not in names, f"{path.name}:{node.lineno} imports logging"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.name}:{node.lineno} prints"


def test_tokens_bearer_credentials_and_dsn_passwords_never_reach_a_log_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkMSJ9.c2lnbmF0dXJl"
    logger = logging.getLogger("fleetflow.test.redaction")
    record = logger.makeRecord(
        logger.name,
        logging.WARNING,
        __file__,
        1,
        "refused %s; Authorization: Bearer abc.def; db postgresql://u:s3cret@db/x",
        (token,),
        None,
    )
    line = JsonFormatter("tests").format(record)
    assert token not in line and "abc.def" not in line and "s3cret" not in line
    message = json.loads(line)["message"]
    assert message == "refused [redacted token]; Authorization: Bearer [redacted]; db postgresql://u:***@db/x"
    assert redact("no secret here") == "no secret here"


def test_a_refusal_is_logged_as_one_line_without_its_traceback() -> None:
    try:
        raise PayloadKeyError("a payload is sealed with payload key 'k1', which this process does not have")
    except PayloadKeyError:
        rec = logging.LogRecord("sdk", logging.ERROR, __file__, 1, "Failed on %s", ("r1",), sys.exc_info())
    assert OneLineRefusals().filter(rec)
    out = line(rec)
    assert out["message"] == (
        "Failed on r1: PayloadKeyError: a payload is sealed with payload key 'k1', "
        "which this process does not have"
    )
    assert "exc" not in out
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        other = logging.LogRecord("sdk", logging.ERROR, __file__, 1, "Failed", (), sys.exc_info())
    assert OneLineRefusals().filter(other) and "Traceback" in line(other)["exc"]
