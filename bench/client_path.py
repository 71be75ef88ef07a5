"""The Kafka client's share of the router's CPU per event, call by call, on a real broker.

Run alone: .venv/bin/python -m bench.client_path [--events 30000] [--bootstrap HOST:PORT]

``bench.floor`` times the router's pure step without a broker; a drain (``bench.router``)
costs about twice as much per event. This section times the rest: the calls the router
makes into confluent-kafka for every record, with the router's own client settings
(``consumer_config``, ``producer_config``) and its own output (:class:`TransactionalOutput`),
over the workload filled into a fresh raw topic.

- ``consume``: ``Consumer.consume(1000)`` until every raw record is in hand, per record.
- ``produce with the router's headers``: each routed record through ``TransactionalOutput``,
  key and the three ``rtcbus.*`` headers included, in transactions of 1,000.
- ``produce without headers``: the same values and keys, no headers: what the headers cost.
- ``transaction, per record``: begin, the dedupe markers, offsets and commit of each
  transaction of 1,000, divided by its records; and its wall time, which the router's loop
  spends waiting (the commit is synchronous), CPU or not.

Beside them, ``back_to_back``: transactions of 100 records begun the moment the last one
committed, as a drain's loop does, through ``TransactionalOutput`` with the router's
``retry.backoff.ms`` (10) and with librdkafka's (100), alternately; the wall time of each
commit point. The coordinator refuses a transaction begun while it still writes the last
one's markers (``CONCURRENT_TRANSACTIONS``), and the back-off is how long the retry waits.

Two clocks per step. *Caller thread* (``time.thread_time``) is the work that holds the GIL
on the router's one thread, which is what bounds a single process's events/s. *Process*
(``time.process_time``) adds librdkafka's own threads, which run beside it on another core;
it is what the drain's CPU per event counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from pydantic import SecretStr

from bench.router import PARTITIONS, fill
from bench.workload import RawRecord, raw_records
from consumer.kafka.admin import ensure_topics
from consumer.kafka.config import consumer_config
from consumer.router import Routed, Transform
from consumer.router.dedupe import marker_records
from consumer.router.output import TransactionalOutput
from consumer.settings import load_settings

TRANSACTION = 1000  # records per transaction, as the router's commit_max_records
STEPS = ("consume", "produce with the router's headers", "produce without headers",
         "transaction, per record")


class _Clocks:
    """CPU seconds of a block on the caller's thread and on the whole process, added up."""

    def __init__(self) -> None:
        self.thread_s = self.process_s = self.wall_s = 0.0
        self._thread = self._process = self._wall = 0.0

    def __enter__(self) -> _Clocks:
        self._thread, self._process, self._wall = time.thread_time(), time.process_time(), time.monotonic()
        return self

    def __exit__(self, *_: object) -> None:
        self.thread_s += time.thread_time() - self._thread
        self.process_s += time.process_time() - self._process
        self.wall_s += time.monotonic() - self._wall


def run(bootstrap: str, events: int = 30000, records: Sequence[RawRecord] | None = None,
        back_to_back_rounds: int = 3) -> dict:
    """µs per event of each step (both clocks), over ``events`` raw records; then
    ``back_to_back_rounds`` rounds of transactions begun back to back."""
    name = uuid.uuid4().hex[:8]
    settings = load_settings(
        bootstrap_servers=bootstrap, topic_prefix=f"client{name}", partitions=PARTITIONS,
        group_id=f"bench-client-{name}", metrics_port=0,
    )
    ensure_topics(settings)
    records = list(records or raw_records(events))
    fill(settings, records)
    consumer = Consumer(consumer_config(settings, settings.group_id))
    clocks = {step: _Clocks() for step in STEPS}
    try:
        consumer.subscribe([settings.raw_topic])
        messages = _consume_all(consumer, len(records), clocks["consume"])
        transform = Transform.from_settings(settings)
        routed = [outcome for outcome in (transform.apply(m, lambda *_: False) for m in messages)
                  if type(outcome) is Routed]
        offsets = [TopicPartition(settings.raw_topic, p, 0) for p in range(PARTITIONS)]
        for step, with_headers in (("produce with the router's headers", True),
                                   ("produce without headers", False)):
            _produce_all(settings, consumer, routed, offsets, with_headers, clocks[step],
                         clocks["transaction, per record"] if with_headers else _Clocks())
        back_to_back = _back_to_back(settings, consumer, routed, offsets, rounds=back_to_back_rounds)
    finally:
        consumer.close()
    per = {"consume": len(messages), "transaction, per record": len(routed)}
    return {
        "events": len(records),
        "routed": len(routed),
        "caller_thread_us_per_event": {
            step: c.thread_s / per.get(step, len(routed)) * 1e6 for step, c in clocks.items()},
        "process_us_per_event": {
            step: c.process_s / per.get(step, len(routed)) * 1e6 for step, c in clocks.items()},
        # The router's loop waits for each commit: wall time per record, CPU or not.
        "transaction_wall_us_per_event": clocks["transaction, per record"].wall_s / len(routed) * 1e6,
        "back_to_back": back_to_back,
    }


