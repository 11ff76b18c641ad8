"""Bases of the API's edge models, and the one conversion from a body to its contract."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from fleetflow.contracts.common import Strict

C = TypeVar("C", bound=BaseModel)

# an unknown field in a request body is a 422 naming it; a contract (fleetflow.contracts.common.
# Contract) ignores one instead, for rolling upgrades, so a body that extends a contract sets this
STRICT = Strict.model_config


class Body(Strict):
    """A request body of the API's own: an unknown field is a 422."""


class View(Strict):
    """An answer the API assembles (a page, an acknowledgement)."""


def as_contract(body: BaseModel, contract: type[C]) -> C:
    """body (an edge model) as the contract it extends: the same fields, the contract's class,
    so what travels through Temporal has the contract's shape whichever edge model accepted it."""
    return contract.model_validate(body.model_dump())
