"""The OpenAPI document's additions: request body schemas written by hand (`openapi_extra`), and
the problem+json errors of every operation."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

_DEFS = "#/$defs/"


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """model's JSON schema with its `$defs` inlined: a `#/$defs/...` reference inside the OpenAPI
    document would point at its root, where nothing is, so clients and fuzzers could not resolve it.
    (The body models are not recursive.)"""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(_DEFS):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**defs[ref.removeprefix(_DEFS)], **rest})
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


# which errors an operation may answer, decided from what the operation has
_WRITES = ("post", "put", "patch", "delete")
_MEDIA = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_FIELDS = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ValidationProblem"}}}
_DESCRIPTIONS = {
    "401": "no bearer token, or one that is invalid, expired or revoked",
    "403": "the token lacks the scope this needs",
    "404": "no such resource (or another tenant's)",
    "409": "conflicts with the resource's current state",
    "412": "If-Match names a stale version",
    "413": "the body is over this route's limit",
    "422": "a bad field: `errors` names each one and the reason",
}


def _errors_of(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    parameters = operation.get("parameters", [])
    codes = []
    if operation.get("security"):
        codes += ["401", "403"]
    if "{" in path:
        codes.append("404")
    if method in _WRITES:
        codes.append("409")
    if any(p.get("in") == "header" and p.get("name", "").lower() == "if-match" for p in parameters):
        codes.append("412")
    if "requestBody" in operation or method in ("post", "put", "patch"):
        codes.append("413")
    if parameters or "requestBody" in operation or "422" in operation.get("responses", {}):
        codes.append("422")
    return codes


def declare_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare in an OpenAPI document the problem+json errors (401, 403, 404, 409, 412, 413,
    422) each operation may answer, and the Problem schemas; FastAPI's `{"detail": ...}` 422
    schema goes."""
    from pydantic.json_schema import models_json_schema

    from api.problems import Problem, ValidationProblem

    _, defs = models_json_schema(
        [(Problem, "validation"), (ValidationProblem, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
                continue
            responses = operation.setdefault("responses", {})
            for code in _errors_of(path, method, operation):
                content = _FIELDS if code == "422" else _MEDIA
                if code == "422" or code not in responses:
                    responses[code] = {"description": _DESCRIPTIONS[code], "content": content}
    text = str(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}'" not in text:
            schemas.pop(unused, None)
    return schema


def document_problems(app: FastAPI) -> None:
    """Make app's OpenAPI document declare its problem+json errors."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = declare_problems(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
