"""The `fleetflow` command line: up, api, worker, check, migrate, token, keys, tenants, devices,
reconcile, simulate, graph."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from fleetflow.contracts.common import TaskQueue
from fleetflow.errors import StartupError
from fleetflow.settings import Settings, load_settings


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return timedelta(seconds=float(text[:-1]) * units[text[-1]])
    except (KeyError, ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 1h or 7d") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _number(low: float, high: float = math.inf, *, strict: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number above `low` (at least `low` when not strict), at most `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (strict and value == low) or value > high:
            upper = f" and at most {high:g}" if math.isfinite(high) else ""
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low:g}{upper}")
        return value

    return parse


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("must be a port number (1-65535)")
    return value


def _mqtt_port(text: str) -> int:
    return 0 if text == "0" else _port(text)


def build_parser() -> argparse.ArgumentParser:
    """The full command line."""
    parser = _Parser(prog="fleetflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = commands.add_parser("up", help="run the whole platform on this machine")
    up.add_argument("--workers", type=_positive, default=1, help="worker processes per queue")
    up.add_argument("--api-processes", type=_positive, default=1, help="API processes on the API port")
    up.add_argument("--data-dir", help="data directory (FLEETFLOW_DATA_DIR)")
    up.add_argument("--api-port", type=_port, help="API port (FLEETFLOW_API_PORT)")
    up.add_argument("--mqtt-port", type=_mqtt_port, help="MQTT port, 0 for none (FLEETFLOW_MQTT_PORT)")
    up.add_argument(
        "--mqtt-tls-port",
        type=_port,
        help="MQTT over TLS port, served when FLEETFLOW_MQTT_TLS_CERT/KEY are set (FLEETFLOW_MQTT_TLS_PORT)",
    )
    up.add_argument("--temporal-port", type=_port, default=7233, help="Temporal gRPC port")
    up.add_argument("--ui-port", type=_port, default=8233, help="Temporal Web UI port")
    up.add_argument(
        "--external-temporal",
        action="store_true",
        help="use TEMPORAL_ADDRESS instead of starting the dev server",
    )

    api = commands.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", help="bind address (FLEETFLOW_API_HOST)")
    api.add_argument("--port", type=_port, help="port (FLEETFLOW_API_PORT)")
    api.add_argument("--processes", type=_positive, default=1, help="API processes sharing the port")

    mqtt = commands.add_parser("mqtt", help="run the MQTT endpoint for devices")
    mqtt.add_argument("--host", dest="mqtt_host", help="bind address (FLEETFLOW_MQTT_HOST)")
    mqtt.add_argument(
        "--port", dest="mqtt_port", type=_mqtt_port, help="port, 0 for TLS only (FLEETFLOW_MQTT_PORT)"
    )
    mqtt.add_argument(
        "--tls-port", dest="mqtt_tls_port", type=_port, help="TLS port (FLEETFLOW_MQTT_TLS_PORT)"
    )

    commands.add_parser(
        "mqtt-bridge",
        help="bridge an external MQTT broker (EMQX) to fleetflow (FLEETFLOW_MQTT_BROKER_URL)",
    )

    worker = commands.add_parser("worker", help="run workers for one task queue")
    worker.add_argument("--queue", required=True, choices=[q.value for q in TaskQueue])
    worker.add_argument("--processes", type=_positive, default=1, help="worker processes")

    check = commands.add_parser("check", help="run the system check")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per service")

    status = commands.add_parser("status", help="services, workflows, ingestion, alerts and rollouts")
    status.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_seconds,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )

    commands.add_parser("migrate", help="apply database migrations")

    token = commands.add_parser("token", help="API tokens")
    token_cmd = token.add_subparsers(dest="token_command", required=True, parser_class=_Parser)
    issue = token_cmd.add_parser("issue", help="issue an API token")
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--scopes", required=True, help="comma-separated, e.g. devices:read,admin")
    issue.add_argument("--subject", default="operator")
    issue.add_argument("--ttl", type=_duration, default=timedelta(hours=1))
    revoke = token_cmd.add_parser("revoke", help="refuse an API token from now on, in every API process")
    revoke.add_argument("token", help="the token, or its jti (with --tenant)")
    revoke.add_argument("--tenant", help="the token's tenant (needed with a jti)")
    revoke.add_argument("--reason", help="why (kept with the revocation)")

    keys = commands.add_parser("keys", help="signing and payload keys")
    keys_cmd = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    keys_cmd.add_parser("list", help="the signing and payload keys, and which ones sign and encrypt")
    rotate = keys_cmd.add_parser("rotate", help="a new key signs (or encrypts) from now on")
    rotate.add_argument("--payload", action="store_true", help="rotate the payload encryption key")
    retire = keys_cmd.add_parser("retire", help="refuse everything a signing key signed")
    retire.add_argument("kid")

    tenants = commands.add_parser("tenants", help="tenant profiles: rate limits and quotas")
    tenants_cmd = tenants.add_subparsers(dest="tenants_command", required=True, parser_class=_Parser)
    profile = tenants_cmd.add_parser("profile", help="show a tenant's limits; name=value changes them")
    profile.add_argument("tenant")
    profile.add_argument(
        "assignments",
        nargs="*",
        metavar="name=value",
        help="e.g. readings_per_s=20000 max_rules=0 (0: unlimited; default: drop)",
    )
    profile.add_argument("--reset", action="store_true", help="drop every override first")

    schedules = commands.add_parser("schedules", help="periodic workflows (Temporal Schedules): list, apply")
    schedules_cmd = schedules.add_subparsers(dest="schedules_command", parser_class=_Parser)
    schedules_cmd.add_parser("apply", help="create or update every schedule (also done at start-up)")

    devices = commands.add_parser("devices", help="device operations")
    devices_cmd = devices.add_subparsers(dest="devices_command", required=True, parser_class=_Parser)
    imp = devices_cmd.add_parser("import", help="bulk-onboard devices from a CSV file")
    imp.add_argument("file", help="CSV with device_id,device_type[,firmware_version,tags,config]")
    imp.add_argument("--token", help="API token (default: FLEETFLOW_TOKEN or the dev admin token)")

    rec = commands.add_parser("reconcile", help="check registry, twins, credentials and ingestion claims now")
    rec.add_argument(
        "--token", help="API token with consistency:admin (default: FLEETFLOW_TOKEN or the dev admin token)"
    )
    rec.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds to wait for the run")

    sim = commands.add_parser("simulate", help="simulated devices sending telemetry, with anomalies")
    sim.add_argument("--devices", type=_positive, required=True, help="devices to onboard (at most 10000)")
    sim.add_argument("--rate", type=_number(0), required=True, help="readings/s, in total")
    sim.add_argument("--duration", type=_number(0), required=True, help="seconds")
    sim.add_argument(
        "--anomaly-rate",
        type=_number(0, 1, strict=False),
        default=0.0,
        help="probability that a temperature reading is a spike (0-1)",
    )
    sim.add_argument("--device-type", default="sensor", help="device type of the simulated devices")
    sim.add_argument(
        "--commands",
        type=int,
        default=1,
        help="commands sent to each device during the run (answered at the job rates; 0: none)",
    )
    sim.add_argument(
        "--transport",
        choices=["http", "mqtt"],
        default="http",
        help="how devices send telemetry: HTTP, or MQTT QoS 1 to FLEETFLOW_MQTT_PORT",
    )
    sim.add_argument(
        "--job-failure-rate",
        type=_number(0, 1, strict=False),
        default=0.0,
        help="probability that a device reports its rollout job failed (0-1)",
    )
    sim.add_argument(
        "--job-timeout-rate",
        type=_number(0, 1, strict=False),
        default=0.0,
        help="probability that a device never answers its rollout job (0-1)",
    )
    sim.add_argument("--token", help="API token (default: FLEETFLOW_TOKEN or the dev admin token)")

    graph = commands.add_parser("graph", help="the service dependency graph, derived from the code (Mermaid)")
    graph.add_argument("--readme", metavar="PATH", help="rewrite the block between PATH's markers")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings()
    update: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        update["data_dir"] = args.data_dir
    if getattr(args, "api_port", None):
        update["api_port"] = args.api_port
    if getattr(args, "port", None):
        update["api_port"] = args.port
    if getattr(args, "mqtt_port", None) is not None:
        update["mqtt_port"] = args.mqtt_port
    if getattr(args, "mqtt_tls_port", None):
        update["mqtt_tls_port"] = args.mqtt_tls_port
    if getattr(args, "mqtt_host", None):
        update["mqtt_host"] = args.mqtt_host
    if getattr(args, "host", None):
        update["api_host"] = args.host
    if not update:
        return settings
    try:
        return Settings.model_validate({**settings.model_dump(), **update})
    except ValidationError as exc:  # a flag that clashes with a setting (the same two ports, say)
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        message = str(first["msg"]).removeprefix("Value error, ")
        raise StartupError(f"{where}: {message}" if where else message) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.2 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.2 and 3600 seconds")
    return value


async def _status(settings: Settings, watch_s: float | None) -> int:
    from cli.status import status

    return await status(settings, watch_s)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def _graph(readme: str | None) -> int:
    from fleetflow.dependency_graph import derive
    from fleetflow.graph_render import mermaid, rewrite_readme

    graph = derive()
    if readme is None:
        print(mermaid(graph), end="")
        return 0
    path = Path(readme)
    try:
        text = path.read_text()
        updated = rewrite_readme(text, graph)
    except (OSError, ValueError) as exc:
        print(f"fleetflow graph: {path}: {exc}", file=sys.stderr)
        return 2
    if updated != text:
        path.write_text(updated)
    print(f"{path}: graph block {'rewritten' if updated != text else 'unchanged'}")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; returns its exit status."""
    command: str = args.command
    if command == "graph":  # reads the code only: no settings, no servers
        return _graph(args.readme)
    settings = _settings(args)
    if command == "up":
        from workers.devstack import UpOptions, up

        return up(
            settings,
            UpOptions(
                args.workers, args.temporal_port, args.ui_port, args.external_temporal, args.api_processes
            ),
        )
    if command == "api":
        from workers.processes import run_api

        return run_api(settings, args.processes)
    if command == "mqtt":
        import uvloop

        from gateway.run import run_gateway

        # libuv's loop: a socket read or write costs a fraction of the selector loop's, and
        # the gateway does one per device packet (benchmark: see README's Benchmarks)
        return uvloop.run(run_gateway(settings))
    if command == "mqtt-bridge":
        from gateway.run import run_bridge

        return _run(run_bridge(settings))
    if command == "keys":
        from cli.key_commands import keys_command

        return keys_command(settings, args)
    if command == "token" and args.token_command == "revoke":
        from cli.key_commands import revoke_token_command

        return _run(revoke_token_command(settings, args))
    if command == "worker":
        from workers.processes import run_workers

        return run_workers(settings, TaskQueue(args.queue), args.processes)
    handlers: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {}
    from cli import commands

    handlers = {
        "check": lambda: commands.check(settings, args.timeout),
        "migrate": lambda: commands.migrate_database(settings),
        "status": lambda: _status(settings, args.watch),
        "token": lambda: commands.issue_token_command(settings, args),
        "devices": lambda: commands.import_devices(settings, args),
        "reconcile": lambda: commands.reconcile(settings, args),
    }
    if command == "tenants":
        from cli.tenant_commands import tenant_profile_command

        handlers["tenants"] = lambda: tenant_profile_command(settings, args)
    if command == "schedules":
        from cli.schedule_commands import schedules_command

        handlers["schedules"] = lambda: schedules_command(settings, args)
    if command == "simulate":
        from cli.simulate import run_command

        handlers["simulate"] = lambda: run_command(settings, args)
    return _run(handlers[command]())


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point; ends with os._exit so the Temporal runtime cannot abort at exit."""
    args = build_parser().parse_args(argv)
    try:
        code = dispatch(args)
    except StartupError as exc:
        print(f"fleetflow: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
