"""CredentialRotation: new credentials for one device or a fleet (id
`credential-rotation-{tenant}-{rotation_id}`).

A device's renewal, an operator's rotation of one device and a fleet's (by ids, or by type
and tags) are the same run: chunks of devices, each chunk one `device.rotate_credentials`
step that records every device's outcome in its table. Only counts and a cursor (the last
device id) travel through history, and the run continues as new every CHUNKS_PER_RUN chunks
with all of it. The replaced credentials end on their own at `valid_until` (the check
honours it), so nothing here waits for the overlap.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from fleetflow.contracts.common import tenant_scoped_id
    from fleetflow.contracts.devices import RotateChunk, RotateCredentials
    from fleetflow.interfaces.device import DeviceActivities
    from workflows import calls
    from workflows.saga import COMPENSATION_RETRY

CHUNK = 200
CHUNKS_PER_RUN = 100


def rotation_workflow_id(tenant: str, rotation_id: str) -> str:
    """The business id of one tenant's credential rotation."""
    return tenant_scoped_id("credential-rotation", tenant, rotation_id)


@workflow.defn
class CredentialRotation:
    """Rotates the selected devices' credentials, a chunk at a time; query `progress`."""

    def __init__(self) -> None:
        self._inp: RotateCredentials | None = None

    @workflow.run
    async def run(self, inp: RotateCredentials) -> RotateCredentials:
        """Rotate chunk after chunk; the final counts."""
        if inp.issued_at is None:
            inp = inp.model_copy(update={"issued_at": workflow.now()})
        self._inp = inp
        for _ in range(CHUNKS_PER_RUN):
            done = await calls.execute(
                DeviceActivities.rotate_credentials,
                RotateChunk(request=inp, limit=CHUNK),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=COMPENSATION_RETRY,
            )
            inp = inp.model_copy(
                update={
                    "after": done.last or inp.after,
                    "rotated": inp.rotated + done.rotated,
                    "skipped": inp.skipped + done.skipped,
                }
            )
            self._inp = inp
            if done.done:
                return inp
        workflow.continue_as_new(inp)

    @workflow.query
    def progress(self) -> RotateCredentials | None:
        """The selection, the cursor and the counts so far."""
        return self._inp
