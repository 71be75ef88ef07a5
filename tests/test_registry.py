"""The local Schema Registry (Apicurio) and the Confluent wire format end to end on it:
shim → raw → router → domain topics, read back with confluent-kafka's own deserializer."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from consumer.examples import load_examples
from consumer.registry import LocalRegistry, url_of
from consumer.routing import RoutingTable
from consumer.settings import load_settings
from kafka_helpers import free_ports
from support import RTCBUS, Stack, assert_carries, callback, read_topic


def test_the_session_registry_speaks_the_confluent_api(schema_registry):
    client = SchemaRegistryClient({"url": schema_registry.url, "timeout": 10})
    assert isinstance(client.get_subjects(), list)  # shared: other tests' subjects may be there


def test_registry_start_status_stop_from_the_cli(tmp_path):
    # A home of its own for the pid and log files, sharing the usual distribution cache.
    cache = load_settings().home / "registry" / "dist"
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "dist").symlink_to(cache, target_is_directory=True)
    port = free_ports(1)
    env = {**os.environ, "RTCBUS_HOME": str(tmp_path), "RTCBUS_REGISTRY_PORT": str(port)}

    def rtcbus(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([RTCBUS, "registry", *args], env=env, capture_output=True, text=True, timeout=120)

    try:
        assert "not running" in rtcbus("status").stdout
        started = rtcbus("start")
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == url_of(port)
        assert httpx.get(f"{url_of(port)}/subjects", timeout=5).json() == []
        status = rtcbus("status").stdout
        assert "running (pid" in status and url_of(port) in status
        assert rtcbus("start").stdout.strip() == url_of(port)  # already up: the same one
    finally:
        stopped = rtcbus("stop")
    assert stopped.returncode == 0 and "Stopped" in stopped.stdout
    assert "not running" in rtcbus("stop").stdout
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2)


def test_a_port_taken_is_refused_by_name(schema_registry, tmp_path):
    # The session's registry holds a port on loopback (a remote SCHEMA_REGISTRY_URL: any free
    # port, taken here).
    url = httpx.URL(schema_registry.url)
    holder = None
    if url.host == "127.0.0.1" and url.port:
        port = url.port
    else:
        import socket

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
    registry = LocalRegistry(load_settings(registry_port=port), run_dir=tmp_path)
    with pytest.raises(Exception, match=f"port {port} on 127.0.0.1 is taken"):
        registry.start()
    if holder is not None:
        holder.close()


@pytest.mark.kafka
def test_every_example_routed_in_the_confluent_wire_format_decodes_from_the_registry(kafka, schema_registry, tmp_path):
    stack = Stack(
        kafka.bootstrap_servers, tmp_path,
        wire_format="confluent", schema_registry_url=schema_registry.url,
    )
    try:
        stack.start_shim()
        stack.start_router()
        sent = {}
        for example in load_examples():
            event_id = uuid.uuid4().hex
            body = callback(example.event_type, example.event_data, stack.secret, event_id=event_id, version=example.version)
            assert stack.post(body) == 200
            sent[event_id] = example
        stack.wait_caught_up()
    finally:
        stack.stop_all()

    # confluent-kafka's deserializer, with nothing of rtcbus's: the schema comes from the registry.
    client = SchemaRegistryClient({"url": schema_registry.url, "timeout": 10})
    deserializer = AvroDeserializer(client)
    table = RoutingTable(topic_prefix=stack.prefix)
    decoded = {}
    for topic in table.topics():
        for message in read_topic(stack.bootstrap, topic):
            assert message.value()[:1] == b"\x00"
            record = deserializer(message.value(), SerializationContext(topic, MessageField.VALUE))
            decoded[record["EventId"]] = (topic, record)
    assert sorted(decoded) == sorted(sent)
    for event_id, (topic, record) in decoded.items():
        example = sent[event_id]
        assert topic == table.route(example.event_type).topic
        assert record["EventType"] == example.event_type
        assert_carries(record["EventData"], example.event_data, "EventData", record["ExtraFields"])
    # TopicRecordNameStrategy: a subject per topic and record type, on this stack's topics.
    ours = {s for s in client.get_subjects() if s.startswith(f"{stack.prefix}.")}
    assert ours == {f"{table.route(e.event_type).topic}-rtcbus.{e.event_type}" for e in sent.values()}


def test_up_with_the_registry_hands_the_children_the_confluent_format_and_its_url():
    from consumer.stack import _child_env

    url = url_of(8081)
    env = _child_env(load_settings(wire_format="confluent", schema_registry_url=url))
    assert env["RTCBUS_WIRE_FORMAT"] == "confluent" and env["RTCBUS_SCHEMA_REGISTRY_URL"] == url
    plain = _child_env(load_settings())
    assert plain["RTCBUS_WIRE_FORMAT"] == "single-object" and "RTCBUS_SCHEMA_REGISTRY_URL" not in plain
