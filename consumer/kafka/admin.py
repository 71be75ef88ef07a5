"""Topic administration: the topics rtcbus needs, created idempotently, and any other topic.

rtcbus's topics are the raw topic, one topic per domain (``unknown`` included), the DLQ,
the shim's quarantine and the router's dedupe changelog. All but the quarantine get
``settings.partitions`` partitions: a record keeps its key from raw to every domain topic,
and only equal partition counts put that key in the same partition number everywhere
(co-partitioning). The quarantine is never routed; it has one partition (see
:data:`QUARANTINE_PARTITIONS`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient, AlterConfigOpType, ClusterMetadata, ConfigEntry, ConfigResource, ConfigSource,
    NewTopic, ResourceType,
)

from consumer.errors import ConfigError, RtcbusError
from consumer.kafka.config import admin_config
from consumer.routing import RoutingTable
from consumer.settings import Settings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
# The router's dedupe window runs on the raw records' timestamps: the broker's append time,
# which no shim's clock can skew (a shim's CreateTime an hour fast would expire EventIds early).
RAW_TOPIC_CLOCK = {"message.timestamp.type": "LogAppendTime"}
# How long the first metadata request may take: librdkafka reports an unreachable cluster
# only when the request times out, and a person waiting for that should not wait long.
CONNECT_TIMEOUT_S = 10.0
# The quarantine takes at most a few bodies a second (the shim caps it), so one partition
# carries it; one partition also makes retention.bytes the bound of the whole topic, and a
# redrive forwards the bodies in the order they arrived.
QUARANTINE_PARTITIONS = 1


@dataclass(frozen=True)
class TopicSpec:
    """A topic as it should be created."""

    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicInfo:
    """A topic as it exists."""

    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str]
    """The topic's own settings (those not inherited from the broker's defaults)."""


def topic_names(settings: Settings) -> list[str]:
    """rtcbus's topics: raw, every domain topic (``unknown`` included), DLQ, quarantine,
    dedupe changelog."""
    return [
        settings.raw_topic,
        *RoutingTable.from_settings(settings).topics(),
        settings.dlq_topic,
        settings.quarantine_topic,
        settings.dedupe_topic,
    ]


def topic_specs(settings: Settings, broker_count: int) -> list[TopicSpec]:
    """How rtcbus's topics are created on a cluster of ``broker_count`` brokers.

    Replication is ``settings.replication_factor``, else 3 on three or more brokers and 1
    below; from 3 on, ``min.insync.replicas=2``, so an ``acks=all`` write survives the loss
    of any one broker.
    """
    replication = settings.replication_factor or (3 if broker_count >= 3 else 1)
    durability = {"min.insync.replicas": "2"} if replication >= 3 else {}
    # Dedupe entries only matter while duplicates can still arrive; a day covers
    # redeliveries and router restarts with room to spare.
    dedupe_retention_ms = max(DAY_MS, int(2 * settings.dedupe_window_s * 1000))
    retention_ms = {
        settings.raw_topic: settings.raw_retention_ms,
        **{topic: settings.events_retention_ms for topic in RoutingTable.from_settings(settings).topics()},
        settings.dlq_topic: settings.dlq_retention_ms,
        settings.quarantine_topic: settings.quarantine_retention_ms,
        settings.dedupe_topic: dedupe_retention_ms,
    }
    specs = []
    for name in topic_names(settings):
        config = {**durability, "retention.ms": str(retention_ms[name])}
        if name == settings.dedupe_topic:
            # Changelogs are usually compacted; this one must forget old EventIds by age.
            config["cleanup.policy"] = "delete"
        else:
            # The broker's default (1 MiB + 12 bytes) is below a full-size body with headers.
            config["max.message.bytes"] = str(settings.max_record_bytes)
        if name == settings.raw_topic:
            config.update(RAW_TOPIC_CLOCK)
        partitions = settings.partitions
        if name == settings.quarantine_topic:
            # Bounded by size too: whoever can reach the shim can fill it with bad signatures.
            # Retention deletes whole closed segments only, so segments are a fraction of
            # the bound (the default 1 GiB segment would let it grow to 1 GiB first).
            config["retention.bytes"] = str(settings.quarantine_retention_bytes)
            config["segment.bytes"] = str(max(1024 * 1024, settings.quarantine_retention_bytes // 16))
            partitions = QUARANTINE_PARTITIONS
        specs.append(TopicSpec(name, partitions, replication, config))
    return specs


def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create those of rtcbus's topics that do not exist yet (see :func:`topic_specs`).

    Returns:
        The names of the topics created; existing topics are left as they are.

    Raises:
        ConfigError: a topic exists with a partition count other than ``settings.partitions``.
        RtcbusError: Kafka did not answer, or refused to create a topic.
    """
    admin = _admin_client(settings)
    metadata = _metadata(admin, settings, min(timeout_s, CONNECT_TIMEOUT_S))
    created = _create(admin, settings, topic_specs(settings, len(metadata.brokers)), metadata, timeout_s)
    if settings.raw_topic in metadata.topics:
        _set_config(admin, settings.raw_topic, RAW_TOPIC_CLOCK, timeout_s)
    return created


