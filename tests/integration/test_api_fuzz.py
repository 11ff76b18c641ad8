"""A fuzz run of the API's OpenAPI schema (schemathesis) answers no request with a 5xx.

The API runs as its own process (`fleetflow api`, configured with the session's settings
through its environment variables), so it has its own event loop, pool and Temporal client;
the session's in-process workers keep running in the session loop (the test awaits the
fuzzer in a thread), so the workflows that fuzzed requests start make progress. Generation
is seeded and deterministic, with a few examples per operation, so a run is repeatable.

Two runs: every operation with an operator token of every scope, and the device-facing
operations (which an operator token cannot pass) with the credential of an active device.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from pydantic import HttpUrl, TypeAdapter, ValidationError
from schemathesis.core.result import Ok
from schemathesis.engine import events, from_schema

from fleetflow.settings import ENVIRONMENT, Settings
from tests.e2e.stack import FLEETFLOW, clean_env, pdeathsig_prefix
from tests.integration.flows import active_device
from tests.support import bearer, free_port

TENANT = "fuzz"  # every resource the fuzzer creates belongs to this tenant
# the device fuzz's own tenant: the fuzz with every scope may set its tenant's profile, device
# types (approval required, say) or rules in any way, and the device fuzz must still onboard
DEVICE_TENANT = "fuzz-device"
SEED = 20260601
# examples generated per operation (FUZZ_N overrides it for a deeper run)
MAX_EXAMPLES = int(os.environ.get("FUZZ_N", "4"))
START_DEADLINE_S = 60.0
# a webhook URL the fuzzer makes valid is pointed here (the discard port): no request leaves the host
WEBHOOK_SINK = "http://127.0.0.1:9/fuzz-webhook"
_HTTP_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)
# the operations only a device credential passes
DEVICE_PATHS = r"^/v1/(device/|device-contact$|telemetry$)"
# only a 5xx (and a response that breaks the schema's own promises) fails the run: a fuzzed
# request's 4xx is not checked against the documented statuses
CHECKS: dict[str, Any] = {
    name: {"enabled": False}
    for name in (
        "status_code_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
        "allow_header_conformance",
    )
}
MAX_PROBLEM_CHARS = 2000  # a failing case's curl line can hold a 2 MiB body


def api_environment(settings: Settings, port: int) -> dict[str, str]:
    """The environment of a `fleetflow api` process with the session's settings, on port."""
    values = {name: getattr(settings, field) for name, (field, _) in ENVIRONMENT.items()}
    values |= {"FLEETFLOW_API_PORT": port, "FLEETFLOW_LOG_FORMAT": "text", "FLEETFLOW_METRICS_PORT": 0}
    return clean_env(**{name: str(value) for name, value in values.items() if value is not None})


def start_api(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    """A `fleetflow api` process with the session's settings on port, its output into log."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*pdeathsig_prefix(), FLEETFLOW, "api"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=api_environment(settings, port),
        )


@pytest.fixture(scope="module")
async def api_url(
    settings: Settings, workers: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """The URL of a `fleetflow api` process on the session's servers; its log is printed at the end."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("fuzz")) / "api.log"
    process = start_api(settings, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            deadline = asyncio.get_running_loop().time() + START_DEADLINE_S
            while True:
                assert process.poll() is None, f"fleetflow api exited:\n{log.read_text(errors='replace')}"
                try:
                    if (await http.get("/openapi.json")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "fleetflow api did not start"
                await asyncio.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        print(log.read_text(errors="replace")[-20000:])


def _sink_webhooks(context: schemathesis.HookContext, case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    """map_case hook: a subscription whose URL would be accepted points at the local sink."""
    operation = context.operation
    body = case.body
    if operation is None or operation.label != "POST /v1/subscriptions" or not isinstance(body, dict):
        return case
    if isinstance(body.get("url"), str):
        try:
            _HTTP_URL.validate_python(body["url"])
        except ValidationError:
            return case
        case.body = {**body, "url": WEBHOOK_SINK}
    return case


def fuzz_config(headers: dict[str, str], checks: dict[str, Any]) -> schemathesis.Config:
    """A bounded, repeatable run: seeded, deterministic, a few examples per operation."""
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "cache": {"enabled": False},
            "headers": headers,
            "workers": 1,
            "continue-on-failure": True,
            "request-timeout": 30,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "checks": checks,
            "phases": {"stateful": {"enabled": False}},
            "operations": [
                # a long-poll: answer at once (its bounds are tested by the twin tests)
                {"include-name": "GET /v1/device/twin/delta", "parameters": {"query.wait": 0}},
                {"include-name": "GET /v1/device/commands", "parameters": {"query.wait": 0}},
                {
                    "include-name": "GET /v1/devices/{device_id}/commands/{command_id}",
                    "parameters": {"query.wait": 0},
                },
                # device types are per tenant (a PUT creates the tenant's own): one fixed name keeps
                # the fuzzer's writes to one device type instead of one per generated name
                {"include-name": "PUT /v1/device-types/{name}", "parameters": {"path.name": "fuzz-type"}},
                # the system check answers 503 when a service misses a (fuzzed, tiny) timeout
                {
                    "include-name": "GET /health",
                    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "4xx", "503"]}},
                },
            ],
        }
    )


