"""Reading a bounded range of a topic: which offsets are due, and the records up to their ends.

The quarantine's and the DLQ's redrives, their listings and the replay are bounded jobs over
one topic: per partition, from a start (a group's committed offset, the beginning, an offset
for a time) to the end offset seen when the job started. Records that arrive meanwhile are
left for the next run, so a job always finishes. They read in batches (:func:`read_batch`);
the redrives settle each in a transaction that carries their group's offsets
(:func:`commit_transaction`), or abort it (:func:`abort_transaction`). The replay settles
its batches with the router's ``TransactionalOutput`` instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.errors import InfrastructureError, RtcbusError

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # one metadata, offsets or transactional call
STALL_S = 60.0  # no record for this long while some are still due: Kafka is not answering
_READ_BATCH = 1000  # records per consume loop in read_range: nothing is settled per batch there


def partitions_of(consumer: Consumer, topic: str) -> list[int]:
    """The partitions of ``topic``, in order.

    Raises:
        RtcbusError: the topic does not exist.
        KafkaException: the metadata call failed.
    """
    metadata = consumer.list_topics(topic, timeout=CALL_TIMEOUT_S).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise RtcbusError(f"topic not found: {topic} (`rtcbus topics create` makes it)")
    return sorted(metadata.partitions)


def due_ranges(consumer: Consumer, topic: str) -> tuple[dict[int, tuple[int, int]], int]:
    """What ``consumer``'s group has not read of ``topic`` yet, up to the ends seen now.

    Returns:
        Per partition with anything due, ``(start, end)``: the group's committed offset
        (the low watermark if retention deleted past it, or if the group never committed)
        and the high watermark now. Then how many records retention deleted before the
        group reached them.

    Raises:
        RtcbusError: the topic does not exist.
        KafkaException: a metadata or offsets call failed.
    """
    committed = consumer.committed(
        [TopicPartition(topic, p) for p in partitions_of(consumer, topic)], timeout=CALL_TIMEOUT_S
    )
    due = {}
    expired = 0
    for tp in committed:
        low, high = consumer.get_watermark_offsets(tp, timeout=CALL_TIMEOUT_S)
        if tp.offset >= 0 and tp.offset < low:
            expired += low - tp.offset
        start = max(tp.offset, low) if tp.offset >= 0 else low
        if start < high:
            due[tp.partition] = (start, high)
    return due, expired


def assign_due(consumer: Consumer, topic: str, due: dict[int, tuple[int, int]]) -> dict[int, int]:
    """Assign ``consumer`` each partition of ``due`` (from :func:`due_ranges`) at its start.

    Returns:
        The ends by partition, for :func:`read_batch`.
    """
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _end) in due.items()])
    return {p: end for p, (_start, end) in due.items()}


def read_batch(
    consumer: Consumer, topic: str, ends: dict[int, int], batch_size: int, *, stall_s: float = STALL_S
) -> list[Message]:
    """Up to ``batch_size`` records of ``topic`` below ``ends``, from the partitions
    ``consumer`` is assigned.

    Returns what has arrived once a poll brings nothing more, without waiting for a full
    batch. A partition whose position reached its end (by position, not by its last
    record: offsets a transaction marker takes are never delivered) is paused and leaves
    ``ends``; the caller reads until ``ends`` is empty. Records at or past their
    partition's end are never returned.

    Raises:
        InfrastructureError: no record for ``stall_s`` while partitions are still due.
        KafkaException: the consumer reported an error other than a partition's end.
    """
    batch: list[Message] = []
    deadline = time.monotonic() + stall_s
    while ends and len(batch) < batch_size:
        messages = consumer.consume(batch_size - len(batch), timeout=0.5)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            if message.offset() < ends.get(message.partition(), -1):
                batch.append(message)
        for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
            if tp.offset >= ends[tp.partition]:
                consumer.pause([TopicPartition(topic, tp.partition)])
                del ends[tp.partition]
        if messages:
            deadline = time.monotonic() + stall_s
        elif batch:
            break  # settle what there is rather than wait for a full batch
        elif time.monotonic() > deadline:
            raise InfrastructureError(
                f"no record of {topic} within {stall_s:.0f} s, though partitions {sorted(ends)} are not read to the end"
            )
    return batch


def read_range(
    reader: Consumer, topic: str, starts: dict[int, int], ends: dict[int, int] | None = None
) -> Iterator[Message]:
    """The committed records of ``topic`` from ``starts`` (offsets, or ``OFFSET_BEGINNING``)
    to ``ends`` (default: the high watermarks now), partition by partition in offset order.

    ``reader`` is assigned the partitions while the iterator runs, and unassigned after.

    Raises:
        InfrastructureError: Kafka did not deliver the records up to the ends.
        KafkaException: a call or the consumer failed.
    """
    if ends is None:
        ends = {}
        for p in starts:
            _low, high = reader.get_watermark_offsets(TopicPartition(topic, p), timeout=CALL_TIMEOUT_S)
            ends[p] = high
    # OFFSET_BEGINNING is below 0: a partition is read if it holds anything past its start.
    ends = {p: end for p, end in ends.items() if end > max(starts[p], 0)}
    if not ends:
        return
    reader.assign([TopicPartition(topic, p, starts[p]) for p in ends])
    try:
        while ends:
            yield from read_batch(reader, topic, ends, _READ_BATCH)
    finally:
        reader.unassign()


def commit_transaction(producer: Producer, consumer: Consumer, topic: str, offsets: dict[int, int]) -> None:
    """Commit ``producer``'s open transaction with ``consumer``'s group offsets in it: by
    partition of ``topic``, the next offset to read.

    Raises:
        KafkaException: the transaction could not be committed (:func:`abort_transaction`).
    """
    producer.send_offsets_to_transaction(
        [TopicPartition(topic, p, o) for p, o in offsets.items()], consumer.consumer_group_metadata(), CALL_TIMEOUT_S
    )
    producer.commit_transaction(CALL_TIMEOUT_S)


def abort_transaction(producer: Producer) -> None:
    """Abort ``producer``'s open transaction after a failure; never raises.

    A failure to abort is logged only: either no transaction was open, or the producer was
    fenced, and the broker settles the transaction either way.
    """
    try:
        producer.abort_transaction(CALL_TIMEOUT_S)
    except KafkaException as exc:
        log.warning("abort after a failed transaction: %s", exc.args[0].str())
