"""The router: raw callbacks in, typed Avro records out, exactly once.

One loop, read top to bottom: consume a batch from the raw topic → parse the envelope →
drop duplicates → validate into the typed model → route → encode → produce to the domain
topic, all inside one Kafka transaction that also carries the consumed offsets and the
dedupe markers. The transaction commits every ``commit_max_records`` records or
``commit_interval_ms``, whichever comes first.

With ``exactly_once`` off, the same loop runs without transactions: at each commit point it
flushes its output, then commits the consumer offsets, so a crash between the two duplicates
what was flushed (at-least-once). It exists for users who accept that, and as the
benchmark's measure of what transactions cost.

Failure handling follows librdkafka's transactional contract:

- bad input (a record that can never be processed) goes to the DLQ inside the same
  transaction, with its bytes and the reason, and the partition keeps flowing;
- an abortable transaction error aborts, rewinds every owned partition to the last
  committed offsets and forgets the aborted EventIds, so the work is redone;
- a retriable error is retried; a fatal one (e.g. fenced by a newer instance with the same
  ``transactional.id``) stops the process loudly.

Offsets sent to the transaction are the ones this loop has *processed*, never the
consumer's position: a batch handed over by ``consume()`` may hold records fetched before
a rebalance callback ran, and committing past them would lose them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CollectorRegistry, Counter, Gauge

from consumer.codec import Codec, codec_from_settings
from consumer.dedupe import DedupeWindow
from consumer.envelope import parse_envelope
from consumer.errors import CallbackError, EncodingError, ValidationError
from consumer.events import EventModels, Source, models
from consumer.kafka.config import consumer_config, producer_config
from consumer.routing import RoutingTable
from consumer.schemas import contract

log = logging.getLogger(__name__)

_TXN_TIMEOUT_S = 30.0  # the producer's transaction.timeout.ms, and the deadline of each call
_ATTEMPT_S = 5.0  # one attempt of a transactional call: short enough to notice a stop
_GRACE_S = 5.0  # how long past its own timeout a librdkafka call may take before it is stuck
_RESTORE_TIMEOUT_S = 60.0
_MARKERS_PER_RECORD = 1000  # EventIds per dedupe marker record: ~60 kB at most

# Errors of a metadata or offsets lookup that a broker restart causes and a retry cures.
_TRANSIENT_LOOKUP_ERRORS = frozenset(
    {
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


class RouterMetrics:
    """The router's Prometheus metrics, on a registry of its own."""

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
        self.commits = Counter(
            "rtcbus_router_transactions_committed", "Transactions committed", registry=registry
        )
        self.aborts = Counter(
            "rtcbus_router_transactions_aborted", "Transactions aborted", registry=registry
        )
        self.producer_replacements = Counter(
            "rtcbus_router_producer_replacements",
            "Transactional producers replaced after a call stuck or timed out",
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
            counter.labels(*labels).inc(n)
        self._counts.clear()


class Router:
    """A consumer-group member that turns raw callbacks into domain records.

    Args:
        settings: the one :class:`consumer.settings.Settings`.
        registry: where the metrics go (a fresh one if not given).
    """

    def __init__(self, settings: Any, registry: CollectorRegistry | None = None) -> None:
        self._settings = settings
        self._raw_topic = settings.raw_topic
        self._dlq_topic = settings.dlq_topic
        self._dedupe_topic = settings.dedupe_topic
        self._routing = RoutingTable.from_settings(settings)
        self._models: EventModels = models()
        self._codec: Codec = codec_from_settings(settings, contract())
        self._dedupe = DedupeWindow(int(settings.dedupe_window_s * 1000))
        self._max_value_bytes = settings.max_record_bytes - 16 * 1024  # key and headers fit too
        self.registry = registry or CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)

        # A killed router's partitions move after session.timeout.ms: 10 s rather than the
        # client's 45 s default, unless the user's pass-through settings say otherwise.
        self._consumer = Consumer(
            {"session.timeout.ms": "10000", **consumer_config(settings, settings.group_id)}
        )
        # One transactional.id per instance: a restarted instance fences its previous
        # incarnation and aborts what it left open; other instances are fenced by the group
        # generation sent with the offsets (KIP-447), so ids need not follow partitions.
        self._transactions = settings.exactly_once
        self._delivery_errors: list[KafkaError] = []
        # EventIds written since the last commit point, by raw partition, with their raw
        # timestamps: they go to the dedupe changelog at the commit, a record per partition.
        self._markers: dict[int, list[tuple[str, int]]] = {}
        self._producer = self._new_producer()
        self._restorer = Consumer(
            {
                **consumer_config(settings, f"{settings.group_id}-restore"),
                "enable.partition.eof": "true",
            }
        )

        self._owned: set[int] = set()
        self._committed: dict[int, int] = {}  # partition -> next offset, as last committed
        self._processed: dict[int, int] = {}  # partition -> next offset, as processed
        self._in_transaction = False
        self._transaction_started = 0.0
        self._transaction_records = 0
        self._rewound = 0  # bumped whenever an abort rewinds partitions mid-consume()
        self._failed = False
        self._stop = threading.Event()

    def _new_producer(self) -> Producer:
        if not self._transactions:
            return Producer({**producer_config(self._settings), "on_delivery": self._delivered})
        return Producer(
            {
                "transaction.timeout.ms": str(int(_TXN_TIMEOUT_S * 1000)),
                **producer_config(
                    self._settings,
                    transactional_id=f"{self._settings.group_id}-{self._settings.instance_id}",
                ),
            }
        )

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self._delivery_errors.append(error)

    @property
    def output_topics(self) -> list[str]:
        return self._routing.topics()

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Route until ``stop`` is set; then commit what is open and leave the group.

        Raises:
            KafkaException: a fatal Kafka error (fenced, unauthorised, broker gone for
                longer than the transaction timeout). The open transaction is not committed.
        """
        settings = self._settings
        interval_s = settings.commit_interval_ms / 1000
        batch_size = min(settings.commit_max_records, 1000)
        self._stop = stop
        if self._transactions:
            self._transactional(self._producer.init_transactions)
        self._consumer.subscribe(
            [self._raw_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        if on_ready:
            on_ready()
        try:
            while not stop.is_set():
                rewound = self._rewound
                messages = self._next_batch(batch_size, wait_s=min(interval_s, 0.1))
                if self._rewound != rewound:
                    # An abort inside consume() rewound the partitions; what this batch
                    # holds may predate the rewind, so it is fetched again.
                    self._seek_to(self._processed)
                    continue
                for message in messages:
                    self._route(message)
                self.metrics.flush()
                if self._in_transaction and (
                    self._transaction_records >= settings.commit_max_records
                    or time.monotonic() - self._transaction_started >= interval_s
                ):
                    self._commit()
            if self._in_transaction:
                self._commit()
        except BaseException:
            # Leaving the group below calls on_revoke: it must not commit half-done work.
            self._failed = True
            raise
        finally:
            self._consumer.close()
            self._restorer.close()
            self._producer.flush(10)

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

    def _route(self, message: Message) -> None:
        """One raw record → one domain record (or a DLQ record, or nothing if a duplicate)."""
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            raise KafkaException(error)
        partition, offset = message.partition(), message.offset()
        if partition not in self._owned or offset < self._processed.get(partition, 0):
            return  # fetched before this partition was revoked, or before a rewind
        if not self._in_transaction:
            self._begin()
        self._transaction_records += 1
        self._processed[partition] = offset + 1

        try:
            if message.value() is None:
                raise ValidationError("raw record has no value")
            envelope = parse_envelope(message.value())
            self.metrics.count(self.metrics.records_in, envelope.event_type)
            if self._dedupe.seen(partition, envelope.event_id):
                self.metrics.duplicates.inc()
                return
            source = Source(message.topic(), partition, offset)
            schema_name, record = self._models.to_record(envelope, source)
            route = self._routing.route(envelope.event_type)
            value = self._codec.encode(schema_name, record, route.topic)
            if len(value) > self._max_value_bytes:
                # Produced anyway, the broker would refuse it at commit, and the aborted
                # transaction would be retried for ever: a poison pill for the partition.
                raise EncodingError(
                    f"{schema_name}: encoded record of {len(value)} bytes is over the "
                    f"{self._max_value_bytes}-byte limit",
                    event_type=envelope.event_type,
                    event_id=envelope.event_id,
                )
        except CallbackError as exc:
            self._dead_letter(message, exc.at(message.topic(), partition, offset))
            return

        timestamp = message.timestamp()[1]
        self._produce(
            route.topic,
            value,
            key=message.key(),
            headers=[
                ("rtcbus.event_type", envelope.event_type.encode()),
                ("rtcbus.event_id", envelope.event_id.encode()),
                ("rtcbus.schema", self._codec.schema_id(schema_name, route.topic).encode()),
            ],
        )
        # The marker keeps the raw record's partition number and timestamp, so the window
        # can be rebuilt per partition, on the raw topic's clock.
        self._markers.setdefault(partition, []).append((envelope.event_id, timestamp))
        self._dedupe.add(partition, envelope.event_id, timestamp)
        self.metrics.count(self.metrics.records_out, envelope.event_type, route.domain)

    def _dead_letter(self, message: Message, error: CallbackError) -> None:
        log.warning("dead-lettering %s", error)
        headers = list(message.headers() or [])
        headers += [
            ("rtcbus.error.class", type(error).__name__.encode()),
            ("rtcbus.error.message", str(error).encode()),
            ("rtcbus.error.field", (error.field or "").encode()),
            ("rtcbus.source.topic", message.topic().encode()),
            ("rtcbus.source.partition", str(message.partition()).encode()),
            ("rtcbus.source.offset", str(message.offset()).encode()),
        ]
        self._produce(self._dlq_topic, message.value(), key=message.key(), headers=headers)
        self.metrics.dead_letters.labels(type(error).__name__).inc()

    def _produce(self, topic: str, value: bytes | None, **kwargs: Any) -> None:
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                return
            except BufferError:
                # The local queue is full: let deliveries drain it, then try again.
                self._producer.poll(0.05)

    # -- transactions -----------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._transactions:
            self._producer.begin_transaction()
        self._in_transaction = True
        self._transaction_started = time.monotonic()
        self._transaction_records = 0

    def _commit(self) -> None:
        """Commit the open transaction with the processed offsets and the dedupe markers.

        If librdkafka says the transaction must be aborted, abort and redo its work. If the
        commit cannot get through within the transaction timeout (a broker restart can leave
        librdkafka waiting on a coordinator it has forgotten), replace the producer: its
        successor's ``init_transactions`` fences it and aborts what it left open, and the
        work is redone.
        """
        offsets = [
            TopicPartition(self._raw_topic, partition, offset)
            for partition, offset in self._processed.items()
            if partition in self._owned and offset >= 0
        ]
        if not self._transactions:
            self._commit_at_least_once(offsets)
            return
        self._produce_markers()
        try:
            self._transactional(
                lambda timeout: self._producer.send_offsets_to_transaction(
                    offsets, self._consumer.consumer_group_metadata(), timeout
                )
            )
            self._transactional(self._producer.commit_transaction)
        except (_Stuck, KafkaException) as exc:
            if isinstance(exc, KafkaException) and exc.args[0].txn_requires_abort():
                log.warning("transaction must be aborted: %s", exc.args[0].str())
                self._abort()
            else:
                self._replace_unless_final(exc, "the commit did not get through")
            return
        self._committed_through(offsets)

    def _produce_markers(self) -> None:
        """The dedupe markers of the EventIds written since the last commit point: per raw
        partition, records of up to ``_MARKERS_PER_RECORD`` ``[EventId, timestamp]`` pairs,
        each timestamped with its newest pair so that a restore seeking by time finds it."""
        markers, self._markers = self._markers, {}
        for partition, pairs in markers.items():
            for start in range(0, len(pairs), _MARKERS_PER_RECORD):
                chunk = pairs[start : start + _MARKERS_PER_RECORD]
                self._produce(
                    self._dedupe_topic,
                    json.dumps(chunk, separators=(",", ":")).encode(),
                    partition=partition,
                    timestamp=max(timestamp for _, timestamp in chunk),
                )

    def _committed_through(self, offsets: list[TopicPartition]) -> None:
        self._in_transaction = False
        self._dedupe.commit()
        self._committed.update({tp.partition: tp.offset for tp in offsets})
        self.metrics.commits.inc()
        self._record_lag()

    def _commit_at_least_once(self, offsets: list[TopicPartition]) -> None:
        """Flush the output, then its dedupe markers, then commit the offsets: nothing is
        marked or committed that Kafka does not have."""
        if not self._flushed():
            return
        # Without a transaction a marker must not reach Kafka before its record does, or a
        # crash in between would make the restored window drop a record never written.
        self._produce_markers()
        if not self._flushed():
            return
        if offsets:
            try:
                _retrying_lookup(lambda: self._consumer.commit(offsets=offsets, asynchronous=False))
            except KafkaException as exc:
                # The group moved on (a rebalance): the next owner redoes these records.
                log.warning("offset commit refused, redoing: %s", exc.args[0].str())
                self._rewind()
                return
        self._committed_through(offsets)

    def _flushed(self) -> bool:
        """Wait until Kafka has everything produced; False (and rewound) if some was refused."""
        while self._producer.flush(_ATTEMPT_S) > 0:
            if self._stop.is_set():
                raise KafkaException(
                    KafkaError(KafkaError._TIMED_OUT, "output not flushed before stopping")
                )
            log.warning("waiting for Kafka to take the output before committing")
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            log.warning("%d records not delivered (%s): redoing", len(errors), errors[0].str())
            self._rewind()
            return False
        return True

    def _abort(self) -> None:
        """Abort the open transaction and redo its work."""
        if not self._transactions:
            self._rewind()  # what was produced stays: at-least-once
            return
        try:
            self._transactional(self._producer.abort_transaction)
        except (_Stuck, KafkaException) as exc:
            self._replace_unless_final(exc, "the abort did not get through")
            return
        self._rewind()

    def _rewind(self) -> None:
        """Forget the aborted transaction: rewind every owned partition to its last committed
        offset and drop the EventIds the transaction added."""
        self._in_transaction = False
        self._markers = {}
        self._dedupe.abort()
        self.metrics.aborts.inc()
        self._processed = {p: self._committed[p] for p in self._owned if p in self._committed}
        self._seek_to(self._processed)
        self._rewound += 1

    def _replace_unless_final(self, exc: _Stuck | KafkaException, what: str) -> None:
        """After a transactional call failed for good: re-raise if the error is not
        retriable or the router is stopping, else replace the producer (redoing the work)."""
        error = exc.args[0] if isinstance(exc, KafkaException) else None
        if self._stop.is_set() or (error is not None and not error.retriable()):
            raise exc
        self._replace_producer(f"{what}: {error.str() if error is not None else exc}")

    def _replace_producer(self, reason: str) -> None:
        """Swap in a new transactional producer with the same ``transactional.id``, and redo
        the open transaction's work. Its ``init_transactions`` bumps the producer epoch,
        which fences the old producer and aborts the transaction it left open. It is retried
        until Kafka answers or the router is asked to stop."""
        log.warning("replacing the transactional producer: %s", reason)
        self.metrics.producer_replacements.inc()
        self._swap_producer()
        while True:
            try:
                self._transactional(self._producer.init_transactions)
                break
            except _Stuck as exc:
                if self._stop.is_set():
                    raise
                log.warning("the new producer is stuck too, replacing it: %s", exc)
                self._swap_producer()
            except KafkaException as exc:
                # Not a new producer: librdkafka resumes a timed-out init_transactions when it
                # is called again, and a second producer would race the first for the epoch.
                if self._stop.is_set() or not exc.args[0].retriable():
                    raise
                log.warning("Kafka still unreachable, retrying: %s", exc.args[0].str())
        self._rewind()

    def _swap_producer(self) -> None:
        stuck, self._producer = self._producer, self._new_producer()
        # Destroying a producer waits for its threads, and a stuck one may never finish:
        # the last reference is dropped in a daemon thread, off the loop's path.
        threading.Thread(target=_dispose, args=([stuck],), daemon=True).start()

    def _transactional(self, call: Callable[[float], Any]) -> None:
        """Run one transactional API call, retrying what librdkafka calls retriable, for up
        to the transaction timeout. Attempts are short, so a stop request is noticed.

        Raises:
            KafkaException: the call's error, once it is not retriable, the deadline has
                passed, or the router is stopping.
            _Stuck: the call did not return in time; the producer must be replaced.
        """
        deadline = time.monotonic() + _TXN_TIMEOUT_S
        while True:
            try:
                _bounded(call, min(_ATTEMPT_S, max(deadline - time.monotonic(), 0.1)))
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable() or time.monotonic() >= deadline or self._stop.is_set():
                    raise
                log.warning("retrying after %s", error.str())

    def _seek_to(self, offsets: dict[int, int]) -> None:
        for partition in self._owned:
            offset = offsets.get(partition, OFFSET_BEGINNING)
            self._consumer.seek(TopicPartition(self._raw_topic, partition, offset))

    # -- rebalances -----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        committed = _retrying_lookup(lambda: consumer.committed(partitions, timeout=_ATTEMPT_S))
        for tp in committed:
            if tp.offset >= 0:
                self._committed[tp.partition] = tp.offset
                self._processed[tp.partition] = tp.offset
            else:
                self._committed.pop(tp.partition, None)
                self._processed.pop(tp.partition, None)
        for partition in numbers:
            resume_ms = self._resume_time_ms(partition, self._processed.get(partition))
            self._dedupe.restore(partition, self._read_markers(partition, resume_ms))
        self._owned.update(numbers)
        log.info("assigned partitions %s", sorted(numbers))

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
        if self._in_transaction:
            self._abort()
        self._forget(partitions)
        log.warning("lost partitions %s", sorted(lost))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        numbers = {tp.partition for tp in partitions}
        self._owned -= numbers
        self._dedupe.drop(numbers)
        for partition in numbers:
            self._committed.pop(partition, None)
            self._processed.pop(partition, None)
            with contextlib.suppress(KeyError):  # no lag was recorded for it yet
                self.metrics.lag.remove(str(partition))

    def _resume_time_ms(self, partition: int, offset: int | None) -> int:
        """The raw timestamp of the first record this instance will route from ``partition``,
        or now if none is waiting: the window is measured on the raw records' clock, so a
        router back after an outage longer than the window still knows what preceded it."""
        now_ms = int(time.time() * 1000)
        start = TopicPartition(self._raw_topic, partition, OFFSET_BEGINNING if offset is None else offset)
        first = next(self._read_partition(start), None)
        return min(now_ms, first.timestamp()[1]) if first is not None else now_ms

    def _read_markers(self, partition: int, resume_ms: int) -> list[tuple[str, int]]:
        """The committed dedupe markers of ``partition`` within the window before
        ``resume_ms``, oldest first."""
        since_ms = int(resume_ms - self._settings.dedupe_window_s * 1000)
        start = _retrying_lookup(
            lambda: self._restorer.offsets_for_times(
                [TopicPartition(self._dedupe_topic, partition, since_ms)], timeout=_ATTEMPT_S
            )
        )[0]
        if start.offset < 0:
            return []  # no marker that recent
        markers: list[tuple[str, int]] = []
        for message in self._read_partition(start):
            if message.value():
                pairs = json.loads(message.value())
                markers.extend((event_id, timestamp) for event_id, timestamp in pairs)
            else:  # the form earlier routers wrote: one EventId per record, in the key
                markers.append((message.key().decode(), message.timestamp()[1]))
        return markers

    def _read_partition(self, start: TopicPartition) -> Iterator[Message]:
        """Committed records of one partition, from ``start`` to its end."""
        self._restorer.assign([start])
        deadline = time.monotonic() + _RESTORE_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                for message in self._restorer.consume(500, timeout=0.5):
                    error = message.error()
                    if error is None:
                        yield message
                    elif error.code() == KafkaError._PARTITION_EOF:
                        return  # read_committed: the end is the last stable offset
                    else:
                        raise KafkaException(error)
        finally:
            self._restorer.unassign()
        raise KafkaException(
            KafkaError(KafkaError._TIMED_OUT, f"reading {start.topic} [{start.partition}] timed out")
        )

    def _record_lag(self) -> None:
        for partition in self._owned:
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(self._raw_topic, partition), cached=True
            )
            position = self._processed.get(partition)
            if high >= 0 and position is not None:
                self.metrics.lag.labels(str(partition)).set(max(high - position, 0))


class _Stuck(Exception):
    """A librdkafka call that has not returned long after its own timeout."""


def _bounded(call: Callable[[float], Any], timeout_s: float) -> Any:
    """``call(timeout_s)``, in a daemon thread, given ``_GRACE_S`` more to return.

    Written by hand because librdkafka 2.16 can block ``send_offsets_to_transaction`` past
    its timeout, for good, when a broker restart removed the group coordinator it cached
    (confluentinc/librdkafka#5456, #5511): seen here as a router silent for 300 s. A
    thread is the only way to stop waiting for a C call; ``concurrent.futures`` would join
    a stuck worker at exit.

    Raises:
        _Stuck: the call is still running.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call(timeout_s)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="rtcbus-transactional-call", daemon=True)
    worker.start()
    worker.join(timeout_s + _GRACE_S)
    if worker.is_alive():
        raise _Stuck(f"a transactional call has not returned {timeout_s + _GRACE_S:.0f} s after it began")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _retrying_lookup(call: Callable[[], Any]) -> Any:
    """``call()``, retried while it fails with an error a broker restart causes (a stale
    leader epoch, a coordinator still loading), for up to the restore timeout."""
    deadline = time.monotonic() + _RESTORE_TIMEOUT_S
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            transient = error.retriable() or error.code() in _TRANSIENT_LOOKUP_ERRORS
            if not transient or time.monotonic() >= deadline:
                raise
            log.warning("retrying after %s", error.str())
            time.sleep(0.2)  # a back-off between attempts, not a wait for an outcome


def _dispose(holder: list[Producer]) -> None:
    """Drop the last reference to a producer, in a thread of its own: its destruction waits
    for librdkafka's threads, which may be stuck on a broker that went away."""
    with contextlib.suppress(Exception):
        holder[0].purge()
    holder.clear()


def run_router(settings: Any) -> None:
    """``rtcbus router``: route until SIGTERM or SIGINT, serving metrics on ``metrics_port``.

    Raises:
        KafkaException: a fatal Kafka error; the process should exit non-zero.
    """
    import signal

    from prometheus_client import start_http_server

    router = Router(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1", registry=router.registry)
    log.info(
        "router %s in group %s: %s -> %s", settings.instance_id, settings.group_id,
        settings.raw_topic, ", ".join(router.output_topics),
    )
    router.run(stop)
    log.info("router stopped")
