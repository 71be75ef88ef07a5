"""The local Schema Registry: Apicurio Registry 2.6 on loopback, for development and tests.

Apicurio speaks the Confluent Schema Registry API at ``/apis/ccompat/v7``, which is what
confluent-kafka's ``SchemaRegistryClient`` (and so :class:`consumer.codec.ConfluentCodec`)
talks to. Unlike ``mock://`` it enforces compatibility rules and answers compatibility tests.

Where it comes from (:func:`provision`): a copy cached under ``settings.home`` by an earlier
run, else Maven Central (``io.apicurio:apicurio-registry-app:<version>:tar.gz:all``) through
``deploy/registry/pom.xml`` and ``mvn dependency:unpack``.

Files under ``settings.home``::

    registry/dist/<version>/          the unpacked distribution (the runner jar and lib/)
    registry/run/registry.pid         the running registry's pid
    registry/run/registry.port        the port it was started on
    registry/run/registry.log         its output

Storage is in memory: a stopped registry forgets its schemas (and a restarted one hands out
ids from 1 again), which is what development and tests want.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from consumer.errors import RegistryLaunchError
from consumer.maven import find_pom, run_mvn
from consumer.settings import Settings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# In a source checkout the pom is in deploy/; a wheel carries it beside this module.
POM = find_pom("registry", packaged=Path(__file__).with_name("registry_pom.xml"))
# About 190 MB of RSS instead of 250 with the JVM's defaults; ample for a development registry.
JVM_OPTIONS = ("-Xmx128m", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")
CCOMPAT_PATH = "/apis/ccompat/v7"


def url_of(port: int) -> str:
    """The Confluent-compatible API of a local registry on ``port``, as clients are given it."""
    return f"http://{HOST}:{port}{CCOMPAT_PATH}"


# -- provisioning ----------------------------------------------------------------------------


def runner_jar(dist: Path, version: str) -> Path:
    return dist / f"apicurio-registry-app-{version}-runner.jar"


def provision(settings: Settings) -> Path:
    """Return the unpacked Apicurio distribution directory, fetching it if needed.

    Raises:
        RegistryLaunchError: Maven is missing or could not resolve the artifact.
    """
    version = settings.registry_version
    dist = settings.home / "registry" / "dist" / version
    if runner_jar(dist, version).is_file():
        return dist
    dist.parent.mkdir(parents=True, exist_ok=True)
    # Unpack into a staging directory and rename it into place, so an interrupted fetch
    # never leaves a cache that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dist.parent))
    try:
        log.info("Fetching Apicurio Registry %s from Maven Central into %s ...", version, dist.parent)
        arguments = [f"-Dapicurio.version={version}", f"-Dunpack.directory={staging}", "dependency:unpack"]
        run_mvn(POM, arguments, f"Apicurio Registry {version}", RegistryLaunchError)
        if not runner_jar(staging, version).is_file():
            raise RegistryLaunchError(f"mvn could not resolve Apicurio Registry {version}: no runner jar")
        try:
            staging.rename(dist)
        except OSError:
            if not runner_jar(dist, version).is_file():  # else a concurrent run got there first
                raise
        return dist
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- the process -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryStatus:
    pid: int | None
    """The registry's process id; None when it is not running."""
    port: int
    url: str
    log_file: Path


