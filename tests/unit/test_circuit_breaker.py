"""The circuit breaker's rules without servers: what counts as the receiver being down, the
probe back-off, what a circuit row admits, and the delivery result older workers decode."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.circuit_breaker import Admission, CircuitPolicy, admission, receiver_down
from fleetflow.contracts.common import Strict
from fleetflow.contracts.events import DeliveryProgress


@pytest.mark.parametrize(
    ("status", "down"),
    [(None, True), (500, True), (503, True), (408, True), (429, True)]
    + [(code, False) for code in (200, 204, 302, 400, 401, 404, 410, 422)],
)
def test_no_answer_5xx_408_and_429_count_against_the_circuit_other_answers_do_not(
    status: int | None, down: bool
) -> None:
    assert receiver_down(status) is down


def test_probes_back_off_doubling_up_to_the_cap_and_never_below_the_floor() -> None:
    policy = CircuitPolicy(threshold=5, probe_s=30, max_probe_s=3600)
    assert [policy.probe_delay(n) for n in range(9)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert policy.probe_delay(10_000) == 3600  # no overflow after days of failed probes
    assert CircuitPolicy(threshold=1, probe_s=0.01, max_probe_s=0.01).probe_delay(0) == 1.0


def row(state: str, failures: int = 0, wait_s: float = 0.0) -> dict[str, Any]:
    return {"circuit_state": state, "circuit_failures": failures, "circuit_wait_s": wait_s}


@pytest.mark.parametrize(
    ("circuit", "admitted"),
    [
        (row("closed"), Admission()),
        (row("closed", failures=2), Admission(dirty=True)),
        (row("open", failures=5, wait_s=12.5), Admission(wait_s=12.5, dirty=True)),
        # due within the second: still a wait (never a call that returns at once, again and again)
        (row("open", failures=5, wait_s=0.01), Admission(wait_s=1.0, dirty=True)),
        (row("half_open", failures=5), Admission(probe=True, dirty=True)),
    ],
)
def test_what_a_circuit_admits(circuit: dict[str, Any], admitted: Admission) -> None:
    assert admission(circuit) == admitted  # type: ignore[arg-type]


class ProgressBeforeCircuits(Strict):
    """DeliveryProgress as workers from before circuit breakers know it."""

    delivered: int = 0
    dead_lettered: int = 0
    more: bool = False
    gone: bool = False


def test_a_closed_circuits_progress_is_what_older_workers_decode() -> None:
    """In a rolling upgrade an older orchestration worker decodes the new webhook worker's
    results: while the circuit is closed they carry no field it does not know."""
    converter = pydantic_data_converter.payload_converter
    closed = converter.to_payloads([DeliveryProgress(delivered=3, more=True)])
    assert converter.from_payloads(closed, [ProgressBeforeCircuits]) == [
        ProgressBeforeCircuits(delivered=3, more=True)
    ]
    opened = converter.to_payloads([DeliveryProgress(probe_in_s=30.0)])
    assert converter.from_payloads(opened, [DeliveryProgress]) == [DeliveryProgress(probe_in_s=30.0)]
