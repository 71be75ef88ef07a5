"""The Helm chart (deploy/helm/rtcbus) and the Strimzi examples (deploy/strimzi), checked offline.

- ``helm lint --strict`` and ``helm template`` with the default and the production values;
- every rendered object validated with kubeconform ``-strict`` against local schemas (the
  Kubernetes API of the oldest and newest supported versions, the Strimzi CRDs generated
  from ``io.strimzi:api``, the Prometheus Operator's CRDs; a kind without a schema is an
  error) and with ``kubernetes-validate --strict``;
- values.schema.json refusing bad values, and the chart refusing more routers than partitions;
- what the objects must say for rtcbus to work: the spool on a volume per replica where
  RTCBUS_SPOOL_DIR points, the probes, the grace periods, the ports, the security context,
  the secrets by reference only, every RTCBUS_* name a real setting;
- the KafkaTopics equal to what ``consumer.kafka.admin.topic_specs`` creates, from the
  settings the chart gives the pods, so the chart and the code cannot drift apart;
- the Strimzi cluster's durability settings, and the KafkaUser's ACLs covering the topics,
  groups and transactional ids the code uses.

The tools come from deploy/tools.sh, which installs them once into a cache (about three
minutes cold: helm is built with Go) and answers in well under a second after that. If it
cannot, the tests fail, naming the tool: CI must have them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.kafka import admin
from consumer.router.loop import transactional_id
from consumer.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "rtcbus"
PRODUCTION = ROOT / "deploy" / "helm" / "values-production.yaml"
STRIMZI = ROOT / "deploy" / "strimzi"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
TOOLS = ROOT / "deploy" / "tools.sh"
RELEASE = "rtcbus"
NAMESPACE = "rtcbus"

# A cold deploy/tools.sh builds helm (a minute or two on 2 cores) inside the first test's setup.
pytestmark = pytest.mark.timeout(1800)

# Every optional part on, to put every template through the validators.
EVERYTHING = [
    "--set", "ingress.enabled=true",
    "--set", "ingress.tls[0].secretName=callbacks-tls",
    "--set", "ingress.tls[0].hosts[0]=rtcbus.example.com",
    "--set", "autoscaling.enabled=true",
    "--set", "networkPolicy.enabled=true",
    "--set", "serviceMonitor.enabled=true",
    "--set", "prometheusRule.enabled=true",
    "--set", "topics.mode=strimzi",
    "--set", "kafka.sasl.enabled=true",
    "--set", "kafka.sasl.passwordSecret.name=kafka-user",
    "--set", "kafka.tls.enabled=true",
    "--set", "kafka.tls.caSecret.name=kafka-ca",
    "--set", "kafka.tls.clientCertSecret.name=kafka-client",
    "--set", "imagePullSecrets[0]=registry",
    "--set", "config.wireFormat=confluent",
    "--set", "config.schemaRegistryUrl=http://registry:8080/apis/ccompat/v7",
]
VARIANTS = {
    "default": [],
    "production": ["-f", str(PRODUCTION)],
    "everything": EVERYTHING,
}


# -- the tools ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    """deploy/tools.sh's NAME=VALUE lines: helm, kubeconform and the schemas' directories."""
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        proc = subprocess.run(
            ["bash", str(TOOLS)], capture_output=True, text=True, env=env, timeout=1700, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deploy/tools.sh did not finish installing helm, kubeconform and the schemas in time")
    if proc.returncode != 0:
        failed = [line for line in proc.stderr.splitlines() if "FAILED" in line]
        pytest.fail(
            f"deploy/tools.sh could not provide the chart's validators: "
            f"{failed[-1] if failed else 'exit ' + str(proc.returncode)}\n{proc.stderr[-4000:]}"
        )
    values = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("=")
        values[name] = shlex.split(value)[0] if value else ""
    for name in ("HELM", "KUBECONFORM", "KUBERNETES_SCHEMAS", "CRD_SCHEMAS", "STRIMZI_CRDS"):
        assert values.get(name), f"deploy/tools.sh printed no {name}"
    return values


def _run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def helm(tools: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _run([tools["HELM"], *args])


def render_text(tools: dict[str, str], *args: str) -> str:
    proc = helm(tools, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def render(tools: dict[str, str], *args: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(tools, *args)) if doc]


def render_fails(tools: dict[str, str], *args: str) -> str:
    proc = helm(tools, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode != 0, f"helm template {' '.join(args)} rendered, and should not have"
    return proc.stderr


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment", "Job"):
            yield f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def settings_from(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **extra: str) -> Settings:
    """The settings a container of the chart would load: its plain RTCBUS_* values, and
    ``extra`` for those that come from Secrets."""
    for name in list(os.environ):
        if name.startswith("RTCBUS_"):
            monkeypatch.delenv(name)
    for name, entry in env_of(container).items():
        if name.startswith("RTCBUS_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def kubeconform(tools: dict[str, str], paths: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    return _run([
        tools["KUBECONFORM"], "-strict", "-summary", "-kubernetes-version", version,
        "-schema-location",
        f"{tools['KUBERNETES_SCHEMAS']}/{{{{.NormalizedKubernetesVersion}}}}-standalone{{{{.StrictSuffix}}}}/{{{{.ResourceKind}}}}{{{{.KindSuffix}}}}.json",
        "-schema-location",
        f"{tools['CRD_SCHEMAS']}/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json",
        *map(str, paths),
    ])


def kubernetes_versions(tools: dict[str, str]) -> list[str]:
    return tools["KUBERNETES_VERSIONS"].split()


# -- lint and schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "production"])
def test_helm_lint_strict(tools: dict[str, str], variant: str) -> None:
    proc = helm(tools, "lint", "--strict", str(CHART), *VARIANTS[variant])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_match_the_kubernetes_and_crd_schemas(
    tools: dict[str, str], variant: str, tmp_path: Path
) -> None:
    rendered = tmp_path / f"{variant}.yaml"
    rendered.write_text(render_text(tools, *VARIANTS[variant]))
    for version in kubernetes_versions(tools):
        proc = kubeconform(tools, [rendered], version)
        assert proc.returncode == 0, f"kubeconform, Kubernetes {version}:\n{proc.stdout}{proc.stderr}"
        assert "Invalid: 0, Errors: 0, Skipped: 0" in proc.stdout, proc.stdout
        proc = _run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, str(rendered)])
        assert proc.returncode == 0, f"kubernetes-validate, Kubernetes {version}:\n{proc.stdout}{proc.stderr}"
        assert "ERROR" not in proc.stdout, proc.stdout


def test_every_kind_the_chart_renders_is_validated(tools: dict[str, str]) -> None:
    kinds = {doc["kind"] for doc in render(tools, *EVERYTHING)} | {
        doc["kind"] for doc in render(tools, *VARIANTS["default"])
    }
    assert kinds == {
        "ServiceAccount", "Secret", "Service", "StatefulSet", "Deployment", "Job",
        "PodDisruptionBudget", "Ingress", "HorizontalPodAutoscaler", "NetworkPolicy",
        "KafkaTopic", "ServiceMonitor", "PrometheusRule",
    }


def test_strimzi_examples_match_the_generated_crds(tools: dict[str, str]) -> None:
    files = sorted(STRIMZI.glob("*.yaml"))
    kinds = {doc["kind"] for path in files for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert kinds == {"Kafka", "KafkaNodePool", "KafkaUser"}
    for version in kubernetes_versions(tools):
        proc = kubeconform(tools, files, version)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Invalid: 0, Errors: 0, Skipped: 0" in proc.stdout, proc.stdout


def test_the_generated_crds_are_kafka_strimzi_io_v1(tools: dict[str, str]) -> None:
    """The CRDs the schemas come from: valid CustomResourceDefinitions, serving v1 (the
    apiVersion the chart and the examples use)."""
    crds = sorted(Path(tools["STRIMZI_CRDS"]).glob("*.yaml"))
    assert len(crds) == 4
    proc = kubeconform(tools, crds, kubernetes_versions(tools)[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in crds:
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["group"] == "kafka.strimzi.io"
        assert [v["name"] for v in crd["spec"]["versions"] if v["served"]] == ["v1"]


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["--set", "router.replicas=0"], "/router/replicas"),
        (["--set", "shim.replicas=0"], "/shim/replicas"),
        (["--set", "kafka.partitions=0"], "/kafka/partitions"),
        (["--set", "shim.terminationGracePeriodSeconds=10"], "/shim/terminationGracePeriodSeconds"),
        (["--set", "router.replicas=two"], "/router/replicas"),
        (["--set", "topics.mode=sometimes"], "/topics/mode"),
        (["--set", "shim.port=70000"], "/shim/port"),
        (["--set", "kafka.config.linger\\.ms=5"], "/kafka/config/linger.ms"),
        (["--set", "secrets.callbackSecrets[0]=a\\,b"], "/secrets/callbackSecrets/0"),
        (["--set", "replicas=3"], "additional properties 'replicas' not allowed"),
        (["--set", "router.replica=3"], "additional properties 'replica' not allowed"),
        (["--set", "kafka.sasl.password=hunter2"], "additional properties 'password' not allowed"),
    ],
)
def test_values_schema_refuses_bad_values(tools: dict[str, str], args: list[str], where: str) -> None:
    stderr = render_fails(tools, *args)
    assert "values don't meet the specifications of the schema" in stderr, stderr
    assert where in stderr, stderr


def test_more_routers_than_partitions_fail_to_render(tools: dict[str, str]) -> None:
    stderr = render_fails(tools, "--set", "router.replicas=7")
    assert "router.replicas (7) must be at most kafka.partitions (6)" in stderr, stderr
    stderr = render_fails(tools, "--set", "router.replicas=4", "--set", "kafka.partitions=3")
    assert "router.replicas (4) must be at most kafka.partitions (3)" in stderr, stderr
    deployment = one(render(tools, "--set", "router.replicas=6"), "Deployment")
    assert deployment["spec"]["replicas"] == 6


def test_other_cross_checks_fail_to_render(tools: dict[str, str]) -> None:
    stderr = render_fails(tools, "--set", "config.signatureSkewS=600")
    assert "at most half of config.dedupeWindowS" in stderr, stderr
    stderr = render_fails(tools, "--set", "kafka.sasl.enabled=true")
    assert "kafka.sasl.passwordSecret.name" in stderr, stderr
    stderr = render_fails(tools, "--set", "config.wireFormat=confluent")
    assert "needs config.schemaRegistryUrl" in stderr, stderr


# -- what the objects say ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shim_is_a_statefulset_with_a_spool_volume_per_replica(tools: dict[str, str], variant: str) -> None:
    docs = render(tools, *VARIANTS[variant])
    shim = one(docs, "StatefulSet", f"{RELEASE}-shim")
    spec = shim["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == f"{RELEASE}-shim-headless"
    assert one(docs, "Service", spec["serviceName"])["spec"]["clusterIP"] == "None"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["shim"]
    env = env_of(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["spool"] == env["RTCBUS_SPOOL_DIR"]["value"]
    assert "spool" not in {v["name"] for v in pod["volumes"]}, "the spool must be the claim, not a pod volume"
    # Writable despite the read-only root: the spool, RTCBUS_HOME and /tmp.
    assert mounts["home"] == env["RTCBUS_HOME"]["value"]
    assert mounts["tmp"] == "/tmp"
    assert env["RTCBUS_SHIM_HOST"]["value"] == "0.0.0.0"
    assert env["RTCBUS_SHIM_ADMIN_HOST"]["value"] == "0.0.0.0"
    assert pod["terminationGracePeriodSeconds"] >= 30
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9109}
    assert int(env["RTCBUS_SHIM_PORT"]["value"]) == ports["http"]
    assert int(env["RTCBUS_SHIM_ADMIN_PORT"]["value"]) == ports["metrics"]
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]:
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_shim_replicas_and_autoscaling(tools: dict[str, str]) -> None:
    assert one(render(tools), "StatefulSet")["spec"]["replicas"] == 2
    assert one(render(tools, "-f", str(PRODUCTION)), "StatefulSet")["spec"]["replicas"] == 3
    docs = render(tools, "--set", "autoscaling.enabled=true")
    assert "replicas" not in one(docs, "StatefulSet")["spec"], "the HPA owns the count"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": f"{RELEASE}-shim"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_metrics_port_is_not_in_the_public_service(tools: dict[str, str], variant: str) -> None:
    docs = render(tools, *VARIANTS[variant])
    public = one(docs, "Service", f"{RELEASE}-shim")
    assert [(p["name"], p["targetPort"]) for p in public["spec"]["ports"]] == [("http", "http")]
    headless = one(docs, "Service", f"{RELEASE}-shim-headless")
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"http": 8080, "metrics": 9109}
    router_metrics = one(docs, "Service", f"{RELEASE}-router-metrics")
    assert {p["name"]: p["port"] for p in router_metrics["spec"]["ports"]} == {"metrics": 9108}
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"] == {"name": public["metadata"]["name"], "port": {"name": "http"}}
                assert path["path"] == "/callbacks"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_router_deployment(tools: dict[str, str], variant: str) -> None:
    docs = render(tools, *VARIANTS[variant])
    router = one(docs, "Deployment", f"{RELEASE}-router")
    assert router["spec"]["replicas"] == (3 if variant == "production" else 2)
    pod = router["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    (container,) = pod["containers"]
    assert container["args"] == ["router"]
    env = env_of(container)
    assert env["RTCBUS_METRICS_HOST"]["value"] == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9108}
    assert env["RTCBUS_METRICS_PORT"]["value"] == "9108"
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]:
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    assert container["volumeMounts"][0] == {"name": "home", "mountPath": env["RTCBUS_HOME"]["value"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_run_locked_down(tools: dict[str, str], variant: str) -> None:
    docs = render(tools, *VARIANTS[variant])
    templates = dict(pod_templates(docs))
    assert len(templates) == (3 if variant == "default" else 2), templates.keys()  # the Job in job mode
    for name, pod in templates.items():
        assert pod["automountServiceAccountToken"] is False, name
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] == 10001 and context["runAsGroup"] == 10001, name
        assert context["fsGroup"] == 10001, f"{name}: the spool volume must be writable for uid 10001"
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["runAsNonRoot"] is True, name
            assert container["resources"]["requests"] and container["resources"]["limits"], name
    for budget in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert budget["spec"]["maxUnavailable"] == 1


def test_secrets_come_by_reference_and_never_appear_in_the_pod_specs(tools: dict[str, str]) -> None:
    callback_secrets = ["s3cret-callback-one", "s3cret-callback-two"]
    args = [
        "--set", f"secrets.callbackSecrets={{{','.join(callback_secrets)}}}",
        "--set", "kafka.sasl.enabled=true",
        "--set", "kafka.sasl.passwordSecret.name=kafka-user",
        "--set", "kafka.tls.enabled=true",
        "--set", "kafka.tls.caSecret.name=kafka-ca",
    ]
    docs = render(tools, *args)
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["secrets"]).decode() == ",".join(callback_secrets)
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for value in callback_secrets:
        assert value not in others
        assert base64.b64encode(value.encode()).decode()[:12] not in others
    for name, pod in pod_templates(docs):
        for container in pod["containers"]:
            env = env_of(container)
            names = list(env)
            assert env["KAFKA_SASL_PASSWORD"]["valueFrom"] == {
                "secretKeyRef": {"name": "kafka-user", "key": "password"}
            }, name
            # $(KAFKA_SASL_PASSWORD) expands only to a variable defined before it.
            assert names.index("KAFKA_SASL_PASSWORD") < names.index("RTCBUS_KAFKA_CONFIG"), name
            config = json.loads(env["RTCBUS_KAFKA_CONFIG"]["value"])
            assert config["sasl.password"] == "$(KAFKA_SASL_PASSWORD)", name
            assert config["security.protocol"] == "SASL_SSL", name
            ca_mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["kafka-ca"]
            assert config["ssl.ca.location"] == f"{ca_mount}/ca.crt", name
            ca_volume = {v["name"]: v for v in pod["volumes"]}["kafka-ca"]
            assert ca_volume["secret"]["secretName"] == "kafka-ca", name
            for entry in env.values():
                assert "value" in entry or "valueFrom" in entry
            if container["name"] == "shim":
                assert env["RTCBUS_SECRETS"]["valueFrom"] == {
                    "secretKeyRef": {"name": secret["metadata"]["name"], "key": "secrets"}
                }
            else:
                assert "RTCBUS_SECRETS" not in env, f"{name} does not need the callback secrets"


def test_an_existing_callback_secret_is_used_as_it_is(tools: dict[str, str]) -> None:
    docs = render(tools, "--set", "secrets.existingSecret=vendor-secrets", "--set", "secrets.existingSecretKey=list")
    assert not [d for d in docs if d["kind"] == "Secret"]
    shim = one(docs, "StatefulSet")["spec"]["template"]
    env = env_of(shim["spec"]["containers"][0])
    assert env["RTCBUS_SECRETS"]["valueFrom"] == {"secretKeyRef": {"name": "vendor-secrets", "key": "list"}}
    assert "checksum/callback-secrets" not in (shim["metadata"].get("annotations") or {})


def test_a_change_of_callback_secrets_rolls_the_shims(tools: dict[str, str]) -> None:
    def checksum(*secrets: str) -> str:
        docs = render(tools, "--set", f"secrets.callbackSecrets={{{','.join(secrets)}}}")
        return one(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/callback-secrets"]

    assert checksum("old") == checksum("old")
    assert checksum("old") != checksum("old", "new")


def test_a_generated_callback_secret_is_consistent(tools: dict[str, str]) -> None:
    """Without secrets the chart generates one: the Secret and the pods' checksum agree."""
    import hashlib

    docs = render(tools)
    value = base64.b64decode(one(docs, "Secret")["data"]["secrets"]).decode()
    assert len(value) >= 32
    annotations = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/callback-secrets"] == hashlib.sha256(value.encode()).hexdigest()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rtcbus_variable_is_a_setting_and_loads(
    tools: dict[str, str], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The names are real settings (pydantic-settings would ignore a misspelt one), and the
    values load: each container's settings pass consumer.settings' own checks."""
    fields = set(Settings.model_fields)
    for name, pod in pod_templates(render(tools, *VARIANTS[variant])):
        for container in pod["containers"]:
            for variable in env_of(container):
                if variable.startswith("RTCBUS_"):
                    assert variable.removeprefix("RTCBUS_").lower() in fields, f"{name}: {variable} is no setting"
            secrets = {"RTCBUS_SECRETS": "from-the-secret"} if container["name"] == "shim" else {}
            settings = settings_from(container, monkeypatch, **secrets)
            assert settings.topic_prefix == "rtc"


# -- topics: the chart's KafkaTopics are the code's ------------------------------------------------

TOPIC_VARIANTS = {
    "strimzi": ["--set", "topics.mode=strimzi"],
    "production": ["-f", str(PRODUCTION)],
    "changed": [
        "--set", "topics.mode=strimzi",
        "--set", "kafka.topicPrefix=acme.rtc",
        "--set", "kafka.partitions=12",
        "--set", "kafka.replicationFactor=2",
        "--set", "topics.retention.rawMs=3600000",
        "--set", "topics.retention.eventsMs=86400000",
        "--set", "topics.retention.dlqMs=7776000000",
        "--set", "topics.retention.quarantineMs=7200000",
        "--set", "topics.retention.quarantineBytes=1073741824",
        "--set", "config.maxBodyBytes=4194304",
        "--set", "config.dedupeWindowS=86400",
        "--set", "config.signatureSkewS=600",
    ],
}


@pytest.mark.parametrize("variant", sorted(TOPIC_VARIANTS))
def test_kafka_topics_are_what_the_code_creates(
    tools: dict[str, str], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(tools, *TOPIC_VARIANTS[variant])
    router = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = settings_from(router, monkeypatch)
    expected = admin.topic_specs(settings, broker_count=3)
    topics = [d for d in docs if d["kind"] == "KafkaTopic"]
    assert [t["spec"]["topicName"] for t in topics] == admin.topic_names(settings)
    cluster = "rtcbus-kafka" if variant == "production" else "my-cluster"
    for topic, spec in zip(topics, expected, strict=True):
        assert topic["apiVersion"] == "kafka.strimzi.io/v1"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert topic["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert topic["spec"]["partitions"] == spec.partitions, spec.name
        assert topic["spec"]["replicas"] == spec.replication_factor, spec.name
        assert topic["spec"]["config"] == dict(spec.config), spec.name
    assert not [d for d in docs if d["kind"] == "Job"], "strimzi mode has no topics Job"


def test_topics_job_runs_rtcbus_topics_create_before_the_release(tools: dict[str, str]) -> None:
    docs = render(tools)
    assert not [d for d in docs if d["kind"] == "KafkaTopic"]
    job = one(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["topics", "create"]
    router = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    shared = {k: v for k, v in env_of(router).items() if k not in ("RTCBUS_METRICS_HOST", "RTCBUS_METRICS_PORT")}
    assert env_of(container) == shared, "the Job creates the topics from the routers' settings"
    docs = render(tools, "--set", "topics.mode=none")
    assert not [d for d in docs if d["kind"] in ("Job", "KafkaTopic")]


# -- monitoring -----------------------------------------------------------------------------------


def test_prometheus_rule_carries_the_alert_rules_file(tools: dict[str, str]) -> None:
    link = CHART / "files" / "rules.yaml"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == RULES.resolve()
    rules = yaml.safe_load(RULES.read_text())
    docs = render(tools, "-f", str(PRODUCTION))
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"]["groups"] == rules["groups"]
    assert not [d for d in render(tools) if d["kind"] == "PrometheusRule"]


def test_service_monitor_scrapes_both_metrics_services(tools: dict[str, str]) -> None:
    docs = render(tools, "-f", str(PRODUCTION))
    monitor = one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        d["metadata"]["name"] for d in docs
        if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
    ]
    assert sorted(scraped) == [f"{RELEASE}-router-metrics", f"{RELEASE}-shim-headless"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # The job label of each target: what the alert rules (and the compose scrape config) call them.
    jobs = {
        d["metadata"]["name"]: d["metadata"]["labels"][monitor["spec"]["jobLabel"]]
        for d in docs if d["metadata"]["name"] in scraped
    }
    assert jobs == {f"{RELEASE}-shim-headless": "rtcbus-shim", f"{RELEASE}-router-metrics": "rtcbus-router"}
    assert set(re.findall(r'job="([^"]+)"', RULES.read_text())) == set(jobs.values())


def test_network_policy_lets_callbacks_reach_only_the_public_port(tools: dict[str, str]) -> None:
    docs = render(tools, "-f", str(PRODUCTION))
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    shim = policies[f"{RELEASE}-shim"]
    assert [[p["port"] for p in rule["ports"]] for rule in shim["ingress"]] == [["http"], ["metrics"]]
    assert shim["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    router = policies[f"{RELEASE}-router"]
    assert [[p["port"] for p in rule["ports"]] for rule in router["ingress"]] == [["metrics"]]


# -- the Strimzi examples --------------------------------------------------------------------------


def strimzi_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(STRIMZI.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def test_strimzi_cluster_is_durable() -> None:
    docs = strimzi_docs()
    kafka = docs["Kafka"]
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 3
    assert config["min.insync.replicas"] == 2
    assert config["offsets.topic.replication.factor"] == 3
    assert config["transaction.state.log.replication.factor"] == 3
    assert config["transaction.state.log.min.isr"] == 2
    assert config["auto.create.topics.enable"] is False
    pool = docs["KafkaNodePool"]
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert pool["spec"]["replicas"] == 3
    assert sorted(pool["spec"]["roles"]) == ["broker", "controller"]
    volumes = pool["spec"]["storage"]["volumes"]
    assert [v["type"] for v in volumes] == ["persistent-claim"]
    assert volumes[0]["deleteClaim"] is False


def test_production_values_match_the_strimzi_examples(tools: dict[str, str]) -> None:
    docs = strimzi_docs()
    kafka, user = docs["Kafka"], docs["KafkaUser"]
    values = yaml.safe_load(PRODUCTION.read_text())
    cluster = kafka["metadata"]["name"]
    assert values["topics"]["mode"] == "strimzi"
    assert values["topics"]["strimzi"]["clusterName"] == cluster
    assert user["metadata"]["labels"]["strimzi.io/cluster"] == cluster
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["tls"] is True and listener["authentication"]["type"] == "scram-sha-512"
    assert values["kafka"]["bootstrapServers"] == f"{cluster}-kafka-bootstrap:{listener['port']}"
    assert values["kafka"]["sasl"]["mechanism"] == "SCRAM-SHA-512"
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    # The user operator names the user's Secret after the KafkaUser, key "password"; the
    # cluster operator's CA certificate is <cluster>-cluster-ca-cert, key ca.crt.
    assert values["kafka"]["sasl"]["username"] == user["metadata"]["name"]
    assert values["kafka"]["sasl"]["passwordSecret"] == {"name": user["metadata"]["name"], "key": "password"}
    assert values["kafka"]["tls"]["caSecret"] == {"name": f"{cluster}-cluster-ca-cert", "key": "ca.crt"}
    for doc in (kafka, user, docs["KafkaNodePool"]):
        assert doc["metadata"]["namespace"] == NAMESPACE
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"


def _allowed(acls: list[dict[str, Any]], kind: str, name: str, operation: str) -> bool:
    for acl in acls:
        resource = acl["resource"]
        if resource["type"] != kind or acl.get("type", "allow") != "allow" or operation not in acl["operations"]:
            continue
        if kind == "cluster":
            return True
        if resource.get("patternType", "literal") == "prefix":
            if name.startswith(resource["name"]):
                return True
        elif name == resource["name"]:
            return True
    return False


def test_kafka_user_acls_cover_what_rtcbus_does(tools: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    acls = strimzi_docs()["KafkaUser"]["spec"]["authorization"]["acls"]
    router = one(render(tools, "-f", str(PRODUCTION)), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = settings_from(router, monkeypatch)
    for topic in admin.topic_names(settings):
        for operation in ("Describe", "DescribeConfigs", "Read", "Write"):
            assert _allowed(acls, "topic", topic, operation), f"{operation} on topic {topic}"
    group = settings.group_id
    for consumer_group in (group, f"{group}-restore", f"{group}-quarantine-redrive", "rtcbus-tail-0123456789ab"):
        for operation in ("Read", "Describe"):
            assert _allowed(acls, "group", consumer_group, operation), f"{operation} on group {consumer_group}"
    for transactional in (transactional_id(settings), f"{group}-quarantine-redrive"):
        for operation in ("Write", "Describe"):
            assert _allowed(acls, "transactionalId", transactional, operation), f"{operation} on {transactional}"
    assert _allowed(acls, "cluster", "kafka-cluster", "IdempotentWrite")
    # Least privilege: nothing beyond rtcbus's names, no topic creation (the topic operator does it).
    assert not _allowed(acls, "topic", "other.topic", "Read")
    assert not _allowed(acls, "topic", settings.raw_topic, "Create")
    assert not _allowed(acls, "group", "another-group", "Read")
