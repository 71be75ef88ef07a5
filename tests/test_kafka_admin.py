import uuid

import pytest
from confluent_kafka.admin import AdminClient

from consumer.errors import ConfigError
from consumer.kafka.admin import TopicSpec, create_topics, describe_topics, ensure_topics, topic_names, topic_specs
from consumer.kafka.config import admin_config
from consumer.settings import load_settings

DAY_MS = 24 * 3600 * 1000


def test_topics_are_raw_every_domain_unknown_dlq_quarantine_and_dedupe():
    names = topic_names(load_settings(topic_prefix="x"))

    assert names[0] == "x.callbacks.raw"
    assert {"x.events.room", "x.events.recording", "x.events.whiteboard", "x.events.unknown"} <= set(names)
    assert names[-3:] == ["x.callbacks.dlq", "x.callbacks.quarantine", "x.router.dedupe"]
    assert len(names) == len(set(names)) == 16


def test_one_partition_count_and_retention_from_settings():
    settings = load_settings(partitions=4, raw_retention_ms=1000, events_retention_ms=2000, dlq_retention_ms=3000)

    specs = {spec.name: spec for spec in topic_specs(settings, broker_count=1)}
    quarantine = specs.pop("rtc.callbacks.quarantine")

    assert {spec.partitions for spec in specs.values()} == {4}
    assert quarantine.partitions == 1
    assert specs["rtc.callbacks.raw"].config["retention.ms"] == "1000"
    assert specs["rtc.events.room"].config["retention.ms"] == "2000"
    assert specs["rtc.events.unknown"].config["retention.ms"] == "2000"
    assert specs["rtc.callbacks.dlq"].config["retention.ms"] == "3000"


def test_dedupe_changelog_expires_by_age_and_outlives_the_window():
    short = {s.name: s for s in topic_specs(load_settings(dedupe_window_s=60, signature_skew_s=30), 1)}["rtc.router.dedupe"]
    long = {s.name: s for s in topic_specs(load_settings(dedupe_window_s=2 * 86400), 1)}["rtc.router.dedupe"]

    assert short.config == {"cleanup.policy": "delete", "retention.ms": str(DAY_MS)}
    assert long.config["retention.ms"] == str(4 * DAY_MS)


def test_quarantine_is_bounded_by_age_and_by_size():
    settings = load_settings(quarantine_retention_ms=2 * DAY_MS, quarantine_retention_bytes=64 * 1024 * 1024)

    quarantine = {s.name: s for s in topic_specs(settings, 1)}[settings.quarantine_topic]

    assert quarantine.config["retention.ms"] == str(2 * DAY_MS)
    assert quarantine.config["retention.bytes"] == str(64 * 1024 * 1024)
    assert quarantine.config["segment.bytes"] == str(4 * 1024 * 1024)  # deleted a segment at a time
    assert quarantine.config["max.message.bytes"] == str(settings.max_record_bytes)
    assert "retention.bytes" not in {s.name: s for s in topic_specs(settings, 1)}[settings.raw_topic].config


@pytest.mark.parametrize(
    ("brokers", "setting", "replication", "min_insync"),
    [(1, None, 1, None), (2, None, 1, None), (3, None, 3, "2"), (5, None, 3, "2"), (3, 2, 2, None), (1, 1, 1, None)],
)
def test_replication_follows_the_cluster_unless_set(brokers, setting, replication, min_insync):
    specs = topic_specs(load_settings(replication_factor=setting), broker_count=brokers)

    assert {spec.replication_factor for spec in specs} == {replication}
    assert {spec.config.get("min.insync.replicas") for spec in specs} == {min_insync}


@pytest.mark.kafka
def test_topics_create_is_idempotent_and_list_shows_what_was_created(kafka):
    settings = kafka.settings(topic_prefix=f"test{uuid.uuid4().hex[:8]}", partitions=2)
    brokers = len(AdminClient(admin_config(settings)).list_topics(timeout=10).brokers)
    expected_replication = 3 if brokers >= 3 else 1

    assert ensure_topics(settings) == sorted(topic_names(settings))
    assert ensure_topics(settings) == []

    topics = describe_topics(settings, [*topic_names(settings), f"{settings.topic_prefix}.missing"])
    assert topics.pop(f"{settings.topic_prefix}.missing") is None
    for name, info in topics.items():
        partitions = 1 if name == settings.quarantine_topic else 2
        assert (info.partitions, info.replication_factor) == (partitions, expected_replication), name
    assert topics[settings.raw_topic].config["retention.ms"] == str(settings.raw_retention_ms)
    assert topics[settings.dedupe_topic].config["cleanup.policy"] == "delete"
    assert topics[settings.quarantine_topic].config["retention.bytes"] == str(settings.quarantine_retention_bytes)


@pytest.mark.kafka
def test_an_existing_topic_with_another_partition_count_is_an_error(kafka):
    settings = kafka.settings(topic_prefix=f"test{uuid.uuid4().hex[:8]}", partitions=2)
    create_topics(settings, [TopicSpec(settings.raw_topic, 3, 1)])

    with pytest.raises(ConfigError, match=rf"{settings.raw_topic} has 3, not 2"):
        ensure_topics(settings)


@pytest.mark.kafka
def test_any_topic_can_be_created_with_its_own_config(kafka, unique_name):
    settings = kafka.settings()
    name = unique_name("topic")

    assert create_topics(settings, [TopicSpec(name, 5, 1, {"cleanup.policy": "compact"})]) == [name]
    assert create_topics(settings, [TopicSpec(name, 5, 1, {"cleanup.policy": "compact"})]) == []

    info = describe_topics(settings, [name])[name]
    assert (info.partitions, info.config["cleanup.policy"]) == (5, "compact")
