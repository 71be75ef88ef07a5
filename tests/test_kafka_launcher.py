"""The local Kafka: restarts keep data, a 3-node cluster survives a broker, errors are one clear line.

These tests run their own brokers (not the session's), from the jars of the ``kafka_dist`` fixture.
"""

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from consumer.kafka.admin import TopicSpec, create_topics, describe_topics, ensure_topics
from consumer.kafka.config import admin_config, consumer_config, producer_config
from consumer.kafka.launcher import ExtraListener, LocalKafka, Node, _server_properties
from consumer.settings import load_settings
from kafka_helpers import consume, free_ports, produce

RTCBUS = str(Path(sys.executable).parent / "rtcbus")


def rtcbus(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([RTCBUS, *args], env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, f"rtcbus {' '.join(args)} failed:\n{result.stderr}"
    return result


def cli_environment(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    return {**env, "RTCBUS_HOME": str(home), "RTCBUS_LOCAL_PORT": str(port), **extra}


def running_pid(status_output: str) -> int:
    match = re.search(r"running \(pid (\d+)\)", status_output)
    assert match, f"not running:\n{status_output}"
    return int(match.group(1))


@pytest.mark.kafka
def test_a_broker_restarted_with_the_cli_still_has_its_records(kafka_dist, tmp_path, unique_name, make_group_id):
    env = cli_environment(tmp_path / "home", free_ports(2), KAFKA_HOME=str(kafka_dist))
    bootstrap = rtcbus("kafka", "start", env=env).stdout.strip()
    try:
        settings = load_settings(bootstrap_servers=bootstrap)
        topic = unique_name("topic")
        create_topics(settings, [TopicSpec(topic, 3, 1)])
        records = [(f"room-{i % 7}".encode(), f"event-{i}".encode()) for i in range(100)]
        produce(producer_config(settings), topic, records)
        pid_before = running_pid(rtcbus("kafka", "status", env=env).stdout)

        restart = subprocess.run(
            f"'{RTCBUS}' kafka stop && '{RTCBUS}' kafka start", shell=True, env=env,
            capture_output=True, text=True, timeout=180,
        )

        assert restart.returncode == 0, restart.stderr
        assert restart.stdout.strip().splitlines()[-1] == bootstrap
        assert running_pid(rtcbus("kafka", "status", env=env).stdout) != pid_before
        assert sorted(consume(consumer_config(settings, make_group_id()), topic, len(records))) == sorted(records)
    finally:
        rtcbus("kafka", "stop", env=env, check=False)
    assert "stopped" in rtcbus("kafka", "status", env=env).stdout


@pytest.mark.kafka
def test_three_brokers_keep_taking_acks_all_writes_when_one_stops(kafka_dist, tmp_path, make_group_id):
    settings = load_settings(
        kafka_home=kafka_dist, brokers=3, local_port=free_ports(6), topic_prefix=f"t{uuid.uuid4().hex[:8]}"
    )
    cluster = LocalKafka(settings, cluster_dir=tmp_path / "cluster")
    bootstrap = cluster.start(timeout_s=120)
    try:
        clients = load_settings(bootstrap_servers=bootstrap, topic_prefix=settings.topic_prefix, partitions=3)
        ensure_topics(clients)
        topic = clients.raw_topic
        # Metadata reaches the three brokers one by one: ask until the one answering knows it.
        deadline = time.monotonic() + 30
        while (info := describe_topics(clients, [topic])[topic]) is None:
            assert time.monotonic() < deadline, f"{topic} never appeared in the metadata"
            time.sleep(0.2)
        assert (info.replication_factor, info.config["min.insync.replicas"]) == (3, "2")
        before = [(f"k{i}".encode(), b"before") for i in range(30)]
        produce(producer_config(clients), topic, before)

        leader = AdminClient(admin_config(clients)).list_topics(topic, timeout=10).topics[topic].partitions[0].leader
        assert [node.node_id for node in cluster.stop([leader])] == [leader]
        assert [s.node.node_id for s in cluster.status() if s.pid is None] == [leader]

        after = [(f"k{i}".encode(), b"after") for i in range(30)]
        produce(producer_config(clients), topic, after)
        received = consume(consumer_config(clients, make_group_id()), topic, len(before) + len(after))
        assert sorted(received) == sorted(before + after)
    finally:
        cluster.stop()


@pytest.mark.kafka
def test_a_broker_that_exits_at_start_names_its_log(kafka_dist, tmp_path):
    settings = load_settings(kafka_home=kafka_dist, local_port=free_ports(2))
    cluster = LocalKafka(settings, cluster_dir=tmp_path / "cluster")
    cluster.start()
    cluster.stop()
    node = cluster.nodes[0]
    meta = node.data_dir / "meta.properties"
    meta.write_text(meta.read_text().replace("node.id=1", "node.id=7"))

    with pytest.raises(Exception, match=r"Kafka node 1 exited during start-up: .*node.id.*\(log: .*server\.log\)") as error:
        cluster.start()

    assert str(node.log_file) in str(error.value)
    assert cluster.status()[0].pid is None


def test_start_without_java_on_path_is_one_clear_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = cli_environment(tmp_path / "home", free_ports(2), PATH=str(empty))

    result = rtcbus("kafka", "start", env=env, check=False)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "rtcbus: error: Java is not on PATH: the local Kafka needs Java 17 or newer "
        "(or set RTCBUS_BOOTSTRAP_SERVERS to use an existing Kafka)"
    ]


def test_start_on_a_taken_port_is_one_clear_line(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        result = rtcbus("kafka", "start", env=cli_environment(tmp_path / "home", port), check=False)

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"rtcbus: error: port {port} on 127.0.0.1 is taken")
    assert "RTCBUS_LOCAL_PORT" in line


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_an_extra_listener_is_added_beside_the_plain_one_and_absent_by_default(tmp_path):
    node = Node(1, 19092, 19093, tmp_path)

    plain = _properties(_server_properties(node, [node]))
    proxied = _properties(_server_properties(node, [node], ExtraListener("PROXIED", 19100, 19200)))

    assert plain["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert plain["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert plain["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert proxied["listeners"] == plain["listeners"] + ",PROXIED://127.0.0.1:19100"
    assert proxied["advertised.listeners"] == plain["advertised.listeners"] + ",PROXIED://127.0.0.1:19200"
    assert proxied["listener.security.protocol.map"] == plain["listener.security.protocol.map"] + ",PROXIED:PLAINTEXT"
    assert proxied["inter.broker.listener.name"] == "PLAINTEXT"
    with pytest.raises(Exception, match="reserved"):
        LocalKafka(load_settings(), cluster_dir=tmp_path, extra_listeners={1: ExtraListener("CONTROLLER", 1, 2)})


@pytest.mark.kafka
def test_a_client_on_the_extra_listener_is_told_the_advertised_port(kafka_dist, tmp_path):
    first = free_ports(4)
    extra = ExtraListener("PROXIED", first + 2, first + 3)
    cluster = LocalKafka(
        load_settings(kafka_home=kafka_dist, local_port=first), cluster_dir=tmp_path / "cluster",
        extra_listeners={1: extra},
    )
    bootstrap = cluster.start()
    try:
        plain = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
        proxied = AdminClient({"bootstrap.servers": f"127.0.0.1:{extra.port}"}).list_topics(timeout=10)
        assert [(b.host, b.port) for b in plain.brokers.values()] == [("127.0.0.1", first)]
        assert [(b.host, b.port) for b in proxied.brokers.values()] == [("127.0.0.1", extra.advertised_port)]
    finally:
        cluster.stop()
