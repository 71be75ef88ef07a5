"""The dead-letter topic: what it holds, and the redrive of its records through the current transform.

The router dead-letters what it cannot process to ``<prefix>.callbacks.dlq``: the raw bytes,
the raw headers, and why (``rtcbus.error.class``, ``.message``, ``.field``) and where from
(``rtcbus.source.topic``, ``.partition``, ``.offset``). :func:`list_dlq` counts them. Once a
schema or a bug is fixed, :func:`redrive` runs them through the transform as it is now and
writes what it routes to the domain topics, exactly once, with the raw record as its Source.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException, Message, Producer, TopicPartition

from consumer.audit import ProgressListener, TimeRange
from consumer.envelope import (
    HEADER_ERROR_CLASS,
    HEADER_ERROR_FIELD,
    HEADER_ERROR_MESSAGE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    HEADER_TRUNCATED,
    header_text,
)
from consumer.errors import InfrastructureError
from consumer.kafka.config import consumer_config, producer_config
from consumer.router.transform import DeadLetter, Duplicate, Routed, Transform
from consumer.topic_range import (
    CALL_TIMEOUT_S, abort_transaction, assign_due, commit_transaction, due_ranges, partitions_of, read_batch, read_range,
)

_BATCH = 500  # records per transaction
_EXAMPLES = 5  # examples of still failing records in a redrive's summary
_LIST_EXAMPLES = 10  # examples in a listing: the first record of each error class and field
# What the router added to the raw record's headers; the rest are the raw headers, which the
# redrive hands back to the transform as the raw record had them.
_ROUTER_HEADERS = frozenset(
    {
        HEADER_ERROR_CLASS, HEADER_ERROR_MESSAGE, HEADER_ERROR_FIELD,
        HEADER_SOURCE_TOPIC, HEADER_SOURCE_PARTITION, HEADER_SOURCE_OFFSET, HEADER_TRUNCATED,
    }
)


def redrive_group(settings: Any) -> str:
    """The redrive's consumer group on the DLQ, also its ``transactional.id``."""
    return f"{settings.group_id}-dlq-redrive"


@dataclass(frozen=True)
class Letter:
    """One DLQ record, as its headers describe it.

    Attributes:
        timestamp_ms: the DLQ record's own timestamp: when it was dead-lettered.
        error_class, field, reason: the router's ``rtcbus.error.*`` headers (``field`` is
            empty when the error names none).
        source: the raw record it came from, ``(topic, partition, offset)``.
        truncated: what the router cut (``rtcbus.dlq.truncated``), if anything.
    """

    partition: int
    offset: int
    timestamp_ms: int | None
    error_class: str
    field: str
    reason: str
    event_id: str | None
    event_type: str | None
    source: tuple[str, int, int] | None
    truncated: str | None

    @classmethod
    def from_message(cls, message: Message) -> Letter:
        kind, timestamp = message.timestamp()
        return cls.from_headers(
            message.partition(), message.offset(),
            timestamp if kind != TIMESTAMP_NOT_AVAILABLE else None,
            dict(message.headers() or ()),
        )

    @classmethod
    def from_headers(
        cls, partition: int, offset: int, timestamp_ms: int | None, headers: dict[str, bytes | None]
    ) -> Letter:
        try:
            source: tuple[str, int, int] | None = (
                header_text(headers[HEADER_SOURCE_TOPIC]) or "",
                int(headers[HEADER_SOURCE_PARTITION] or b""),
                int(headers[HEADER_SOURCE_OFFSET] or b""),
            )
        except (KeyError, ValueError):
            source = None
        return cls(
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            error_class=header_text(headers.get(HEADER_ERROR_CLASS)) or "?",
            field=header_text(headers.get(HEADER_ERROR_FIELD)) or "",
            reason=header_text(headers.get(HEADER_ERROR_MESSAGE)) or "",
            event_id=header_text(headers.get(HEADER_EVENT_ID)),
            event_type=header_text(headers.get(HEADER_EVENT_TYPE)),
            source=source if source and source[0] else None,
            truncated=header_text(headers.get(HEADER_TRUNCATED)),
        )

    @property
    def kind(self) -> str:
        """The error class, and the field when there is one: what letters are counted by."""
        return f"{self.error_class} {self.field}" if self.field else self.error_class

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id, "event_type": self.event_type,
            "partition": self.partition, "offset": self.offset, "timestamp_ms": self.timestamp_ms,
            "error_class": self.error_class, "field": self.field or None, "reason": self.reason,
        }

    def describe(self) -> str:
        return (
            f"EventId={self.event_id or '?'} {self.event_type or '?'} at {self.partition}:{self.offset}  "
            f"{self.error_class}: {self.reason}"
        )


