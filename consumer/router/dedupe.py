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

import gc
import json
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from preshed.maps import PreshMap
from xxhash import xxh3_128_digest as _xxh3_128

# The committed EventIds of one partition sit in a few hash tables ("generations"), oldest
# first, each spanning 1/GENERATIONS to 2/GENERATIONS of the window: expiry drops a whole
# table, and a miss costs one probe per table (GENERATIONS + 2 at most, 6 to 7 in a full
# window at a steady rate). More generations expire more finely, so fewer expired EventIds
# are still held, but probe more. At 4 the window held about 21 % more EventIds than it
# must (42 bytes per EventId at 300,000); at 8, 8 % (31 bytes), for about 4 probes more on
# a miss, some 0.2 µs (`python -m bench.dedupe`, its memory table).
GENERATIONS = 8

_split = struct.Struct("<QQ").unpack


def event_digest(event_id: str) -> tuple[int, int]:
    """The 128-bit XXH3 digest of ``event_id``, as two 64-bit halves ``(high, low)``.

    What the window remembers instead of the EventId: 16 bytes whatever its length.

    Why a false "seen" is negligible. A false "seen" would drop a real event, so it must not
    happen in the life of a deployment. A lookup of a new EventId against ``n`` remembered
    digests is a false "seen" with probability ``n / 2**128``; over ``m`` lookups,
    ``P ≈ m·n / 2**128``. At 20,000 events/s with the default 15-minute window, ``n`` is
    18 M (all on one router, the worst case; the window may remember up to half as much
    again, see :class:`_Generations`: 27 M) and a year is ``m`` = 6.3·10^11 lookups:
    ``P ≈ 6.3e11 · 2.7e7 / 3.4e38 ≈ 5·10^-20`` a year. Two remembered EventIds sharing a
    digest are harmless: both were routed.

    Why XXH3 and not BLAKE2b: a third of the CPU (about 0.25 against 0.8 µs an EventId on
    the bench's machine, ``python -m bench.dedupe``), on the path of every record; its
    128-bit output passes the SMHasher tests of uniformity, which is what the figure above
    needs. Why unkeyed: XXH3 is not built to resist crafted collisions, but a crafted
    collision buys an attacker nothing. To make the router drop a real event he must post,
    before it, an EventId colliding with the real one; knowing the real one, he could post
    the real EventId itself, a true duplicate the window drops anyway. In signed mode only
    the RTC cloud mints EventIds. Unkeyed, the digest is the same in every process.
    """
    return _split(_xxh3_128(event_id.encode()))


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that makes millions of small objects
    none of which can be part of a cycle: a restore's markers (strings, ints, tuples). Each
    few hundred new tuples would otherwise start a collection, and the oldest generation's
    walks over everything made so far; with it on, a restore of 3 M markers took 2.8 s of
    CPU instead of 1.2 (``bench/dedupe.py``). Process-wide, for the seconds a restore takes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Generations:
    """One partition's committed digests: hash tables of ``high → low`` in C (preshed's
    ``PreshMap``, no Python object per entry), each with the raw time span it holds.

    preshed doubles a table when it is 60 % full, so a growing table is 30–60 % full (27–53
    bytes per entry). A table that already spans its share of the window is closed instead
    of doubled: closed tables are 60 % full, 27 bytes an entry, and span 1/G to 2/G of the
    window (G = :data:`GENERATIONS`). Expiry drops a table only when its newest entry is
    older than the horizon, so nothing younger than the window is forgotten; older entries
    are remembered at most 2/G of the window longer (about 1/(2G) on average), which only
    catches more true duplicates.

    Args:
        span_ms: the raw time a table spans before it may close.
    """

    __slots__ = ("_span_ms", "tables", "_first_ms", "_newest_ms")

    def __init__(self, span_ms: int) -> None:
        self._span_ms = span_ms
        self.tables: list[PreshMap] = []
        self._first_ms: list[int] = []
        self._newest_ms: list[int] = []

    def insert(self, high: int, low: int, timestamp_ms: int) -> None:
        table = self.tables[-1] if self.tables else self._open(timestamp_ms)
        # Measured on the incoming timestamp: one out of order only closes the table later,
        # so that it is kept longer.
        spans = timestamp_ms - self._first_ms[-1]
        if spans >= self._span_ms and (
            # The next insert would make preshed double the table (its own test after an
            # insert is `(filled + 1) * 5 >= length * 3`): close it instead.
            (len(table) + 2) * 5 >= table.capacity * 3
            # At a steady rate a table passes one such point between 1 and 2 spans; a
            # slow one closes at 2 spans, so no table outlives the window by more.
            or spans >= 2 * self._span_ms
        ):
            table = self._open(timestamp_ms)
        present = table[high]
        if present is not None and present != low:
            # Two EventIds whose high halves collide (about n²/2^65 for a table of n: once
            # in 10^5 tables of 18 M) cannot share a slot: the second one opens a table.
            table = self._open(timestamp_ms)
        table[high] = low
        if timestamp_ms > self._newest_ms[-1]:
            self._newest_ms[-1] = timestamp_ms

    def expire(self, horizon_ms: int) -> None:
        """Drop the tables whose newest entry is older than ``horizon_ms``."""
        while self._newest_ms and self._newest_ms[0] < horizon_ms:
            del self.tables[0], self._first_ms[0], self._newest_ms[0]

    def size(self) -> int:
        return sum(len(table) for table in self.tables)

    def nbytes(self) -> int:
        """Bytes of the tables' cells (16 each)."""
        return 16 * sum(table.capacity for table in self.tables)

    def _open(self, timestamp_ms: int) -> PreshMap:
        table = PreshMap()
        self.tables.append(table)
        self._first_ms.append(timestamp_ms)
        self._newest_ms.append(timestamp_ms)
        return table