class LocalRegistry:
    """One Apicurio Registry JVM on ``127.0.0.1:settings.registry_port``, in-memory storage.

    Args:
        settings: provides ``home``, ``registry_version`` and ``registry_port``.
        run_dir: where the pid, port and log files live; default ``settings.home / "registry" / "run"``.
    """

    def __init__(self, settings: Settings, *, run_dir: Path | None = None) -> None:
        self._settings = settings
        self.run_dir = run_dir or settings.home / "registry" / "run"
        self.pid_file = self.run_dir / "registry.pid"
        self.port_file = self.run_dir / "registry.port"
        self.log_file = self.run_dir / "registry.log"
        # The registry started by this object: polling it reaps it once it exits.
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The port of the running registry, else the one the settings give."""
        if self._running_pid() is not None:
            try:
                return int(self.port_file.read_text())
            except (OSError, ValueError):
                pass
        return self._settings.registry_port

    @property
    def url(self) -> str:
        """The Confluent-compatible API, e.g. ``http://127.0.0.1:8081/apis/ccompat/v7``."""
        return url_of(self.port)

    def status(self) -> RegistryStatus:
        return RegistryStatus(self._running_pid(), self.port, self.url, self.log_file)

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the registry unless it runs; return once ``/health/ready`` answers 200.

        Returns:
            The client URL (:attr:`url`).

        Raises:
            RegistryLaunchError: no Java, no distribution, the port taken, or a registry that
                exited or was not ready within ``timeout_s`` (the message names its log).
        """
        if self._running_pid() is not None:
            self._wait_until_ready(timeout_s)
            return self.url
        java = shutil.which("java")
        if java is None:
            raise RegistryLaunchError("Java is not on PATH: the local Schema Registry needs Java 17 or newer")
        port = self._settings.registry_port
        _check_port_free(port)
        dist = provision(self._settings)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "QUARKUS_HTTP_HOST": HOST, "QUARKUS_HTTP_PORT": str(port)}
        command = [java, *JVM_OPTIONS, "-jar", str(runner_jar(dist, self._settings.registry_version))]
        with open(self.log_file, "ab") as out:
            # A session of its own: the registry outlives the CLI that started it and does not
            # get the terminal's Ctrl-C.
            self._child = subprocess.Popen(
                command, cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.port_file.write_text(f"{port}\n")
        self.pid_file.write_text(f"{self._child.pid}\n")
        log.info("Started Apicurio Registry (pid %d), log: %s", self._child.pid, self.log_file)
        try:
            self._wait_until_ready(timeout_s)
        except RegistryLaunchError:
            self.stop()
            raise
        return self.url

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM the registry, SIGKILL it after ``timeout_s``.

        Returns:
            Whether it was running.
        """
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal(pid, signal.SIGTERM)
        if not self._wait_for_exit(time.monotonic() + timeout_s):
            log.warning("the registry did not stop within %.0f s; killing it (log: %s)", timeout_s, self.log_file)
            _signal(pid, signal.SIGKILL)
            if not self._wait_for_exit(time.monotonic() + 10):
                raise RegistryLaunchError(f"the registry (pid {pid}) survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        return True

    # -- internals --------------------------------------------------------------------------

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready = f"http://{HOST}:{self.port}/health/ready"
        while True:
            try:
                if httpx.get(ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self._running_pid() is None:
                raise RegistryLaunchError(
                    f"the registry exited during start-up: {_last_error(self.log_file)} (log: {self.log_file})"
                )
            if time.monotonic() > deadline:
                raise RegistryLaunchError(
                    f"the registry was not ready at {ready} within {timeout_s:.0f} s (log: {self.log_file})"
                )
            time.sleep(0.1)

    def _wait_for_exit(self, deadline: float) -> bool:
        while self._running_pid() is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        if self._child is not None and self._child.pid == pid:
            return pid if self._child.poll() is None else None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, but not ours to signal: the command line below decides
        # The pid may belong to another process by now: only an Apicurio runner counts.
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.parent.is_dir():
            try:
                if b"apicurio-registry-app" not in cmdline.read_bytes():
                    return None
            except OSError:
                return None
        return pid


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise RegistryLaunchError(
                f"port {port} on {HOST} is taken ({exc.strerror}): stop what uses it, or choose "
                "another with --port or RTCBUS_REGISTRY_PORT"
            ) from exc


def _last_error(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-300:]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "ERROR" in line or "Exception" in line:
            return line.strip()[:300]
    return "no error in its log"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it exited on its own in the meantime
