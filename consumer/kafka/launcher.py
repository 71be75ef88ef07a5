"""The local Apache Kafka: real KRaft nodes on loopback, for development and tests.

Where the broker's jars come from, in this order (:func:`provision`):

1. ``settings.kafka_home`` (``KAFKA_HOME``): an unpacked Kafka release;
2. a copy cached under ``settings.home`` by an earlier run;
3. Maven Central, through ``deploy/kafka/pom.xml`` and ``mvn dependency:copy-dependencies``;
4. the official release archive from apache.org.

A cached copy is laid out like a release (``libs/*.jar``), so it can serve as ``KAFKA_HOME``.

Files under ``settings.home``::

    kafka/dist/<version>/libs/        the jars
    kafka/cluster/cluster.json        cluster id, broker count, first port (written on first start)
    kafka/cluster/node-<id>/          server.properties, data/, logs/server.log, kafka.pid

Each node is broker and controller in one process. Node ``i`` (from 1) listens for clients on
``local_port + 2*(i-1)`` and for its controller on the port after that.

A node can be given one more client listener (:class:`ExtraListener`), e.g. one that advertises
the port of a proxy in front of it, so that a client bootstrapping through the proxy makes
every connection through it (fault tests cut a client off that way) while other clients use
the plain listener. Without one, nothing changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from consumer.errors import KafkaLaunchError
from consumer.maven import find_pom, run_mvn
from consumer.settings import Settings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# In a source checkout the pom is in deploy/; a wheel carries it beside this module.
POM = find_pom("kafka", packaged=Path(__file__).with_name("pom.xml"))
LOG4J2_CONFIG = Path(__file__).with_name("log4j2.xml")
RELEASE_ARCHIVE_URLS = (
    "https://downloads.apache.org/kafka/{version}/kafka_2.13-{version}.tgz",
    "https://archive.apache.org/dist/kafka/{version}/kafka_2.13-{version}.tgz",
)
# A development broker: a modest heap (Kafka's own default is 1 GB), and a loud exit
# rather than a half-dead broker when that is not enough.
JVM_OPTIONS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


# -- provisioning ----------------------------------------------------------------------------


def provision(settings: Settings) -> Path:
    """Return a Kafka distribution directory (one with ``libs/*.jar``), fetching it if needed.

    Raises:
        KafkaLaunchError: ``KAFKA_HOME`` is not a Kafka release, or no source could provide
            the jars (the message names what was tried).
    """
    if settings.kafka_home is not None:
        home = settings.kafka_home.expanduser()
        if not _has_kafka_jars(home):
            raise KafkaLaunchError(f"KAFKA_HOME={home} is not a Kafka release: no libs/kafka_2.13-*.jar")
        return home

    version = settings.kafka_version
    dist = settings.home / "kafka" / "dist" / version
    if _has_kafka_jars(dist):
        return dist

    dist.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for fetch in (_fetch_with_maven, _fetch_release_archive):
        # Fetch into a staging directory and rename it into place, so an interrupted fetch
        # never leaves a cache that looks complete.
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dist.parent))
        try:
            fetch(version, staging)
            try:
                staging.rename(dist)
            except OSError:
                if not _has_kafka_jars(dist):  # else a concurrent run got there first
                    raise
            return dist
        except KafkaLaunchError as exc:
            failures.append(str(exc))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise KafkaLaunchError(
        f"cannot provision Kafka {version}: {'; '.join(failures)}. "
        "Install Maven, or set KAFKA_HOME to an unpacked Kafka release"
    )


def _has_kafka_jars(dist: Path) -> bool:
    return any((dist / "libs").glob("kafka_2.13-*.jar"))


def _fetch_with_maven(version: str, target: Path) -> None:
    log.info("Fetching Kafka %s from Maven Central into %s ...", version, target.parent)
    arguments = [
        f"-Dkafka.version={version}", "dependency:copy-dependencies", "-DincludeScope=runtime",
        f"-DoutputDirectory={target / 'libs'}",
    ]
    run_mvn(POM, arguments, f"Kafka {version}", KafkaLaunchError)


def _fetch_release_archive(version: str, target: Path) -> None:
    errors = []
    for template in RELEASE_ARCHIVE_URLS:
        url = template.format(version=version)
        log.info("Downloading %s ...", url)
        try:
            with tempfile.TemporaryFile() as archive:
                with urllib.request.urlopen(url, timeout=30) as response:
                    shutil.copyfileobj(response, archive)
                with urllib.request.urlopen(url + ".sha512", timeout=30) as response:
                    expected = _sha512_from(response.read().decode())
                archive.seek(0)
                if hashlib.file_digest(archive, "sha512").hexdigest() != expected:
                    raise KafkaLaunchError(f"{url}: SHA-512 does not match {url}.sha512")
                archive.seek(0)
                _extract_libs(archive, target / "libs")
            return
        except (OSError, tarfile.TarError, KafkaLaunchError) as exc:  # URLError is an OSError
            errors.append(f"{url}: {exc}")
    raise KafkaLaunchError("download failed: " + "; ".join(errors))


def _sha512_from(text: str) -> str:
    # Apache publishes either `gpg --print-md` output ("file: 1A2B 3C4D ...", wrapped) or
    # `sha512sum` output ("1a2b3c4d...  file").
    digest = text.split(":", 1)[1] if ":" in text else text.split()[0]
    return "".join(digest.split()).lower()


def _extract_libs(archive, libs: Path) -> None:
    libs.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=archive) as tar:
        for member in tar:
            if member.isfile() and Path(member.name).parent.name == "libs":
                # Only the base name is used, so no member can write outside libs/.
                with tar.extractfile(member) as src, open(libs / Path(member.name).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    if not _has_kafka_jars(libs.parent):
        raise KafkaLaunchError("the release archive has no libs/kafka_2.13-*.jar")


def kafka_version_of(dist: Path) -> str:
    """The Kafka version of a distribution directory, read from its jar names."""
    for jar in (dist / "libs").glob("kafka_2.13-*.jar"):
        match = re.fullmatch(r"kafka_2\.13-(\d[^-]*)\.jar", jar.name)
        if match:
            return match.group(1)
    return "unknown"


# -- the cluster -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One node of the local cluster: broker and controller in one JVM."""

    node_id: int
    port: int
    controller_port: int
    dir: Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.dir / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def log_file(self) -> Path:
        """The broker's log (log4j2); JVM output that bypasses it goes to ``kafka.out`` beside it."""
        return self.log_dir / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "kafka.pid"


@dataclass(frozen=True)
class ExtraListener:
    """A second client listener of one node (PLAINTEXT, on ``HOST``).

    The node listens on ``port`` and tells clients that connect there to reach it at
    ``advertised_port``: a proxy forwarding ``advertised_port`` to ``port`` then carries every
    connection of a client that bootstraps from it.
    """

    name: str
    """The listener's name, e.g. ``PROXIED``; not ``PLAINTEXT`` or ``CONTROLLER``."""
    port: int
    advertised_port: int


@dataclass(frozen=True)
class NodeStatus:
    node: Node
    pid: int | None
    """The broker's process id; None when it is not running."""


class LocalKafka:
    """A Kafka cluster of ``settings.brokers`` KRaft nodes on loopback, kept in ``cluster_dir``.

    The cluster id and the data survive :meth:`stop`; the next :meth:`start` resumes them,
    with the broker count and ports it last ran with unless the settings name others.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        cluster_dir: Path | None = None,
        extra_listeners: dict[int, ExtraListener] | None = None,
    ) -> None:
        """
        Args:
            settings: provides the jars (see :func:`provision`), ``brokers`` and ``local_port``.
            cluster_dir: where the cluster's data and logs live; default
                ``settings.home / "kafka" / "cluster"``.
            extra_listeners: by node id, one more client listener for that node, written to
                its configuration at every start by this object (not kept in the cluster's
                state: a later ``LocalKafka`` without them starts the nodes without them).

        Raises:
            KafkaLaunchError: an extra listener reuses a reserved listener name.
        """
        for listener in (extra_listeners or {}).values():
            if listener.name.upper() in ("PLAINTEXT", "CONTROLLER"):
                raise KafkaLaunchError(f"extra listener name {listener.name} is reserved")
        self._extra_listeners = dict(extra_listeners or {})
        self._settings = settings
        self.cluster_dir = cluster_dir or settings.home / "kafka" / "cluster"
        self._state_file = self.cluster_dir / "cluster.json"
        # Brokers started by this object, by pid: polling them reaps them once they exit,
        # so a stopped broker does not linger as a zombie that still looks alive.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def bootstrap_servers(self) -> str:
        """The client addresses: of the cluster as last started, else as the settings describe it."""
        return ",".join(node.address for node in self.nodes)

    @property
    def nodes(self) -> list[Node]:
        """The nodes as last started, else as the settings describe them."""
        state = self._read_state()
        if state is None:
            return self._layout(self._settings.brokers, self._settings.local_port)
        return self._layout(state["brokers"], state["first_port"])

    @property
    def kafka_version(self) -> str | None:
        """The Kafka version the cluster last ran, None before its first start."""
        state = self._read_state()
        return None if state is None else state["kafka_version"]

    def status(self) -> list[NodeStatus]:
        """Every node of the cluster and whether it runs; empty before the first start."""
        if self._read_state() is None:
            return []
        return [NodeStatus(node, self._running_pid(node)) for node in self.nodes]

    def start(self, timeout_s: float = 60.0) -> str:
        """Start every node that is not running, formatting its storage on first start.

        Returns once every node answers a metadata request and lists all nodes.

        Returns:
            The bootstrap servers.

        Raises:
            KafkaLaunchError: no Java, no jars, a port taken, a node that exited or did not
                answer within ``timeout_s`` (the message names its log), or a cluster that
                already exists with another broker count or runs on other ports.
        """
        java = shutil.which("java")
        if java is None:
            raise KafkaLaunchError(
                "Java is not on PATH: the local Kafka needs Java 17 or newer "
                "(or set RTCBUS_BOOTSTRAP_SERVERS to use an existing Kafka)"
            )
        settings = self._settings
        state = self._read_state()
        brokers, first_port = self._wanted_layout(state)
        if state is not None and state["brokers"] != brokers:
            raise KafkaLaunchError(
                f"the local Kafka in {self.cluster_dir} has {state['brokers']} broker(s), not "
                f"{brokers}: stop it and delete that directory, or use another RTCBUS_HOME"
            )
        running = {status.node.node_id for status in self.status() if status.pid is not None}
        if running and state is not None and state["first_port"] != first_port:
            raise KafkaLaunchError(
                f"the local Kafka already runs at {self.bootstrap_servers}; "
                f"stop it first to move it to port {first_port}"
            )
        nodes = self._layout(brokers, first_port)
        to_start = [node for node in nodes if node.node_id not in running]
        if not to_start:
            return self.bootstrap_servers
        for node in to_start:
            _check_port_free(node.port)
            _check_port_free(node.controller_port)
            if node.node_id in self._extra_listeners:
                _check_port_free(self._extra_listeners[node.node_id].port)

        dist = provision(settings)
        cluster_id = state["cluster_id"] if state is not None else _new_cluster_id()
        self._write_state(cluster_id, brokers, first_port, kafka_version_of(dist))
        for node in to_start:
            node.log_dir.mkdir(parents=True, exist_ok=True)
            node.config_file.write_text(
                _server_properties(node, nodes, self._extra_listeners.get(node.node_id))
            )
        self._format(
            [node for node in to_start if not (node.data_dir / "meta.properties").exists()],
            java, dist, cluster_id,
        )
        for node in to_start:
            self._launch(node, java, dist)
        self._wait_until_up(to_start, {node.node_id for node in nodes}, timeout_s)
        return self.bootstrap_servers

    def stop(self, node_ids: Iterable[int] | None = None, timeout_s: float = 30.0) -> list[Node]:
        """Stop the running nodes, all or those in ``node_ids``.

        Each gets SIGTERM, which makes Kafka shut down in a controlled way (leadership moves
        away first); one still running after ``timeout_s`` is killed.

        Returns:
            The nodes that were running and are now stopped.
        """
        wanted = None if node_ids is None else set(node_ids)
        targets = [
            status for status in self.status()
            if status.pid is not None and (wanted is None or status.node.node_id in wanted)
        ]
        for status in targets:
            _signal(status.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for status in targets:
            if not self._wait_for_exit(status.node, deadline):
                log.warning(
                    "Kafka node %d did not stop within %.0f s; killing it (log: %s)",
                    status.node.node_id, timeout_s, status.node.log_file,
                )
                _signal(status.pid, signal.SIGKILL)
                if not self._wait_for_exit(status.node, time.monotonic() + 10):
                    raise KafkaLaunchError(f"Kafka node {status.node.node_id} (pid {status.pid}) survived SIGKILL")
            status.node.pid_file.unlink(missing_ok=True)
        return [status.node for status in targets]

    # -- internals --------------------------------------------------------------------------

    def _wanted_layout(self, state: dict | None) -> tuple[int, int]:
        # Broker count and first port: what the settings say when they say it (flag or
        # environment), else what the cluster last ran with, so a plain restart resumes it.
        given = self._settings.model_fields_set
        brokers, first_port = self._settings.brokers, self._settings.local_port
        if state is not None and "brokers" not in given:
            brokers = state["brokers"]
        if state is not None and "local_port" not in given:
            first_port = state["first_port"]
        return brokers, first_port

    def _layout(self, brokers: int, first_port: int) -> list[Node]:
        return [
            Node(
                node_id=i,
                port=first_port + 2 * (i - 1),
                controller_port=first_port + 2 * (i - 1) + 1,
                dir=self.cluster_dir / f"node-{i}",
            )
            for i in range(1, brokers + 1)
        ]

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise KafkaLaunchError(f"cannot read {self._state_file}: {exc}") from exc

    def _write_state(self, cluster_id: str, brokers: int, first_port: int, kafka_version: str) -> None:
        self.cluster_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "cluster_id": cluster_id,
            "brokers": brokers,
            "first_port": first_port,
            "kafka_version": kafka_version,
        }
        self._state_file.write_text(json.dumps(state, indent=2) + "\n")

    def _format(self, nodes: list[Node], java: str, dist: Path, cluster_id: str) -> None:
        # The nodes format in parallel: each run is a JVM start, most of a second.
        runs = [
            (node, subprocess.Popen(
                [
                    java, *_logging_options(node), "-cp", str(dist / "libs" / "*"),
                    "kafka.tools.StorageTool", "format",
                    "--cluster-id", cluster_id, "--config", str(node.config_file),
                ],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
            for node in nodes
        ]
        outputs = [(node, run, run.communicate()[0]) for node, run in runs]
        for node, run, output in outputs:
            if run.returncode != 0:
                lines = output.strip().splitlines() or ["no output"]
                raise KafkaLaunchError(
                    f"formatting the storage of Kafka node {node.node_id} failed: {lines[-1]} "
                    f"(log: {node.log_file})"
                )

    def _launch(self, node: Node, java: str, dist: Path) -> None:
        command = [
            java, *JVM_OPTIONS, *_logging_options(node), "-cp", str(dist / "libs" / "*"),
            "kafka.Kafka", str(node.config_file),
        ]
        with open(node.log_dir / "kafka.out", "ab") as out:
            # A session of its own: the broker outlives the CLI that started it and does not
            # get the terminal's Ctrl-C.
            process = subprocess.Popen(
                command, cwd=node.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children[process.pid] = process
        node.pid_file.write_text(f"{process.pid}\n")
        log.info("Started Kafka node %d (pid %d), log: %s", node.node_id, process.pid, node.log_file)

    def _wait_until_up(self, nodes: list[Node], all_ids: set[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for node in nodes:
            while not _answers_metadata(node, all_ids):
                if self._running_pid(node) is None:
                    raise KafkaLaunchError(
                        f"Kafka node {node.node_id} exited during start-up: "
                        f"{_last_error(node)} (log: {node.log_file})"
                    )
                if time.monotonic() > deadline:
                    raise KafkaLaunchError(
                        f"Kafka node {node.node_id} did not answer on {node.address} within "
                        f"{timeout_s:.0f} s (log: {node.log_file})"
                    )
                time.sleep(0.1)

    def _wait_for_exit(self, node: Node, deadline: float) -> bool:
        while self._running_pid(node) is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _running_pid(self, node: Node) -> int | None:
        try:
            pid = int(node.pid_file.read_text())
        except (OSError, ValueError):
            return None
        child = self._children.get(pid)
        if child is not None:
            return pid if child.poll() is None else None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, but not ours to signal: the command line below decides
        # The pid may belong to another process by now (or to a zombie, whose command line
        # is empty): only a JVM started with this node's config file counts.
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.parent.is_dir():
            try:
                if str(node.config_file).encode() not in cmdline.read_bytes():
                    return None
            except OSError:
                return None
        return pid


def _server_properties(node: Node, nodes: list[Node], extra: ExtraListener | None = None) -> str:
    # Internal topics (consumer offsets, transaction and share-group state) default to
    # replication factor 3; on fewer brokers they must be told, or groups and transactions
    # fail in ways that look like client bugs.
    internal_rf = min(3, len(nodes))
    internal_min_isr = 2 if internal_rf >= 3 else 1
    properties = {
        "process.roles": "broker,controller",
        "node.id": node.node_id,
        # A static quorum: the voters are fixed by the layout, and ports may change between starts.
        "controller.quorum.voters": ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in nodes),
        "listeners": f"PLAINTEXT://{HOST}:{node.port},CONTROLLER://{HOST}:{node.controller_port}"
        + (f",{extra.name}://{HOST}:{extra.port}" if extra else ""),
        "advertised.listeners": f"PLAINTEXT://{HOST}:{node.port}"
        + (f",{extra.name}://{HOST}:{extra.advertised_port}" if extra else ""),
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        + (f",{extra.name}:PLAINTEXT" if extra else ""),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": node.data_dir,
        "offsets.topic.replication.factor": internal_rf,
        "transaction.state.log.replication.factor": internal_rf,
        "transaction.state.log.min.isr": internal_min_isr,
        "share.coordinator.state.topic.replication.factor": internal_rf,
        "share.coordinator.state.topic.min.isr": internal_min_isr,
        "group.initial.rebalance.delay.ms": 0,
        # A restarted node is refused (DUPLICATE_BROKER_REGISTRATION) until its previous
        # session expires, and a killed node keeps its leaderships until then: 9 s by default,
        # 4 s here, so restarts and fault tests on the local cluster are quick.
        "broker.heartbeat.interval.ms": 1000,
        "broker.session.timeout.ms": 4000,
        # Topics come from `rtcbus topics create`: a typo in a topic name must fail, as it
        # does on a production cluster, not create a topic nobody reads.
        "auto.create.topics.enable": "false",
    }
    lines = [f"{key}={value}" for key, value in properties.items()]
    return "# Written by rtcbus on every start; edits are overwritten.\n" + "\n".join(lines) + "\n"


def _logging_options(node: Node) -> list[str]:
    return [f"-Dkafka.logs.dir={node.log_dir}", f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}"]


def _new_cluster_id() -> str:
    # Kafka's Uuid.randomUuid().toString(): 16 random bytes, URL-safe base64 without padding,
    # never starting with '-' (it would read as an option on a command line).
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR, as the broker uses it: connections in TIME_WAIT from a previous run
        # do not make a port taken, a listening socket does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise KafkaLaunchError(
                f"port {port} on {HOST} is taken ({exc.strerror}): stop what uses it, or choose "
                "another first port with --port or RTCBUS_LOCAL_PORT"
            ) from exc


def _answers_metadata(node: Node, all_ids: set[int]) -> bool:
    # A plain connect first: it is cheap and quiet while the port is still closed.
    try:
        socket.create_connection((HOST, node.port), timeout=1).close()
    except OSError:
        return False
    # log_level 0: a peer that is still starting must not fill the terminal with
    # librdkafka's connection errors.
    admin = AdminClient({"bootstrap.servers": node.address, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=2)
    except KafkaException:
        return False
    return all_ids <= set(metadata.brokers)


def _last_error(node: Node) -> str:
    """The last line that looks like an error in the node's JVM output or log."""
    for path in (node.log_dir / "kafka.out", node.log_file):
        try:
            lines = path.read_text(errors="replace").splitlines()[-300:]
        except OSError:
            continue
        for line in reversed(lines):
            if "ERROR" in line or "Exception" in line or line.startswith("Error"):
                return line.strip()[:300]
    return "no error in its log"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it exited on its own in the meantime
