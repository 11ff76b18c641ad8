"""Checks on docker-compose.temporal.yml, the production-shaped stack.

PyYAML is not a dependency, so the file is never parsed here directly: docker-compose
itself validates and normalises it. The structural checks read the normalised
configuration as JSON, from `docker-compose config --format json` (Compose v2) or,
with the Python Compose v1 (Debian's `docker-compose` 1.29), by handing the
`config` output to the YAML loader of docker-compose's own interpreter. Without
either, the structural checks are skipped with the reason.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from api.observability import STATE_GAUGES
from fleetflow.contracts.common import TaskQueue
from fleetflow.temporal import DYNAMIC_CONFIG

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.temporal.yml"
TIMEOUT_S = 60

# every task queue has its worker service: a queue added without one fails here
WORKER_QUEUES = tuple(q.value for q in TaskQueue)
SEARCH_ATTRIBUTES = ("DeviceId", "TenantId", "Operation", "ReportedFirmware")
APP_ENV = {
    "DATABASE_URL": "postgresql://fleetflow:fleetflow@postgresql:5432/fleetflow",
    "TEMPORAL_ADDRESS": "temporal:7233",
    "TEMPORAL_NAMESPACE": "default",
    "TEMPORAL_UI_URL": "http://localhost:8080",
}
KEYS_DIR = "/var/lib/fleetflow/keys"
DATA_DIR = "/var/lib/fleetflow/data"
# Grafana's admin password has no default: `config` needs it (any value) to run at all
GRAFANA_PASSWORD = "compose-test-password"
MINIO_PASSWORD = "minio-test-password"  # MinIO's root password (and the API's S3 secret key)
# the firmware images' object store: what every app container is configured with
FIRMWARE_S3_ENV = {
    "FLEETFLOW_FIRMWARE_S3_URL": "http://minio:9000",
    "FLEETFLOW_FIRMWARE_S3_BUCKET": "fleetflow-firmware",
    "FLEETFLOW_FIRMWARE_S3_SECRET_KEY": MINIO_PASSWORD,
}
# every piece of state, by service: the paths that must be named volumes (not the container's
# writable layer, which a rebuild or `compose down` loses); Temporal's state is in postgresql
STATE = {
    "postgresql": ["/var/lib/postgresql/data"],
    "prometheus": ["/prometheus"],
    "grafana": ["/var/lib/grafana"],
    "jaeger": ["/badger"],
    "minio": ["/data"],
    "api": [KEYS_DIR, DATA_DIR],
    **{f"worker-{queue}": [KEYS_DIR, DATA_DIR] for queue in WORKER_QUEUES},
}

# A published image with a tag (optionally a digest): `temporalio/<name>`, `postgres`, and the
# monitoring stack's collector, Jaeger, Prometheus and Grafana.
_IMAGE = re.compile(
    r"^(?:docker\.io/)?(?:library/)?(?P<repo>temporalio/[a-z0-9._-]+|postgres"
    r"|otel/opentelemetry-collector-contrib|jaegertracing/all-in-one|prom/prometheus|grafana/grafana"
    r"|emqx/emqx|minio/minio|minio/mc)"
    r":(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})(?:@sha256:[0-9a-f]{64})?$"
)
# what the app containers need for traces and metrics (see deploy/prometheus/prometheus.yml)
MONITORING_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318",
    "FLEETFLOW_METRICS_HOST": "0.0.0.0",
    "FLEETFLOW_METRICS_PORT": "9464",
}
# service -> (image repository, files of deploy/ it mounts)
MONITORING = {
    "otel-collector": ("otel/opentelemetry-collector-contrib", ["deploy/otel-collector.yaml"]),
    "jaeger": ("jaegertracing/all-in-one", []),
    "prometheus": ("prom/prometheus", ["deploy/prometheus/prometheus.yml"]),
    "grafana": ("grafana/grafana", ["deploy/grafana/provisioning", "deploy/grafana/dashboards"]),
}

_JSON_FROM_YAML = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "the docker-compose command is not installed "
            "(e.g. `apt-get install docker-compose`); cannot validate the compose file"
        )
    return exe


def _run_config(
    exe: str,
    *extra: str,
    grafana_password: bool = True,
    emqx_password: bool = True,
    minio_password: bool = True,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("GRAFANA_ADMIN_PASSWORD", None)
    env.pop("EMQX_DASHBOARD_PASSWORD", None)
    env.pop("MINIO_ROOT_PASSWORD", None)
    if grafana_password:
        env["GRAFANA_ADMIN_PASSWORD"] = GRAFANA_PASSWORD
    if emqx_password:
        env["EMQX_DASHBOARD_PASSWORD"] = "emqx-test-password"
        env["EMQX_BRIDGE_API_SECRET"] = "emqx-bridge-test-secret"
    if minio_password:
        env["MINIO_ROOT_PASSWORD"] = MINIO_PASSWORD
    return subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _python_shebang(exe: str) -> list[str] | None:
    """The interpreter command of a Python `docker-compose` script, if it is one."""
    try:
        with open(exe, "rb") as fh:
            first = fh.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!") or "python" not in first:
        return None
    return shlex.split(first[2:])


def _normalised_config() -> dict[str, Any]:
    """The compose file as docker-compose normalises it, as a JSON object."""
    exe = _docker_compose()
    as_json = _run_config(exe, "--format", "json")
    if as_json.returncode == 0:
        try:
            loaded: Any = json.loads(as_json.stdout)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, dict):
            return loaded

    # Compose v1 has no `--format json`: let its own YAML loader do the parsing.
    interpreter = _python_shebang(exe)
    if interpreter is None:
        pytest.skip("`docker-compose config --format json` is not supported by this docker-compose")
    as_yaml = _run_config(exe)
    assert as_yaml.returncode == 0, as_yaml.stderr
    converted = subprocess.run(
        [*interpreter, "-c", _JSON_FROM_YAML],
        input=as_yaml.stdout,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if converted.returncode != 0:
        pytest.skip(
            "`docker-compose config --format json` is not supported and docker-compose's "
            f"interpreter cannot load YAML: {converted.stderr.strip()[-300:]}"
        )
    result: Any = json.loads(converted.stdout)
    assert isinstance(result, dict), "docker-compose config did not yield a mapping"
    return result


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if isinstance(command, str):
        return shlex.split(command)
    if isinstance(command, list):
        return [str(part) for part in command]
    return []


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (str(item).partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _published_ports(service: dict[str, Any]) -> list[str]:
    published: list[str] = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") not in (None, "", 0, "0"):
                published.append(str(port["published"]))
        elif ":" in str(port):
            published.append(str(port))
    return published


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _open_ports(service: dict[str, Any]) -> list[str]:
    """The host ports a service publishes on every interface (not only on loopback)."""
    open_ports: list[str] = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") in (None, "", 0, "0"):
                continue
            if str(port.get("host_ip") or "") not in _LOOPBACK:
                open_ports.append(str(port["published"]))
        elif ":" in str(port) and not str(port).startswith(tuple(f"{h}:" for h in _LOOPBACK)):
            open_ports.append(str(port))
    return open_ports


def _exposure_problems(services: dict[str, Any]) -> list[str]:
    """Temporal's frontend has no authentication (whoever reaches it can start, signal,
    terminate and read any workflow), nor do the Web UI, Prometheus and Jaeger here: only
    the API, which checks a token on every request, and the MQTT broker, which checks every
    device's CONNECT through the API's hooks, may listen on every interface."""
    problems: list[str] = []
    for name, service in sorted(services.items()):
        image = str(service.get("image", ""))
        if image.startswith(("temporalio/server:", "temporalio/auto-setup:")) and _published_ports(service):
            problems.append(f"{name}: publishes the Temporal frontend {_published_ports(service)}")
        elif _open_ports(service) and not (
            name == "api" or (name == "emqx" and _open_ports(service) == ["1883"])
        ):
            problems.append(f"{name}: publishes {_open_ports(service)} on every interface, without login")
    ui = services.get("temporal-ui")
    if ui is not None and str(_environment(ui).get("TEMPORAL_DISABLE_WRITE_ACTIONS")).lower() != "true":
        problems.append("temporal-ui: write actions (start, signal, terminate) are not disabled")
    grafana = services.get("grafana")
    if grafana is not None:
        env = _environment(grafana)
        if str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() != "false":
            problems.append("grafana: anonymous access is enabled")
        if env.get("GF_SECURITY_ADMIN_PASSWORD") in (None, "", "admin"):
            problems.append("grafana: the admin password is Grafana's default (admin)")
        elif env.get("GF_SECURITY_ADMIN_PASSWORD") != GRAFANA_PASSWORD:
            problems.append("grafana: the admin password is not GRAFANA_ADMIN_PASSWORD")
        if str(env.get("GF_AUTH_DISABLE_LOGIN_FORM", "false")).lower() == "true":
            problems.append("grafana: the login form is disabled")
    return problems


def _state_problems(config: dict[str, Any]) -> list[str]:
    """Every path in STATE is a named volume of the stack, and the app's data directory is it."""
    problems: list[str] = []
    services: dict[str, Any] = config.get("services") or {}
    named = set((config.get("volumes") or {}).keys())
    for name, paths in sorted(STATE.items()):
        service = services.get(name)
        if service is None:
            continue  # reported as missing elsewhere
        mounted = dict(_named_mounts(service))
        for path in paths:
            if mounted.get(path) not in named:
                problems.append(
                    f"{name}: {path} is not a named volume (its state is lost with the container)"
                )
        if DATA_DIR in paths and _environment(service).get("FLEETFLOW_DATA_DIR") != DATA_DIR:
            problems.append(f"{name}: FLEETFLOW_DATA_DIR is not {DATA_DIR}")
    return problems


