"""``rtcbus replay``: re-derive the domain records of a time range of raw into another topic prefix.

After a contract change, or to give a team a fresh copy: the raw records of
``[--from, --until]`` (their LogAppendTime) go through the router's own pure step
(:class:`~consumer.router.transform.Transform`, built for the target prefix) into the
target's domain topics and DLQ, exactly once.

Why a loop of its own rather than :class:`~consumer.router.loop.Router`: the router is an
open-ended group member (subscribe, rebalances, lag, health), and a replay is a bounded job
over fixed offsets: it *assigns* each raw partition from the first offset at ``--from``
(``offsets_for_times``, exact on LogAppendTime, which only grows) to the first offset past
``--until`` (or the high watermark), and stops there. Bending the router into that would take
an input topic, start and end offsets and a type filter as seams; the parts that carry the
guarantees are reused instead, unchanged:

- :class:`~consumer.router.output.TransactionalOutput`: each batch's records, its dedupe
  markers and the consumed raw offsets in one transaction. The offsets go to the group
  ``<group_id>-replay-<prefix>``, so a replay that was interrupted resumes where its last
  committed transaction ended; the fixed ``transactional.id`` of the same name fences a
  second replay into the same prefix and aborts what an interrupted one left open.
- :class:`~consumer.router.dedupe.DedupeWindow` and its changelog in the target's
  ``<prefix>.router.dedupe`` (co-partitioned with raw), read back by
  :class:`~consumer.router.dedupe.DedupeLog` on a resume: the replay drops duplicate
  EventIds as the router does, across an interruption too. The window starts empty at
  ``--from``: a vendor's re-send of an event from before the range is routed.

``--types`` keeps those EventTypes; other records are skipped (not written, not marked),
and the offsets move past them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, IsolationLevel, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from consumer.envelope import HEADER_ERROR_MESSAGE
from consumer.errors import ConfigError, InfrastructureError, RtcbusError
from consumer.kafka.config import admin_config, consumer_config
from consumer.router.dedupe import DedupeLog, DedupeWindow, marker_records
from consumer.router.output import CommitResult, TransactionalOutput, committed_offsets
from consumer.router.transform import DeadLetter, Duplicate, Routed, Transform
from consumer.topic_range import CALL_TIMEOUT_S, read_batch

log = logging.getLogger(__name__)

_BATCH = 500  # raw records per transaction

# on_progress(raw offsets done, raw offsets in the range)
ProgressListener = Callable[[int, int], None]


@dataclass
class ReplaySummary:
    """What a replay run did; counted once each transaction committed.

    Attributes:
        read: raw records this run took through the transform (skipped ones included).
        routed: domain records written, per domain.
        skipped: records of EventTypes ``--types`` left out.
        duplicates: records dropped for an EventId already replayed from their partition.
        dead_letters: records written to the target's DLQ.
        resumed: raw offsets an earlier, interrupted run had already replayed.
    """

    to_prefix: str
    read: int = 0
    routed: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    resumed: int = 0

    def add(self, other: ReplaySummary) -> None:
        self.read += other.read
        self.routed.update(other.routed)
        self.skipped += other.skipped
        self.duplicates += other.duplicates
        self.dead_letters += other.dead_letters

    def describe(self) -> str:
        lines = [
            f"replayed into {self.to_prefix}: {self.read} raw records read, {sum(self.routed.values())} routed, "
            f"{self.duplicates} duplicates dropped, {self.dead_letters} dead letters, {self.skipped} skipped by --types"
        ]
        lines += [f"  {count:>8}  {domain}" for domain, count in sorted(self.routed.items())]
        if self.resumed:
            lines.append(f"  resumed: {self.resumed} raw offsets were replayed by an earlier run")
        return "\n".join(lines)


def target_settings(settings: Any, to_prefix: str) -> Any:
    """``settings`` with every output under ``to_prefix``; the input stays ``settings.raw_topic``.

    Raises:
        ConfigError: the target's topics would be any of the source's (the same prefix, or
            ``topics`` overrides that name the same topics under both prefixes).
    """
    from consumer.kafka.admin import topic_names

    if to_prefix == settings.topic_prefix:
        raise ConfigError(f"--to-prefix {to_prefix!r} is the source's own prefix")
    target = settings.model_copy(update={"topic_prefix": to_prefix})
    shared = sorted(set(topic_names(settings)) & set(topic_names(target)))
    if shared:
        raise ConfigError(f"the replay would write to the source's topics: {', '.join(shared)} (RTCBUS_TOPICS overrides?)")
    return target


def replay_group(settings: Any, to_prefix: str) -> str:
    """The consumer group (and ``transactional.id``) of a replay into ``to_prefix``."""
    return f"{settings.group_id}-replay-{to_prefix}"


def replay(
    settings: Any,
    since_ms: int,
    until_ms: int,
    *,
    to_prefix: str,
    event_types: Iterable[str] | None = None,
    on_progress: ProgressListener | None = None,
    batch_size: int = _BATCH,
) -> ReplaySummary:
    """Replay the raw records of ``settings.raw_topic`` with a timestamp in ``[since_ms,
    until_ms]`` into ``to_prefix``'s domain topics and DLQ (created first), exactly once.

    A second call with the same arguments resumes where the first's last committed
    transaction ended, and writes nothing twice.

    Args:
        event_types: the EventTypes to replay; None: all.
        on_progress: called after each record with the raw offsets done and due.
        batch_size: raw records per transaction.

    Raises:
        ConfigError: an unknown EventType, a target that overlaps the source, or a raw topic
            with another partition count than the settings'.
        RtcbusError: the raw topic does not exist.
        InfrastructureError: Kafka or the Schema Registry failed; the open transaction was
            not committed, and a re-run resumes.
        KafkaException: a fatal Kafka error (e.g. fenced by a second replay into the prefix).
    """
    from consumer.kafka.admin import describe_topics, ensure_topics

    target = target_settings(settings, to_prefix)
    transform = Transform.from_settings(target)
    wanted = None if event_types is None else set(event_types)
    if wanted is not None:
        unknown = sorted(wanted - set(transform.routing.event_types))
        if unknown:
            raise ConfigError(f"--types: unknown EventType(s): {', '.join(unknown)}")

    raw_topic = settings.raw_topic
    found = describe_topics(settings, [raw_topic])[raw_topic]
    if found is None:
        raise RtcbusError(f"topic not found: {raw_topic} (`rtcbus topics create` makes it)")
    if found.partitions != target.partitions:
        # Markers are co-partitioned with raw: the target's changelog needs raw's partition count.
        raise ConfigError(f"{raw_topic} has {found.partitions} partitions, the settings say {target.partitions}")
    ensure_topics(target)

    group = replay_group(settings, to_prefix)
    ranges = _offset_range(settings, raw_topic, found.partitions, since_ms, until_ms)
    consumer = Consumer({**consumer_config(settings, group), "logger": log})
    window_ms = int(settings.dedupe_window_s * 1000)
    dedupe_log = DedupeLog(
        lambda: Consumer(
            {**consumer_config(settings, f"{group}-restore"), "enable.partition.eof": "true", "logger": log}
        ),
        raw_topic, target.dedupe_topic, window_ms, timeout_s=60.0,
    )
    output = TransactionalOutput(
        target, group, dedupe_topic=target.dedupe_topic, replace_when_fenced=False, stopping=lambda: False
    )
    run = _Replay(transform, wanted, output, consumer, dedupe_log, DedupeWindow(window_ms), target.dlq_topic, raw_topic)
    try:
        output.start()
        return run.run(ranges, to_prefix, batch_size, on_progress)
    except BaseException:
        # Interrupted or failed: what is open must not linger, holding read_committed readers
        # of the target back until the transaction times out. Best effort: the next run's
        # init_transactions on the same id aborts it anyway.
        if run.in_transaction:
            try:
                output.abort()
            except Exception as exc:  # the cause that brought us here matters more
                log.warning("abort after a failed replay: %s", exc)
        raise
    finally:
        consumer.close()
        dedupe_log.close()
        output.close()


def _offset_range(settings: Any, topic: str, partitions: int, since_ms: int, until_ms: int) -> dict[int, tuple[int, int]]:
    """Per partition, the first offset at ``since_ms`` and the first past ``until_ms``.

    Asked READ_UNCOMMITTED, so ``latest`` is the high watermark (raw is written without
    transactions but for a quarantine redrive, whose records the range may end in).
    """
    admin = AdminClient({**admin_config(settings), "logger": log})
    tps = [TopicPartition(topic, p) for p in range(partitions)]

    def offsets(spec: OffsetSpec) -> dict[int, int]:
        futures = admin.list_offsets(
            {tp: spec for tp in tps}, isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=CALL_TIMEOUT_S
        )
        return {tp.partition: future.result().offset for tp, future in futures.items()}

    highs = offsets(OffsetSpec.latest())
    starts = offsets(OffsetSpec.for_timestamp(since_ms))
    ends = offsets(OffsetSpec.for_timestamp(until_ms + 1))
    # -1: no record that late, so the range reaches the end.
    return {
        p: (highs[p] if starts[p] < 0 else starts[p], highs[p] if ends[p] < 0 else ends[p])
        for p in range(partitions)
    }


class _Replay:
    """The loop of one replay: read a batch → transform → produce → commit with the offsets."""

    def __init__(
        self,
        transform: Transform,
        wanted: set[str] | None,
        output: TransactionalOutput,
        consumer: Consumer,
        dedupe_log: DedupeLog,
        window: DedupeWindow,
        dlq_topic: str,
        raw_topic: str,
    ) -> None:
        self._transform, self._wanted, self._output = transform, wanted, output
        self._consumer, self._log, self._window = consumer, dedupe_log, window
        self._dlq_topic, self._raw_topic = dlq_topic, raw_topic
        self.in_transaction = False

    def run(
        self, ranges: dict[int, tuple[int, int]], to_prefix: str, batch_size: int, on_progress: ProgressListener | None
    ) -> ReplaySummary:
        summary = ReplaySummary(to_prefix)
        total = sum(max(end - start, 0) for start, end in ranges.values())
        positions = self._resume(ranges)
        summary.resumed = sum(positions[p] - start for p, (start, _end) in ranges.items() if p in positions)
        ends = {p: end for p, (_start, end) in ranges.items() if positions.get(p, end) < end}
        done = total - sum(end - positions[p] for p, end in ends.items())
        if on_progress is not None:
            on_progress(done, total)
        self._consumer.assign([TopicPartition(self._raw_topic, p, positions[p]) for p in ends])
        while ends:
            unfinished = dict(ends)
            batch = read_batch(self._consumer, self._raw_topic, ends, batch_size)
            pending = ReplaySummary(to_prefix)
            processed: dict[int, int] = {}
            markers: dict[int, list[tuple[str, int]]] = {}
            self._output.begin()
            self.in_transaction = True
            for message in batch:
                self._handle(message, pending, markers)
                processed[message.partition()] = message.offset() + 1
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
            for p in unfinished.keys() - ends.keys():
                processed[p] = unfinished[p]  # read to its end: past control records, or nothing left
            offsets = [TopicPartition(self._raw_topic, p, o) for p, o in processed.items()]
            result = self._output.commit(offsets, self._consumer, marker_records(markers))
            self.in_transaction = False
            if result is not CommitResult.COMMITTED:
                # Nothing of it counts; the next run resumes from what Kafka holds.
                self._window.abort()
                raise InfrastructureError(
                    f"a replay transaction was {result.value}: stopped; run the replay again to resume"
                )
            self._window.commit()
            summary.add(pending)
        if on_progress is not None:
            on_progress(total, total)  # offsets without a record (transaction markers) included
        return summary

    def _resume(self, ranges: dict[int, tuple[int, int]]) -> dict[int, int]:
        """Per partition, where to go on: the replay group's committed offset within the
        range, else the range's start; the dedupe window restored from the target's changelog."""
        committed = committed_offsets(
            self._consumer, [TopicPartition(self._raw_topic, p) for p in ranges], CALL_TIMEOUT_S
        )
        positions = {}
        for tp in committed:
            start, end = ranges[tp.partition]
            positions[tp.partition] = min(max(tp.offset, start), end) if tp.offset >= 0 else start
            if start < positions[tp.partition] < end:
                self._window.restore(tp.partition, self._log.markers(tp.partition, positions[tp.partition]))
        return positions

    def _handle(self, message: Message, pending: ReplaySummary, markers: dict[int, list[tuple[str, int]]]) -> None:
        """One raw record → a domain record, a DLQ record, or nothing (a duplicate, skipped)."""
        outcome = self._transform.apply(message, self._window.seen)  # InfrastructureError: stop
        pending.read += 1
        if self._wanted is not None and outcome.event_type not in self._wanted:
            pending.skipped += 1
        elif type(outcome) is Routed:
            self._output.produce(outcome.topic, outcome.value, key=outcome.key, headers=outcome.headers)
            partition, timestamp = message.partition(), message.timestamp()[1]
            markers.setdefault(partition, []).append((outcome.event_id, timestamp))
            self._window.add(partition, outcome.event_id, timestamp)
            pending.routed[outcome.domain] += 1
        elif type(outcome) is Duplicate:
            pending.duplicates += 1
        else:
            self._dead_letter(outcome)
            pending.dead_letters += 1

    def _dead_letter(self, letter: DeadLetter) -> None:
        try:
            self._output.produce(self._dlq_topic, letter.value, key=letter.key, headers=letter.headers)
        except KafkaException:
            # The target DLQ's limit is below what the transform budgeted for (as in the router).
            letter = letter.shrunk()
            self._output.produce(self._dlq_topic, letter.value, key=letter.key, headers=letter.headers)
        reason = dict(letter.headers).get(HEADER_ERROR_MESSAGE, b"").decode("utf-8", "replace")
        log.info("dead-lettered: %s", reason)
