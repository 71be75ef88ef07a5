"""The loop most teams would write: json.loads, pydantic, SerializingProducer, commit per batch.

Per message: parse the envelope and its EventData with ``json.loads``, validate with the
project's pydantic model of the EventType, produce the model's dict through a
``SerializingProducer`` whose value serializer is confluent-kafka's ``AvroSerializer`` (one
per record type, on the in-memory ``mock://`` registry, subject per topic and record). After
each consumed batch: flush, then a synchronous consumer commit (at-least-once).
"""

from __future__ import annotations

import json
import threading

from confluent_kafka import Consumer, KafkaError, KafkaException, SerializingProducer

from bench.workload import domain_record
from consumer.events import models
from consumer.kafka.config import consumer_config, producer_config
from consumer.routing import RoutingTable
from consumer.schemas import contract
from consumer.settings import Settings


def run(settings: Settings, stop: threading.Event) -> None:
    from confluent_kafka.schema_registry import (
        SchemaRegistryClient,
        topic_record_subject_name_strategy,
    )
    from confluent_kafka.schema_registry.avro import AvroSerializer

    registry = SchemaRegistryClient.new_client({"url": "mock://bench-textbook"})
    conf = {"subject.name.strategy": topic_record_subject_name_strategy}
    serializers = {
        name: AvroSerializer(registry, schema.schema_json, conf=conf)
        for name, schema in contract().items()
    }
    producer = SerializingProducer(
        {
            **producer_config(settings),
            "value.serializer": lambda record, ctx: serializers[record["EventType"]](record, ctx),
        }
    )
    consumer = Consumer(consumer_config(settings, settings.group_id))
    consumer.subscribe([settings.raw_topic])
    routing, event_models = RoutingTable.from_settings(settings), models()
    try:
        while not stop.is_set():
            messages = consumer.consume(min(settings.commit_max_records, 1000), timeout=0.1)
            if not messages:
                continue
            for message in messages:
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(message.error())
                envelope = json.loads(message.value())
                event_type = envelope["EventType"]
                record = domain_record(envelope, event_models)
                producer.produce(routing.route(event_type).topic, key=message.key(), value=record)
                producer.poll(0)
            producer.flush()
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
