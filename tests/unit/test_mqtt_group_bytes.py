"""The gateway's group commit bounds a group by its bytes as well as by its publishes: one
statement carrying every queued payload could pass what PostgreSQL takes in a message, fail,
and fail again on every redelivery."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import ingest
from gateway.ingest import GroupCommitter, Outcome, Pending


class _Conn:
    def is_closed(self) -> bool:
        return False


class _Pool:
    async def acquire(self) -> _Conn:
        return _Conn()

    async def release(self, conn: _Conn) -> None:
        return None


async def test_a_group_holds_no_more_bytes_than_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[int] = []

    async def accept(conn: Any, group: list[Pending], *, shards: int) -> list[Outcome]:
        groups.append(len(group))
        return [Outcome.STORED] * len(group)

    monkeypatch.setattr(ingest, "accept_publishes", accept)
    monkeypatch.setattr(ingest, "MAX_GROUP_BYTES", 200)
    committer = GroupCommitter(_Pool(), shards=2)  # type: ignore[arg-type]
    committer.start()
    row = "d-1,t,2026-01-01T00:00:00+00:00,1.0\n"
    done = [committer.submit(Pending("acme", "d-1", [row], None, i + 1)) for i in range(5)]
    assert all(200 // len(p.payload) == 2 for p, _ in committer._queue)  # two to a group
    assert await asyncio.gather(*done) == [Outcome.STORED] * 5
    await committer.stop()
    assert groups == [2, 2, 1]
