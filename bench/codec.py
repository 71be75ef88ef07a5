"""Codec rate on one core: encode and decode events/s for a mixed batch of all 45 examples.

Run: .venv/bin/python -m bench.codec [--seconds 3] [--rounds 5]

Side by side, in one run: the project's single-object codec, the Schema Registry framing
(confluent-kafka's AvroSerializer on the in-memory mock registry), and fastavro with the
schema parsed per message (what parse-once saves).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import fastavro

from consumer.codec import ConfluentCodec, SingleObjectCodec
from consumer.envelope import parse_envelope
from consumer.events import models
from consumer.examples import load_examples
from consumer.schemas import contract


def raw_callbacks() -> list[bytes]:
    bodies = []
    for number, example in enumerate(load_examples()):
        body = {
            "EventType": example.event_type,
            "EventData": json.dumps(example.event_data),
            "EventTime": "2024-05-01T12:00:00+08:00",
            "EventId": f"bench-{number}",
            "AppId": "bench",
            "Version": example.version,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


def rate(work, batch, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for item in batch:
            work(item)
        done += len(batch)
    return done / (time.perf_counter() - start)


def interleaved(contenders: dict, seconds: float, rounds: int) -> dict[str, float]:
    """Each contender runs a slice per round, in turn, so noise hits all alike; the median
    of the rounds is reported."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (work, batch) in contenders.items():
            rates[name].append(rate(work, batch, seconds / rounds))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per contender, in all")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    seconds, rounds = args.seconds, args.rounds
    bodies = raw_callbacks()
    batch = [models().to_record(parse_envelope(body)) for body in bodies]
    single = SingleObjectCodec(contract())
    confluent = ConfluentCodec(contract(), "mock://bench")
    encoded_single = [single.encode(name, record) for name, record in batch]
    encoded_confluent = [confluent.encode(name, record, "bench") for name, record in batch]

    def reparse_encode(item):
        name, record = item
        schema = fastavro.parse_schema(dict(contract()[name].schema))
        fastavro.schemaless_writer(io.BytesIO(), schema, record)

    rows = interleaved(
        {
            "single-object encode": (lambda i: single.encode(*i), batch),
            "single-object decode": (single.decode, encoded_single),
            "registry framing encode": (lambda i: confluent.encode(i[0], i[1], "bench"), batch),
            "registry framing decode": (lambda b: confluent.decode(b, "bench"), encoded_confluent),
            "fastavro, schema parsed per message, encode": (reparse_encode, batch),
            "envelope + model (parse, validate, to_record)": (
                lambda body: models().to_record(parse_envelope(body)), bodies
            ),
        },
        seconds,
        rounds,
    )
    base = rows["single-object encode"]
    print(f"{'codec':48} {'events/s':>12} {'vs single-object encode':>24}")
    for name, value in rows.items():
        print(f"{name:48} {value:12,.0f} {value / base:23.2f}x")


if __name__ == "__main__":
    main()
