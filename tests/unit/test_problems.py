"""Every error is an RFC 9457 problem, whatever raised it."""

from __future__ import annotations

import httpx
from fastapi import FastAPI, HTTPException

from api.problems import install_problem_handlers, invalid


def _app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("password=hunter2 at db.internal:5432")

    @app.get("/limited")
    async def limited() -> None:
        raise HTTPException(429, detail={"detail": "slow down", "retry_after_s": 3})

    @app.get("/fields")
    async def fields() -> None:
        raise invalid(["query", "as_of"], "not a timestamp")

    return app


async def _get(path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        return await http.get(path)


async def test_an_unexpected_error_is_a_problem_that_says_nothing_of_its_cause() -> None:
    response = await _get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 500 and problem["title"] == "Internal Server Error"
    assert problem["instance"] == "/boom"
    assert "hunter2" not in response.text and "db.internal" not in response.text


async def test_a_detail_object_keeps_its_members() -> None:
    problem = (await _get("/limited")).json()
    assert problem["detail"] == "slow down" and problem["retry_after_s"] == 3 and problem["status"] == 429


async def test_field_errors_keep_their_locations() -> None:
    response = await _get("/fields")
    problem = response.json()
    assert response.status_code == 422 and problem["title"] == "Unprocessable Content"
    assert problem["errors"] == [{"loc": ["query", "as_of"], "msg": "not a timestamp", "type": "value_error"}]
    assert problem["detail"] == "query.as_of: not a timestamp"
