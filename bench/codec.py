"""Codec rate on one core: encode and decode events/s for the workload's mixed batch.

Run alone: .venv/bin/python -m bench.codec [--seconds 3] [--rounds 5]

Side by side, in one run, on the same records (``bench.workload``, all 38 EventTypes):
the project's single-object codec (fastavro, schemas parsed once), the ``avro`` package
(the Apache reference implementation, schemas parsed once), and confluent-kafka's
``AvroSerializer``/``AvroDeserializer`` on the in-memory ``mock://`` registry; also fastavro
with the schema parsed per message (what parse-once saves) and the step before encoding
(envelope parse, pydantic validation, record dict), for scale.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import fastavro

from bench.workload import raw_records
from consumer.codec import ConfluentCodec, SingleObjectCodec
from consumer.envelope import parse_envelope
from consumer.events import models
from consumer.schemas import contract


def rate(work, batch, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for item in batch:
            work(item)
        done += len(batch)
    return done / (time.perf_counter() - start)


def interleaved(contenders: dict, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Each contender runs a slice per round, in turn, so noise hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (work, batch) in contenders.items():
            rates[name].append(rate(work, batch, seconds / rounds))
    return rates


def avro_package_codec():
    """Encode and decode with the ``avro`` package, schemas parsed once."""
    import avro.io
    import avro.schema

    schemas = {name: avro.schema.parse(s.schema_json) for name, s in contract().items()}
    writers = {name: avro.io.DatumWriter(schema) for name, schema in schemas.items()}
    readers = {name: avro.io.DatumReader(schema) for name, schema in schemas.items()}

    def encode(item) -> bytes:
        name, record = item
        buffer = io.BytesIO()
        writers[name].write(record, avro.io.BinaryEncoder(buffer))
        return buffer.getvalue()

    def decode(item) -> dict:
        name, data = item
        return readers[name].read(avro.io.BinaryDecoder(io.BytesIO(data)))

    return encode, decode


def run(seconds: float, rounds: int, events: int = 2000) -> dict:
    """Events/s of every contender (medians of the rounds) and the ratio to the project's codec."""
    bodies = [record.body for record in raw_records(events, prefix="codec")]
    batch = [models().to_record(parse_envelope(body)) for body in bodies]
    single = SingleObjectCodec(contract())
    confluent = ConfluentCodec(contract(), "mock://bench")
    avro_encode, avro_decode = avro_package_codec()
    encoded_single = [single.encode(name, record) for name, record in batch]
    # The avro package wants a record exactly as the schema says (no unknown keys, datetimes
    # for timestamp-millis): what a decoder returns.
    avro_batch = [(name, single.decode(data)) for (name, _), data in zip(batch, encoded_single)]
    encoded_confluent = [confluent.encode(name, record, "bench") for name, record in batch]
    encoded_avro = [(name, avro_encode((name, record))) for name, record in avro_batch]

    def reparse_encode(item):
        name, record = item
        schema = fastavro.parse_schema(dict(contract()[name].schema))
        fastavro.schemaless_writer(io.BytesIO(), schema, record)

    rates = interleaved(
        {
            "rtcbus codec encode": (lambda i: single.encode(*i), batch),
            "rtcbus codec decode": (single.decode, encoded_single),
            "avro package encode": (avro_encode, avro_batch),
            "avro package decode": (avro_decode, encoded_avro),
            "confluent AvroSerializer encode": (
                lambda i: confluent.encode(i[0], i[1], "bench"), batch
            ),
            "confluent AvroDeserializer decode": (
                lambda b: confluent.decode(b, "bench"), encoded_confluent
            ),
            "fastavro, schema parsed per message, encode": (reparse_encode, batch),
            "envelope + model (parse, validate, to_record)": (
                lambda body: models().to_record(parse_envelope(body)), bodies
            ),
        },
        seconds,
        rounds,
    )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    rows = {}
    for name, value in medians.items():
        base = medians["rtcbus codec decode" if "decode" in name else "rtcbus codec encode"]
        rows[name] = {"events_per_s": value, "rounds": rates[name], "vs_rtcbus": value / base}
    return {"events": events, "seconds": seconds, "rounds": rounds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per contender, in all")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = run(args.seconds, args.rounds)
    print(f"{'codec':48} {'events/s':>12} {'vs rtcbus codec':>16}")
    for name, row in result["rows"].items():
        print(f"{name:48} {row['events_per_s']:12,.0f} {row['vs_rtcbus']:15.2f}x")


if __name__ == "__main__":
    main()
