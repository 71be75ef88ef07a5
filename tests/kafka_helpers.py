"""Small helpers for tests that talk to a real broker: produce and read back, free ports."""

from __future__ import annotations

import random
import socket
import time

from confluent_kafka import Consumer, Producer


def produce(config: dict[str, str], topic: str, records: list[tuple[bytes, bytes]], timeout_s: float = 60) -> None:
    """Produce ``(key, value)`` records and wait until the broker acknowledged every one.

    Raises:
        AssertionError: a record failed, or not all were acknowledged within ``timeout_s``.
    """
    failures: list[str] = []
    acknowledged = 0

    def on_delivery(error, message) -> None:
        nonlocal acknowledged
        if error is not None:
            failures.append(f"{message.key()!r}: {error}")
        else:
            acknowledged += 1

    producer = Producer(config)
    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        producer.poll(0)
    remaining = producer.flush(timeout_s)
    assert not failures, f"delivery failed: {failures}"
    assert remaining == 0 and acknowledged == len(records), (
        f"{acknowledged} of {len(records)} records acknowledged within {timeout_s} s"
    )


def consume(config: dict[str, str], topic: str, count: int, timeout_s: float = 60) -> list[tuple[bytes, bytes]]:
    """Read ``count`` records of ``topic`` as ``(key, value)``, then a short while more.

    The extra read catches records that should not be there (duplicates, aborted writes).

    Raises:
        AssertionError: fewer than ``count`` records arrived within ``timeout_s``.
    """
    consumer = Consumer(config)
    consumer.subscribe([topic])
    records: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            _take(consumer, records, 0.5)
        assert len(records) >= count, f"{len(records)} of {count} records read from {topic} within {timeout_s} s"
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            _take(consumer, records, 0.2)
    finally:
        consumer.close()
    return records


def _take(consumer: Consumer, records: list[tuple[bytes, bytes]], timeout_s: float) -> None:
    message = consumer.poll(timeout_s)
    if message is None:
        return
    assert message.error() is None, f"consumer error: {message.error()}"
    records.append((message.key(), message.value()))


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1.

    Chosen below the kernel's ephemeral range (32768 and up on Linux), where client
    connections would otherwise take them while a broker is being started.
    """
    for _ in range(200):
        first = random.randrange(15000, 32000 - count)
        if all(_is_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
