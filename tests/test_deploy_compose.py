"""deploy/compose.yaml (and the override compose.registry.yaml), checked with real tools.

- podman-compose resolves each form (plain; profile monitoring; the registry override with
  profile registry) the way it would run it. It runs with ``--dry-run``, in which it needs no
  podman binary: it only prints the podman commands, which are checked too (what is published,
  where the spool lives);
- the files, and podman-compose's resolved models, validate against the compose
  specification's JSON schema (from the Go module github.com/compose-spec/compose-go/v2,
  fetched by deploy/monitoring-tools.sh) with ``jsonschema``;
- what the schema cannot say: every start is gated on health, the spool is a named volume,
  nothing is published beyond 127.0.0.1, no secret is in the file, the routers' metrics stay
  on the compose network, and the settings each rtcbus service gets are valid rtcbus settings.

A missing tool (podman-compose, the schema) fails the tests, naming it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from consumer.settings import Settings, load_settings
from test_deploy_monitoring import monitoring_tool

REPO = Path(__file__).parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
REGISTRY_OVERRIDE = DEPLOY / "compose.registry.yaml"
ENV_EXAMPLE = DEPLOY / "rtcbus.env.example"

RTCBUS_SERVICES = {"topics", "shim", "router-1", "router-2"}
CORE = {"kafka", *RTCBUS_SERVICES}
HEALTH_GATES = {"service_healthy", "service_completed_successfully"}

pytestmark = pytest.mark.timeout(1200)  # the schema comes with the tools (a cold build is long)


def podman_compose() -> str:
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if not found:
        pytest.fail("podman-compose is not installed (pip install -e '.[dev]')", pytrace=False)
    return found


def run_podman_compose(*args: str, files: list[Path], profiles: list[str] = (), cwd: Path = DEPLOY):
    """podman-compose --dry-run in a clean environment: no COMPOSE_*, no RTCBUS_* of the caller's,
    and an empty env file instead of a deploy/.env a developer may have."""
    empty = cwd / ".env.test-empty"
    empty.write_text("")
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    command = [podman_compose(), "--dry-run", "--env-file", str(empty)]
    for path in files:
        command += ["-f", str(path)]
    for profile in profiles:
        command += ["--profile", profile]
    try:
        done = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    finally:
        empty.unlink()
    assert done.returncode == 0, f"{shlex.join(command + list(args))}:\n{done.stdout}\n{done.stderr}"
    return done


FORMS = {
    "plain": ([COMPOSE], [], CORE),
    "monitoring": ([COMPOSE], ["monitoring"], CORE | {"prometheus", "grafana"}),
    "registry": ([COMPOSE, REGISTRY_OVERRIDE], ["registry"], CORE | {"registry"}),
    "everything": ([COMPOSE, REGISTRY_OVERRIDE], ["registry", "monitoring"], CORE | {"registry", "prometheus", "grafana"}),
}


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict]:
    """Each form as podman-compose resolves it (interpolated, merged, profiles applied)."""
    models = {}
    for form, (files, profiles, _) in FORMS.items():
        models[form] = yaml.safe_load(run_podman_compose("config", files=files, profiles=profiles).stdout)
    return models


@pytest.fixture(scope="module")
def schema_validator():
    import jsonschema

    schema = json.loads(Path(monitoring_tool("COMPOSE_SPEC_SCHEMA")).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- the tools' verdicts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_podman_compose_resolves_each_form(resolved, form):
    _, _, expected = FORMS[form]
    assert set(resolved[form]["services"]) == expected
    routers = [resolved[form]["services"][name] for name in ("router-1", "router-2")]
    confluent = {"RTCBUS_WIRE_FORMAT": "confluent", "RTCBUS_SCHEMA_REGISTRY_URL": "http://registry:8080/apis/ccompat/v7"}
    for router in routers:
        if "registry" in expected:
            assert confluent.items() <= router["environment"].items()
            assert router["depends_on"]["registry"] == {"condition": "service_healthy"}
        else:
            assert not confluent.keys() & router["environment"].keys()
            assert "registry" not in router["depends_on"]


def test_the_files_follow_the_compose_specification(resolved, schema_validator):
    for path in (COMPOSE, REGISTRY_OVERRIDE):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in schema_validator.iter_errors(raw(path))]
        assert not errors, f"{path.name}:\n" + "\n".join(errors)
        assert "version" not in raw(path), "the compose specification has no version: key any more"
    for form, model in resolved.items():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in schema_validator.iter_errors(model)]
        assert not errors, f"{form}, as podman-compose resolved it:\n" + "\n".join(errors)
    # The schema is strict: a misspelt key is refused, so the check above means something.
    broken = raw(COMPOSE)
    broken["services"]["shim"]["stop_grace"] = "30s"
    assert not schema_validator.is_valid(broken)


def test_podman_compose_would_publish_on_loopback_only_and_mount_the_spool_volume(tmp_path):
    # `up --dry-run` creates the host directories of missing bind mounts: run it on a copy.
    for name in ("compose.yaml", "compose.registry.yaml", "prometheus", "grafana"):
        source = DEPLOY / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    (tmp_path / "rtcbus.env").write_text("RTCBUS_SECRETS=only-a-test\n")
    done = run_podman_compose(
        "--verbose", "up", "-d", files=[tmp_path / "compose.yaml", tmp_path / "compose.registry.yaml"],
        profiles=["monitoring", "registry"], cwd=tmp_path,
    )
    creates = {}
    for line in (done.stdout + done.stderr).splitlines():
        match = re.search(r"podman create --name=rtcbus_(.+?)_1 (.*)$", line)
        if match:
            creates[match.group(1)] = match.group(2)
    assert set(creates) == set(FORMS["everything"][2])
    published = {service: re.findall(r"(?:^| )-p (\S+)", args) for service, args in creates.items()}
    assert {s for s, ports in published.items() if ports} == {"shim", "prometheus", "grafana"}
    for service, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), f"{service} publishes {port} beyond loopback"
    assert "127.0.0.1:8080:8080" in published["shim"]
    assert "--mount type=volume,source=rtcbus_spool,destination=/var/lib/rtcbus/spool" in creates["shim"]
    # The secret reaches the shim only, from the env file.
    assert "RTCBUS_SECRETS=only-a-test" in creates["shim"]
    assert not [s for s, args in creates.items() if s != "shim" and "RTCBUS_SECRETS" in args]


# -- what the schema cannot say ---------------------------------------------------------------------------


def test_every_start_is_gated_on_health(resolved):
    services = resolved["everything"]["services"]
    for name, service in services.items():
        for dependency, gate in service.get("depends_on", {}).items():
            assert gate["condition"] in HEALTH_GATES, f"{name} starts on {dependency} merely started"
            target = services[dependency]
            if gate["condition"] == "service_healthy":
                assert target.get("healthcheck", {}).get("test"), f"{dependency} has no healthcheck to wait for"
            else:
                assert target.get("restart") == "no", f"{dependency} is a one-shot; it must not restart"
    for name in RTCBUS_SERVICES:
        assert services[name]["depends_on"]["kafka"] == {"condition": "service_healthy"}, name
    for name in RTCBUS_SERVICES - {"topics"}:
        assert services[name]["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["topics"]["command"] == ["topics", "create"]
    for name in RTCBUS_SERVICES:
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"], name
    assert "kafka-broker-api-versions.sh" in " ".join(services["kafka"]["healthcheck"]["test"])
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_the_probes_stop_and_spool_are_those_of_each_role(resolved):
    services = resolved["everything"]["services"]
    shim = services["shim"]
    assert "http://127.0.0.1:8080/healthz" in " ".join(shim["healthcheck"]["test"])
    assert shim["stop_grace_period"] == "30s"
    spool = [v for v in shim["volumes"] if (v if isinstance(v, str) else v["target"]).endswith("/var/lib/rtcbus/spool")]
    assert spool, "the shim has no spool volume"
    source = spool[0].split(":")[0] if isinstance(spool[0], str) else spool[0]["source"]
    assert source in resolved["everything"]["volumes"], "the spool must be a named volume, not a bind mount"
    assert shim["environment"]["RTCBUS_SPOOL_DIR"] == "/var/lib/rtcbus/spool"
    for name in ("router-1", "router-2"):
        router = services[name]
        assert router["command"] == ["router"]
        assert "http://127.0.0.1:9108/healthz" in " ".join(router["healthcheck"]["test"])
        assert router["stop_grace_period"] == "60s"
        assert not router.get("ports"), f"{name} publishes its metrics"
        assert router["environment"]["RTCBUS_METRICS_PORT"] == "9108"
        assert "RTCBUS_INSTANCE_ID" not in router["environment"], "replicas must not share a transactional.id"
    kafka = services["kafka"]["environment"]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "KAFKA_MIN_INSYNC_REPLICAS",
    ):
        assert kafka[key] == "1", key
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert "broker,controller" == kafka["KAFKA_PROCESS_ROLES"]
    assert services["registry"]["profiles"] == ["registry"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]


def test_nothing_is_published_beyond_loopback(resolved):
    for name, service in resolved["everything"]["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port}"


def test_no_secret_is_in_the_compose_files(resolved):
    secretive = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|SASL|CREDENTIAL|PRIVATE", re.IGNORECASE)
    for path in (COMPOSE, REGISTRY_OVERRIDE):
        for name, service in raw(path)["services"].items():
            environment = service.get("environment", {})
            keys = environment if isinstance(environment, dict) else [e.split("=")[0] for e in environment]
            assert not [k for k in keys if secretive.search(k)], f"{path.name} {name}: a secret in environment"
    text = COMPOSE.read_text() + REGISTRY_OVERRIDE.read_text()
    assert "RTCBUS_SECRETS=" not in text and "RTCBUS_SECRETS:" not in text
    assert resolved["everything"]["services"]["shim"]["env_file"][0]["path"].endswith("rtcbus.env")
    assert resolved["everything"]["services"]["shim"]["env_file"][0]["required"] is True
    # The env files hold secrets: git ignores them, and only their examples are committed.
    for secret_file in ("deploy/rtcbus.env", "deploy/grafana/grafana.env"):
        ignored = subprocess.run(["git", "check-ignore", "-q", secret_file], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{secret_file} is not ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "deploy/rtcbus.env.example"], cwd=REPO, capture_output=True, check=False
    )
    assert tracked.returncode == 0, "deploy/rtcbus.env.example is not committed"


def _example_settings() -> dict[str, str]:
    """The example env file's settings, the commented-out ones too (they are documentation)."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*(RTCBUS_[A-Z_]+)=(.*)", line.strip())
        if match:
            value = match.group(2)
            found[match.group(1)] = value[1:-1] if value[:1] == value[-1:] == "'" else value
    return found


