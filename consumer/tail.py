"""``rtcbus tail``: read domain topics as a subscriber would, and print JSON lines.

Reads with ``isolation.level=read_committed`` (only what the router committed), decodes each
record with the project's codec and writes one JSON object per record.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException

from consumer.codec import codec_from_settings
from consumer.kafka.config import consumer_config
from consumer.routing import RoutingTable
from consumer.schemas import contract


def topics_for(settings: Any, domains: list[str]) -> list[str]:
    """The topics of ``domains`` (every domain, ``unknown`` included, when empty).

    Raises:
        KeyError: a domain that does not exist, with the known ones in the message.
    """
    table = RoutingTable.from_settings(settings)
    if not domains:
        return table.topics()
    unknown = [d for d in domains if d not in table.domains]
    if unknown:
        raise KeyError(f"unknown domain(s) {unknown}; known: {sorted(table.domains)}")
    return sorted({table.domains[d] for d in domains})


def read_records(
    settings: Any,
    topics: list[str],
    stop: threading.Event,
    idle_timeout_s: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded records of ``topics`` from the beginning, as dicts with their coordinates.

    Stops when ``stop`` is set, or after ``idle_timeout_s`` without a record.

    Raises:
        KafkaException: a Kafka error other than reaching a partition's end.
    """
    codec = codec_from_settings(settings, contract())
    consumer = Consumer(consumer_config(settings, f"rtcbus-tail-{uuid.uuid4().hex[:12]}"))
    consumer.subscribe(topics)
    last_record = time.monotonic()
    try:
        while not stop.is_set():
            message = consumer.poll(0.2)
            if message is None:
                if idle_timeout_s is not None and time.monotonic() - last_record > idle_timeout_s:
                    return
                continue
            error = message.error()
            if error is not None:
                if error.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise KafkaException(error)
            last_record = time.monotonic()
            yield {
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "key": message.key().decode() if message.key() else None,
                "record": codec.decode(message.value(), message.topic()),
            }
    finally:
        consumer.close()


def to_json_line(record: dict[str, Any]) -> str:
    """One record as a JSON line; timestamps as RFC 3339."""
    return json.dumps(record, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def tail(
    settings: Any,
    domains: list[str],
    write: Callable[[str], None],
    stop: threading.Event,
    idle_timeout_s: float | None = None,
    limit: int | None = None,
) -> int:
    """Print decoded records of ``domains`` as JSON lines; returns how many were printed."""
    count = 0
    for record in read_records(settings, topics_for(settings, domains), stop, idle_timeout_s):
        write(to_json_line(record))
        count += 1
        if limit is not None and count >= limit:
            break
    return count
