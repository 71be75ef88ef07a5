"""A Kafka for one benchmark run: the given cluster, or a local broker started and stopped here."""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchKafka:
    """The broker of a run: where it is, and its version when this run started it."""

    bootstrap_servers: str
    version: str | None


def _free_port_pair() -> int:
    """A port whose successor is free too (the local broker takes two)."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


@contextlib.contextmanager
def bench_kafka(bootstrap: str | None = None) -> Iterator[BenchKafka]:
    """Yield ``bootstrap`` if given, else a fresh local broker, stopped on the way out."""
    if bootstrap is not None:
        yield BenchKafka(bootstrap, None)
        return
    from consumer.kafka.launcher import LocalKafka, provision
    from consumer.settings import load_settings

    local = LocalKafka(
        load_settings(
            home=Path(tempfile.mkdtemp(prefix="rtcbus-bench-")),
            kafka_home=provision(load_settings()),
            local_port=_free_port_pair(),
        )
    )
    try:
        yield BenchKafka(local.start(), local.kafka_version)
    finally:
        local.stop()