def _named_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(target, source) of the service's volumes."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("target", "")), str(volume.get("source", ""))))
        else:
            source, _, rest = str(volume).partition(":")
            mounts.append((rest.split(":")[0], source))
    return mounts


def _problems(config: dict[str, Any]) -> list[str]:
    """Everything wrong with a normalised compose configuration (empty when fine)."""
    problems: list[str] = []
    services: dict[str, Any] = config.get("services") or {}

    for name, service in sorted(services.items()):
        image = service.get("image")
        if image is None:
            if "build" not in service:
                problems.append(f"{name}: neither image nor build")
            continue
        match = _IMAGE.match(str(image))
        if match is None:
            problems.append(f"{name}: image {image!r} is not a known published image with a tag")
        elif match["tag"] == "latest":
            problems.append(f"{name}: image {image!r} uses the moving 'latest' tag")

    for queue in WORKER_QUEUES:
        name = f"worker-{queue}"
        worker = services.get(name)
        if worker is None:
            problems.append(f"{name}: missing")
            continue
        expected = ["fleetflow", "worker", "--queue", queue]
        if _command(worker) != expected:
            problems.append(f"{name}: command {_command(worker)} != {expected}")
        if "build" not in worker:
            problems.append(f"{name}: not built from the project's Dockerfile")
        if "container_name" in worker:
            problems.append(f"{name}: container_name prevents --scale")
        if _published_ports(worker):
            problems.append(f"{name}: publishes host ports {_published_ports(worker)}")

    api = services.get("api")
    if api is None:
        problems.append("api: missing")
    else:
        if _command(api) != ["fleetflow", "api"]:
            problems.append(f"api: command {_command(api)} != ['fleetflow', 'api']")
        if "8000" not in _published_ports(api) and not any(
            p.endswith(":8000") or p.startswith("8000:") for p in _published_ports(api)
        ):
            problems.append("api: port 8000 is not published")
        if _environment(api).get("FLEETFLOW_API_HOST") != "0.0.0.0":
            problems.append("api: FLEETFLOW_API_HOST is not 0.0.0.0")

    for name in ["api", *(f"worker-{queue}" for queue in WORKER_QUEUES)]:
        if name not in services:
            continue
        env = _environment(services[name])
        for key, value in APP_ENV.items():
            if env.get(key) != value:
                problems.append(f"{name}: {key}={env.get(key)!r}, expected {value!r}")
        if env.get("FLEETFLOW_KEYS_DIR") != KEYS_DIR:
            problems.append(f"{name}: FLEETFLOW_KEYS_DIR is not {KEYS_DIR}")
        if not any(
            v.startswith("fleetflow-keys:") or v == "fleetflow-keys" for v in _volume_sources(services[name])
        ):
            problems.append(f"{name}: does not mount the fleetflow-keys volume")
        if "keys" not in (services[name].get("depends_on") or {}):
            problems.append(f"{name}: does not wait for the keys service")
        for key, value in MONITORING_ENV.items():
            if env.get(key) != value:
                problems.append(f"{name}: {key}={env.get(key)!r}, expected {value!r}")

    ui = services.get("temporal-ui")
    if ui is None:
        problems.append("temporal-ui: missing")
    else:
        # payloads are encrypted: without the API's codec the UI shows only ciphertext
        ui_env = _environment(ui)
        if ui_env.get("TEMPORAL_CODEC_ENDPOINT") != "http://localhost:8000/codec":
            problems.append("temporal-ui: TEMPORAL_CODEC_ENDPOINT is not the API's /codec")
        if str(ui_env.get("TEMPORAL_CODEC_INCLUDE_CREDENTIALS")).lower() != "true":
            problems.append("temporal-ui: TEMPORAL_CODEC_INCLUDE_CREDENTIALS is not true (no codec cookie)")

    for name, (repository, files) in MONITORING.items():
        service = services.get(name)
        if service is None:
            problems.append(f"{name}: missing")
            continue
        if not str(service.get("image", "")).startswith(f"{repository}:"):
            problems.append(f"{name}: image {service.get('image')!r} is not {repository}")
        mounted = " ".join(_volume_sources(service))
        for file in files:
            if str(REPO / file) not in mounted:
                problems.append(f"{name}: does not mount {file}")

    problems += _exposure_problems(services)
    problems += _state_problems(config)
    problems += _firmware_store_problems(services)

    images = {name: str(service.get("image", "")) for name, service in services.items()}
    if not any(image.startswith("postgres:") for image in images.values()):
        problems.append("no postgres service")
    if not any(image.startswith("temporalio/ui:") for image in images.values()):
        problems.append("no temporalio/ui service")
    registrars = [
        " ".join(_command(services[name]) + [str(part) for part in _as_list(services[name])])
        for name, image in images.items()
        if image.startswith("temporalio/admin-tools:")
    ]
    for attribute in SEARCH_ATTRIBUTES:
        if not any("search-attribute create" in script and attribute in script for script in registrars):
            problems.append(f"no admin-tools service registers search attribute {attribute}")
    return problems