# what CPython 3.11.7 (gh-106905, fixed in 3.11.8) raises when two of the fuzzer's threads build
# Python AST objects at once (Hypothesis and schemathesis parse source to draw constants): an
# error of the harness in the test process, never an answer of the API under test
HARNESS_BUG = "AST constructor recursion depth mismatch"


@contextlib.contextmanager
def _no_local_constants_scan() -> Iterator[None]:
    """Hypothesis parses every local module it has not seen (`ast`) to draw their constants,
    here in this worker thread while the event loop's thread runs the in-process workers:
    CPython 3.11.7 keeps one AST recursion counter for all threads (gh-106905, fixed in 3.11.8)
    and fails such a parse with "AST constructor recursion depth mismatch" when another thread
    parses at the same time. The fuzz needs no constants from fleetflow's source."""
    from hypothesis.internal.conjecture import providers

    scan = getattr(providers, "_get_local_constants", None)
    if scan is None:  # a Hypothesis without the scan
        yield
        return
    providers._get_local_constants = lambda: providers._local_constants
    try:
        yield
    finally:
        providers._get_local_constants = scan


def fuzz(url: str, headers: dict[str, str], path_regex: str | None = None) -> list[str]:
    """Run schemathesis against url (blocking), on the operations whose path matches path_regex
    (default: all); every failed check and error, and every operation left untested, described."""
    schema: schemathesis.BaseSchema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=fuzz_config(headers, CHECKS)
    )
    if path_regex is not None:
        # (an include would be or-ed with the per-operation settings' names, which select all)
        pattern = re.compile(path_regex)
        schema = schema.exclude(func=lambda context: not pattern.search(context.operation.path))
    schema.hook("map_case")(_sink_webhooks)
    problems: list[str] = []
    cases: Counter[str] = Counter()  # generated cases per operation
    with _no_local_constants_scan():
        executed = list(from_schema(schema).execute())
    for event in executed:
        if isinstance(event, events.ScenarioFinished):
            cases[event.recorder.label] += len(event.recorder.cases)
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    if node.failure_info is not None:
                        failure = node.failure_info.failure
                        problem = (
                            f"{event.recorder.label}: {failure.title}\n{failure.message}\n"
                            f"{node.failure_info.code_sample}"
                        )
                        problems.append(problem[:MAX_PROBLEM_CHARS])
        elif isinstance(event, events.NonFatalError):
            message = f"{event.label}: {event.info.title}: {event.info.message}"
            if HARNESS_BUG in message:  # the fuzzer's own thread failed, not the API: see above
                print(f"skipped, a CPython 3.11.7 error in the fuzzer: {message}")
                continue
            problems.append(message)
        elif isinstance(event, events.FatalError):
            raise event.exception
    print(f"fuzzed {sum(cases.values())} cases over {len(cases)} operations: {dict(cases)}")
    # an operation the fuzzer never sent a request to would pass unseen
    labels = {result.ok().label for result in schema.get_all_operations() if isinstance(result, Ok)}
    problems += [f"{label}: no case was generated" for label in sorted(labels) if not cases[label]]
    return problems


@pytest.fixture(scope="module")
async def device_credential(api_url: str) -> str:
    """The credential of an active device of a tenant the other fuzz left alone."""
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as http:
        # tenants:admin reaches any tenant's profile: back to the defaults, whatever was set
        reset = await http.put(
            f"/v1/tenants/{DEVICE_TENANT}/profile", json={}, headers=bearer("platform", ["tenants:admin"])
        )
        assert reset.status_code == 200, reset.text
        _, credential = await active_device(http, auth=bearer(DEVICE_TENANT))
    return credential


@pytest.mark.timeout(600)
async def test_fuzz_with_every_scope_finds_no_server_error(api_url: str) -> None:
    problems = await asyncio.to_thread(fuzz, api_url, bearer(TENANT))
    assert not problems, "\n\n".join(problems)


@pytest.mark.timeout(600)
async def test_fuzz_of_device_operations_with_a_device_credential_finds_no_server_error(
    api_url: str, device_credential: str
) -> None:
    headers = {"Authorization": f"Bearer {device_credential}"}
    problems = await asyncio.to_thread(fuzz, api_url, headers, DEVICE_PATHS)
    assert not problems, "\n\n".join(problems)