# -- listing --------------------------------------------------------------------------------


@dataclass
class DlqListing:
    """What the DLQ holds: records by error class and by field, their time range, examples."""

    by_class: Tally[str] = field(default_factory=Tally)
    by_field: Tally[str] = field(default_factory=Tally)
    """Only records whose error names a field (validation errors), by that field."""
    first_ms: int | None = None
    last_ms: int | None = None
    examples: list[Letter] = field(default_factory=list)
    """The first record of each error class and field, up to ten."""

    @property
    def total(self) -> int:
        return sum(self.by_class.values())

    def add(self, letter: Letter) -> None:
        self.by_class[letter.error_class] += 1
        if letter.field:
            self.by_field[letter.field] += 1
        if letter.timestamp_ms is not None:
            self.first_ms = min(letter.timestamp_ms, self.first_ms or letter.timestamp_ms)
            self.last_ms = max(letter.timestamp_ms, self.last_ms or letter.timestamp_ms)
        if len(self.examples) < _LIST_EXAMPLES and all(e.kind != letter.kind for e in self.examples):
            self.examples.append(letter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_error_class": dict(self.by_class.most_common()),
            "by_field": dict(self.by_field.most_common()),
            "first": _utc(self.first_ms) if self.first_ms is not None else None,
            "last": _utc(self.last_ms) if self.last_ms is not None else None,
            "first_ms": self.first_ms,
            "last_ms": self.last_ms,
            "examples": [example.to_dict() for example in self.examples],
        }

    def describe(self) -> str:
        lines = [f"{self.total} dead letters"]
        if self.first_ms is not None and self.last_ms is not None:
            lines.append(f"dead-lettered from {_utc(self.first_ms)} to {_utc(self.last_ms)}")
        if self.by_class:
            lines.append(f"{'records':>8}  error class")
            lines += [f"{count:>8}  {name}" for name, count in self.by_class.most_common()]
        if self.by_field:
            lines.append(f"{'records':>8}  field")
            lines += [f"{count:>8}  {name}" for name, count in self.by_field.most_common()]
        if self.examples:
            lines.append("examples:")
            lines += [f"  {example.describe()}" for example in self.examples]
        return "\n".join(lines)


def list_dlq(settings: Any) -> DlqListing:
    """Read the whole DLQ once (``read_committed``, no offsets committed) and count what it holds.

    Raises:
        RtcbusError: the DLQ topic does not exist.
        InfrastructureError: Kafka did not deliver the records up to the end.
    """
    listing = DlqListing()
    reader = Consumer(consumer_config_for_reading(settings, "list"))
    try:
        starts = {p: OFFSET_BEGINNING for p in partitions_of(reader, settings.dlq_topic)}
        for message in read_range(reader, settings.dlq_topic, starts):
            listing.add(Letter.from_message(message))
    finally:
        reader.close()
    return listing


# -- redrive --------------------------------------------------------------------------------


