"""Structured logs: one JSON object a line, with the trace, the workflow and the device.

Every record gets, where known:

- `trace_id`, `span_id`: the current OpenTelemetry span (in workflow code, the span that
  started the workflow; only while tracing is on);
- `workflow_id`, `run_id`, `workflow_type`: inside an activity (from `activity.info()`) and
  from workflow code logging through `workflow.logger` (which the SDK silences on replay,
  so a replayed workflow logs nothing twice);
- `device_id`: from `bound(device_id=...)`, the `{device_id}` of the API route being served,
  the input of an activity about one device (`LogContext`), or the `DeviceId` search
  attribute of a workflow.

`FLEETFLOW_LOG_FORMAT=text` gives the former one-line text format for reading by eye.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from temporalio import activity, client, worker, workflow

from fleetflow.errors import Refusal

_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_fields", default=None)
# the ASGI scope of the request being served: routing fills in its path parameters later
_scope: contextvars.ContextVar[MutableMapping[str, Any] | None] = contextvars.ContextVar(
    "log_scope", default=None
)

# attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# handled above, or not worth a field (uvicorn's ANSI-coloured copy of the message)
_SKIPPED_EXTRAS = frozenset(
    {"temporal_workflow", "workflow_info", "temporal_activity", "temporal_log", "color_message"}
)
_HANDLER_MARK = "_fleetflow_handler"
# what must never reach a log line, whoever logged it (an exception text, a library's debug line)
_SECRETS = (
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted token]"),
    (re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"), r"\1[redacted]"),
    (re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
)


def redact(text: str) -> str:
    """text with tokens, bearer credentials and DSN passwords replaced."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add fields to every record logged inside the block (in this task and its children)."""
    token = _fields.set({**(_fields.get() or {}), **fields})
    try:
        yield
    finally:
        _fields.reset(token)


def bind_request(scope: MutableMapping[str, Any]) -> contextvars.Token[MutableMapping[str, Any] | None]:
    """Remember the ASGI scope of the request this task serves (api/observability.py)."""
    return _scope.set(scope)


def unbind_request(token: contextvars.Token[MutableMapping[str, Any] | None]) -> None:
    """Forget the request bound by bind_request."""
    _scope.reset(token)


def _workflow_fields(record: logging.LogRecord, out: dict[str, Any]) -> None:
    details = getattr(record, "temporal_workflow", None)
    if isinstance(details, dict):
        for key in ("workflow_id", "run_id", "workflow_type", "task_queue", "attempt"):
            if key in details:
                out[key] = details[key]
    info = getattr(record, "workflow_info", None)
    attributes = getattr(info, "typed_search_attributes", None)
    for pair in getattr(attributes, "search_attributes", ()):
        if pair.key.name == "DeviceId":
            out.setdefault("device_id", pair.value)


def _activity_fields(out: dict[str, Any]) -> None:
    if not activity.in_activity():
        return
    info = activity.info()
    out.update(
        workflow_id=info.workflow_id,
        run_id=info.workflow_run_id,
        activity_type=info.activity_type,
        task_queue=info.task_queue,
        attempt=info.attempt,
    )


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, service, logger, message, context."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            out["trace_id"] = format(context.trace_id, "032x")
            out["span_id"] = format(context.span_id, "016x")
        _activity_fields(out)
        _workflow_fields(record, out)
        scope = _scope.get()
        if scope is not None:
            device_id = (scope.get("path_params") or {}).get("device_id")
            if device_id:
                out["device_id"] = device_id
        out.update(_fields.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _SKIPPED_EXTRAS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return redact(json.dumps(out, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """The one-line text format, redacted like the JSON one."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one redacted line."""
        return redact(super().format(record))


class OneLineRefusals(logging.Filter):
    """A record carrying a Refusal keeps its reason on the message line and drops the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; rewrites one that carries a Refusal."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, Refusal):
            record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {exc}", None
            record.exc_info, record.exc_text = None, None
        return True


def configure(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Send the process's logs to stderr, as JSON (or text), at level; safe to call again."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(OneLineRefusals())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
        # the workflow's details become JSON fields instead of a dict appended to the message
        workflow.logger.workflow_info_on_message = False
        workflow.logger.full_workflow_info_on_extra = True
        activity.logger.activity_info_on_message = False
    else:
        handler.setFormatter(TextFormatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def device_of(arg: object) -> str | None:
    """The device an activity input is about: its `device_id`, or its `spec.device_id`."""
    for candidate in (arg, getattr(arg, "spec", None)):
        value = getattr(candidate, "device_id", None)
        if isinstance(value, str):
            return value
    return None


class LogContext(client.Interceptor, worker.Interceptor):
    """Worker interceptor (given to the client, like TracingInterceptor, so every worker on
    the client gets it): the logs of an activity about one device carry its device_id."""

    def intercept_activity(
        self, next: worker.ActivityInboundInterceptor
    ) -> worker.ActivityInboundInterceptor:
        """Wrap every activity."""
        return _ActivityDevice(next)


class _ActivityDevice(worker.ActivityInboundInterceptor):
    async def execute_activity(self, input: worker.ExecuteActivityInput) -> Any:
        device_id = device_of(input.args[0]) if input.args else None
        if device_id is None:
            return await super().execute_activity(input)
        with bound(device_id=device_id):
            return await super().execute_activity(input)
