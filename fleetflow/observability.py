"""Logs, metrics and traces: set up once per process, the same way in every process.

- Logs: JSON lines on stderr (fleetflow/logs.py).
- Metrics: one OpenTelemetry MeterProvider whose Prometheus reader feeds the process's
  `prometheus_client` registry: the platform's instruments (fleetflow/metrics.py) and the
  Temporal SDK's own worker and client metrics, which the SDK writes into a MetricBuffer
  of this process's Temporal Runtime and `temporal_metrics()` drains into the same provider.
  The API serves them at /metrics on its own port, a worker on `serve_metrics()`'s port.
- Traces: off unless OTEL_EXPORTER_OTLP_ENDPOINT is set or an exporter is passed. Off means
  no tracer provider and no instrumentation at all, so the cost is nil; on means a
  parent-based ratio sampler (FLEETFLOW_TRACE_SAMPLE_RATIO), OTLP/HTTP export in batches,
  asyncpg and httpx instrumented, FastAPI's native server spans (it follows the global
  provider), and Temporal's TracingInterceptor spans (fleetflow/temporal.py) between them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from wsgiref.simple_server import WSGIServer

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import start_http_server
from temporalio.contrib.opentelemetry import MetricsExporter
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    MetricBuffer,
    MetricBufferDurationFormat,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from fleetflow import logs
from fleetflow.metrics import SECONDS_BUCKETS
from fleetflow.settings import Settings

log = logging.getLogger(__name__)

# SDK metric updates held between two drains (one a second): a busy worker makes a few
# thousand a second
TEMPORAL_METRIC_BUFFER = 100_000


@dataclass
class Telemetry:
    """What setup() configured in this process."""

    service_name: str
    resource: Resource
    meter_provider: MeterProvider
    runtime: Runtime
    buffer: MetricBuffer
    tracer_provider: TracerProvider | None = None
    draining: bool = False


_state: Telemetry | None = None


def setup(
    service_name: str, settings: Settings | None = None, *, exporter: SpanExporter | None = None
) -> Telemetry:
    """Configure logs, metrics and (when asked for) tracing; once per process.

    A later call changes nothing already set up, except that it can turn tracing on: an
    exporter passed (a test's in-memory one) is added with a synchronous processor, so a
    test can read its spans at once; OTel allows one tracer provider per process.
    """
    global _state
    settings = settings or Settings()
    if _state is None:
        logs.configure(service_name, settings.log_level, settings.log_format)
        resource = Resource.create(
            {"service.name": service_name, "service.instance.id": f"{socket.gethostname()}-{os.getpid()}"}
        )
        meter_provider = MeterProvider(
            resource=resource,
            metric_readers=[PrometheusMetricReader(scope_info_enabled=False)],
            # the SDK's durations are seconds: the default buckets (0 … 10,000) suit milliseconds
            views=[
                View(
                    meter_name="temporalio",
                    instrument_type=Histogram,
                    aggregation=ExplicitBucketHistogramAggregation(SECONDS_BUCKETS),
                )
            ],
        )
        metrics.set_meter_provider(meter_provider)
        buffer = MetricBuffer(TEMPORAL_METRIC_BUFFER, duration_format=MetricBufferDurationFormat.SECONDS)
        runtime = Runtime(
            telemetry=TelemetryConfig(
                metrics=buffer,
                attach_service_name=False,  # the scrape target says which process it is
                # the SDK core's own warnings go through our handlers, as JSON like the rest
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                    forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
                ),
            )
        )
        _state = Telemetry(service_name, resource, meter_provider, runtime, buffer)
    if exporter is not None:
        _tracer_provider(_state, settings).add_span_processor(SimpleSpanProcessor(exporter))
    elif settings.otlp_endpoint and _state.tracer_provider is None:
        _tracer_provider(_state, settings).add_span_processor(
            BatchSpanProcessor(_otlp_exporter(settings.otlp_endpoint))
        )
    return _state


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL; traces go to /v1/traces
    return OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")


def _tracer_provider(state: Telemetry, settings: Settings) -> TracerProvider:
    """The process's tracer provider, created (and the libraries instrumented) on first use."""
    if state.tracer_provider is not None:
        return state.tracer_provider
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    provider = TracerProvider(
        resource=state.resource,
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
    )
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    state.tracer_provider = provider
    return provider


def tracing_enabled() -> bool:
    """True once this process records spans (the API then instruments its app)."""
    return _state is not None and _state.tracer_provider is not None


def temporal_runtime() -> Runtime | None:
    """The Runtime whose metrics this process exports (None before setup: the SDK default)."""
    return _state.runtime if _state is not None else None


@asynccontextmanager
async def temporal_metrics() -> AsyncIterator[None]:
    """Drain the Temporal SDK's metrics into the meter provider while the block runs."""
    state = _state
    if state is None or state.draining:
        yield
        return
    state.draining = True
    try:
        async with MetricsExporter(state.buffer, state.meter_provider, poll_interval=timedelta(seconds=1)):
            yield
    finally:
        state.draining = False


def serve_metrics(host: str, port: int) -> WSGIServer | None:
    """Serve /metrics on host:port in a background thread; None (and a warning) when the
    port is taken or 0: the process then runs without a scrape endpoint rather than not at all."""
    if port == 0:
        return None
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("no /metrics: cannot listen on %s:%s (FLEETFLOW_METRICS_PORT): %s", host, port, exc)
        return None
    log.info("metrics on http://%s:%s/metrics", host, port)
    return server


def shutdown(timeout_ms: int = 5000) -> None:
    """Export the spans still buffered; called when a process stops."""
    if _state is not None and _state.tracer_provider is not None:
        _state.tracer_provider.force_flush(timeout_ms)
