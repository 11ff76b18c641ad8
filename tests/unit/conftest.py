"""Temporal servers for the workflow unit tests, one of each per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.support import TEMPORAL_CLI, TEST_SERVER


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server (timers fire at once)."""
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(TEST_SERVER), data_converter=pydantic_data_converter
    )
    yield environment
    await environment.shutdown()


@pytest.fixture(scope="module")
async def dev() -> AsyncIterator[WorkflowEnvironment]:
    """A real dev server, for what the time-skipping one does not do (updates, activity timeouts)."""
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_CLI), data_converter=pydantic_data_converter
    )
    yield environment
    await environment.shutdown()
