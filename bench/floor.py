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

Beside them, the router's step before and after issue 14, step by step in the same run
(``pipelines``): before, the pydantic path (``parse_envelope``, ``EventModels.to_record``)
and fastavro alone; after, the lean path it now takes first (``RecordDecoder.envelope``,
``RecordDecoder.record``) and the compiled Avro writers; and the share of the workload the
lean path leaves to the pydantic one. The rows of one table
are measured round by round in turn, so a busy spell of the machine hits them alike.
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
from consumer.records import RecordDecoder
from consumer.schemas import contract

_NOWHERE = "127.0.0.1:9"  # a port nothing listens on; nothing dials it
SHARED = "shared floor: json.loads, pydantic validate and dump, Avro encode"
ROUTE = "rtcbus Transform.apply and the window, all of the pure step"
TEXTBOOK = "textbook per record, without Kafka"
# Before: the router's step as it was (pydantic, fastavro); after: the lean path first, and
# the compiled Avro writers.
PATHS = ("before", "after")
WHOLE = "Transform.apply and the window"


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
    routes = _route_works(records)
    figures[ROUTE] = cpu_us(routes["after"], len(records), rounds)
    collections = _collections(routes["after"])
    figures[TEXTBOOK] = _textbook_cpu_us(records, rounds)
    pipelines, fallback = _pipelines(records, bodies, routes, rounds)
    return {
        "events": len(records),
        "rounds": rounds,
        "cpu_us_per_event": figures,
        "pipelines": pipelines,
        "lean_fallback_share": fallback,
        # Garbage collections during one pass of the router's pure step over the records,
        # by generation: whether the collector is part of the per-record cost or its tail.
        "gc_collections": collections,
    }


def _collections(work: Callable[[], None]) -> dict[str, int]:
    """Collections Python's garbage collector ran during ``work``, by generation."""
    import gc

    counts = {"0": 0, "1": 0, "2": 0}

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            counts[str(info["generation"])] += 1

    gc.collect()
    gc.callbacks.append(count)
    try:
        work()
    finally:
        gc.callbacks.remove(count)
    return counts


def _pipelines(
    records: Sequence[RawRecord], bodies: Sequence[bytes], routes: dict, rounds: int
) -> tuple[dict[str, dict[str, float]], float]:
    """Each step of the pydantic path and of the lean path, CPU µs/event, side by side; and
    the share of ``records`` the lean path leaves to the pydantic path."""
    event_models, decoder = models(), RecordDecoder(contract())
    fastavro_alone, compiled = (
        SingleObjectCodec(contract(), compiled_writers=False), SingleObjectCodec(contract())
    )
    source = Source("bench.callbacks.raw", 0, 0)
    envelopes = [parse_envelope(body) for body in bodies]
    typed = [event_models.to_record(e, source) for e in envelopes]
    lean_envelopes = [decoder.envelope(body) for body in bodies]
    decided = [decoder.record(*e, source) if e is not None else None for e in lean_envelopes]
    lean_typed = [t for t in decided if t is not None]
    lean_ready = [e for e, t in zip(lean_envelopes, decided) if t is not None]

    def each(function: Callable, items: Sequence) -> Callable[[], None]:
        def work() -> None:
            for item in items:
                function(item)
        return work

    # The lean steps run over the records the lean path decides; a record it leaves costs
    # its envelope (and maybe record) step and then the whole pydantic path.
    steps = {
        ("envelope", "before"): each(parse_envelope, bodies),
        ("envelope", "after"): each(decoder.envelope, bodies),
        ("record (validate, dump, extras)", "before"): each(
            lambda e: event_models.to_record(e, source), envelopes),
        ("record (validate, dump, extras)", "after"): each(
            lambda e: decoder.record(*e, source), lean_ready),
        ("Avro encode", "before"): each(lambda t: fastavro_alone.encode(t[0], t[1]), typed),
        ("Avro encode", "after"): each(lambda t: compiled.encode(t[0], t[1]), lean_typed),
        (WHOLE, "before"): routes["before"],
        (WHOLE, "after"): routes["after"],
        # In the same rounds, for the target: the router's step against the textbook's.
        ("textbook", "before"): _textbook_work(records),
    }
    sizes = {
        ("record (validate, dump, extras)", "after"): len(lean_ready),
        ("Avro encode", "after"): len(lean_typed),
    }
    figures: dict[str, dict[str, float]] = {}
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, work in steps.items():
            started = time.process_time()
            work()
            best[name] = min(best[name], time.process_time() - started)
    for (step, path), seconds in best.items():
        figures.setdefault(step, {})[path] = seconds / max(sizes.get((step, path), len(records)), 1) * 1e6
    textbook = figures.pop("textbook")["before"]
    for paths in (figures[WHOLE],):
        paths["vs_textbook"] = {path: paths[path] / textbook for path in PATHS}
    figures[WHOLE]["textbook"] = textbook
    return figures, 1 - len(lean_typed) / len(records)



