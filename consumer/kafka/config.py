"""librdkafka configurations built from the settings.

rtcbus's guarantees rest on a few client properties (``acks=all``, idempotence,
``read_committed``, manual commits); they are set here and nowhere else. The user's
pass-through properties (security, tuning: ``settings.kafka_config``) are merged in; the
settings already reject unknown keys and keys rtcbus owns.
"""

from __future__ import annotations

from consumer.settings import Settings


def bootstrap_servers(settings: Settings) -> str:
    """``settings.bootstrap_servers``, else the address of the local Kafka (``rtcbus kafka start``)."""
    if settings.bootstrap_servers:
        return settings.bootstrap_servers
    from consumer.kafka.launcher import LocalKafka  # the launcher is only needed without a cluster

    return LocalKafka(settings).bootstrap_servers


def admin_config(settings: Settings) -> dict[str, str]:
    """Configuration of an ``AdminClient``."""
    return {**settings.kafka_client_config(), "bootstrap.servers": bootstrap_servers(settings)}


def producer_config(settings: Settings, transactional_id: str | None = None) -> dict[str, str]:
    """Configuration of a ``Producer`` whose acknowledged records survive a broker loss.

    Args:
        transactional_id: makes the producer transactional; must be stable per producing
            instance, so that a restarted instance fences its previous incarnation.
    """
    config = {
        # Room for the largest body the shim accepts (the user's setting wins if given).
        "message.max.bytes": str(settings.max_record_bytes),
        **settings.kafka_client_config(),
        "bootstrap.servers": bootstrap_servers(settings),
        "acks": "all",
        "enable.idempotence": "true",
        # Java's partitioner: a key lands where Java clients and Kafka Streams expect it, and
        # the shim and the router (both librdkafka) agree, so a room keeps one partition
        # number from the raw topic to every domain topic.
        "partitioner": "murmur2_random",
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
    return config


def consumer_config(
    settings: Settings, group_id: str, *, auto_offset_reset: str = "earliest"
) -> dict[str, str]:
    """Configuration of a ``Consumer`` in ``group_id`` that sees committed records only.

    Offsets are never committed automatically: the caller commits them, or sends them with
    its transaction. Partitions are assigned incrementally (``cooperative-sticky``), so an
    ``on_assign`` callback must use ``incremental_assign``, not ``assign``.

    Args:
        auto_offset_reset: where a group without a committed offset starts.
    """
    return {
        **settings.kafka_client_config(),
        "bootstrap.servers": bootstrap_servers(settings),
        "group.id": group_id,
        "isolation.level": "read_committed",
        "enable.auto.commit": "false",
        "auto.offset.reset": auto_offset_reset,
        "partition.assignment.strategy": "cooperative-sticky",
    }