def test_every_rtcbus_service_gets_valid_settings(resolved, monkeypatch):
    example = _example_settings()
    fields = {f"RTCBUS_{name.upper()}" for name in Settings.model_fields}
    assert set(example) <= fields, f"rtcbus.env.example names unknown settings: {sorted(set(example) - fields)}"
    uncommented = {
        k: v for k, v in example.items()
        if re.search(rf"^{k}=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    }
    assert set(uncommented) == {"RTCBUS_SECRETS"}
    for form in ("plain", "registry"):
        for name in RTCBUS_SERVICES:
            service = resolved[form]["services"][name]
            for key in [k for k in os.environ if k.startswith("RTCBUS_")]:
                monkeypatch.delenv(key)
            environment = {k: str(v) for k, v in service["environment"].items()}
            assert set(environment) - {"RTCBUS_METRICS_HOST"} <= fields | {"HEALTHCHECK_URL"}, name
            if name == "shim":
                environment.update(uncommented)
            for key, value in environment.items():
                monkeypatch.setenv(key, value)
            settings = load_settings()  # raises ConfigError naming what is wrong
            assert settings.bootstrap_servers == "kafka:9092"
            if name == "shim":
                assert settings.secrets and not settings.unsigned
                assert (settings.shim_host, settings.shim_port, settings.shim_admin_port) == ("0.0.0.0", 8080, 9109)
            if name.startswith("router"):
                assert settings.metrics_host == "0.0.0.0" and settings.metrics_port == 9108
                assert settings.wire_format == ("confluent" if form == "registry" else "single-object")


def test_prometheus_and_grafana_find_what_compose_runs(resolved):
    services = resolved["everything"]["services"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]] for job in scrape["scrape_configs"]}
    assert targets["rtcbus-shim"] == [f"shim:{services['shim']['environment']['RTCBUS_SHIM_ADMIN_PORT']}"]
    assert sorted(targets["rtcbus-router"]) == [
        f"{name}:{services[name]['environment']['RTCBUS_METRICS_PORT']}" for name in ("router-1", "router-2")
    ]
    for name, target in [("shim", "9109"), ("router-1", "9108"), ("router-2", "9108")]:
        assert target in [str(p) for p in services[name]["expose"]], f"{name} does not expose {target}"
    # Every bind mount's source exists (else the container runtime makes an empty directory).
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = (volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"]))
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which does not exist"
                mounts[target] = path
    assert mounts["/etc/prometheus/prometheus.yml"] == (DEPLOY / "prometheus" / "prometheus.yml").resolve()
    assert mounts["/etc/prometheus/rules.yaml"] == (DEPLOY / "prometheus" / "rules.yaml").resolve()
    assert "rules.yaml" in scrape["rule_files"]
    providers = raw(DEPLOY / "grafana" / "provisioning" / "dashboards" / "rtcbus.yaml")["providers"]
    dashboard_dir = providers[0]["options"]["path"]
    dashboards = [t for t, p in mounts.items() if p == (DEPLOY / "grafana" / "rtcbus.json").resolve()]
    assert dashboards and Path(dashboards[0]).parent == Path(dashboard_dir)
    datasources = raw(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090" and datasources[0]["type"] == "prometheus"
    assert "--web.listen-address=:9090" in services["prometheus"]["command"]