def _shared(body: bytes, event_models, codec: SingleObjectCodec) -> bytes:
    """What any contender doing this job does per callback, the cheapest way this suite
    knows: the textbook's parse and model, then the project's Avro encoder."""
    envelope = json.loads(body)
    return codec.encode(envelope["EventType"], domain_record(envelope, event_models))


def _route_works(records: Sequence[RawRecord]) -> dict[str, Callable[[], None]]:
    """The router's whole pure step over ``records``, with the window: by the lean path
    first (the router's), and by the pydantic path alone."""
    from confluent_kafka import Message

    from consumer.router import Routed, Transform
    from consumer.router.dedupe import DedupeWindow
    from consumer.routing import RoutingTable
    from consumer.settings import load_settings

    # The bootstrap address is never dialled: the transform holds no Kafka client.
    settings = load_settings(bootstrap_servers=_NOWHERE, topic_prefix="floor", partitions=3)
    messages = [
        Message(topic=settings.raw_topic, partition=n % 3, offset=n // 3, key=r.key, value=r.body,
                timestamp=(2, 1_700_000_000_000 + n))
        for n, r in enumerate(records)
    ]

    def route(transform: Transform) -> Callable[[], None]:
        def work() -> None:
            # A fresh window each round: the first sighting of every EventId, as in the drain.
            window = DedupeWindow(15 * 60 * 1000)
            for message in messages:
                outcome = transform.apply(message, window.seen)
                if type(outcome) is Routed:
                    window.add(message.partition(), outcome.event_id, message.timestamp()[1])
        return work

    before = Transform(
        models(), RoutingTable.from_settings(settings),
        SingleObjectCodec(contract(), compiled_writers=False), settings.max_record_bytes,
    )
    return {"before": route(before), "after": route(Transform.from_settings(settings))}


def _textbook_cpu_us(records: Sequence[RawRecord], rounds: int) -> float:
    return cpu_us(_textbook_work(records), len(records), rounds)


def _textbook_work(records: Sequence[RawRecord]) -> Callable[[], None]:
    """The textbook's per-record step over ``records``, without Kafka."""
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

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = run(args.events, args.rounds)
    print(json.dumps(results, indent=2))
    print()
    print(pipelines_table(results))


def pipelines_table(results: dict) -> str:
    """The two paths of ``results`` side by side, as a Markdown table."""
    lines = [
        "| router step, one core, no broker | before: pydantic, fastavro, CPU µs/event "
        "| after: lean path, compiled writers, CPU µs/event | after / before |",
        "|---|---:|---:|---:|",
    ]
    for step, paths in results["pipelines"].items():
        if step == WHOLE:
            continue
        lines.append(
            f"| {step} | {paths['before']:.1f} | {paths['after']:.1f} | {paths['after'] / paths['before']:.2f} |"
        )
    whole = results["pipelines"][WHOLE]
    lines.append(
        f"| {WHOLE} | {whole['before']:.1f} | {whole['after']:.1f} | {whole['after'] / whole['before']:.2f} |"
    )
    lines.append(
        f"| textbook per record, without Kafka, in the same rounds | {whole['textbook']:.1f} | "
        f"| router / textbook: before {whole['vs_textbook']['before']:.2f}, "
        f"after {whole['vs_textbook']['after']:.2f} (target ≤ 0.33) |"
    )
    lines.append(f"\nLeft to the pydantic path by the lean one: {results['lean_fallback_share']:.1%} of the workload.")
    if "gc_collections" in results:
        lines.append(f"Garbage collections in one pass of the pure step over {results['events']:,} events, "
                     f"by generation: {results['gc_collections']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