def _set_config(admin: AdminClient, topic: str, config: Mapping[str, str], timeout_s: float) -> None:
    """Set ``config`` on an existing ``topic`` (a raw topic from before it had to be so)."""
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
            for name, value in config.items()
        ],
    )
    for future in admin.incremental_alter_configs([resource], request_timeout=timeout_s).values():
        try:
            future.result()
        except KafkaException as exc:
            raise RtcbusError(f"cannot configure topic {topic}: {exc.args[0].str()}") from exc


def create_topics(settings: Settings, specs: Iterable[TopicSpec], *, timeout_s: float = 30.0) -> list[str]:
    """Create the topics of ``specs`` that do not exist yet; wait until each partition has a leader.

    Returns:
        The names of the topics created.

    Raises:
        ConfigError: a topic exists with another partition count.
        RtcbusError: Kafka did not answer, or refused to create a topic.
    """
    admin = _admin_client(settings)
    metadata = _metadata(admin, settings, min(timeout_s, CONNECT_TIMEOUT_S))
    return _create(admin, settings, list(specs), metadata, timeout_s)


def describe_topics(settings: Settings, names: Iterable[str], *, timeout_s: float = 30.0) -> dict[str, TopicInfo | None]:
    """Partitions, replication and own settings of each topic in ``names``; None for a missing topic.

    Raises:
        RtcbusError: Kafka did not answer.
    """
    admin = _admin_client(settings)
    metadata = _metadata(admin, settings, min(timeout_s, CONNECT_TIMEOUT_S))
    names = list(names)
    present = [name for name in names if name in metadata.topics]
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in present]
    configs = admin.describe_configs(resources, request_timeout=timeout_s) if resources else {}
    own = {}
    for resource, future in configs.items():
        try:
            entries = future.result()
        except KafkaException as exc:
            raise RtcbusError(f"cannot describe topic {resource.name}: {exc.args[0].str()}") from exc
        own[resource.name] = {
            name: entry.value
            for name, entry in sorted(entries.items())
            if ConfigSource(entry.source) is ConfigSource.DYNAMIC_TOPIC_CONFIG
        }
    result: dict[str, TopicInfo | None] = {}
    for name in names:
        topic = metadata.topics.get(name)
        if topic is None:
            result[name] = None
            continue
        partitions = topic.partitions.values()
        replication = max((len(partition.replicas) for partition in partitions), default=0)
        result[name] = TopicInfo(name, len(topic.partitions), replication, own.get(name, {}))
    return result


def _admin_client(settings: Settings) -> AdminClient:
    # librdkafka's log lines (e.g. every failed connect) go to this module's logger instead
    # of stderr; failures reach the caller as exceptions.
    return AdminClient({**admin_config(settings), "logger": log})


def _metadata(admin: AdminClient, settings: Settings, timeout_s: float) -> ClusterMetadata:
    try:
        return admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise RtcbusError(
            f"Kafka at {admin_config(settings)['bootstrap.servers']} did not answer within "
            f"{timeout_s:.0f} s ({exc.args[0].str()}); is it running (`rtcbus kafka start`), "
            "or is RTCBUS_BOOTSTRAP_SERVERS right?"
        ) from exc


def _create(
    admin: AdminClient, settings: Settings, specs: list[TopicSpec], metadata: ClusterMetadata, timeout_s: float
) -> list[str]:
    existing = metadata.topics
    mismatched = [
        f"{spec.name} has {len(existing[spec.name].partitions)}, not {spec.partitions}"
        for spec in specs
        if spec.name in existing and len(existing[spec.name].partitions) != spec.partitions
    ]
    if mismatched:
        raise ConfigError(
            "topics exist with another partition count (keys keep their partition only "
            f"when all topics have the same count): {'; '.join(mismatched)}"
        )
    new = [spec for spec in specs if spec.name not in existing]
    if not new:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication_factor, config=dict(s.config)) for s in new],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:  # else created concurrently: fine
                raise RtcbusError(f"cannot create topic {name}: {error.str()}") from exc
    _wait_for_leaders(admin, settings, [spec.name for spec in new], time.monotonic() + timeout_s)
    return sorted(created)


def _wait_for_leaders(admin: AdminClient, settings: Settings, names: list[str], deadline: float) -> None:
    # create_topics returns when the controller has the topic; producers and consumers need
    # every partition to have a leader on the brokers, which follows shortly after.
    while True:
        topics = _metadata(admin, settings, max(1.0, deadline - time.monotonic())).topics
        pending = [
            name for name in names
            if name not in topics
            or topics[name].error is not None
            or any(partition.leader < 0 for partition in topics[name].partitions.values())
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RtcbusError(f"topics without a leader after creation: {', '.join(pending)}")
        time.sleep(0.1)
