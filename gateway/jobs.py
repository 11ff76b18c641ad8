"""Rollout jobs over MQTT: the pending job pushed on `jobs/notify` when it is offered (the
`device_job_offered` NOTIFY of a trigger on device.rollout_jobs) and at SUBSCRIBE; the device's
`jobs/{campaign}/progress` publishes move the job as `POST /v1/device/jobs/{campaign}/progress`
does (and a success reports the new firmware to the twin)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError
from temporalio.client import Client
from temporalio.service import RPCError

from activities.device_mqtt import notify_twin_changed
from activities.devices import DeviceService
from fleetflow.contracts.rollouts import JobReport
from fleetflow.contracts.twin import ReportState
from fleetflow.db import Pool
from fleetflow.mqtt_topics import Published, Topic, filter_matches, topic
from gateway import codec
from workflows.device_twin import DeviceTwin, twin_id

if TYPE_CHECKING:
    from gateway.connection import Connection

log = logging.getLogger(__name__)
RC5_NO_MATCHING = 0x10  # "no matching subscribers": used for a progress of no known job
RC5_CONFLICT = 0x83  # "implementation specific error": the move is not allowed from its state


class JobPush:
    """Pushes a device's pending job; takes its progress publishes."""

    def __init__(self, devices: DeviceService, temporal: Client, pool: Pool) -> None:
        self.devices = devices
        self.pool = pool
        self.temporal = temporal

    async def push(self, conn: Connection) -> None:
        """Send the pending job (if any) when the device subscribed to jobs/notify."""
        claims = conn.claims
        if claims is None:
            return
        name = topic(claims.tenant, claims.device_id, Topic.JOBS_NOTIFY)
        if not any(filter_matches(f, name) for f in conn.subscriptions):
            return
        job = await self.devices.pending_job(claims.tenant, claims.device_id)
        if job is not None:
            conn.push(name, job.model_dump_json().encode())

    async def progress(self, conn: Connection, target: Published, payload: bytes) -> int:
        """A `jobs/{campaign}/progress` publish; the PUBACK reason code."""
        claims = conn.claims
        assert claims is not None
        try:
            report = JobReport.model_validate_json(payload)
        except ValidationError:
            return codec.RC5_PAYLOAD_INVALID
        try:
            installed = await self.devices.report_job(
                claims.tenant, claims.device_id, target.campaign, report.kind, report.state, report.detail
            )
        except LookupError:
            return RC5_NO_MATCHING
        except ValueError:
            return RC5_CONFLICT
        if installed is not None:
            twin = self.temporal.get_workflow_handle(twin_id(claims.tenant, claims.device_id))
            try:
                patch = {"firmware_version": installed}
                await twin.signal(DeviceTwin.report, ReportState(patch=patch, at=datetime.now(UTC)))
            except RPCError:
                pass  # no twin yet: it starts from the registry, which has the new version
            else:
                await notify_twin_changed(self.pool, claims.tenant, claims.device_id, reported=True)
        return 0
