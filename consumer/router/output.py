"""Where the router's records go, and how a commit point makes them final.

Two outputs behind one interface (:class:`Output`):

- :class:`TransactionalOutput` (exactly once): records, dedupe markers and consumed offsets
  in one Kafka transaction. It follows librdkafka's transactional contract: an abortable
  error aborts; a call that is stuck or times out, or a producer that was fenced, gets the
  producer replaced (its successor's ``init_transactions`` fences it and settles whatever
  it left open). A replaced producer means the commit's outcome is not known here, so the
  result says :attr:`CommitResult.UNKNOWN` and the loop re-reads offsets and markers from
  Kafka before redoing anything.
- :class:`AtLeastOnceOutput`: flush the records, then the markers, then commit the consumer
  offsets; a crash in between duplicates what was flushed.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.kafka.config import producer_config

log = logging.getLogger(__name__)

DEFAULT_TRANSACTION_TIMEOUT_S = 30.0  # transaction.timeout.ms, unless the user's settings say
ATTEMPT_S = 5.0  # one attempt of a transactional call: short enough to notice a stop
_GRACE_S = 5.0  # how long past its own timeout a librdkafka call may take before it is stuck
# The first back-off of a retried request, unless the user's settings say (librdkafka: 100).
# A transaction begun right after a commit meets the coordinator still writing the last
# one's markers: AddPartitionsToTxn and AddOffsetsToTxn are refused CONCURRENT_TRANSACTIONS
# and retried after this back-off, so at librdkafka's 100 ms a commit point often took
# 100 ms more than its work (confluentinc/confluent-kafka-python#967; the Java client retries
# those after 20 ms, KAFKA-5477). Later retries still back off exponentially, up to
# retry.backoff.max.ms, so a coordinator in trouble is not hammered.
TRANSACTIONAL_RETRY_BACKOFF_MS = 10

Marker = tuple[int, bytes, int]  # (raw partition, changelog value, timestamp ms)


# The errors that say another producer with this transactional.id has taken over.
FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


class CommitResult(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    """Nothing of the transaction is in Kafka: redo from the offsets last committed."""
    UNKNOWN = "unknown"
    """It may or may not have committed: re-read the offsets and markers from Kafka."""


class Output(Protocol):
    """What the loop needs from an output."""

    def start(self) -> None:
        """Get ready to produce (``init_transactions``)."""

    def begin(self) -> None:
        """Open the unit of work that the next commit point closes."""

    def produce(self, topic: str, value: bytes | None, **kwargs: Any) -> None:
        """Queue one record (``key``, ``headers``, ``partition``, ``timestamp``).

        Raises:
            KafkaException: ``MSG_SIZE_TOO_LARGE``, the record cannot be sent at all.
        """

    def commit(
        self, offsets: list[TopicPartition], consumer: Consumer, markers: Iterable[Marker]
    ) -> CommitResult:
        """Make the records and the dedupe ``markers`` final with the consumed ``offsets``."""

    def abort(self) -> CommitResult:
        """Drop the open unit of work."""

    def close(self) -> None: ...


class TransactionalOutput:
    """Exactly once: Kafka transactions.

    Args:
        settings: the one :class:`consumer.settings.Settings`.
        transactional_id: this process's id; see :func:`consumer.router.loop.transactional_id`.
        replace_when_fenced: whether a fenced producer is replaced rather than fatal. True
            when the id is unique to this process: then only this process's own successor
            producer, or the coordinator aborting an expired transaction, can fence it.
            False for an id set by hand, where a fence means another live instance holds
            it, and the older one must stop. Any other fatal error (librdkafka's "sequence
            desynchronization" after brokers restart, for one) is this producer's alone and
            is cured by a successor either way.
        stopping: whether the router is asked to stop; retries end then.
        on_replace: called with the reason whenever the producer is replaced.
        producer_factory: builds the producer from its configuration (a test seam).
    """

    def __init__(
        self,
        settings: Any,
        transactional_id: str,
        *,
        dedupe_topic: str,
        replace_when_fenced: bool,
        stopping: Callable[[], bool],
        on_replace: Callable[[str], None] = lambda reason: None,
        producer_factory: Callable[[dict[str, str]], Producer] = Producer,
    ) -> None:
        self._config = {
            "transaction.timeout.ms": str(int(DEFAULT_TRANSACTION_TIMEOUT_S * 1000)),
            "retry.backoff.ms": str(TRANSACTIONAL_RETRY_BACKOFF_MS),
            **producer_config(settings, transactional_id=transactional_id),
        }
        self.timeout_s = int(self._config["transaction.timeout.ms"]) / 1000
        self._dedupe_topic = dedupe_topic
        self._replace_when_fenced = replace_when_fenced
        self._stopping = stopping
        self._on_replace = on_replace
        self._factory = producer_factory
        self._producer = producer_factory(self._config)
        self._broken: KafkaException | None = None  # set when produce() found it unusable

    def start(self) -> None:
        try:
            self._transactional(self._producer.init_transactions)
        except (_Stuck, KafkaException) as exc:
            self._replace_or_raise(exc, "init_transactions did not get through")

    def begin(self) -> None:
        if self._broken is None:
            try:
                self._producer.begin_transaction()
            except KafkaException as exc:
                self._broken = exc  # settled at the commit point, by a replacement

    def produce(self, topic: str, value: bytes | None, **kwargs: Any) -> None:
        if self._broken is not None:
            return  # the transaction is lost already; the commit point replaces the producer
        try:
            _produce(self._producer, topic, value, **kwargs)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            self._broken = exc

    def commit(
        self, offsets: list[TopicPartition], consumer: Consumer, markers: Iterable[Marker]
    ) -> CommitResult:
        try:
            for partition, value, timestamp in markers:
                self.produce(self._dedupe_topic, value, partition=partition, timestamp=timestamp)
            if self._broken is not None:
                # The producer refused a record of this transaction, so it cannot commit. An
                # abort settles it (redo), or fails as the producer's state says (replaced;
                # raised for a fence of a fixed id). Seen during a rebalance: produce refused
                # with _STATE ("Erroneous state") once the transaction had entered an abortable
                # error; that error carries no abort flag, and was taken for a fatal one.
                broken, self._broken = self._broken, None
                log.warning("a record of the transaction was refused, aborting it: %s", broken.args[0].str())
                return self.abort()
            self._transactional(
                lambda timeout: self._producer.send_offsets_to_transaction(
                    offsets, consumer.consumer_group_metadata(), timeout
                )
            )
            self._transactional(self._producer.commit_transaction)
        except (_Stuck, KafkaException) as exc:
            if isinstance(exc, KafkaException) and exc.args[0].txn_requires_abort():
                log.warning("transaction must be aborted: %s", exc.args[0].str())
                return self.abort()
            self._replace_or_raise(exc, "the commit did not get through")
            return CommitResult.UNKNOWN
        return CommitResult.COMMITTED

    def abort(self) -> CommitResult:
        self._broken = None
        try:
            self._transactional(self._producer.abort_transaction)
        except (_Stuck, KafkaException) as exc:
            self._replace_or_raise(exc, "the abort did not get through")
            return CommitResult.UNKNOWN
        return CommitResult.ABORTED

    def close(self) -> None:
        """Flush what is queued, best effort: a producer broken for good (librdkafka's fatal
        state) cannot, and what it holds belongs to a transaction that never committed, so
        nothing is lost. Raising here would hide the error that ended the run."""
        try:
            self._producer.flush(10)
        except KafkaException as exc:
            log.warning("the transactional producer could not flush at close: %s", exc.args[0].str())

    # -- replacement ------------------------------------------------------------------------

    def _replace_or_raise(self, exc: _Stuck | KafkaException, what: str) -> None:
        """After a transactional call failed for good: replace the producer, or re-raise if
        the error is one a new producer would not cure, or the router is stopping."""
        error = exc.args[0] if isinstance(exc, KafkaException) else None
        curable = (
            error is None
            or error.retriable()
            or error.code() == KafkaError._TIMED_OUT
            or (error.fatal() and (self._replace_when_fenced or error.code() not in FENCED))
        )
        if self._stopping() or not curable:
            raise exc
        self._replace(f"{what}: {error.str() if error is not None else exc}")

    def _replace(self, reason: str) -> None:
        """Swap in a new producer with the same ``transactional.id``. Its
        ``init_transactions`` bumps the epoch, which fences the old producer, and returns
        only once the transaction the old one left open is settled (committed, if its
        EndTxn had reached the coordinator, else aborted). Retried until Kafka answers or
        the router is asked to stop."""
        log.warning("replacing the transactional producer: %s", reason)
        self._on_replace(reason)
        self._swap()
        while True:
            try:
                self._transactional(self._producer.init_transactions)
                return
            except _Stuck as exc:
                if self._stopping():
                    raise
                log.warning("the new producer is stuck too, replacing it: %s", exc)
                self._swap()
            except KafkaException as exc:
                error = exc.args[0]
                # Not a new producer on a timeout: librdkafka resumes a timed-out
                # init_transactions when it is called again, and a second producer would
                # race the first for the epoch.
                if self._stopping() or not (error.retriable() or error.code() == KafkaError._TIMED_OUT):
                    raise
                log.warning("Kafka still unreachable, retrying: %s", error.str())

    def _swap(self) -> None:
        stuck, self._producer = self._producer, self._factory(self._config)
        self._broken = None
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
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                _bounded(call, min(ATTEMPT_S, max(deadline - time.monotonic(), 0.1)))
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable() or time.monotonic() >= deadline or self._stopping():
                    raise
                log.warning("retrying after %s", error.str())
                time.sleep(0.1)  # a back-off for a call that failed at once, not a wait for it


class AtLeastOnceOutput:
    """At least once: flush, then the markers, then the consumer offsets."""

    def __init__(self, settings: Any, *, dedupe_topic: str, stopping: Callable[[], bool]) -> None:
        self._delivery_errors: list[KafkaError] = []
        self._producer = Producer({**producer_config(settings), "on_delivery": self._delivered})
        self._dedupe_topic = dedupe_topic
        self._stopping = stopping

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self._delivery_errors.append(error)

    def start(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def produce(self, topic: str, value: bytes | None, **kwargs: Any) -> None:
        _produce(self._producer, topic, value, **kwargs)

    def commit(
        self, offsets: list[TopicPartition], consumer: Consumer, markers: Iterable[Marker]
    ) -> CommitResult:
        if not self._flushed():
            return CommitResult.ABORTED
        # Without a transaction a marker must not reach Kafka before its record does, or a
        # crash in between would make the restored window drop a record never written.
        for partition, value, timestamp in markers:
            self.produce(self._dedupe_topic, value, partition=partition, timestamp=timestamp)
        if not self._flushed():
            return CommitResult.ABORTED
        if offsets:
            try:
                retrying(lambda: consumer.commit(offsets=offsets, asynchronous=False), self._stopping)
            except KafkaException as exc:
                # The group moved on (a rebalance): the next owner redoes these records.
                log.warning("offset commit refused, redoing: %s", exc.args[0].str())
                return CommitResult.ABORTED
        return CommitResult.COMMITTED

    def abort(self) -> CommitResult:
        return CommitResult.ABORTED  # what was produced stays: at-least-once

    def close(self) -> None:
        self._producer.flush(10)

    def _flushed(self) -> bool:
        """Wait until Kafka has everything produced; False if some was refused."""
        while self._producer.flush(ATTEMPT_S) > 0:
            if self._stopping():
                raise KafkaException(
                    KafkaError(KafkaError._TIMED_OUT, "output not flushed before stopping")
                )
            log.warning("waiting for Kafka to take the output before committing")
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            log.warning("%d records not delivered (%s): redoing", len(errors), errors[0].str())
            return False
        return True


# Errors of a metadata, offsets or commit call that a lost or restarting broker causes and
# a retry cures.
TRANSIENT_ERRORS = frozenset(
    {
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._DESTROY_BROKER,  # a broker left the metadata while a request was on it
        KafkaError._WAIT_COORD,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.UNSTABLE_OFFSET_COMMIT,
        KafkaError.REBALANCE_IN_PROGRESS,
    }
)
RETRY_TIMEOUT_S = 120.0


def is_transient(error: KafkaError) -> bool:
    return error.retriable() or error.code() in TRANSIENT_ERRORS


def retrying(
    call: Callable[[], Any], stopping: Callable[[], bool], timeout_s: float = RETRY_TIMEOUT_S
) -> Any:
    """``call()``, retried while it fails with an error a lost broker causes (a stale
    leader epoch, a coordinator moving or still loading), for up to ``timeout_s``.

    Raises:
        KafkaException: an error a retry would not cure, or still failing at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if not is_transient(error) or time.monotonic() >= deadline or stopping():
                raise
            log.warning("retrying after %s", error.str())
            time.sleep(0.2)  # a back-off between attempts, not a wait for an outcome


def committed_offsets(consumer: Consumer, partitions: list[TopicPartition], timeout_s: float) -> list[TopicPartition]:
    """``consumer.committed(partitions)``, failing as a whole when any partition's lookup
    failed, so that :func:`retrying` retries what a moving coordinator fails.

    Raises:
        KafkaException: the call's error, or the first partition's.
    """
    committed = consumer.committed(partitions, timeout=timeout_s)
    for tp in committed:
        if tp.error is not None:
            raise KafkaException(tp.error)
    return committed


def _produce(producer: Producer, topic: str, value: bytes | None, **kwargs: Any) -> None:
    while True:
        try:
            producer.produce(topic, value, **kwargs)
            return
        except BufferError:
            # The local queue is full: let deliveries drain it, then try again.
            producer.poll(0.05)


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


def _dispose(holder: list[Producer]) -> None:
    """Drop the last reference to a producer, in a thread of its own: its destruction waits
    for librdkafka's threads, which may be stuck on a broker that went away."""
    with contextlib.suppress(Exception):
        holder[0].purge()
    holder.clear()