@dataclass
class RedriveSummary:
    """What a redrive did (or, dry, would do).

    Attributes:
        redriven: records routed and written to their domain topics (dry: would be), by topic.
        already_present: records whose EventId was already on its domain topic (the original
            got through, or an earlier redrive wrote it), or was redriven earlier in this run
            from another dead letter of the same event: not written again.
        still_failing: records the current transform still cannot process, by error class and
            field; not written anywhere (the DLQ does not grow).
        skipped: records the filters left out.
        expired: records the DLQ's retention deleted before a redrive reached them.
    """

    dry_run: bool = False
    redriven: Tally[str] = field(default_factory=Tally)
    already_present: int = 0
    still_failing: Tally[str] = field(default_factory=Tally)
    failing_examples: list[str] = field(default_factory=list)
    skipped: int = 0
    expired: int = 0

    @property
    def examined(self) -> int:
        return sum(self.redriven.values()) + self.already_present + sum(self.still_failing.values()) + self.skipped

    def describe(self) -> str:
        verb = "would redrive" if self.dry_run else "redrove"
        redriven, failing = sum(self.redriven.values()), sum(self.still_failing.values())
        lines = [
            f"{self.examined} dead letters examined: {verb} {redriven} to their domain topics, "
            f"{self.already_present} already there, {failing} still failing, {self.skipped} left out by the filters"
        ]
        lines += [f"  {count:>6}  to {topic}" for topic, count in self.redriven.most_common()]
        lines += [f"  {count:>6}  still failing: {kind}" for kind, count in self.still_failing.most_common()]
        if self.failing_examples:
            lines.append("  e.g.")
            lines += [f"    {example}" for example in self.failing_examples]
        if self.expired:
            lines.append(f"  {self.expired} dead letters expired from the DLQ before a redrive reached them")
        return "\n".join(lines)


@dataclass(frozen=True)
class Filters:
    """Which dead letters a redrive takes: by error class (none given: every class) and by
    the DLQ record's timestamp, when it was dead-lettered."""

    error_classes: frozenset[str] = frozenset()
    window: TimeRange = TimeRange()

    def take(self, letter: Letter) -> bool:
        if self.error_classes and letter.error_class not in self.error_classes:
            return False
        if self.window != TimeRange():
            return letter.timestamp_ms is not None and letter.timestamp_ms in self.window
        return True


def redrive(
    settings: Any,
    transform: Transform,
    *,
    error_classes: Iterable[str] = (),
    window: TimeRange = TimeRange(),
    dry_run: bool = False,
    on_progress: ProgressListener | None = None,
    batch_size: int = _BATCH,
) -> RedriveSummary:
    """Run the DLQ's records through ``transform`` and write what it routes to its domain topic.

    Reads the DLQ as consumer group ``<group_id>-dlq-redrive`` (``read_committed``) from its
    committed offsets to the ends seen at the start. Each record is handed to the transform as
    the raw record it was (its ``rtcbus.source.*`` coordinates, key, value and raw headers), so
    the domain record names the raw record as its Source. What is routed is written in a
    transaction that also commits the group's offsets; the fixed ``transactional.id``
    ``<group_id>-dlq-redrive`` fences a second redrive running at the same time.

    Exactly once, by EventId: before writing, the EventIds already on the domain topics are
    read, and a record whose EventId is among them (or was redriven earlier in the run) is
    not written again. Records that still fail, and records the filters leave out, are not
    written anywhere, and the group's offsets never move past them: a later redrive (another
    filter, another fix) finds them again, and the records it re-reads behind them are
    recognised by their EventId.

    Args:
        transform: the transform as it is now (``Transform.from_settings``).
        error_classes: only dead letters of these classes (``rtcbus.error.class``); none: all.
        window: only dead letters whose DLQ timestamp is in it.
        dry_run: transform and report; write and commit nothing.
        on_progress: called with (offsets read, offsets to read) after each batch.
        batch_size: records per transaction.

    Raises:
        RtcbusError: the DLQ topic does not exist.
        InfrastructureError: Kafka (or a Schema Registry the encoding needs) failed; nothing
            of the open transaction was written.
    """
    filters = Filters(frozenset(error_classes), window)
    group = redrive_group(settings)
    topic = settings.dlq_topic
    summary = RedriveSummary(dry_run=dry_run)
    consumer = Consumer(consumer_config(settings, group))
    producer: Producer | None = None
    try:
        due, summary.expired = due_ranges(consumer, topic)
        if not due:
            return summary
        oldest, count = _oldest_taken(settings, due, filters)
        if oldest is None:
            summary.skipped = count
            return summary
        # Which EventIds are on the domain topics already. A copy of a dead-lettered event can
        # only be there from after it was dead-lettered (the original getting through later, or
        # an earlier redrive): a copy routed before it, within the router's dedupe window,
        # would have made the router drop it as a duplicate instead. So the topics are read
        # from the oldest dead letter taken, less that window for the routers' clock skew.
        # Not the router's dedupe changelog: it is keyed by raw partition, holds only what the
        # router wrote (not a redrive's records), and only for the window.
        present = present_event_ids(
            settings, transform.routing.topics(), since_ms=oldest - int(settings.dedupe_window_s * 1000)
        )
        if not dry_run:
            producer = Producer(producer_config(settings, transactional_id=group))
            producer.init_transactions(CALL_TIMEOUT_S)
        ends = assign_due(consumer, topic, due)
        total = sum(end - start for start, end in due.values())
        read_to = {p: start for p, (start, _end) in due.items()}
        held: dict[int, int] = {}  # partition -> the first record not settled, never committed past
        while ends:
            batch = read_batch(consumer, topic, ends, batch_size)
            _settle(batch, transform, present, filters, held, producer, consumer, summary)
            for message in batch:
                read_to[message.partition()] = message.offset() + 1
            if on_progress:
                on_progress(total if not ends else sum(read_to[p] - due[p][0] for p in due), total)
    except BaseException as exc:
        if producer is not None:
            abort_transaction(producer)
        if isinstance(exc, KafkaException):
            raise InfrastructureError(
                f"redrive stopped, nothing of its open transaction written: {exc.args[0].str()}"
            ) from exc
        raise
    finally:
        consumer.close()
        if producer is not None:
            producer.flush(CALL_TIMEOUT_S)
    return summary


