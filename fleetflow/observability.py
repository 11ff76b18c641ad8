"""OpenTelemetry and logging set-up, in one place for every process."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

_configured = False


def setup(service_name: str, level: str = "INFO", exporter: SpanExporter | None = None) -> None:
    """Configure logging and the tracer provider once per process.

    Spans are exported when an exporter is given, or over OTLP when
    OTEL_EXPORTER_OTLP_ENDPOINT is set and the OTLP exporter is installed;
    otherwise spans are created but never exported.
    """
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(level=level, format=f"%(asctime)s {service_name} %(levelname)s %(name)s: %(message)s")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )

            exporter = OTLPSpanExporter()
        except ImportError:
            logging.getLogger(__name__).warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp "
                "is not installed; spans are not exported"
            )
    if exporter is not None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
