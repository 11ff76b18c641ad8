"""The Temporal client factory and the platform's search attributes."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import client as temporal_client
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client, Interceptor
from temporalio.common import (
    HeaderCodecBehavior,
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)
from temporalio.contrib.opentelemetry import TracingInterceptor

from fleetflow import observability
from fleetflow.errors import StartupError
from fleetflow.identity_interceptors import ServiceIdentityInterceptor
from fleetflow.keys import KeyRing, keyring
from fleetflow.logs import LogContext
from fleetflow.metrics import ActivityOutcomes
from fleetflow.payload_codec import data_converter
from fleetflow.settings import Settings

# The server loads each history shard's transfer and visibility tasks at most 20 times a second
# by default, so every workflow and activity task waited ~25 ms before matching saw it: a bare
# five-activity workflow took 300 ms on the dev server, 86 ms with these (the loads happen on
# notification, so an idle server costs nothing more). The compose stack's Temporal gets the
# same values from deploy/temporal-dynamicconfig.yaml.
DYNAMIC_CONFIG: dict[str, int] = {
    "history.transferProcessorMaxPollRPS": 1000,
    "history.transferProcessorMaxPollHostRPS": 10000,
    "history.visibilityProcessorMaxPollRPS": 1000,
    "history.visibilityProcessorMaxPollHostRPS": 10000,
}


def dev_server_args() -> list[str]:
    """`temporal server start-dev` arguments that apply DYNAMIC_CONFIG."""
    args: list[str] = []
    for key, value in DYNAMIC_CONFIG.items():
        args += ["--dynamic-config-value", f"{key}={value}"]
    return args


DEVICE_ID = SearchAttributeKey.for_keyword("DeviceId")
TENANT_ID = SearchAttributeKey.for_keyword("TenantId")
OPERATION = SearchAttributeKey.for_keyword("Operation")
# the firmware version a twin's device reports, so reconciliation compares it with the
# registry from the same visibility listing that finds the twins (no query per device)
REPORTED_FIRMWARE = SearchAttributeKey.for_keyword("ReportedFirmware")
SEARCH_ATTRIBUTES = (DEVICE_ID, TENANT_ID, OPERATION, REPORTED_FIRMWARE)

# Workflows that run for ever and serve everyone (a shard's ingestion, a subscription's
# deliveries) do not join the trace of whoever happened to start them: that trace would
# grow for the workflow's whole life, and under ratio sampling a shard would be traced
# always or never. Their activities each begin a trace of their own instead, sampled alone.
DETACHED_FROM_CALLER = frozenset({"TelemetryIngestion", "IngestionSupervisor", "EventDelivery"})
TRACE_HEADER = "_tracer-data"  # TracingInterceptor's header


class DetachedTraces(Interceptor):
    """Client interceptor (placed after TracingInterceptor): starts the DETACHED_FROM_CALLER
    workflows without the caller's trace context. The client's own span is still recorded."""

    def intercept_client(
        self, next: temporal_client.OutboundInterceptor
    ) -> temporal_client.OutboundInterceptor:
        """Wrap the client's outbound calls."""
        return _DetachedStart(next)


class _DetachedStart(temporal_client.OutboundInterceptor):
    async def start_workflow(
        self, input: temporal_client.StartWorkflowInput
    ) -> temporal_client.WorkflowHandle[Any, Any]:
        if input.workflow in DETACHED_FROM_CALLER and TRACE_HEADER in input.headers:
            input.headers = {k: v for k, v in input.headers.items() if k != TRACE_HEADER}
        return await super().start_workflow(input)


def interceptors(ring: KeyRing, service: str, issuer: str = "fleetflow") -> list[Interceptor]:
    """The client's interceptors; the ones that are also worker interceptors apply to every
    worker built on the client: tracing, service identity (signed as `service`), log context,
    business counters."""
    return [
        TracingInterceptor(),
        DetachedTraces(),
        ServiceIdentityInterceptor(ring, service, issuer),
        LogContext(),
        ActivityOutcomes(),
    ]


# headers pass through the payload codec too: the service identity token is a (short-lived)
# credential, and it must not be readable, nor usable, by whoever reads a history
HEADER_CODEC = HeaderCodecBehavior.CODEC


def sealing_headers(client: Client) -> Client:
    """The same client, but with its headers sealed like its payloads (HEADER_CODEC); for
    clients made by something other than connect(), such as a test environment's."""
    config = client.config()
    config["header_codec_behavior"] = HEADER_CODEC
    return Client(**config)


async def connect(settings: Settings, *, service: str, timeout: float = 10.0) -> Client:
    """Connect with the platform's converter (pydantic, encrypted payloads), interceptors and
    TLS / API-key options (settings.temporal_client); StartupError when unreachable."""
    options = settings.temporal_client
    try:
        async with asyncio.timeout(timeout):
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                tls=options.connect_tls(),
                api_key=options.api_key,
                rpc_metadata=options.rpc_metadata,
                data_converter=data_converter(settings),
                interceptors=interceptors(keyring(settings), service, settings.jwt_issuer),
                header_codec_behavior=HEADER_CODEC,
                # the process's runtime, whose metrics it exports (the SDK default before setup)
                runtime=observability.temporal_runtime(),
            )
    except (RuntimeError, OSError, TimeoutError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(
            f"cannot reach Temporal at {settings.temporal_address} (TEMPORAL_ADDRESS, "
            f"{options.describe()}): {reason}"
        ) from None


async def ensure_search_attributes(client: Client) -> None:
    """Register fleetflow's search attributes (SEARCH_ATTRIBUTES, all Keyword) where missing."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    missing = {k.name for k in SEARCH_ATTRIBUTES} - set(listed.custom_attributes)
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=client.namespace,
                search_attributes={name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in missing},
            )
        )


def device_search_attributes(
    tenant: str, operation: str, device_id: str | None = None
) -> TypedSearchAttributes:
    """The attributes that make a run findable in the Web UI by device, tenant and operation."""
    pairs = [SearchAttributePair(TENANT_ID, tenant), SearchAttributePair(OPERATION, operation)]
    if device_id is not None:
        pairs.append(SearchAttributePair(DEVICE_ID, device_id))
    return TypedSearchAttributes(pairs)
