"""Fixtures: one real Kafka for the whole session, and unique topic and group names per test.

The ``kafka`` fixture provides a broker, the first of:

1. ``KAFKA_BOOTSTRAP_SERVERS``: an existing cluster;
2. testcontainers with the official ``apache/kafka`` image, when a Docker daemon answers;
3. the local launcher (``consumer.kafka.launcher``): the real broker from Maven Central, its data
   in a temporary directory, its jars in the usual cache (``~/.rtcbus`` or ``RTCBUS_HOME``).

A broker that cannot be provisioned fails every test that needs one; it never skips them.
How the broker was provisioned is reported at the end of the run.

The ``schema_registry`` fixture provides a Schema Registry the same way: ``SCHEMA_REGISTRY_URL``,
else the local Apicurio (``consumer.registry``); it fails, never skips, when there is none.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from consumer.kafka.admin import TopicSpec, create_topics
from consumer.kafka.launcher import LocalKafka, provision
from consumer.settings import Settings, load_settings
from kafka_helpers import free_ports
from support import Stack

KAFKA_REPORT = pytest.StashKey[str]()
REGISTRY_REPORT = pytest.StashKey[str]()


@dataclass(frozen=True)
class KafkaBroker:
    """The session's broker."""

    bootstrap_servers: str
    source: str
    """How it was provisioned: ``KAFKA_BOOTSTRAP_SERVERS``, ``testcontainers`` or ``local launcher``."""

    def settings(self, **overrides: object) -> Settings:
        """Settings pointing at this broker; ``overrides`` as CLI flags would give them."""
        return load_settings(bootstrap_servers=self.bootstrap_servers, **overrides)


