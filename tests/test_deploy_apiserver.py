"""The Helm chart and the Strimzi examples against a real kube-apiserver (no nodes, no controllers).

- ``kubectl apply --dry-run=server --validate=strict`` accepts the default, production and
  every-option renders and deploy/strimzi, with the Strimzi and Prometheus Operator CRDs
  installed, and refuses objects with an unknown field (a built-in kind and a custom one);
- ``helm install`` creates the objects; ``helm upgrade`` keeps the generated callback secret
  (the chart's ``lookup``, which only a real server answers) and thus the shim pods'
  checksum; an upgrade that changes ``shim.spool.size`` is refused (a StatefulSet's
  volumeClaimTemplates are immutable); ``helm uninstall`` leaves the KafkaTopics.

kube-apiserver, etcd and kubectl come from ``deploy/tools.sh --apiserver``, which builds them
from source once (about 6 minutes cold) and answers in well under a second after that. The
servers listen on 127.0.0.1 only, on free ports, with their data in a temporary directory;
admin access is a static token (``--token-auth-file``, group system:masters), anonymous
requests are refused. With no nodes nothing is ever scheduled: the install uses
``topics.mode=strimzi``, because the default ``job`` mode's pre-install hook Job would make
helm wait for a Job that never runs.

If the binaries cannot be built the tests fail, naming the step: CI builds them first.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import test_deploy_chart as chart
from kafka_helpers import free_ports

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "deploy" / "tools.sh"
STRIMZI = ROOT / "deploy" / "strimzi"
RELEASE = chart.RELEASE

# A cold deploy/tools.sh --apiserver builds kube-apiserver, kubectl and etcd (about 6 minutes
# on 2 cores, plus helm and the CRDs if they are missing) inside the fixture.
pytestmark = pytest.mark.timeout(1800)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass
class ApiServer:
    tools: dict[str, str]
    kubeconfig: Path
    env: dict[str, str]
    url: str
    token: str

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run([self.tools["KUBECTL"], "--kubeconfig", str(self.kubeconfig), *args], self.env, input, timeout)

    def helm(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return _run([self.tools["HELM"], "--kubeconfig", str(self.kubeconfig), *args], self.env, None, timeout)

    def get(self, *args: str) -> dict[str, Any]:
        proc = self.kubectl("get", "-o", "json", *args)
        assert proc.returncode == 0, f"kubectl get {' '.join(args)}:\n{proc.stderr}"
        return json.loads(proc.stdout)


def _run(
    command: list[str], env: dict[str, str], input: str | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, env=env, input=input, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{shlex.join(command)} did not finish within {timeout} s")


def _apiserver_tools() -> dict[str, str]:
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        proc = subprocess.run(
            ["bash", str(TOOLS), "--apiserver"], capture_output=True, text=True, env=env, timeout=1700, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deploy/tools.sh --apiserver did not finish building kube-apiserver, etcd and kubectl in time")
    if proc.returncode != 0:
        failed = [line for line in proc.stderr.splitlines() if "FAILED" in line]
        pytest.fail(
            f"deploy/tools.sh --apiserver could not provide kube-apiserver, etcd and kubectl: "
            f"{failed[-1] if failed else 'exit ' + str(proc.returncode)}\n{proc.stderr[-4000:]}"
        )
    values = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("=")
        values[name] = shlex.split(value)[0] if value else ""
    for name in ("HELM", "KUBE_APISERVER", "ETCD", "KUBECTL", "STRIMZI_CRDS", "PROMETHEUS_OPERATOR_CRDS"):
        assert values.get(name), f"deploy/tools.sh --apiserver printed no {name}"
    for name in ("HELM", "KUBE_APISERVER", "ETCD", "KUBECTL"):
        assert os.access(values[name], os.X_OK), f"deploy/tools.sh --apiserver: {name}={values[name]} is not executable"
    return values


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # A process group of its own, so that stopping it stops whatever it started too.
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str, *, token: str | None = None,
               context: ssl.SSLContext | None = None) -> None:
    """Until ``url`` answers 200 within READY_TIMEOUT_S; fails early if the process exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before it was ready:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as answer:
                if answer.status == 200:
                    return
                last = f"HTTP {answer.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}: {error.read()[-500:].decode(errors='replace')}"
        except (OSError, ssl.SSLError) as error:
            last = str(error)
        time.sleep(0.2)
    pytest.fail(f"{what} was not ready within {READY_TIMEOUT_S} s ({url}: {last}):\n{_tail(log)}")


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """etcd and kube-apiserver on 127.0.0.1, with the Strimzi and Prometheus Operator CRDs
    installed and Established; both stopped (their process groups killed) at the end."""
    tools = _apiserver_tools()
    tmp = tmp_path_factory.mktemp("apiserver")
    first = free_ports(3)
    etcd_client, etcd_peer, secure_port = first, first + 1, first + 2

    # The service-account token signing key, and its public half for verifying them.
    key, public_key = tmp / "service-account.key", tmp / "service-account.pub"
    for command in (
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)],
        ["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(public_key)],
    ):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, f"{shlex.join(command)} (the service-account key):\n{proc.stderr}"
    token = secrets.token_hex(24)
    tokens = tmp / "tokens.csv"
    tokens.write_text(f'{token},admin,admin,"system:masters"\n')
    tokens.chmod(0o600)

    processes: list[subprocess.Popen[bytes]] = []
    try:
        etcd_log = tmp / "etcd.log"
        etcd = _start([
            tools["ETCD"], "--name", "test", "--data-dir", str(tmp / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ], etcd_log)
        processes.append(etcd)
        _wait_http(f"http://127.0.0.1:{etcd_client}/health", etcd, etcd_log, "etcd")

        apiserver_log = tmp / "kube-apiserver.log"
        certs = tmp / "certs"
        kube_apiserver = _start([
            tools["KUBE_APISERVER"],
            "--etcd-servers", f"http://127.0.0.1:{etcd_client}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(secure_port), "--cert-dir", str(certs),
            # The default reconciler refuses a loopback advertise address.
            "--endpoint-reconciler-type", "none",
            "--service-cluster-ip-range", "10.96.0.0/24",
            "--anonymous-auth=false", "--token-auth-file", str(tokens),
            "--authorization-mode", "AlwaysAllow",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(public_key), "--service-account-signing-key-file", str(key),
            "--profiling=false",
        ], apiserver_log)
        processes.append(kube_apiserver)
        url = f"https://127.0.0.1:{secure_port}"
        # The serving certificate is self-signed, generated into --cert-dir at start.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        _wait_http(f"{url}/readyz", kube_apiserver, apiserver_log, "kube-apiserver", token=token, context=insecure)

        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/version", headers={"Authorization": f"Bearer {token}"}),
            timeout=5, context=insecure,
        ) as answer:
            version = json.load(answer)
        # What helm compares a chart's kubeVersion with, and templates see as .Capabilities.
        assert version["gitVersion"].startswith("v1."), f"kube-apiserver reports version {version}"

        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": url,
                "certificate-authority-data": base64.b64encode((certs / "apiserver.crt").read_bytes()).decode(),
            }}],
            "users": [{"name": "admin", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        }))
        kubeconfig.chmod(0o600)
        home = tmp / "home"
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(home / "kube-cache"),
            "HELM_CACHE_HOME": str(home / "helm-cache"), "HELM_CONFIG_HOME": str(home / "helm-config"),
            "HELM_DATA_HOME": str(home / "helm-data"),
        }
        server = ApiServer(tools=tools, kubeconfig=kubeconfig, env=env, url=url, token=token)

        crds = [*sorted(Path(tools["STRIMZI_CRDS"]).glob("*.yaml")),
                *sorted(Path(tools["PROMETHEUS_OPERATOR_CRDS"]).glob("*.yaml"))]
        assert crds, "no CRDs in STRIMZI_CRDS / PROMETHEUS_OPERATOR_CRDS"
        # kubectl create: the Prometheus Operator's CRDs exceed the last-applied annotation's size.
        proc = server.kubectl("create", *(arg for path in crds for arg in ("-f", str(path))))
        assert proc.returncode == 0, f"kubectl create of the CRDs:\n{proc.stdout}{proc.stderr}"
        proc = server.kubectl("wait", "--for", "condition=Established", "--timeout", "60s", "crd", "--all", timeout=90)
        assert proc.returncode == 0, f"the CRDs were not Established:\n{proc.stdout}{proc.stderr}"
        for kind in ("kafkatopics.kafka.strimzi.io", "kafkas.kafka.strimzi.io", "servicemonitors.monitoring.coreos.com",
                     "prometheusrules.monitoring.coreos.com"):
            assert kind in proc.stdout, f"{kind} is not among the installed CRDs:\n{proc.stdout}"
        yield server
    finally:
        for proc_ in reversed(processes):
            _stop(proc_)


