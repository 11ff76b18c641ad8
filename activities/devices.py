"""The device service: registry, credentials and configuration; owns the `device` schema.

Every write is an activity keyed by tenant + device id (and onboarding id), safe to
retry: a repeated call finds its own earlier work and does nothing more. `DeviceService`
implements every activity of `DeviceActivities`: the registry's here, the bulk and rollout
ones by delegating to its parts (`BulkProvisioning`, `FirmwareStore`, `RolloutPlanner`,
`RolloutJobs`, `DeviceJobs`); the API reads through
its read model (`DeviceReadModel`), exposed below under the names the API calls.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities import data_facade
from activities.device_bulk import BulkProvisioning
from activities.device_commands import DeviceCommands
from activities.device_consistency import DeviceConsistency
from activities.device_credentials import CredentialRotations
from activities.device_firmware import FirmwareStore
from activities.device_firmware_settings import firmware_blobs
from activities.device_jobs import DeviceJobs
from activities.device_onboarding_steps import (
    credential_issued,
    issue_credential_on,
    register_on,
    store_config_on,
)
from activities.device_reads import DeviceReadModel
from activities.device_rollout_plans import RolloutPlanner
from activities.device_rollouts import RolloutJobs
from activities.device_state import refuse, set_status
from activities.poison import poison_guard
from activities.probe import probe
from fleetflow import config_schema
from fleetflow.contracts.commands import CommandState, SettleCommand
from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.consistency import FinishReconciliation, ReconciledPage, ReconcilePage
from fleetflow.contracts.devices import (
    BulkChunk,
    BulkChunkResult,
    DeviceBatch,
    DeviceStatus,
    DeviceTransition,
    IssueCredential,
    IssuedCredential,
    OnboardingStep,
    ProvisionDevice,
    ProvisionedDevice,
    RegisterDevice,
    RevokeCredential,
    RotateChunk,
    RotatedChunk,
    StoreConfig,
    ValidatedOnboarding,
    ValidateOnboarding,
)
from fleetflow.contracts.rollouts import (
    DeviceStep,
    RolloutInput,
    RolloutPlan,
    RolloutTick,
    StopRollout,
    TickResult,
)
from fleetflow.contracts.system import ProbeRequest, ProbeResult
from fleetflow.contracts.telemetry import UnreadyDevices, WindowRef
from fleetflow.db import Pool
from fleetflow.interfaces import implements
from fleetflow.interfaces.device import DeviceActivities
from fleetflow.keys import keyring
from fleetflow.settings import Settings


class DeviceService(DeviceActivities):
    """Activities of the `device` task queue, and what the API asks of the device service."""

    queue = TaskQueue.DEVICE

    def __init__(self, pool: Pool, settings: Settings, temporal: Client | None = None) -> None:
        self.pool = pool
        self.consistency = DeviceConsistency(pool, temporal)
        self.consistency_report = self.consistency.report
        self.keys = keyring(settings)
        self.issuer = settings.jwt_issuer
        self.quota_defaults = settings.quotas
        self.reads = DeviceReadModel(pool)
        self.firmware_store = FirmwareStore(pool, firmware_blobs(pool, settings))
        self.planner = RolloutPlanner(pool)
        self.rollouts = RolloutJobs(pool)
        self.device_jobs = DeviceJobs(pool)
        self.bulk = BulkProvisioning(pool, self.reads, self.keys, self.issuer, self.quota_defaults)
        # what the API asks of the device service, answered by its parts
        self.device_type = self.reads.device_type
        self.device_types = self.reads.device_types
        self.put_device_type = self.reads.put_device_type
        self.resolve_config = self.reads.resolve_config
        self.get_device = self.reads.get_device
        self.list_devices = self.reads.list_devices
        self.credential_active = self.reads.credential_active
        self.credential_valid_until = self.reads.credential_valid_until
        self.credentials = CredentialRotations(pool, self.keys, self.issuer, settings.credential_overlap_s)
        self.rotation_outcomes = self.credentials.rotation_outcomes
        self.rotation_counts = self.credentials.rotation_counts
        self.rotated_credentials = self.credentials.rotated_credentials
        self.credentials_active = self.reads.credentials_active
        self.config_of = self.reads.config_of
        self.put_firmware = self.firmware_store.put_firmware
        self.firmware = self.firmware_store.firmware
        self.firmware_bytes = self.firmware_store.firmware_bytes
        self.pending_job = self.device_jobs.pending_job
        self.report_job = self.device_jobs.report_job
        self.campaign_devices = self.rollouts.campaign_devices
        self.bulk_credentials = self.bulk.bulk_credentials
        self.commands = DeviceCommands(pool)
        self.create_command = self.commands.create_command
        self.drop_command = self.commands.drop_command
        self.command = self.commands.command
        self.list_commands = self.commands.list_commands
        self.take_commands = self.commands.take_commands
        self.release_commands = self.commands.release_commands
        self.acknowledged_commands = self.commands.acknowledged_commands
        self.release_node_commands = self.commands.release_node_commands
        self.answer_command = self.commands.answer_command
        self.claim_poller = self.commands.claim_poller
        self.release_poller = self.commands.release_poller

    # --- activities ------------------------------------------------------------

    @implements(DeviceActivities.ping)
    async def ping(self, request: ProbeRequest) -> ProbeResult:
        """Answer the system check."""
        return await probe(self.queue, self.pool, request)

    @implements(DeviceActivities.validate_onboarding)
    async def validate_onboarding(self, request: ValidateOnboarding) -> ValidatedOnboarding:
        """Check the device type and configuration, and that the id is free."""
        try:
            validated = await self.reads.resolve_config(request.tenant, request.spec)
        except (LookupError, config_schema.ConfigError) as exc:
            raise refuse(str(exc), "InvalidDevice") from None
        return validated

    @implements(DeviceActivities.register)
    async def register(self, request: RegisterDevice) -> None:
        """Register the device as `pending` for this onboarding (or find it already so)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await register_on(conn, request, self.quota_defaults)

    @implements(DeviceActivities.validate_and_register)
    async def validate_and_register(self, request: RegisterDevice) -> ValidatedOnboarding:
        """`validate_onboarding` then `register`; a first attempt refused at validation says so."""
        validated = await self._validated(request)
        await self.register(request)
        return validated

    async def _validated(self, request: RegisterDevice) -> ValidatedOnboarding:
        """`validate_onboarding` of a merged step: a refusal of its first attempt carries the
        detail "validate" (nothing was written, the workflow drops the undos)."""
        try:
            return await self.validate_onboarding(
                ValidateOnboarding(tenant=request.tenant, spec=request.spec)
            )
        except ApplicationError as exc:
            if activity.info().attempt > 1:
                raise  # an earlier attempt may have written: the undo must run
            raise ApplicationError(
                exc.message, OnboardingStep.VALIDATE.value, type=exc.type, non_retryable=exc.non_retryable
            ) from exc

    @implements(DeviceActivities.provision_device)
    async def provision_device(self, request: ProvisionDevice) -> ProvisionedDevice:
        """Validate, then register, issue the credential and store the configuration in one
        transaction (only register when the type needs approval). All or nothing: a failure
        commits none of it, and a retry after a commit finds it and returns the same credential."""
        register = RegisterDevice(
            tenant=request.tenant, spec=request.spec, onboarding_id=request.onboarding_id, actor=request.actor
        )
        validated = await self._validated(register)
        async with self.pool.acquire() as conn, conn.transaction():
            await register_on(conn, register, self.quota_defaults)
            if validated.requires_approval:
                if not await credential_issued(conn, request.tenant, request.spec.device_id, request.jti):
                    return ProvisionedDevice(validated=validated)
                # an earlier attempt committed it all (the type needed no approval then) and its
                # report was lost: that decision stands, and the workflow learns of the credential
                # (else it would never revoke it, nor wait for an approval with it out)
                validated = validated.model_copy(update={"requires_approval": False})
            expires_at = request.expires_at
            if validated.credential_lifetime_days is not None:
                expires_at = request.issued_at + timedelta(days=validated.credential_lifetime_days)
            credential = await issue_credential_on(
                conn,
                IssueCredential(
                    tenant=request.tenant,
                    device_id=request.spec.device_id,
                    onboarding_id=request.onboarding_id,
                    jti=request.jti,
                    issued_at=request.issued_at,
                    expires_at=expires_at,
                ),
                self.keys,
                self.issuer,
            )
            await store_config_on(
                conn,
                StoreConfig(
                    tenant=request.tenant,
                    device_id=request.spec.device_id,
                    onboarding_id=request.onboarding_id,
                    config=validated.config,
                    actor=request.actor,
                ),
            )
        return ProvisionedDevice(validated=validated, credential=credential)

    @implements(DeviceActivities.mark_failed)
    async def mark_failed(self, request: DeviceTransition) -> None:
        """Compensation of `register`: this onboarding's registration becomes `failed`."""
        async with self.pool.acquire() as conn, conn.transaction():
            await set_status(
                conn,
                request.tenant,
                request.device_id,
                DeviceStatus.FAILED,
                actor=request.actor,
                reason=request.reason,
                onboarding_id=request.onboarding_id,
                only_from=(DeviceStatus.PENDING, DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE),
            )

    @implements(DeviceActivities.issue_credential)
    async def issue_credential(self, request: IssueCredential) -> IssuedCredential:
        """Issue the device's credential; stored only as a hash, the token returned once."""
        async with self.pool.acquire() as conn, conn.transaction():
            return await issue_credential_on(conn, request, self.keys, self.issuer)

    @implements(DeviceActivities.revoke_credential)
    async def revoke_credential(self, request: RevokeCredential) -> None:
        """Revoke one credential (compensation of `issue_credential`); refused at once after."""
        await self.pool.execute(
            """UPDATE device.credentials SET revoked_at = now()
               WHERE jti = $1 AND tenant = $2 AND device_id = $3 AND revoked_at IS NULL""",
            request.jti,
            request.tenant,
            request.device_id,
        )

    @implements(DeviceActivities.store_config)
    async def store_config(self, request: StoreConfig) -> None:
        """Store the initial configuration and mark the device `provisioned`."""
        async with self.pool.acquire() as conn, conn.transaction():
            await store_config_on(conn, request)

    @implements(DeviceActivities.remove_config)
    async def remove_config(self, request: DeviceTransition) -> None:
        """Compensation of `store_config`."""
        await self.pool.execute(
            """DELETE FROM device.configurations c USING device.devices d
               WHERE c.tenant = $1 AND c.device_id = $2 AND d.tenant = c.tenant
                 AND d.device_id = c.device_id AND d.onboarding_id = $3""",
            request.tenant,
            request.device_id,
            request.onboarding_id,
        )

    @implements(DeviceActivities.activate)
    async def activate(self, request: DeviceTransition) -> None:
        """The device made first contact: it becomes `active`."""
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await set_status(
                conn,
                request.tenant,
                request.device_id,
                DeviceStatus.ACTIVE,
                actor=request.actor,
                onboarding_id=request.onboarding_id,
                only_from=(DeviceStatus.PROVISIONED,),
                firmware_version=request.firmware_version,
            )
            if not moved:
                status = await conn.fetchval(
                    """SELECT status FROM device.devices
                       WHERE tenant = $1 AND device_id = $2 AND onboarding_id = $3""",
                    request.tenant,
                    request.device_id,
                    request.onboarding_id,
                )
                if status != DeviceStatus.ACTIVE:
                    raise refuse(f"device cannot be activated from {status!r}", "BadTransition")

    @implements(DeviceActivities.find_unready)
    async def find_unready(self, ref: WindowRef) -> UnreadyDevices:
        """Note the devices of a telemetry window that may not send (unknown, or not active) in
        device.window_unready, keyed by the window; answers how many. Idempotent."""
        async with poison_guard():
            # the window's devices from the data service's facade (one query), then one statement
            senders = await data_facade.window_devices(self.pool, ref.window_id)
            count = await self.pool.fetchval(
                """WITH noted AS (
                       INSERT INTO device.window_unready (window_id, tenant, device_id, reason)
                       SELECT $1, w.tenant, w.device_id, coalesce(d.status, 'unknown')
                       FROM unnest($2::text[], $3::text[]) AS w(tenant, device_id)
                       LEFT JOIN device.devices d USING (tenant, device_id)
                       WHERE d.status IS DISTINCT FROM 'active'
                       ON CONFLICT DO NOTHING RETURNING 1)
                   -- one snapshot: the rows a first attempt inserted are not in the table yet
                   SELECT (SELECT count(*) FROM noted)
                        + (SELECT count(*) FROM device.window_unready WHERE window_id = $1)""",
                ref.window_id,
                [tenant for tenant, _ in senders],
                [device_id for _, device_id in senders],
            )
        return UnreadyDevices(count=count)

    # --- bulk imports (BulkProvisioning) --------------------------------------------

    @implements(DeviceActivities.provision_batch)
    async def provision_batch(self, chunk: BulkChunk) -> BulkChunkResult:
        """Register, credential, configure and activate one slice of a bulk import."""
        return await self.bulk.provision_batch(chunk)

    @implements(DeviceActivities.deprovision_batch)
    async def deprovision_batch(self, batch: DeviceBatch) -> None:
        """Compensation of `provision_batch` for the given devices of this bulk import (None: all)."""
        await self.bulk.deprovision_batch(batch)

    # --- credential renewal and rotation (CredentialRotations) ---------------------------

    @implements(DeviceActivities.rotate_credentials)
    async def rotate_credentials(self, chunk: RotateChunk) -> RotatedChunk:
        """Give the next chunk of selected devices a new credential (jti
        `<rotation id>:<device id>`, so a retry issues nothing twice); their other live
        credentials stay valid until the overlap ends. Outcomes per device in
        device.credential_rotations."""
        return await self.credentials.rotate_credentials(chunk)

    # --- firmware campaigns (RolloutPlanner, RolloutJobs) --------------------------------

    @implements(DeviceActivities.plan_rollout)
    async def plan_rollout(self, inp: RolloutInput) -> RolloutPlan:
        """Fix the target list and its waves (once: a retry returns the recorded plan)."""
        return await self.planner.plan_rollout(inp)

    @implements(DeviceActivities.rollout_tick)
    async def rollout_tick(self, tick: RolloutTick) -> TickResult:
        """Expire silent devices, check the abort criteria, offer new jobs, and count."""
        return await self.rollouts.rollout_tick(tick)

    @implements(DeviceActivities.stop_rollout)
    async def stop_rollout(self, stop: StopRollout) -> int:
        """Cancel the jobs not started yet; with `rollback`, queue rollbacks. How many are queued."""
        return await self.rollouts.stop_rollout(stop)

    # --- decommissioning --------------------------------------------------------------

    @implements(DeviceActivities.revoke_all_credentials)
    async def revoke_all_credentials(self, step: DeviceStep) -> int:
        """Revoke every credential of the device; refused from the next request on."""
        result = await self.pool.execute(
            """UPDATE device.credentials SET revoked_at = now()
               WHERE tenant = $1 AND device_id = $2 AND revoked_at IS NULL""",
            step.tenant,
            step.device_id,
        )
        return int(str(result).split()[-1])

    @implements(DeviceActivities.settle_command)
    async def settle_command(self, settle: SettleCommand) -> CommandState:
        """End a command as expired or timed out if it is still pending or delivered."""
        return await self.commands.settle_command(settle)

    @implements(DeviceActivities.cancel_jobs)
    async def cancel_jobs(self, step: DeviceStep) -> int:
        """Cancel the device's pending rollout jobs and end its open commands."""
        await self.commands.cancel_commands(step.tenant, step.device_id, "device decommissioned")
        result = await self.pool.execute(
            """UPDATE device.rollout_jobs SET state = 'cancelled', updated_at = now(),
                   detail = 'device decommissioned', finished_seq = nextval('device.rollout_finished_seq')
               WHERE tenant = $1 AND device_id = $2
                 AND state IN ('queued', 'offered', 'downloading', 'installing')""",
            step.tenant,
            step.device_id,
        )
        return int(str(result).split()[-1])

    @implements(DeviceActivities.mark_decommissioned)
    async def mark_decommissioned(self, step: DeviceStep) -> None:
        """The device is retired for good."""
        async with self.pool.acquire() as conn, conn.transaction():
            await set_status(
                conn,
                step.tenant,
                step.device_id,
                DeviceStatus.DECOMMISSIONED,
                actor=step.actor,
                reason=step.reason or "decommissioned",
            )
            # a command sent since `cancel_jobs` ends too; none can be sent after this commits
            await self.commands.cancel_commands(step.tenant, step.device_id, "device decommissioned", conn)
            # again, after the device row is taken: a rotation or renewal that ran since the
            # first revocation (the device was still active) issued a credential; none issues
            # one from now on (they take the same row and skip a device no longer active)
            await conn.execute(
                """UPDATE device.credentials SET revoked_at = now()
                   WHERE tenant = $1 AND device_id = $2 AND revoked_at IS NULL""",
                step.tenant,
                step.device_id,
            )

    @implements(DeviceActivities.note_retirement_problem)
    async def note_retirement_problem(self, step: DeviceStep) -> None:
        """Say on the device itself that its retirement is stuck, and where."""
        await self.pool.execute(
            """UPDATE device.devices SET status_reason = $3, updated_at = now()
               WHERE tenant = $1 AND device_id = $2""",
            step.tenant,
            step.device_id,
            step.reason,
        )

    # --- reconciliation (activities/device_consistency.py) ----------------------------

    @implements(DeviceActivities.reconcile_devices)
    async def reconcile_devices(self, page: ReconcilePage) -> ReconciledPage:
        """Check and repair one page of the registry."""
        return await self.consistency.reconcile_devices(page)

    @implements(DeviceActivities.finish_reconciliation)
    async def finish_reconciliation(self, finish: FinishReconciliation) -> None:
        """Record the run's totals."""
        await self.consistency.finish_reconciliation(finish)