@pytest.fixture(scope="session")
def kafka(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A real Kafka broker for the session (see the module docstring for where it comes from)."""
    started = time.monotonic()
    try:
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            broker = KafkaBroker(os.environ["KAFKA_BOOTSTRAP_SERVERS"], "KAFKA_BOOTSTRAP_SERVERS")
            _wait_for_metadata(broker.bootstrap_servers, 30)
            stop: Callable[[], object] = lambda: None
        elif _docker_answers():
            broker, stop = _start_container()
        else:
            broker, stop = _start_local(tmp_path_factory.mktemp("kafka"))
    except Exception as exc:  # any reason at all: the run must fail, saying why
        pytest.fail(f"no Kafka broker for the integration tests: {exc}", pytrace=False)
    request.config.stash[KAFKA_REPORT] = (
        f"Kafka for the tests: {broker.source} at {broker.bootstrap_servers}, "
        f"ready in {time.monotonic() - started:.1f} s"
    )
    yield broker
    stop()


@dataclass(frozen=True)
class SchemaRegistry:
    """The session's Schema Registry (Confluent API)."""

    url: str
    """What a ``SchemaRegistryClient`` is given, e.g. ``http://127.0.0.1:<port>/apis/ccompat/v7``."""
    source: str


@pytest.fixture(scope="session")
def schema_registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaRegistry]:
    """A real Schema Registry for the session: ``SCHEMA_REGISTRY_URL`` if set, else the local
    Apicurio (``consumer.registry``) on a free port, its jars in the usual cache. Shared by every
    test: name subjects with a topic prefix of the test's own, never assert the whole list."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from consumer.registry import LocalRegistry

    started = time.monotonic()
    stop: Callable[[], object] = lambda: None
    try:
        if os.environ.get("SCHEMA_REGISTRY_URL"):
            registry = SchemaRegistry(os.environ["SCHEMA_REGISTRY_URL"], "SCHEMA_REGISTRY_URL")
        else:
            settings = load_settings(registry_port=free_ports(1))
            local = LocalRegistry(settings, run_dir=tmp_path_factory.mktemp("registry"))
            try:
                url = local.start()
            except Exception:
                local.stop()  # one that started but was not ready must not outlive the run
                raise
            registry = SchemaRegistry(url, f"local Apicurio Registry {settings.registry_version}")
            stop = local.stop
        SchemaRegistryClient({"url": registry.url, "timeout": 10}).get_subjects()
    except Exception as exc:  # any reason at all: the run must fail, saying why
        stop()
        pytest.fail(f"no Schema Registry for the tests: {exc}", pytrace=False)
    request.config.stash[REGISTRY_REPORT] = (
        f"Schema Registry for the tests: {registry.source} at {registry.url}, "
        f"ready in {time.monotonic() - started:.1f} s"
    )
    yield registry
    stop()


@pytest.fixture(scope="session")
def kafka_dist() -> Path:
    """A Kafka distribution (``libs/*.jar``) for tests that run their own brokers with the launcher."""
    try:
        return provision(load_settings())
    except Exception as exc:
        pytest.fail(f"cannot provision Kafka for the launcher tests: {exc}", pytrace=False)


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name("topic")`` → a name no other test (or run) uses, legal for topics and groups."""
    test = re.sub(r"[^a-zA-Z0-9._-]", "-", request.node.name)[:80]
    return lambda kind: f"test.{kind}.{test}.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_topic(kafka: KafkaBroker, unique_name: Callable[[str], str]) -> Callable[..., str]:
    """``make_topic(partitions=1, replication_factor=1, config=None)`` creates a topic unique to
    this test on the session's broker and returns its name, once every partition has a leader."""

    def make(partitions: int = 1, replication_factor: int = 1, config: Mapping[str, str] | None = None) -> str:
        name = unique_name("topic")
        create_topics(kafka.settings(), [TopicSpec(name, partitions, replication_factor, config or {})])
        return name

    return make


@pytest.fixture
def make_group_id(unique_name: Callable[[str], str]) -> Callable[[], str]:
    """``make_group_id()`` → a consumer group id unique to this test."""
    return lambda: unique_name("group")


@pytest.fixture
def stack(kafka: KafkaBroker, tmp_path: Path) -> Iterator[Stack]:
    """A shim and routers on unique topics of the session's broker (3 partitions); every
    process it started is stopped at the end."""
    stack = Stack(kafka.bootstrap_servers, tmp_path)
    yield stack
    stack.stop_all()


# -- the session's summaries, also from pytest-xdist workers ----------------------------------
# `make test` runs two xdist workers (the fault suite on one, the rest beside it), and a
# worker's own terminal summary is never shown. So every summary is a section, collected at the
# end of the session: written by the process that ran it, or by the controller from what its
# workers sent back (``workeroutput``). CI reads two of them: "Kafka for the tests:" and
# "fault suite:".
SECTIONS = pytest.StashKey[list[tuple[str, list[str]]]]()
# Plugins, registered by name at run time, that have ``summary() -> (title, lines) | None``.
SUMMARY_PLUGINS = ("rtcbus-fault-report", "rtcbus-fuzz-report")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault suite first: it is the longest file, so under xdist (``--dist loadfile
    --no-loadscope-reorder``) it starts at once on one worker while the other runs the rest."""
    items.sort(key=lambda item: item.get_closest_marker("faults") is None)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    sections = config.stash.setdefault(SECTIONS, [])
    report = config.stash.get(KAFKA_REPORT, None)
    if report is not None:
        sections.append(("kafka", [report]))
    registry_report = config.stash.get(REGISTRY_REPORT, None)
    if registry_report is not None:
        sections.append(("schema registry", [registry_report]))
    for name in SUMMARY_PLUGINS:
        plugin = config.pluginmanager.get_plugin(name)
        section = plugin.summary() if plugin is not None else None
        if section is not None:
            sections.append(section)
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints them
        workeroutput["rtcbus_sections"] = [[title, lines] for title, lines in sections]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist's controller: keep what a worker sent back for the terminal summary."""
    sections = node.config.stash.setdefault(SECTIONS, [])
    for title, lines in getattr(node, "workeroutput", {}).get("rtcbus_sections", []):
        sections.append((title, list(lines)))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    for title, lines in config.stash.get(SECTIONS, []):
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)


# -- provisioning ----------------------------------------------------------------------------


def _start_local(cluster_dir: Path) -> tuple[KafkaBroker, Callable[[], object]]:
    # The default home holds the jar cache, so CI and developers fetch Kafka once; the
    # cluster itself (data, logs) lives in the session's temporary directory.
    local = LocalKafka(load_settings(local_port=free_ports(2), brokers=1), cluster_dir=cluster_dir)
    try:
        bootstrap = local.start()
    except Exception:
        local.stop()  # a node that started but did not answer must not outlive the run
        raise
    return KafkaBroker(bootstrap, f"local launcher (Kafka {local.kafka_version}, {cluster_dir})"), local.stop


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


def _start_container() -> tuple[KafkaBroker, Callable[[], object]]:
    # testcontainers' KafkaContainer drives Confluent's cp-kafka image with that image's
    # scripts; the official apache/kafka image is configured by KAFKA_* variables instead,
    # so it runs as a plain container here. Clients reach it on a host port fixed before
    # start, because the broker must advertise the address clients use.
    from testcontainers.core.container import DockerContainer

    version = load_settings().kafka_version
    port = free_ports(1)
    container = DockerContainer(f"apache/kafka:{version}").with_bind_ports(9092, port)
    host = container.get_docker_client().host()
    for key, value in {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{host}:{port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }.items():
        container.with_env(key, value)
    container.start()
    bootstrap = f"{host}:{port}"
    try:
        _wait_for_metadata(bootstrap, 120)
    except Exception:
        container.stop()
        raise
    return KafkaBroker(bootstrap, f"testcontainers (apache/kafka:{version})"), container.stop


def _wait_for_metadata(bootstrap: str, timeout_s: float) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=5)
            return
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f} s: {exc}") from exc
        time.sleep(0.5)
