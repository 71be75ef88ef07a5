import json

import pytest
from confluent_kafka import Producer

from consumer.kafka.config import admin_config, bootstrap_servers, consumer_config, producer_config
from consumer.settings import load_settings
from kafka_helpers import consume, produce


def test_bootstrap_servers_default_to_the_local_kafka(tmp_path):
    settings = load_settings(bootstrap_servers=None, home=tmp_path, local_port=19192, brokers=3)

    assert bootstrap_servers(settings) == "127.0.0.1:19192,127.0.0.1:19194,127.0.0.1:19196"


def test_producer_is_durable_and_carries_the_pass_through_properties(monkeypatch):
    monkeypatch.setenv("RTCBUS_KAFKA_CONFIG", json.dumps({"security.protocol": "SASL_SSL", "linger.ms": "5"}))
    settings = load_settings(bootstrap_servers="kafka:9092")

    config = producer_config(settings, transactional_id="router-0")

    assert config["bootstrap.servers"] == "kafka:9092"
    assert (config["acks"], config["enable.idempotence"]) == ("all", "true")
    assert config["transactional.id"] == "router-0"
    assert (config["security.protocol"], config["linger.ms"]) == ("SASL_SSL", "5")
    assert "transactional.id" not in producer_config(settings)
    assert admin_config(settings)["security.protocol"] == "SASL_SSL"


def test_consumer_reads_committed_and_commits_by_hand():
    config = consumer_config(load_settings(bootstrap_servers="kafka:9092"), "readers")

    assert config["group.id"] == "readers"
    assert config["isolation.level"] == "read_committed"
    assert config["enable.auto.commit"] == "false"
    assert config["partition.assignment.strategy"] == "cooperative-sticky"


@pytest.mark.kafka
def test_records_make_the_round_trip_through_the_broker(kafka, make_topic, make_group_id):
    settings = kafka.settings()
    topic = make_topic(partitions=3)
    records = [(f"room-{i % 5}".encode(), f"event-{i}".encode()) for i in range(50)]

    produce(producer_config(settings), topic, records)
    received = consume(consumer_config(settings, make_group_id()), topic, len(records))

    assert sorted(received) == sorted(records)
    # one key, one partition: the order of a room's events is kept
    for key in {key for key, _ in records}:
        assert [value for k, value in received if k == key] == [value for k, value in records if k == key]


@pytest.mark.kafka
def test_consumers_see_committed_transactions_only(kafka, make_topic, make_group_id, unique_name):
    settings = kafka.settings()
    topic = make_topic()
    producer = Producer(producer_config(settings, transactional_id=unique_name("txn")))
    producer.init_transactions(30)
    for outcome in ("abort", "commit"):
        producer.begin_transaction()
        producer.produce(topic, key=b"k", value=outcome.encode())
        producer.flush(30)
        if outcome == "abort":
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)

    assert consume(consumer_config(settings, make_group_id()), topic, 1) == [(b"k", b"commit")]