def _firmware_store_problems(services: dict[str, Any]) -> list[str]:
    """Every API and worker container uses the minio bucket (so a second API replica serves the
    images the first stored); MinIO publishes nothing and has the password of the environment,
    and the one-shot bucket service makes the bucket they name."""
    problems: list[str] = []
    minio = services.get("minio")
    if minio is None:
        return ["minio: missing"]
    if _published_ports(minio):
        problems.append(f"minio: publishes {_published_ports(minio)}")
    env = _environment(minio)
    if env.get("MINIO_ROOT_PASSWORD") != MINIO_PASSWORD:
        problems.append("minio: MINIO_ROOT_PASSWORD is not the environment's MINIO_ROOT_PASSWORD")
    if "server" not in _command(minio):
        problems.append(f"minio: command {_command(minio)} does not run the server")
    bucket = services.get("minio-bucket")
    script = "" if bucket is None else " ".join(str(p) for p in _as_list(bucket) + _command(bucket))
    if "mc mb --ignore-existing store/fleetflow-firmware" not in script:
        problems.append("minio-bucket: does not make the fleetflow-firmware bucket")
    for name in ["api", *(f"worker-{queue}" for queue in WORKER_QUEUES)]:
        if name not in services:
            continue
        app_env = _environment(services[name])
        for key, value in FIRMWARE_S3_ENV.items():
            if app_env.get(key) != value:
                problems.append(f"{name}: {key} is not {value!r}")
        if app_env.get("FLEETFLOW_FIRMWARE_S3_ACCESS_KEY") != env.get("MINIO_ROOT_USER"):
            problems.append(f"{name}: FLEETFLOW_FIRMWARE_S3_ACCESS_KEY is not MinIO's user")
        waits = services[name].get("depends_on") or {}
        if "minio-bucket" not in waits:
            problems.append(f"{name}: does not wait for the minio-bucket service")
    return problems


