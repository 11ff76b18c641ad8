"""The API is where strictness belongs: every request body it documents refuses unknown fields,
at every depth, while the Temporal contracts behind it ignore them (test_payload_tolerance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api.app import create_app
from api.models.base import as_contract
from api.models.rollouts import RolloutBody
from fleetflow.contracts.rollouts import RolloutRequest
from fleetflow.settings import load_settings


def _objects(node: Any, schemas: dict[str, Any], seen: set[str]) -> list[dict[str, Any]]:
    """Every object schema with named properties under node, references followed once."""
    if isinstance(node, list):
        return [o for item in node for o in _objects(item, schemas, seen)]
    if not isinstance(node, dict):
        return []
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            return []
        seen.add(name)
        return _objects(schemas[name], schemas, seen)
    found = [node] if node.get("type") == "object" and node.get("properties") else []
    return found + [o for value in node.values() for o in _objects(value, schemas, seen)]


def test_every_request_body_refuses_unknown_fields(tmp_path: Path) -> None:
    document = create_app(load_settings({"FLEETFLOW_DATA_DIR": str(tmp_path)})).openapi()
    schemas = document["components"]["schemas"]
    lenient, bodies = [], 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                for obj in _objects(content.get("schema", {}), schemas, set()):
                    bodies += 1
                    if obj.get("additionalProperties") is not False:
                        lenient.append(f"{method.upper()} {path} {media}: {obj.get('title')}")
    assert bodies > 15  # the walk itself must find the bodies
    assert lenient == []


def test_a_body_reaches_temporal_as_its_contract() -> None:
    body = RolloutBody.model_validate(
        {"campaign_id": "c1", "firmware_id": "f1", "target": {"tags": ["a"]}, "policy": {"canary": 2}}
    )
    request = as_contract(body, RolloutRequest)
    assert type(request) is RolloutRequest
    assert (
        type(request.target).__name__ == "RolloutTarget" and type(request.policy).__name__ == "RolloutPolicy"
    )
    assert request.model_dump() == body.model_dump()
