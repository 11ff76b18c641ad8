"""Export slots: a tenant's third export at once is refused, another tenant's is not, a process
runs a bounded number, and a slot comes back when its export ends or expires."""

from __future__ import annotations

import time

import pytest
from fastapi import HTTPException

from api.export_slots import ExportSlots


def test_a_tenant_gets_its_slots_and_no_more_while_another_tenant_still_does() -> None:
    slots = ExportSlots(per_tenant=2, per_process=3)
    first, _ = slots.take("acme"), slots.take("acme")
    with pytest.raises(HTTPException) as refused:
        slots.take("acme")
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "60"}
    slots.take("globex")  # the third of the process
    with pytest.raises(HTTPException):
        slots.take("initech")  # the process is full
    with slots.held("acme", first):
        pass  # the export ended
    slots.take("acme")


def test_a_slot_whose_export_never_ran_expires() -> None:
    slots = ExportSlots(per_tenant=1, per_process=8, expiry_s=0.05)
    slots.take("acme")  # its response body never started streaming: nothing gives it back
    with pytest.raises(HTTPException):
        slots.take("acme")
    time.sleep(0.1)
    slots.take("acme")


def test_a_failed_export_gives_its_slot_back() -> None:
    slots = ExportSlots(per_tenant=1, per_process=8)
    slot = slots.take("acme")
    with pytest.raises(RuntimeError), slots.held("acme", slot):
        raise RuntimeError("the client went away")
    slots.take("acme")