def _volume_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes") or []:
        sources.append(
            str(volume.get("source", "")) if isinstance(volume, dict) else str(volume).split(":")[0]
        )
    return sources


def _as_list(service: dict[str, Any]) -> list[Any]:
    entrypoint = service.get("entrypoint")
    if isinstance(entrypoint, list):
        return entrypoint
    return [] if entrypoint is None else [entrypoint]


def test_compose_config_validates() -> None:
    exe = _docker_compose()
    result = _run_config(exe, "--quiet")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"


def test_grafana_has_no_default_password() -> None:
    """Without GRAFANA_ADMIN_PASSWORD the stack does not start (Grafana would be admin/admin)."""
    result = _run_config(_docker_compose(), "--quiet", grafana_password=False)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_the_emqx_dashboard_has_no_default_password() -> None:
    """Without EMQX_DASHBOARD_PASSWORD the stack does not start (EMQX's default is admin/public)."""
    result = _run_config(_docker_compose(), "--quiet", emqx_password=False)
    assert result.returncode != 0
    assert "EMQX_DASHBOARD_PASSWORD" in result.stderr


def test_minio_has_no_default_password() -> None:
    """Without MINIO_ROOT_PASSWORD the stack does not start (MinIO's default is minioadmin)."""
    result = _run_config(_docker_compose(), "--quiet", minio_password=False)
    assert result.returncode != 0
    assert "MINIO_ROOT_PASSWORD" in result.stderr