def _settle(
    batch: list[Message],
    transform: Transform,
    present: set[str],
    filters: Filters,
    held: dict[int, int],
    producer: Producer | None,
    consumer: Consumer,
    summary: RedriveSummary,
) -> None:
    """Transform ``batch``; write what is routed and commit the offsets of what is settled,
    in one transaction."""
    if not batch:
        return
    seen: Callable[[int, str], bool] = lambda _partition, event_id: event_id in present  # noqa: E731
    # Per record: None (left out by the filters), an outcome, or why it cannot be redriven.
    verdicts: list[tuple[Letter, Routed | Duplicate | DeadLetter | str | None]] = []
    offsets: dict[int, int] = {}
    for message in batch:
        letter = Letter.from_message(message)
        verdict: Routed | Duplicate | DeadLetter | str | None = None
        if filters.take(letter):
            raw = raw_record(message, letter)
            verdict = raw if isinstance(raw, str) else transform.apply(raw, seen)
        if type(verdict) is Routed:
            present.add(verdict.event_id)  # a second dead letter of the event is a duplicate
        partition = message.partition()
        if type(verdict) not in (Routed, Duplicate) and partition not in held:
            held[partition] = message.offset()
        offsets[partition] = held.get(partition, message.offset() + 1)
        verdicts.append((letter, verdict))
    if producer is not None:
        producer.begin_transaction()
        for _letter, verdict in verdicts:
            if type(verdict) is Routed:
                producer.produce(verdict.topic, verdict.value, key=verdict.key, headers=verdict.headers)
        commit_transaction(producer, consumer, batch[0].topic(), offsets)
    # Counted once the transaction committed: a failed one counts nothing.
    for letter, verdict in verdicts:
        if verdict is None:
            summary.skipped += 1
        elif type(verdict) is Routed:
            summary.redriven[verdict.topic] += 1
        elif type(verdict) is Duplicate:
            summary.already_present += 1
        else:
            if isinstance(verdict, DeadLetter):
                now = Letter.from_headers(letter.partition, letter.offset, letter.timestamp_ms, dict(verdict.headers))
                kind, example = now.kind, now.describe()
            else:
                kind, example = verdict, f"{letter.describe()}  ({verdict})"
            summary.still_failing[kind] += 1
            if len(summary.failing_examples) < _EXAMPLES:
                summary.failing_examples.append(example)


