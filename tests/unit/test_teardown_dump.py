"""The session teardown's diagnostic (tests/conftest.py): a teardown still waiting prints what
its event loop's tasks wait for, whether or not the loop is running."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import arm_task_dump


def test_the_tasks_are_printed_while_their_loop_is_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    # a synchronous finalizer hanging between two fixtures' run_until_complete: nothing runs a
    # callback scheduled on the loop, so the dump must not depend on one
    loop = asyncio.new_event_loop()
    try:
        never = loop.create_future()

        async def stuck_shutdown() -> None:
            await never

        stuck = loop.create_task(stuck_shutdown(), name="stuck-shutdown")
        arm_task_dump(loop, 0.0).join()
        assert not stuck.done()
        err = capsys.readouterr().err
        assert "--- stuck-shutdown" in err and "stuck_shutdown" in err
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
        loop.close()
