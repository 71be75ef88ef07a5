"""Where a router's CPU goes per event, step by step, on one core and without a broker.

Run alone: .venv/bin/python -m bench.floor [--events 5000] [--rounds 5]

The throughput targets against the textbook loop and Quix Streams are ratios of events/s.
This section says what bounds them: each step the router must take for every callback
(parse the JSON, validate into the typed model, encode Avro) timed on its own over the
workload's mixed batch, next to the router's whole pure per-record step (``Transform.apply`` and
the dedupe window; producing is the output's, and is not timed here) and the textbook's (``json.loads``, the pydantic model,
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

_NOWHERE = "127.0.0.1:9"  # a port nothing listens on; nothing dials it
SHARED = "shared floor: json.loads, pydantic validate and dump, Avro encode"
ROUTE = "rtcbus Transform.apply and the window, all of the pure step"
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

    from consumer.router import Routed, Transform
    from consumer.router.dedupe import DedupeWindow
    from consumer.settings import load_settings

    # The bootstrap address is never dialled: the transform holds no Kafka client.
    settings = load_settings(bootstrap_servers=_NOWHERE, topic_prefix="floor", partitions=3)
    transform = Transform.from_settings(settings)
    messages = [
        Message(topic=settings.raw_topic, partition=n % 3, offset=n // 3, key=r.key, value=r.body,
                timestamp=(2, 1_700_000_000_000 + n))
        for n, r in enumerate(records)
    ]

    def work() -> None:
        # A fresh window each round: the first sighting of every EventId, as in the drain.
        window = DedupeWindow(15 * 60 * 1000)
        for message in messages:
            outcome = transform.apply(message, window.seen)
            if type(outcome) is Routed:
                window.add(message.partition(), outcome.event_id, message.timestamp()[1])

    return cpu_us(work, len(messages), rounds)


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
