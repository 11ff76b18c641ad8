"""Bodies and answers of `/v1/telemetry` and `/v1/rules`. The batch is parsed as the data
service's TelemetryBatchDict (fleetflow.contracts.telemetry); TelemetryBatch documents it."""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints

from api.models.base import STRICT, Body, View
from fleetflow.contracts.limits import MAX_BATCH_READINGS, BatchId, DeviceId, Metric, Value
from fleetflow.contracts.telemetry import COMMENT_MAX_CHARS, Rule


class Reading(Body):
    """One measurement of one device."""

    device_id: DeviceId
    ts: AwareDatetime
    metric: Metric
    value: Value


class TelemetryBatch(Body):
    """Body of `POST /v1/telemetry`; `batch_id` makes a retry harmless."""

    batch_id: BatchId
    readings: Annotated[list[Reading], Field(min_length=1, max_length=MAX_BATCH_READINGS)]


class TelemetryAccepted(View):
    """Answer of `POST /v1/telemetry` (202): the batch is durable."""

    batch_id: str
    readings: int
    duplicate: bool = False


class RuleBody(Rule):
    """Body of `PUT /v1/rules/{rule_id}`."""

    model_config = STRICT


class AlertActionBody(Body):
    """Body of `POST /v1/alerts/{alert_id}/acknowledge` and `.../clear` (optional)."""

    comment: Annotated[str, StringConstraints(max_length=COMMENT_MAX_CHARS)] | None = None
