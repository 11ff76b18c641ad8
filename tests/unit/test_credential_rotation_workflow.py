"""CredentialRotation's batching with a stub device service: every device once, in chunks,
with its cursor, counts and issue time carried across continue-as-new."""

from __future__ import annotations

import uuid

import pytest
from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from fleetflow.contracts.common import TaskQueue
from fleetflow.contracts.devices import RotateChunk, RotateCredentials, RotatedChunk
from workflows import credential_rotation
from workflows.credential_rotation import CredentialRotation

DEVICES = [f"d{i:02d}" for i in range(10)]
SEEN: list[tuple[str, str]] = []  # (device id, issued_at) per device handed to the service
RUNS: set[str] = set()  # the workflow runs that called the service


@activity.defn(name="device.rotate_credentials")
async def rotate(chunk: RotateChunk) -> RotatedChunk:
    after = chunk.request.after
    RUNS.add(activity.info().workflow_run_id or "")
    batch = [d for d in DEVICES if d > after][: chunk.limit]
    SEEN.extend((d, str(chunk.request.issued_at)) for d in batch)
    skipped = sum(1 for d in batch if d == "d03")  # one device is not active
    return RotatedChunk(
        rotated=len(batch) - skipped,
        skipped=skipped,
        last=batch[-1] if batch else "",
        done=len(batch) < chunk.limit,
    )


async def test_a_fleet_is_rotated_once_per_device_across_continue_as_new(
    env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credential_rotation, "CHUNK", 3)
    monkeypatch.setattr(credential_rotation, "CHUNKS_PER_RUN", 2)  # 4 chunks: 2 runs
    SEEN.clear()
    RUNS.clear()
    device = Worker(env.client, task_queue=TaskQueue.DEVICE.value, activities=[rotate])
    flows = Worker(
        env.client,
        task_queue=TaskQueue.ORCHESTRATION.value,
        workflows=[CredentialRotation],
        workflow_runner=UnsandboxedWorkflowRunner(),  # sees the monkeypatched sizes
    )
    wid = f"credential-rotation-test-{uuid.uuid4()}"
    async with device, flows:
        result = await env.client.execute_workflow(
            CredentialRotation.run,
            RotateCredentials(tenant="acme", rotation_id="r1", actor="tester", device_type="sensor"),
            id=wid,
            task_queue=TaskQueue.ORCHESTRATION.value,
        )
    assert [d for d, _ in SEEN] == DEVICES  # each once, in order
    assert len({at for _, at in SEEN}) == 1  # one issue time, kept across continue-as-new
    assert (result.rotated, result.skipped, result.after) == (9, 1, "d09")
    assert len(RUNS) == 2  # it continued as new once
