"""The router's loop: poll the raw topic, transform each record, produce, commit.

Read top to bottom, one batch at a time: consume a batch → for each record, the pure
:class:`~consumer.router.transform.Transform` gives a domain record, a duplicate or a dead
letter → the :class:`~consumer.router.output.Output` produces it → every
``commit_max_records`` records or ``commit_interval_ms``, whichever comes first, a commit
point makes the records, their dedupe markers and the consumed offsets final together.

What a commit point can end in:

- committed: the window keeps the transaction's EventIds;
- aborted: nothing reached Kafka; every owned partition is rewound to the offsets last
  committed and the transaction's EventIds are forgotten, so the work is redone;
- unknown (the producer was replaced after a call stuck, timed out or was fenced): the
  transaction may have committed. Nothing in memory is trusted then: the committed offsets
  and the dedupe markers are read back from Kafka (:meth:`Router._restore`) before any
  record is redone, so a transaction that did commit is not written twice.

Offsets sent to the transaction are the ones this loop has *processed*, never the
consumer's position: a batch handed over by ``consume()`` may hold records fetched before
a rebalance callback ran, and committing past them would lose them.

Replicas: every process derives a ``transactional.id`` of its own (:func:`transactional_id`),
so N routers with identical settings all run. Zombies are fenced by the consumer group's
generation, which the offsets carry into the transaction (KIP-447), not by the id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CollectorRegistry

from consumer.envelope import HEADER_ERROR_MESSAGE
from consumer.errors import InfrastructureError
from consumer.kafka.config import consumer_config
from consumer.router.dedupe import DedupeLog, DedupeWindow, marker_records
from consumer.router.health import Health, serve_admin
from consumer.router.metrics import RouterMetrics
from consumer.router.output import (
    ATTEMPT_S,
    RETRY_TIMEOUT_S,
    AtLeastOnceOutput,
    CommitResult,
    Output,
    TransactionalOutput,
    committed_offsets,
    retrying,
)
from consumer.router.transform import DeadLetter, Duplicate, Routed, Transform

log = logging.getLogger(__name__)

_RETRY_BACKOFF_S = 1.0  # after an infrastructure failure of the transform (the registry away)


def transactional_id(settings: Any) -> str:
    """``<group>-<instance>``: the instance is ``settings.instance_id`` when given, else
    unique to this process (host, pid and a random part), so replicas started with the
    same settings never share an id and fence each other."""
    instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return f"{settings.group_id}-{instance}"


class Router:
    """A consumer-group member that turns raw callbacks into domain records.

    Args:
        settings: the one :class:`consumer.settings.Settings`.
        registry: where the metrics go (a fresh one if not given).
        transform: the pure step (default: the contract's, from the settings).
        producer_factory: builds the transactional producer from its configuration; a seam
            for tests that need a producer whose answers get lost.
    """

    def __init__(
        self,
        settings: Any,
        registry: CollectorRegistry | None = None,
        *,
        transform: Transform | None = None,
        producer_factory: Callable[[dict[str, str]], Producer] = Producer,
    ) -> None:
        self._settings = settings
        self._raw_topic = settings.raw_topic
        self._dlq_topic = settings.dlq_topic
        self.transform = transform or Transform.from_settings(settings)
        self.registry = registry or CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.health = Health(settings.router_stall_s)
        window_ms = int(settings.dedupe_window_s * 1000)
        self._window = DedupeWindow(window_ms)
        self._stop = threading.Event()

        # A killed router's partitions move after session.timeout.ms: 10 s rather than the
        # client's 45 s default, unless the user's pass-through settings say otherwise.
        self._consumer = Consumer(
            {"session.timeout.ms": "10000", **consumer_config(settings, settings.group_id)}
        )
        self._log = DedupeLog(
            lambda: Consumer(
                {
                    **consumer_config(settings, f"{settings.group_id}-restore"),
                    "enable.partition.eof": "true",
                }
            ),
            settings.raw_topic,
            settings.dedupe_topic,
            window_ms,
            timeout_s=60.0,
        )
        self.transactional_id = transactional_id(settings)
        self._output: Output
        if settings.exactly_once:
            self._output = TransactionalOutput(
                settings,
                self.transactional_id,
                dedupe_topic=settings.dedupe_topic,
                replace_when_fenced=not settings.instance_id,
                stopping=self._stopping,
                on_replace=lambda _reason: self.metrics.producer_replacements.inc(),
                producer_factory=producer_factory,
            )
        else:
            self._output = AtLeastOnceOutput(
                settings, dedupe_topic=settings.dedupe_topic, stopping=self._stopping
            )

        self._owned: set[int] = set()
        self._committed: dict[int, int] = {}  # partition -> next offset, as last committed
        self._processed: dict[int, int] = {}  # partition -> next offset, as processed
        # EventIds written since the last commit point, by raw partition, with their raw
        # timestamps: they go to the dedupe changelog at the commit.
        self._markers: dict[int, list[tuple[str, int]]] = {}
        self._in_transaction = False
        self._transaction_started = 0.0
        self._transaction_records = 0
        self._rewound = 0  # bumped whenever partitions are rewound, so a batch is refetched
        self._failed = False
        self._warned_create_time = False

    def _stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def output_topics(self) -> list[str]:
        return self.transform.routing.topics()

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Route until ``stop`` is set; then commit what is open and leave the group.

        Raises:
            KafkaException: a fatal Kafka error (unauthorised, fenced with an id set by
                hand, broker gone for longer than the retries). Nothing open is committed.
        """
        settings = self._settings
        interval_s = settings.commit_interval_ms / 1000
        batch_size = min(settings.commit_max_records, 1000)
        self._stop = stop
        try:
            self._output.start()
            self._consumer.subscribe(
                [self._raw_topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self.health.ready()
            if on_ready:
                on_ready()
            while not stop.is_set():
                self.health.beat()
                rewound = self._rewound
                messages = self._next_batch(batch_size, wait_s=min(interval_s, 0.1))
                for message in messages:
                    if self._rewound != rewound:
                        break  # partitions were rewound: what is left predates the rewind
                    self._handle(message)
                self.metrics.flush()
                if self._rewound != rewound:
                    self._seek_to(self._processed)
                    continue
                if self._in_transaction and (
                    self._transaction_records >= settings.commit_max_records
                    or time.monotonic() - self._transaction_started >= interval_s
                ):
                    self._commit()
            self.health.stopping()
            if self._in_transaction:
                self._commit()
        except BaseException:
            # Leaving the group below calls on_revoke: it must not commit half-done work.
            self._failed = True
            raise
        finally:
            self._consumer.close()
            self._log.close()
            self._output.close()

    def _next_batch(self, size: int, wait_s: float) -> list[Message]:
        """Up to ``size`` records: those already fetched, at once; else the first to arrive
        within ``wait_s``, with any that came with it.

        Not ``consume(size, wait_s)`` alone: it returns early only with ``size`` records, so
        at a low rate it would hold every record for the whole ``wait_s``.
        """
        messages = self._consumer.consume(size, timeout=0)
        if messages:
            return messages
        first = self._consumer.poll(wait_s)
        if first is None:
            return []
        return [first, *self._consumer.consume(size - 1, timeout=0)]

    def _handle(self, message: Message) -> None:
        """One raw record → a domain record, a DLQ record, or nothing if a duplicate."""
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.fatal():
                raise KafkaException(error)
            # A broker lost, a partition moving: librdkafka recovers by itself.
            log.warning("consumer: %s", error.str())
            return
        partition, offset = message.partition(), message.offset()
        if partition not in self._owned or offset < self._processed.get(partition, 0):
            return  # fetched before this partition was revoked, or before a rewind
        if not self._in_transaction:
            self._begin()

        try:
            outcome = self.transform.apply(message, self._window.seen)
        except InfrastructureError as exc:
            log.warning("cannot transform now, redoing after %.0f s: %s", _RETRY_BACKOFF_S, exc)
            self._settle(self._output.abort())
            self._stop.wait(_RETRY_BACKOFF_S)
            return
        self._transaction_records += 1
        self._processed[partition] = offset + 1

        if type(outcome) is Routed:
            self._output.produce(outcome.topic, outcome.value, key=outcome.key, headers=outcome.headers)
            timestamp = self._raw_time_ms(message)
            self._markers.setdefault(partition, []).append((outcome.event_id, timestamp))
            self._window.add(partition, outcome.event_id, timestamp)
            self.metrics.count(self.metrics.records_in, outcome.event_type)
            self.metrics.count(self.metrics.records_out, outcome.event_type, outcome.domain)
        elif type(outcome) is Duplicate:
            self.metrics.count(self.metrics.records_in, outcome.event_type)
            self.metrics.count(self.metrics.duplicates)
        else:
            self._dead_letter(outcome)

    def _dead_letter(self, letter: DeadLetter) -> None:
        try:
            self._output.produce(self._dlq_topic, letter.value, key=letter.key, headers=letter.headers)
        except KafkaException as exc:
            # The DLQ topic's limit is below what the transform budgeted for: the value goes,
            # the reason and the source coordinates stay.
            log.warning("dead letter too large for %s (%s): cutting it", self._dlq_topic, exc.args[0].str())
            letter = letter.shrunk()
            self._output.produce(self._dlq_topic, letter.value, key=letter.key, headers=letter.headers)
        reason = dict(letter.headers).get(HEADER_ERROR_MESSAGE, b"").decode("utf-8", "replace")
        log.warning("dead-lettered: %s", reason)
        self.metrics.count(self.metrics.records_in, letter.event_type)
        self.metrics.count(self.metrics.dead_letters, letter.error_class)
        if letter.truncated:
            self.metrics.count(self.metrics.dead_letters_truncated)

    def _raw_time_ms(self, message: Message) -> int:
        """The raw record's time, on which the dedupe window runs: the broker's append time.

        A raw topic created before rtcbus set ``message.timestamp.type=LogAppendTime`` carries
        the shims' clocks, which one fast clock skews; ``rtcbus topics create`` fixes it.
        """
        kind, timestamp = message.timestamp()
        if kind != TIMESTAMP_LOG_APPEND_TIME and not self._warned_create_time:
            self._warned_create_time = True
            log.warning(
                "%s carries producer timestamps, not LogAppendTime: the dedupe window runs on "
                "the shims' clocks; run `rtcbus topics create` to set it", self._raw_topic,
            )
        return timestamp

    # -- commit points ---------------------------------------------------------------------------

    def _begin(self) -> None:
        self._output.begin()
        self._in_transaction = True
        self._transaction_started = time.monotonic()
        self._transaction_records = 0

    def _commit(self) -> None:
        """Commit the open transaction with the processed offsets and the dedupe markers."""
        offsets = [
            TopicPartition(self._raw_topic, partition, offset)
            for partition, offset in self._processed.items()
            if partition in self._owned and offset >= 0
        ]
        markers, self._markers = self._markers, {}
        result = self._output.commit(offsets, self._consumer, marker_records(markers))
        if result is CommitResult.COMMITTED:
            self._in_transaction = False
            self._window.commit()
            self._committed.update({tp.partition: tp.offset for tp in offsets})
            self.metrics.commits.inc()
            self._record_lag()
        else:
            self._settle(result)

    def _settle(self, result: CommitResult) -> None:
        """After an abort, redo from the offsets last committed; after an outcome unknown,
        from what Kafka says was committed."""
        self._in_transaction = False
        self._markers = {}
        self._window.abort()
        self.metrics.aborts.inc()
        if result is CommitResult.UNKNOWN:
            self.metrics.resyncs.inc()
            log.warning("commit outcome unknown: re-reading offsets and dedupe markers from Kafka")
            self._restore(sorted(self._owned))
        else:
            self._processed = {p: self._committed[p] for p in self._owned if p in self._committed}
        self._seek_to(self._processed)
        self._rewound += 1

    def _seek_to(self, offsets: dict[int, int]) -> None:
        for partition in self._owned:
            offset = offsets.get(partition, OFFSET_BEGINNING)
            self._consumer.seek(TopicPartition(self._raw_topic, partition, offset))

    # -- partitions: assignment, restore, revocation --------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = sorted(tp.partition for tp in partitions)
        self._restore(numbers)
        self._owned.update(numbers)
        # Assigned at the offsets _restore read (with retries), not left to librdkafka to look
        # up again: its own OffsetFetch, answered NOT_COORDINATOR as a whole while the group
        # coordinator moves, leaves the partitions unfetched for good, with no retry
        # (confluentinc/librdkafka#5586; seen in the fault suite as a router assigned six
        # partitions that never routed a record). The dedupe window was restored from these
        # same offsets, so where the fetch starts and what the window holds agree. No
        # committed offset: the beginning, as the consumer's auto.offset.reset=earliest.
        consumer.incremental_assign(
            [TopicPartition(self._raw_topic, p, self._committed.get(p, OFFSET_BEGINNING)) for p in numbers]
        )
        log.info("assigned partitions %s", numbers)

    def _restore(self, partitions: list[int]) -> None:
        """Read the committed offsets and the dedupe window of ``partitions`` from Kafka.

        A broker lost meanwhile fails lookups (unknown partition, no coordinator, offsets
        still unstable while a transaction settles): they are retried, not fatal.

        Raises:
            KafkaException: still failing after the retries, or an error retries do not cure.
        """

        def read() -> tuple[list[TopicPartition], dict[int, list[tuple[str, int]]]]:
            committed = committed_offsets(
                self._consumer, [TopicPartition(self._raw_topic, p) for p in partitions], ATTEMPT_S
            )
            try:
                windows = {
                    tp.partition: self._log.markers(tp.partition, tp.offset if tp.offset >= 0 else None)
                    for tp in committed
                }
            except KafkaException:
                self._log.reset()  # the next attempt with a fresh client (see DedupeLog.reset)
                raise
            return committed, windows

        committed, windows = retrying(read, self._stopping, RETRY_TIMEOUT_S)
        for tp in committed:
            if tp.offset >= 0:
                self._committed[tp.partition] = tp.offset
                self._processed[tp.partition] = tp.offset
            else:
                self._committed.pop(tp.partition, None)
                self._processed.pop(tp.partition, None)
            self._window.restore(tp.partition, windows[tp.partition])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Cooperative rebalancing: commit what was done so the next owner starts after it.
        if self._in_transaction and not self._failed:
            self._commit()
        self._forget(partitions)
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The partitions already belong to someone else: our open work must not commit.
        lost = {tp.partition for tp in partitions}
        self._owned -= lost
        if self._in_transaction and not self._failed:
            self._settle(self._output.abort())
        self._forget(partitions)
        log.warning("lost partitions %s", sorted(lost))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        numbers = {tp.partition for tp in partitions}
        self._owned -= numbers
        self._window.drop(numbers)
        for partition in numbers:
            self._committed.pop(partition, None)
            self._processed.pop(partition, None)
            with contextlib.suppress(KeyError):  # no lag was recorded for it yet
                self.metrics.lag.remove(str(partition))

    def _record_lag(self) -> None:
        for partition in self._owned:
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(self._raw_topic, partition), cached=True
            )
            position = self._processed.get(partition)
            if high >= 0 and position is not None:
                self.metrics.lag.labels(str(partition)).set(max(high - position, 0))


def run_router(settings: Any) -> None:
    """``rtcbus router``: route until SIGTERM or SIGINT, serving ``/metrics``, ``/healthz`` and
    ``/readyz`` on ``metrics_host:metrics_port`` (see :mod:`consumer.router.health`).

    Raises:
        KafkaException: a fatal Kafka error; the process should exit non-zero.
    """
    import signal

    router = Router(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if settings.metrics_port:
        serve_admin(router.health, router.registry, settings.metrics_host, settings.metrics_port)
    log.info(
        "router in group %s, transactional.id %s: %s -> %s", settings.group_id,
        router.transactional_id, settings.raw_topic, ", ".join(router.output_topics),
    )
    router.run(stop)
    log.info("router stopped")