def test_firmware_store_detection_catches_broken_files() -> None:
    """A published MinIO, an API on its local disk, a worker with the wrong bucket."""
    config = copy.deepcopy(_normalised_config())
    services = config["services"]
    assert _firmware_store_problems(services) == []
    services["minio"]["ports"] = ["9000:9000"]
    del services["api"]["environment"]["FLEETFLOW_FIRMWARE_S3_URL"]
    services["worker-device"]["environment"]["FLEETFLOW_FIRMWARE_S3_BUCKET"] = "other"
    del services["minio"]["volumes"]
    problems = "\n".join(_firmware_store_problems(services) + _state_problems(config))
    assert "minio: publishes" in problems
    assert "api: FLEETFLOW_FIRMWARE_S3_URL is not" in problems
    assert "worker-device: FLEETFLOW_FIRMWARE_S3_BUCKET is not" in problems
    assert "minio: /data is not a named volume" in problems


def test_state_and_login_detection_catches_broken_files() -> None:
    """What the compose file used to do: anonymous Grafana viewers with admin/admin, traces in
    memory, firmware files in the container's writable layer."""
    config = copy.deepcopy(_normalised_config())
    services = config["services"]
    assert _state_problems(config) == []
    services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] = "admin"
    services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] = "true"
    del services["jaeger"]["volumes"]
    services["api"]["volumes"] = [v for v in services["api"]["volumes"] if DATA_DIR not in str(v)]
    services["worker-data"]["environment"]["FLEETFLOW_DATA_DIR"] = ".fleetflow"
    services["prometheus"]["volumes"] = [
        "/srv/prom:/prometheus:rw" if "/prometheus:" in str(v) and "yml" not in str(v) else v
        for v in services["prometheus"]["volumes"]
    ]
    problems = "\n".join(_state_problems(config) + _exposure_problems(services))
    assert "grafana: anonymous access is enabled" in problems
    assert "grafana: the admin password is Grafana's default" in problems
    assert "jaeger: /badger is not a named volume" in problems
    assert f"api: {DATA_DIR} is not a named volume" in problems
    assert "worker-data: FLEETFLOW_DATA_DIR is not" in problems
    assert "prometheus: /prometheus is not a named volume" in problems


def test_compose_services_are_well_formed() -> None:
    problems = _problems(_normalised_config())
    assert problems == [], "\n".join(problems)


def test_problem_detection_catches_broken_files() -> None:
    """The structural checks do fail on a broken configuration."""
    config = _normalised_config()
    broken = copy.deepcopy(config)
    services = broken["services"]
    services["worker-data"]["container_name"] = "fleetflow-worker-data"
    services["worker-data"]["ports"] = [{"published": 9000, "target": 9000}]
    services["worker-device"]["command"] = ["fleetflow", "worker", "--queue", "data"]
    del services["worker-analytics"]
    temporal_images = [
        name
        for name, service in services.items()
        if str(service.get("image", "")).startswith("temporalio/server")
    ]
    assert temporal_images, "expected a temporalio/server service"
    services[temporal_images[0]]["image"] = "temporalio/server:latest"
    services["postgresql"]["image"] = "postgres"
    services["grafana"]["image"] = "grafana/grafana:latest"
    del services["prometheus"]
    del services["temporal-ui"]["environment"]["TEMPORAL_CODEC_ENDPOINT"]

    problems = "\n".join(_problems(broken))
    assert "worker-data: container_name" in problems
    assert "worker-data: publishes host ports" in problems
    assert "worker-device: command" in problems
    assert "worker-analytics: missing" in problems
    assert "'latest'" in problems
    assert "postgresql: image 'postgres' is not" in problems
    assert "grafana: image 'grafana/grafana:latest' uses the moving 'latest' tag" in problems
    assert "prometheus: missing" in problems
    assert "temporal-ui: TEMPORAL_CODEC_ENDPOINT is not the API's /codec" in problems


