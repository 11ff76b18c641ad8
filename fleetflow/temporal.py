"""The Temporal client factory and the platform's search attributes."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter

from fleetflow.errors import StartupError
from fleetflow.settings import Settings

DEVICE_ID = SearchAttributeKey.for_keyword("DeviceId")
TENANT_ID = SearchAttributeKey.for_keyword("TenantId")
OPERATION = SearchAttributeKey.for_keyword("Operation")
SEARCH_ATTRIBUTES = (DEVICE_ID, TENANT_ID, OPERATION)


async def connect(settings: Settings, *, timeout: float = 10.0) -> Client:
    """Connect with the pydantic converter and tracing; StartupError when unreachable."""
    try:
        async with asyncio.timeout(timeout):
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
                interceptors=[TracingInterceptor()],
            )
    except (RuntimeError, OSError, TimeoutError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(
            f"cannot reach Temporal at {settings.temporal_address} (TEMPORAL_ADDRESS): {reason}"
        ) from None


async def ensure_search_attributes(client: Client) -> None:
    """Register DeviceId, TenantId and Operation (Keyword) where missing."""
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
