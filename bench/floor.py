"""Where a router's CPU goes per event, step by step, on one core and without a broker.

Run alone: .venv/bin/python -m bench.floor [--events 5000] [--rounds 5]

The throughput targets against the textbook loop and Quix Streams are ratios of events/s.
This section says what bounds them: each step the router must take for every callback
(parse the JSON, validate into the typed model, encode Avro) timed on its own over the
workload's mixed batch, next to the router's whole per-record work (``Router._route``, its
producer only queueing locally) and the textbook's (``json.loads``, the pydantic model,
``AvroSerializer``). CPU time (``time.process_time``), the best of ``rounds``: the floor
of each step, not what a busy machine makes of it.

If the steps every contender shares already cost more than a third of what the textbook
spends per event in its drain, no single Python process can route three times as fast.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

from bench.workload import RawRecord, domain_record, raw_records
from consumer.codec import SingleObjectCodec
from consumer.envelope import parse_envelope
from consumer.events import Source, models
from consumer.schemas import contract

# A port nothing listens on: the router's producer queues locally and sends nothing.
_NOWHERE = "127.0.0.1:9"
SHARED = "shared floor: json.loads, pydantic validate and dump, Avro encode"
ROUTE = "rtcbus Router._route, all of it"
TEXTBOOK = "textbook per record, without Kafka"


def cpu_us(work: Callable[[], None], events: int, rounds: int) -> float:
    """CPU µs per event of ``work`` (which handles ``events`` events), the best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best / events * 1e6


def run(events: int = 5000, rounds: int = 5, records: Sequence[RawRecord] | None = None) -> dict:
    records = list(records or raw_records(events))
    event_models, codec = models(), SingleObjectCodec(contract())
    source = Source("bench.callbacks.raw", 0, 0)
    bodies = [r.body for r in records]
    envelopes = [parse_envelope(body) for body in bodies]
    typed = [event_models.to_record(e, source) for e in envelopes]

    def each(function: Callable, items: Sequence) -> Callable[[], None]:
        def work() -> None:
            for item in items:  # results dropped: kept, they would add collector work
                function(item)
        return work

    steps = {
        "json.loads (body and EventData)": each(
            lambda body: json.loads(json.loads(body)["EventData"]), bodies),
        "envelope (parse, checks, EventData)": each(
            lambda body: parse_envelope(body).event_data(), bodies),
        "validate (pydantic model)": each(lambda e: event_models.validate(e, source), envelopes),
        "record (validate, dump, extras)": each(
            lambda e: event_models.to_record(e, source), envelopes),
        "Avro encode": each(lambda t: codec.encode(t[0], t[1]), typed),
    }
    steps[SHARED] = each(lambda body: _shared(body, event_models, codec), bodies)
    figures = {name: cpu_us(work, len(records), rounds) for name, work in steps.items()}
    figures[ROUTE] = _route_cpu_us(records, rounds)
    figures[TEXTBOOK] = _textbook_cpu_us(records, rounds)
    return {"events": len(records), "rounds": rounds, "cpu_us_per_event": figures}



def _shared(body: bytes, event_models, codec: SingleObjectCodec) -> bytes:
    """What any contender doing this job does per callback, the cheapest way this suite
    knows: the textbook's parse and model, then the project's Avro encoder."""
    envelope = json.loads(body)
    return codec.encode(envelope["EventType"], domain_record(envelope, event_models))


def _route_cpu_us(records: Sequence[RawRecord], rounds: int) -> float:
    from confluent_kafka import Message

    from consumer.router import Router
    from consumer.settings import load_settings

    settings = load_settings(
        bootstrap_servers=_NOWHERE, topic_prefix="floor", partitions=3, exactly_once=False,
        metrics_port=0, kafka_config={"reconnect.backoff.ms": "60000",
                                      "reconnect.backoff.max.ms": "60000"},
    )
    router = Router(settings)
    messages = [
        Message(topic=settings.raw_topic, partition=n % 3, offset=n // 3, key=r.key, value=r.body,
                timestamp=(1, 1_700_000_000_000 + n))
        for n, r in enumerate(records)
    ]

    def work() -> None:
        # A fresh start each round: an empty window, nothing queued, nothing processed.
        router._dedupe.abort()
        router._markers, router._processed = {}, {}
        router._owned, router._in_transaction = {0, 1, 2}, True
        router._producer.purge()
        for message in messages:
            router._route(message)
        router.metrics.flush()

    try:
        return cpu_us(work, len(messages), rounds)
    finally:
        # Its clients would go on trying to reach nowhere for the rest of the suite.
        router._producer.purge()
        router._consumer.close()
        router._restorer.close()


def _textbook_cpu_us(records: Sequence[RawRecord], rounds: int) -> float:
    from confluent_kafka.schema_registry import (
        SchemaRegistryClient,
        topic_record_subject_name_strategy,
    )
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    registry = SchemaRegistryClient.new_client({"url": "mock://bench-floor"})
    conf = {"subject.name.strategy": topic_record_subject_name_strategy}
    serializers = {name: AvroSerializer(registry, schema.schema_json, conf=conf)
                   for name, schema in contract().items()}
    event_models, context = models(), SerializationContext("floor", MessageField.VALUE)

    def work() -> None:
        for record in records:
            envelope = json.loads(record.body)
            serializers[envelope["EventType"]](domain_record(envelope, event_models), context)

    return cpu_us(work, len(records), rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.events, args.rounds), indent=2))


if __name__ == "__main__":
    main()