class DedupeWindow:
    """EventIds seen per partition, forgotten once older than the window.

    Committed EventIds are kept as 128-bit digests (:func:`event_digest`) in hash tables
    with no Python object per entry: about 31–33 bytes per EventId in windows of 300,000 to a million,
    where a dict of the strings took about 250 (``bench/dedupe.py`` measures both). The open
    transaction's EventIds are kept as they are, apart, so that an abort forgets exactly them.

    Args:
        window_ms: how long an EventId is remembered, measured on the raw records'
            timestamps (so a router replaying a backlog keeps the right window).
    """

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._span_ms = max(1, window_ms // GENERATIONS)
        self._committed: dict[int, _Generations] = {}
        self._pending: dict[int, dict[str, tuple[int, tuple[int, int] | None]]] = {}
        # The digest `seen` made last: the `add` of a routed event follows its `seen`, and
        # hashing it again at the commit would double the window's cost per event.
        self._last: tuple[str | None, tuple[int, int] | None] = (None, None)

    def seen(self, partition: int, event_id: str) -> bool:
        """Whether ``event_id`` was already written from ``partition``."""
        pending = self._pending.get(partition)
        if pending is not None and event_id in pending:
            return True
        generations = self._committed.get(partition)
        if generations is None:
            return False
        digest = high, low = event_digest(event_id)
        self._last = (event_id, digest)
        for table in generations.tables:  # oldest first; a miss probes them all
            if table[high] == low:
                return True
        return False

    def add(self, partition: int, event_id: str, timestamp_ms: int) -> None:
        """Remember ``event_id`` as written in the open transaction."""
        last_id, digest = self._last
        pending = self._pending.setdefault(partition, {})
        pending[event_id] = (timestamp_ms, digest if last_id == event_id else None)

    def commit(self) -> None:
        """The open transaction committed: keep its EventIds, forget expired ones."""
        for partition, added in self._pending.items():
            generations = self._committed.get(partition)
            if generations is None:
                generations = self._committed[partition] = _Generations(self._span_ms)
            insert = generations.insert
            timestamp_ms = 0
            for event_id, (timestamp_ms, digest) in added.items():
                insert(*(digest or event_digest(event_id)), timestamp_ms)
            if added:
                # Raw timestamps arrive nearly in order, so the newest is the last one added.
                generations.expire(timestamp_ms - self._window_ms)
        self._pending.clear()

    def abort(self) -> None:
        """The open transaction aborted: forget what it added."""
        self._pending.clear()

    def restore(self, partition: int, markers: Iterable[tuple[str, int]]) -> None:
        """Load a partition's markers ``(event_id, timestamp_ms)``, oldest first."""
        generations = _Generations(self._span_ms)
        insert = generations.insert
        timestamp_ms = None
        with collector_paused():
            for event_id, timestamp_ms in markers:
                insert(*event_digest(event_id), timestamp_ms)
        if timestamp_ms is not None:
            generations.expire(timestamp_ms - self._window_ms)
        self._committed[partition] = generations
        self._pending.pop(partition, None)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this instance no longer owns."""
        for partition in partitions:
            self._committed.pop(partition, None)
            self._pending.pop(partition, None)

    def size(self, partition: int) -> int:
        """How many EventIds ``partition`` remembers, committed and pending."""
        generations = self._committed.get(partition)
        committed = generations.size() if generations is not None else 0
        return committed + len(self._pending.get(partition, ()))

    def nbytes(self) -> int:
        """Bytes the committed digests take, all partitions together."""
        return sum(generations.nbytes() for generations in self._committed.values())


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
        with collector_paused():
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