def _namespace(server: ApiServer, name: str) -> None:
    proc = server.kubectl("create", "namespace", name)
    assert proc.returncode == 0 or "AlreadyExists" in proc.stderr, proc.stderr


def _dry_run(server: ApiServer, manifest: str, namespace: str) -> subprocess.CompletedProcess[str]:
    return server.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-",
                          input=manifest)


def _docs(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


# -- server-side dry runs ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(chart.VARIANTS))
def test_server_dry_run_accepts_the_render(apiserver: ApiServer, variant: str) -> None:
    _namespace(apiserver, chart.NAMESPACE)
    manifest = chart.render_text(apiserver.tools, *chart.VARIANTS[variant])
    docs = _docs(manifest)
    proc = _dry_run(apiserver, manifest, chart.NAMESPACE)
    assert proc.returncode == 0, f"{variant}: the API server refused the render:\n{proc.stdout}{proc.stderr}"
    accepted = [line for line in proc.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(docs), f"{variant}: {len(docs)} objects, accepted:\n{proc.stdout}{proc.stderr}"
    assert not proc.stderr.strip(), f"{variant}: warnings from the API server:\n{proc.stderr}"


def test_server_dry_run_accepts_the_strimzi_examples(apiserver: ApiServer) -> None:
    files = sorted(STRIMZI.glob("*.yaml"))
    assert files
    namespaces = {doc["metadata"].get("namespace") for path in files for doc in _docs(path.read_text())}
    for namespace in namespaces - {None}:
        _namespace(apiserver, namespace)
    manifest = "\n---\n".join(path.read_text() for path in files)
    proc = _dry_run(apiserver, manifest, chart.NAMESPACE)
    assert proc.returncode == 0, f"the API server refused deploy/strimzi:\n{proc.stdout}{proc.stderr}"
    accepted = [line for line in proc.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(_docs(manifest)), proc.stdout + proc.stderr
    assert not proc.stderr.strip(), f"warnings from the API server:\n{proc.stderr}"


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("StatefulSet", ("spec", "template", "spec", "containers", 0)),
        ("KafkaTopic", ("spec",)),
    ],
)
def test_server_dry_run_refuses_an_unknown_field(
    apiserver: ApiServer, kind: str, where: tuple[str | int, ...]
) -> None:
    """The dry runs above can fail: strict validation names a field neither the built-in
    schema nor the CRD's knows."""
    _namespace(apiserver, chart.NAMESPACE)
    docs = _docs(chart.render_text(apiserver.tools, "--set", "topics.mode=strimzi"))
    broken = next(doc for doc in docs if doc["kind"] == kind)
    node: Any = broken
    for step in where:
        node = node[step]
    node["livenessProbez"] = {"periodSeconds": 5}
    proc = _dry_run(apiserver, yaml.safe_dump(broken), chart.NAMESPACE)
    assert proc.returncode != 0, f"a {kind} with an unknown field was accepted:\n{proc.stdout}"
    assert "unknown field" in proc.stderr and "livenessProbez" in proc.stderr, proc.stderr


# -- a release: install, upgrade, a refused upgrade, uninstall ---------------------------------------


def test_helm_install_upgrade_and_uninstall(apiserver: ApiServer) -> None:
    namespace = "rtcbus-release"
    # No hooks: the default topics.mode=job would make helm wait for a Job no node runs.
    values = ["--set", "topics.mode=strimzi"]
    release = [RELEASE, str(chart.CHART), "--namespace", namespace]

    proc = apiserver.helm("install", *release, "--create-namespace", "--timeout", "60s", *values)
    assert proc.returncode == 0, f"helm install:\n{proc.stdout}{proc.stderr}"
    proc = apiserver.helm("get", "manifest", RELEASE, "--namespace", namespace)
    assert proc.returncode == 0, proc.stderr
    installed = _docs(proc.stdout)
    assert not any(doc["kind"] == "Job" for doc in installed), "strimzi mode renders no Job"

    # Every object of the release is in the cluster, the workloads by name.
    names = [f"{doc['kind'].lower()}/{doc['metadata']['name']}" for doc in installed]
    found = apiserver.get("--namespace", namespace, *names)["items"]
    assert sorted(f"{o['kind'].lower()}/{o['metadata']['name']}" for o in found) == sorted(names)
    for kind, name in [
        ("statefulset", f"{RELEASE}-shim"), ("deployment", f"{RELEASE}-router"),
        ("service", f"{RELEASE}-shim"), ("service", f"{RELEASE}-shim-headless"),
        ("service", f"{RELEASE}-router-metrics"), ("secret", f"{RELEASE}-callback-secrets"),
    ]:
        assert f"{kind}/{name}" in names, f"helm install created no {kind} {name}: {names}"
    pdbs = apiserver.get("pdb", "--namespace", namespace)["items"]
    assert len(pdbs) == 2, [p["metadata"]["name"] for p in pdbs]
    topics = sorted(n for n in names if n.startswith("kafkatopic/"))
    assert topics, names

    def callback_secret() -> str:
        secret = apiserver.get("secret", f"{RELEASE}-callback-secrets", "--namespace", namespace)
        (value,) = secret["data"].values()
        return base64.b64decode(value).decode()

    def shim_checksum() -> str:
        shim = apiserver.get("statefulset", f"{RELEASE}-shim", "--namespace", namespace)
        return shim["spec"]["template"]["metadata"]["annotations"]["checksum/callback-secrets"]

    generated, checksum = callback_secret(), shim_checksum()
    assert len(generated) == 40, "the chart generates a 40-character secret"

    # An upgrade that changes something: the generated secret is kept (lookup), and with it
    # the shim pods' checksum (no roll for nothing).
    proc = apiserver.helm("upgrade", *release, "--timeout", "60s", *values, "--set", "router.replicas=3")
    assert proc.returncode == 0, f"helm upgrade:\n{proc.stdout}{proc.stderr}"
    router = apiserver.get("deployment", f"{RELEASE}-router", "--namespace", namespace)
    assert router["spec"]["replicas"] == 3, "the upgrade did not reach the cluster"
    assert callback_secret() == generated, "helm upgrade replaced the generated callback secret"
    assert shim_checksum() == checksum, "helm upgrade changed the shim pods' checksum/callback-secrets"

    # The spool's size is a volumeClaimTemplate: the API server refuses to change it (1.37 says
    # "spec.volumeClaimTemplates: Invalid value: ...: field is immutable"), as values.yaml warns.
    proc = apiserver.helm("upgrade", *release, "--timeout", "60s", *values, "--set", "router.replicas=3",
                          "--set", "shim.spool.size=4Gi")
    assert proc.returncode != 0, f"an upgrade changing shim.spool.size was accepted:\n{proc.stdout}"
    assert "UPGRADE FAILED" in proc.stderr, proc.stderr
    assert "spec.volumeClaimTemplates" in proc.stderr and "immutable" in proc.stderr, proc.stderr
    shim = apiserver.get("statefulset", f"{RELEASE}-shim", "--namespace", namespace)
    (claim,) = shim["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert callback_secret() == generated

    # Uninstall: the workloads go, the KafkaTopics stay (helm.sh/resource-policy: keep).
    proc = apiserver.helm("uninstall", RELEASE, "--namespace", namespace, "--timeout", "60s")
    assert proc.returncode == 0, f"helm uninstall:\n{proc.stdout}{proc.stderr}"
    left = apiserver.get("kafkatopics", "--namespace", namespace)["items"]
    assert sorted(f"kafkatopic/{t['metadata']['name']}" for t in left) == topics, "helm uninstall removed KafkaTopics"
    for kind in ("statefulset", "deployment", "service", "pdb", "secret"):
        items = apiserver.get(kind, "--namespace", namespace, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
        assert not items, f"helm uninstall left {kind}: {[i['metadata']['name'] for i in items]}"
    proc = apiserver.helm("status", RELEASE, "--namespace", namespace)
    assert proc.returncode != 0, "the release is still there after helm uninstall"