BACK_TO_BACK = {"router's retry.backoff.ms=10": None, "librdkafka's retry.backoff.ms=100": "100"}


def _back_to_back(settings, consumer: Consumer, routed: Sequence[Routed], offsets: list[TopicPartition],
                  rounds: int = 3, transactions: int = 10, size: int = 100) -> dict:
    """Commit-point wall ms (begin, ``size`` records, markers, offsets, commit) of transactions
    begun back to back, per back-off, interleaved round by round: median and slowest."""
    walls: dict[str, list[float]] = {arm: [] for arm in BACK_TO_BACK}
    chunk = routed[:size]
    for _ in range(rounds):
        for arm, backoff in BACK_TO_BACK.items():
            config = {"retry.backoff.ms": SecretStr(backoff)} if backoff else {}
            arm_settings = settings.model_copy(update={"kafka_config": {**settings.kafka_config, **config}})
            output = TransactionalOutput(
                arm_settings, f"{settings.group_id}-b2b-{uuid.uuid4().hex[:6]}",
                dedupe_topic=settings.dedupe_topic, replace_when_fenced=False, stopping=lambda: False,
            )
            output.start()
            try:
                for _ in range(transactions):
                    began = time.monotonic()
                    output.begin()
                    for r in chunk:
                        output.produce(r.topic, r.value, key=r.key, headers=r.headers)
                    markers = {0: [(r.event_id, 1_700_000_000_000) for r in chunk]}
                    if output.commit(offsets, consumer, marker_records(markers)).value != "committed":
                        raise RuntimeError("a back-to-back bench transaction did not commit")
                    walls[arm].append((time.monotonic() - began) * 1000)
            finally:
                output.close()
    return {arm: {"transactions": len(ms), "median_ms": statistics.median(ms), "max_ms": max(ms)}
            for arm, ms in walls.items()}


def _consume_all(consumer: Consumer, count: int, clocks: _Clocks) -> list[Message]:
    messages: list[Message] = []
    deadline = time.monotonic() + 120
    while len(messages) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumed {len(messages)} of {count} raw records in 120 s")
        with clocks:
            batch = consumer.consume(1000, timeout=0.1)
        for message in batch:
            error = message.error()
            if error is None:
                messages.append(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(error.str())
    return messages


def _produce_all(settings, consumer: Consumer, routed: Sequence[Routed], offsets: list[TopicPartition],
                 with_headers: bool, produce_clocks: _Clocks, commit_clocks: _Clocks) -> None:
    """``routed`` through the router's transactional output, ``TRANSACTION`` per transaction."""
    output = TransactionalOutput(
        settings, f"{settings.group_id}-{'headers' if with_headers else 'bare'}",
        dedupe_topic=settings.dedupe_topic, replace_when_fenced=False, stopping=lambda: False,
    )
    output.start()
    try:
        for start in range(0, len(routed), TRANSACTION):
            chunk = routed[start:start + TRANSACTION]
            with commit_clocks:
                output.begin()
            produce: Callable = output.produce
            with produce_clocks:
                if with_headers:
                    for r in chunk:
                        produce(r.topic, r.value, key=r.key, headers=r.headers)
                else:
                    for r in chunk:
                        produce(r.topic, r.value, key=r.key)
            markers = {0: [(r.event_id, 1_700_000_000_000) for r in chunk]}
            with commit_clocks:
                result = output.commit(offsets, consumer, marker_records(markers))
            if result.value != "committed":
                raise RuntimeError(f"a bench transaction ended {result.value}")
    finally:
        output.close()


def table(results: dict) -> str:
    """The steps as a Markdown table."""
    lines = ["| Kafka client step, router's settings, real broker | caller thread µs/event "
             "| process µs/event (librdkafka's threads included) |", "|---|---:|---:|"]
    for step in STEPS:
        lines.append(f"| {step} | {results['caller_thread_us_per_event'][step]:.1f} "
                     f"| {results['process_us_per_event'][step]:.1f} |")
    lines.append(f"\nThe loop waits for each commit: {results['transaction_wall_us_per_event']:.1f} µs "
                 f"of wall time per record (transactions of {TRANSACTION}).")
    if "back_to_back" in results:
        lines += ["", "| transactions of 100 begun back to back | commit point, median ms | slowest ms | transactions |",
                  "|---|---:|---:|---:|"]
        for arm, figures in results["back_to_back"].items():
            lines.append(f"| {arm} | {figures['median_ms']:.1f} | {figures['max_ms']:.1f} | {figures['transactions']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=30000)
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    args = parser.parse_args()
    from bench.broker import bench_kafka

    with bench_kafka(args.bootstrap) as kafka:
        results = run(kafka.bootstrap_servers, args.events)
    print(json.dumps(results, indent=2))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
