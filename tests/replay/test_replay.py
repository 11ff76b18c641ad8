"""Every recorded history replays against the current workflow code.

A failure here means a change would break determinism for runs in flight:
guard the change with `workflow.patched(...)` instead of re-recording.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from fleetflow.identity_workflow import ScheduledRunProof
from fleetflow.payload_codec import data_converter
from fleetflow.settings import Settings
from fleetflow.temporal import HEADER_CODEC
from tests.replay.keys import REPLAY_PAYLOAD_KEYS
from workers.registry import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
# histories recorded before payload encryption carry plain payloads; later ones are sealed
# with the replay key, so both kinds must decode (the migration setting lets the plain ones in)
CONVERTER = data_converter(Settings(payload_keys=REPLAY_PAYLOAD_KEYS, accept_plain_payloads=True))


def test_every_workflow_type_has_a_recorded_history() -> None:
    recorded = set()
    for path in HISTORIES:
        events = json.loads(path.read_text())["events"]
        recorded.add(events[0]["workflowExecutionStartedEventAttributes"]["workflowType"]["name"])
    assert recorded >= {w.__name__ for w in WORKFLOWS}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    replayer = Replayer(
        workflows=list(WORKFLOWS),
        data_converter=CONVERTER,
        header_codec_behavior=HEADER_CODEC,
        interceptors=[ScheduledRunProof()],
    )
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await replayer.replay_workflow(history)