def test_exposure_detection_catches_published_temporal_and_open_uis() -> None:
    """What the compose file used to do: publish the frontend, and the UI on every interface."""
    services = copy.deepcopy(_normalised_config()["services"])
    assert _exposure_problems(services) == []
    services["temporal"]["ports"] = [{"published": 7233, "target": 7233}]
    services["temporal-ui"]["ports"] = [{"published": 8080, "target": 8080}]
    services["jaeger"]["ports"] = ["0.0.0.0:16686:16686/tcp"]
    del services["temporal-ui"]["environment"]["TEMPORAL_DISABLE_WRITE_ACTIONS"]
    problems = "\n".join(_exposure_problems(services))
    assert "temporal: publishes the Temporal frontend" in problems
    assert "temporal-ui: publishes ['8080'] on every interface" in problems
    assert "jaeger: publishes ['0.0.0.0:16686:16686/tcp'] on every interface" in problems
    assert "temporal-ui: write actions" in problems


def test_monitoring_files_match_what_the_processes_export() -> None:
    """Prometheus finds every worker service on its metrics port, every file the stack mounts
    exists, and the dashboard asks only for metrics fleetflow exports."""
    for _, files in MONITORING.values():
        for file in files:
            assert (REPO / file).exists(), file
    scrape = (REPO / "deploy/prometheus/prometheus.yml").read_text()
    assert "dns_sd_configs" in scrape and f"port: {MONITORING_ENV['FLEETFLOW_METRICS_PORT']}" in scrape
    for queue in WORKER_QUEUES:
        assert f"- worker-{queue}" in scrape, queue
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/fleetflow.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    defined = (REPO / "fleetflow/metrics.py").read_text() + "".join(f'"{g.name}"' for g in STATE_GAUGES)
    for used in sorted({m for e in exprs for m in re.findall(r"\bfleetflow_[a-z_]+", e)}):
        dotted = re.sub(r"_(total|bucket|count|sum)$", "", used).replace("_", ".")
        candidates = {dotted, *(dotted[:i] + "_" + dotted[i + 1 :] for i, c in enumerate(dotted) if c == ".")}
        assert any(f'"{c}"' in defined for c in candidates), (
            f"the dashboard uses {used}, which is not exported"
        )


def test_compose_temporal_gets_the_platform_dynamic_config() -> None:
    """The compose stack's Temporal server loads tasks as fast as the dev server does."""
    text = (REPO / "deploy" / "temporal-dynamicconfig.yaml").read_text()
    for key, value in DYNAMIC_CONFIG.items():
        assert re.search(rf"^{re.escape(key)}:\n  - value: {value}$", text, re.MULTILINE), key
    temporal = _normalised_config()["services"]["temporal"]
    mounted = _volume_sources(temporal)
    assert str(REPO / "deploy" / "temporal-dynamicconfig.yaml") in mounted, mounted


def test_mqtt_bridges_scale_behind_emqx() -> None:
    """`--scale mqtt-bridge=N` works (no container_name, no host ports); the bridges reach EMQX
    and its REST API; EMQX sends presence events to the API, tells the ACL hook a bridge's
    role, and has the bridges' API key."""
    services = _normalised_config()["services"]
    bridge = services["mqtt-bridge"]
    assert "container_name" not in bridge and not _published_ports(bridge)
    assert list(bridge["command"]) == ["fleetflow", "mqtt-bridge"]
    env = _environment(bridge)
    assert env["FLEETFLOW_MQTT_BROKER_URL"] == "mqtt://emqx:1883"
    assert env["FLEETFLOW_EMQX_API_URL"] == "http://emqx:18083"
    assert env["FLEETFLOW_EMQX_API_KEY"] == "fleetflow-bridge"
    assert env["FLEETFLOW_EMQX_API_SECRET"] == "emqx-bridge-test-secret"
    emqx = _environment(services["emqx"])
    assert "client_attrs.role" in emqx["EMQX_AUTHORIZATION__SOURCES__1__BODY"]
    assert emqx["EMQX_ACTIONS__HTTP__FLEETFLOW_EVENTS__PARAMETERS__PATH"] == "/v1/mqtt/events"
    rule = emqx["EMQX_RULE_ENGINE__RULES__FLEETFLOW_EVENTS__SQL"]
    for event in ("client_connected", "client_disconnected", "session_subscribed"):
        assert f'"$events/{event}"' in rule.replace("$$", "$")
    assert "client_attrs.tenant AS tenant" in rule
    assert emqx["EMQX_API_KEY__BOOTSTRAP_FILE"].startswith("/opt/emqx/etc/fleetflow/")
    assert "emqx-api-key" in _volume_sources(services["emqx"])
    assert "emqx-api-key" in _volume_sources(services["emqx-api-key"])