def raw_record(message: Message, letter: Letter | None = None) -> Message | str:
    """The raw record a dead letter was made from, as the transform reads it: the router's
    headers taken off, the raw coordinates put back (the domain record's Source); or why it
    cannot be had: its value was cut (the original, whole, is in raw at its coordinates while
    raw's retention keeps it), or it does not say where it came from. Never partial bytes.

    Args:
        letter: ``Letter.from_message(message)``, if the caller has it already.
    """
    letter = letter or Letter.from_message(message)
    if letter.truncated and "value" in letter.truncated:
        topic, partition, offset = letter.source or ("?", -1, -1)
        return f"value cut in the DLQ; the original is at {topic} {partition}:{offset}"
    if letter.source is None:
        return "no rtcbus.source.* headers: not a dead letter of the router"
    topic, partition, offset = letter.source
    headers = [(name, value) for name, value in message.headers() or () if name not in _ROUTER_HEADERS]
    return Message(
        topic=topic, partition=partition, offset=offset, key=message.key(), value=message.value(),
        headers=headers, timestamp=message.timestamp(),
    )


def _oldest_taken(settings: Any, due: dict[int, tuple[int, int]], filters: Filters) -> tuple[int | None, int]:
    """The oldest timestamp of the due dead letters the filters take (None if they take
    none), and how many due dead letters there are.

    A pass of its own, before anything is written, so that the domain topics are read once."""
    reader = Consumer(consumer_config_for_reading(settings, "plan"))
    oldest: int | None = None
    count = 0
    try:
        starts = {p: start for p, (start, _end) in due.items()}
        for message in read_range(reader, settings.dlq_topic, starts, {p: end for p, (_s, end) in due.items()}):
            count += 1
            letter = Letter.from_message(message)
            if filters.take(letter):
                stamp = letter.timestamp_ms if letter.timestamp_ms is not None else 0
                oldest = stamp if oldest is None else min(oldest, stamp)
    finally:
        reader.close()
    return oldest, count


def present_event_ids(settings: Any, topics: Iterable[str], since_ms: int) -> set[str]:
    """The EventIds (``rtcbus.event_id`` header) of the committed records of ``topics`` with
    a timestamp at or after ``since_ms``. A topic that does not exist holds none.

    Raises:
        InfrastructureError: Kafka did not deliver the records up to the end.
    """
    present: set[str] = set()
    reader = Consumer(consumer_config_for_reading(settings, "dedupe"))
    try:
        for topic in topics:
            metadata = reader.list_topics(topic, timeout=CALL_TIMEOUT_S).topics.get(topic)
            if metadata is None or metadata.error is not None:
                continue
            # A timestamp below 0 would mean "latest" (-1) or "earliest" (-2) to Kafka.
            asked = [TopicPartition(topic, p, max(since_ms, 0)) for p in sorted(metadata.partitions)]
            starts = {}
            for tp in reader.offsets_for_times(asked, timeout=CALL_TIMEOUT_S):
                if tp.error is not None:
                    raise KafkaException(tp.error)
                if tp.offset >= 0:  # else nothing that recent
                    starts[tp.partition] = tp.offset
            for message in read_range(reader, topic, starts):
                event_id = dict(message.headers() or ()).get(HEADER_EVENT_ID)
                if event_id is not None:
                    present.add(event_id.decode("utf-8", "replace"))
    finally:
        reader.close()
    return present


# -- reading --------------------------------------------------------------------------------


def consumer_config_for_reading(settings: Any, purpose: str) -> dict[str, str]:
    """A consumer that only reads: a group of its own that never commits."""
    return consumer_config(settings, f"rtcbus-dlq-{purpose}-{uuid.uuid4().hex[:12]}")


def to_json(listing: DlqListing) -> str:
    return json.dumps(listing.to_dict(), ensure_ascii=False)


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")

