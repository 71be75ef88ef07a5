"""The router's Prometheus metrics, on a registry of its own.

Every label set is bounded: EventType labels take only the contract's EventTypes and
``unknown`` (see :meth:`consumer.router.transform.Transform.label`), error labels are
exception class names, partitions are the raw topic's.
"""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge


class RouterMetrics:
    """What the router counts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records_in = Counter(
            "rtcbus_router_records_in", "Raw records consumed", ["event_type"], registry=registry
        )
        self.records_out = Counter(
            "rtcbus_router_records_out",
            "Domain records produced",
            ["event_type", "domain"],
            registry=registry,
        )
        self.duplicates = Counter(
            "rtcbus_router_duplicates_dropped", "Callbacks dropped as duplicates", registry=registry
        )
        self.dead_letters = Counter(
            "rtcbus_router_dead_letters", "Records sent to the DLQ", ["error"], registry=registry
        )
        self.dead_letters_truncated = Counter(
            "rtcbus_router_dead_letters_truncated",
            "DLQ records whose value or headers were cut to fit the topic",
            registry=registry,
        )
        self.commits = Counter(
            "rtcbus_router_transactions_committed", "Transactions committed", registry=registry
        )
        self.aborts = Counter(
            "rtcbus_router_transactions_aborted", "Transactions aborted", registry=registry
        )
        self.producer_replacements = Counter(
            "rtcbus_router_producer_replacements",
            "Transactional producers replaced after a call stuck, timed out or was fenced",
            registry=registry,
        )
        self.resyncs = Counter(
            "rtcbus_router_resyncs",
            "Offsets and dedupe window re-read from Kafka after a commit of unknown outcome",
            registry=registry,
        )
        self.lag = Gauge(
            "rtcbus_router_consumer_lag", "Records behind the raw topic's end", ["partition"],
            registry=registry,
        )
        # Per-record counts are kept here and added to the counters once per batch: each
        # ``labels(...).inc()`` takes two locks, a measurable share of the loop per record.
        self._counts: collections.Counter[tuple[Counter, tuple[str, ...]]] = collections.Counter()

    def count(self, counter: Counter, *labels: str) -> None:
        """``counter.labels(*labels).inc()``, at the next :meth:`flush`."""
        self._counts[(counter, labels)] += 1

    def flush(self) -> None:
        for (counter, labels), n in self._counts.items():
            (counter.labels(*labels) if labels else counter).inc(n)
        self._counts.clear()
