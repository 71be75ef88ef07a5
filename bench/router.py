"""Router throughput by commit interval: events/s draining a pre-filled raw topic, exactly once.

Run: .venv/bin/python -m bench.router [--events 20000] [--intervals 20,100,1000] [--rounds 2]

Each run fills a fresh raw topic (3 partitions) with the 45 examples of the events page, mixed,
each with its own EventId, then lets one in-process router drain it. The clock runs from the
first record the router processes to the commit of the last, so joining the group is not
counted. The intervals
are interleaved round by round; medians are reported, with the ratio to the default (100 ms).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from bench.broker import bench_kafka
from consumer.examples import load_examples
from consumer.kafka.admin import ensure_topics
from consumer.router import Router
from consumer.settings import Settings, load_settings
from consumer.routing import partition_key


def fill(settings: Settings, events: int) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "linger.ms": 20,
                         "partitioner": "murmur2_random"})
    for number, example in zip(range(events), itertools.cycle(load_examples())):
        event_id = f"bench-{number}"
        body = json.dumps({
            "EventType": example.event_type, "EventData": json.dumps(example.event_data),
            "EventTime": "2024-05-01T12:00:00+08:00", "EventId": event_id,
            "AppId": "bench", "Version": example.version,
        }).encode()
        key = partition_key(example.event_data, "bench", event_id).encode()
        while True:
            try:
                producer.produce(settings.raw_topic, body, key=key)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


def committed(consumer: Consumer, partitions: list[TopicPartition]) -> int:
    """Offsets the group committed, summed; 0 while its coordinator is still loading."""
    try:
        return sum(max(tp.offset, 0) for tp in consumer.committed(partitions, timeout=10))
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.NOT_COORDINATOR or exc.args[0].retriable():
            return 0
        raise


def records_in(router: Router) -> float:
    return sum(
        sample.value
        for metric in router.metrics.records_in.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def drain(settings: Settings, events: int) -> float:
    """Events/s of one router draining the raw topic."""
    partitions = [TopicPartition(settings.raw_topic, p) for p in range(settings.partitions)]
    watcher = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group_id})
    router, stop = Router(settings), threading.Event()
    thread = threading.Thread(target=router.run, args=(stop,))
    thread.start()
    try:
        while records_in(router) == 0:
            time.sleep(0.01)
        started = time.monotonic()
        while committed(watcher, partitions) < events:
            time.sleep(0.02)
        return events / (time.monotonic() - started)
    finally:
        stop.set()
        thread.join(60)
        watcher.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--intervals", default="20,100,1000", help="commit intervals in ms")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    args = parser.parse_args()
    intervals = [int(i) for i in args.intervals.split(",")]
    rates: dict[int, list[float]] = {i: [] for i in intervals}
    with bench_kafka(args.bootstrap) as bootstrap:
        for _ in range(args.rounds):
            for interval in intervals:
                name = uuid.uuid4().hex[:8]
                settings = load_settings(
                    bootstrap_servers=bootstrap, topic_prefix=f"bench{name}", partitions=3,
                    group_id=f"bench-{name}", commit_interval_ms=interval,
                    commit_max_records=100_000, metrics_port=0,
                )
                ensure_topics(settings)
                fill(settings, args.events)
                rates[interval].append(drain(settings, args.events))
    base = statistics.median(rates.get(100) or rates[intervals[0]])
    print(f"{'commit interval':>16} {'events/s':>10} {'vs 100 ms':>10}  (each round)")
    for interval, values in rates.items():
        median = statistics.median(values)
        each = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{interval:>13} ms {median:>10,.0f} {median / base:>9.2f}x  ({each})")


if __name__ == "__main__":
    main()
