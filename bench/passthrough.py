"""The ceiling of the router comparison: consume → produce the same bytes, no parsing.

Transactional like the router: the consumed offsets go into each transaction, which commits
every ``commit_max_records`` records or ``commit_interval_ms``, whichever comes first, with
the router's batch size. One output record per input record, to one topic.
"""

from __future__ import annotations

import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from consumer.kafka.config import consumer_config, producer_config
from consumer.settings import Settings


def output_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}.passthrough.out"


def run(settings: Settings, stop: threading.Event) -> None:
    raw, out = settings.raw_topic, output_topic(settings)
    interval_s = settings.commit_interval_ms / 1000
    batch_size = min(settings.commit_max_records, 1000)
    consumer = Consumer(consumer_config(settings, settings.group_id))
    producer = Producer(producer_config(settings, transactional_id=f"{settings.group_id}-ceiling"))
    producer.init_transactions()
    consumer.subscribe([raw])
    processed: dict[int, int] = {}
    started: float | None = None  # when the open transaction began; None: none open
    records = 0

    def commit() -> None:
        offsets = [TopicPartition(raw, p, o) for p, o in processed.items()]
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata())
        producer.commit_transaction()

    try:
        while not stop.is_set():
            for message in consumer.consume(batch_size, timeout=min(interval_s, 0.1)):
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(message.error())
                if started is None:
                    producer.begin_transaction()
                    started, records = time.monotonic(), 0
                while True:
                    try:
                        producer.produce(out, message.value(), key=message.key())
                        break
                    except BufferError:
                        producer.poll(0.05)
                processed[message.partition()] = message.offset() + 1
                records += 1
            if started is not None and (
                records >= settings.commit_max_records
                or time.monotonic() - started >= interval_s
            ):
                commit()
                started = None
        if started is not None:
            commit()
    finally:
        consumer.close()
