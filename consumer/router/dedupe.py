"""The router's EventId window, and the changelog that persists it.

:class:`DedupeWindow` is pure bookkeeping: which events a partition has already turned
into records. :class:`DedupeLog` reads it back from Kafka. Every EventId the router writes out is also
written, inside the same Kafka transaction, as a marker to a changelog topic that is
co-partitioned with the raw topic. On assignment the router reads a partition's markers
of the last window back into this structure, so a duplicate is recognised after a restart
or a rebalance too.

EventIds added during the open transaction are *pending*: an abort forgets them (their
records were never committed, so their retries must go through); a commit keeps them.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition


class DedupeWindow:
    """EventIds seen per partition, forgotten once older than the window.

    Args:
        window_ms: how long an EventId is remembered, measured on the raw records'
            timestamps (so a router replaying a backlog keeps the right window).
    """

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._committed: dict[int, OrderedDict[str, int]] = {}
        self._pending: dict[int, dict[str, int]] = {}

    def seen(self, partition: int, event_id: str) -> bool:
        """Whether ``event_id`` was already written from ``partition``."""
        return event_id in self._pending.get(partition, ()) or event_id in self._committed.get(
            partition, ()
        )

    def add(self, partition: int, event_id: str, timestamp_ms: int) -> None:
        """Remember ``event_id`` as written in the open transaction."""
        self._pending.setdefault(partition, {})[event_id] = timestamp_ms

    def commit(self) -> None:
        """The open transaction committed: keep its EventIds, forget expired ones."""
        for partition, added in self._pending.items():
            window = self._committed.setdefault(partition, OrderedDict())
            window.update(added)
            self._expire(window)
        self._pending.clear()

    def abort(self) -> None:
        """The open transaction aborted: forget what it added."""
        self._pending.clear()

    def restore(self, partition: int, markers: Iterable[tuple[str, int]]) -> None:
        """Load a partition's markers ``(event_id, timestamp_ms)``, oldest first."""
        window = OrderedDict(markers)
        self._expire(window)
        self._committed[partition] = window
        self._pending.pop(partition, None)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this instance no longer owns."""
        for partition in partitions:
            self._committed.pop(partition, None)
            self._pending.pop(partition, None)

    def size(self, partition: int) -> int:
        return len(self._committed.get(partition, ())) + len(self._pending.get(partition, ()))

    def _expire(self, window: OrderedDict[str, int]) -> None:
        if not window:
            return
        # Raw timestamps arrive nearly in order, so the newest entry is the last one.
        horizon = next(reversed(window.values())) - self._window_ms
        while window:
            event_id, timestamp_ms = next(iter(window.items()))
            if timestamp_ms >= horizon:
                break
            del window[event_id]


# -- the changelog ---------------------------------------------------------------------------

MARKERS_PER_RECORD = 1000  # EventIds per marker record: ~60 kB at most


def marker_records(markers: dict[int, list[tuple[str, int]]]) -> Iterator[tuple[int, bytes, int]]:
    """The changelog records for ``markers`` (raw partition → ``[(EventId, raw timestamp)]``):
    ``(partition, value, timestamp_ms)``, up to :data:`MARKERS_PER_RECORD` pairs a record,
    each timestamped with its newest pair so that a restore seeking by time finds it."""
    for partition, pairs in markers.items():
        for start in range(0, len(pairs), MARKERS_PER_RECORD):
            chunk = pairs[start : start + MARKERS_PER_RECORD]
            value = json.dumps(chunk, separators=(",", ":")).encode()
            yield partition, value, max(timestamp for _, timestamp in chunk)


def parse_marker_record(value: bytes | None, key: bytes | None, timestamp_ms: int) -> list[tuple[str, int]]:
    """The ``(EventId, timestamp)`` pairs of one changelog record."""
    if value:
        return [(event_id, timestamp) for event_id, timestamp in json.loads(value)]
    # The form earlier routers wrote: one EventId per record, in the key.
    return [(key.decode(), timestamp_ms)] if key else []


class DedupeLog:
    """Reads the changelog back: the markers of one raw partition within the window.

    It owns a consumer of its own (``read_committed``, never in a group), so that a restore
    does not disturb the router's group consumer.

    Args:
        new_consumer: makes an unsubscribed ``read_committed`` consumer with
            ``enable.partition.eof``.
        raw_topic, dedupe_topic: the co-partitioned topics.
        window_ms: how far back before the resume point markers matter.
        timeout_s: how long reading one partition may take before it fails.
    """

    def __init__(
        self,
        new_consumer: Callable[[], Consumer],
        raw_topic: str,
        dedupe_topic: str,
        window_ms: int,
        timeout_s: float,
    ) -> None:
        self._new_consumer = new_consumer
        self._consumer = new_consumer()
        self._raw_topic = raw_topic
        self._dedupe_topic = dedupe_topic
        self._window_ms = window_ms
        self._timeout_s = timeout_s

    def markers(self, partition: int, resume_offset: int | None) -> list[tuple[str, int]]:
        """The committed markers of ``partition`` within the window before the raw record at
        ``resume_offset`` (None: the partition's start), oldest first.

        The window is measured on the raw topic's clock (its LogAppendTime), so a router
        back after an outage longer than the window still knows what preceded it.

        Raises:
            KafkaException: a lookup or a read failed or timed out.
        """
        since_ms = self._resume_time_ms(partition, resume_offset) - self._window_ms
        (start,) = self._consumer.offsets_for_times(
            [TopicPartition(self._dedupe_topic, partition, since_ms)], timeout=self._timeout_s
        )
        if start.error is not None:
            raise KafkaException(start.error)
        if start.offset < 0:
            return []  # no marker that recent
        found: list[tuple[str, int]] = []
        for message in self._read(start):
            found.extend(parse_marker_record(message.value(), message.key(), message.timestamp()[1]))
        return found

    def reset(self) -> None:
        """Start over with a fresh consumer, after a read failed.

        Seen in the fault suite: after the broker leading a changelog partition was killed
        and restarted, this consumer (which only assigns partitions for a moment) answered
        ``offsets_for_times`` with "Unknown partition" for minutes while every other client
        had recovered; a new client has fresh metadata at once.
        """
        stale, self._consumer = self._consumer, self._new_consumer()
        stale.close()

    def close(self) -> None:
        self._consumer.close()

    def _resume_time_ms(self, partition: int, offset: int | None) -> int:
        now_ms = int(time.time() * 1000)
        start = TopicPartition(self._raw_topic, partition, OFFSET_BEGINNING if offset is None else offset)
        first = next(self._read(start), None)
        return min(now_ms, first.timestamp()[1]) if first is not None else now_ms

    def _read(self, start: TopicPartition) -> Iterator[Message]:
        """Committed records of one partition, from ``start`` to its end."""
        self._consumer.assign([start])
        deadline = time.monotonic() + self._timeout_s
        try:
            while time.monotonic() < deadline:
                for message in self._consumer.consume(500, timeout=0.5):
                    error = message.error()
                    if error is None:
                        yield message
                    elif error.code() == KafkaError._PARTITION_EOF:
                        return  # read_committed: the end is the last stable offset
                    else:
                        raise KafkaException(error)
        finally:
            self._consumer.unassign()
        raise KafkaException(
            KafkaError(KafkaError._TIMED_OUT, f"reading {start.topic} [{start.partition}] timed out")
        )
