"""``rtcbus audit``: prove, after the fact, that raw and the outputs agree.

Three parts, top to bottom:

- the comparison (pure): what was read (:class:`Observed`, plain dataclasses) in, an
  :class:`AuditReport` out; no Kafka, tested without a broker;
- the reading (I/O): :func:`read_pipeline` reads the raw topic over a time range and every
  output (each domain topic, ``unknown``, the DLQ) whole, with ``read_committed``, waiting
  for open transactions to settle;
- the report: a summary table, or one JSON object for scripts.

Every raw record in the range is classified exactly once, so the counts add up to
``raw_records``: *routed* (it is the Source of a domain/unknown record), *dead-lettered*
(a DLQ record names its coordinates), *pending* (at or past the router group's committed
offset: not processed yet), *dropped as duplicate* (its EventId was routed from another raw
record), else *lost*.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from consumer.envelope import (
    HEADER_ERROR_CLASS,
    HEADER_ERROR_FIELD,
    HEADER_ERROR_MESSAGE,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    parse_envelope,
    parse_event_time,
)
from consumer.errors import EncodingError, RtcbusError, ValidationError
from consumer.router.output import committed_offsets, is_transient, retrying

log = logging.getLogger(__name__)

# How many examples of each finding the table shows (JSON lists them all).
EXAMPLES = 10


# -- what was read -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Coordinates:
    """Where a record sits."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A raw record in the audited range; ``event_id`` is None when its body does not parse."""

    at: Coordinates
    timestamp_ms: int
    event_id: str | None
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """A decoded domain or ``unknown`` record, with the raw record it came from."""

    at: Coordinates
    key: bytes | None
    event_id: str
    source: Coordinates


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A DLQ record, with the raw record it came from (its ``rtcbus.source.*`` headers)."""

    at: Coordinates
    source: Coordinates
    error_class: str = ""
    message: str = ""
    field: str = ""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """An output record the audit cannot attribute: it does not decode, or lacks its Source."""

    at: Coordinates
    reason: str


@dataclass(frozen=True)
class Observed:
    """Everything the comparison needs, as read from Kafka.

    Attributes:
        raw: the raw records in the audited range.
        outputs: every domain and ``unknown`` record.
        dead_letters: every DLQ record.
        unreadable: output records that could not be decoded or attributed.
        committed: the router group's committed offset per raw partition (absent or
            negative: nothing committed there yet).
        unsettled: output partitions whose read stopped below the high watermark (an open
            transaction), as readable descriptions.
    """

    raw_topic: str
    raw: Sequence[RawRecord] = ()
    outputs: Sequence[OutputRecord] = ()
    dead_letters: Sequence[DeadLetter] = ()
    unreadable: Sequence[Unreadable] = ()
    committed: Mapping[int, int] = field(default_factory=dict)
    unsettled: Sequence[str] = ()


# -- the comparison (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem, with what a person needs to find the record."""

    kind: str  # "lost", "duplicated", "out_of_order", "undecodable"
    event_id: str | None
    raw_partition: int | None
    raw_offset: int | None
    detail: str


@dataclass(frozen=True)
class AuditReport:
    """The outcome: counts of raw records by fate, and the findings."""

    raw_records: int
    event_ids: int
    routed: int
    dead_lettered: int
    duplicates_dropped: int
    pending: int
    lost: tuple[Finding, ...] = ()
    duplicated: tuple[Finding, ...] = ()
    out_of_order: tuple[Finding, ...] = ()
    undecodable: tuple[Finding, ...] = ()
    unsettled: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.out_of_order or self.undecodable or self.unsettled)

    @property
    def exit_code(self) -> int:
        """0 when clean, 1 on any finding or an unsettled output."""
        return 0 if self.clean else 1

    def to_dict(self) -> dict[str, Any]:
        """The counts, the EventIds of each finding, and every finding in detail."""
        return {
            "raw_records": self.raw_records,
            "event_ids": self.event_ids,
            "routed": self.routed,
            "dead_lettered": self.dead_lettered,
            "duplicates_dropped": self.duplicates_dropped,
            "pending": self.pending,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "out_of_order": len(self.out_of_order),
            "undecodable": len(self.undecodable),
            "unsettled": len(self.unsettled),
            "lost_ids": _ids(self.lost),
            "duplicated_ids": _ids(self.duplicated),
            "out_of_order_ids": _ids(self.out_of_order),
            "unsettled_partitions": list(self.unsettled),
            "findings": [
                asdict(finding)
                for finding in (*self.lost, *self.duplicated, *self.out_of_order, *self.undecodable)
            ],
        }


def _ids(findings: Iterable[Finding]) -> list[str]:
    # A raw record whose body does not parse has no EventId; it is in "findings" only.
    return sorted({finding.event_id for finding in findings if finding.event_id is not None})


@dataclass(frozen=True, slots=True)
class Fate:
    """What became of one raw record, and the record that shows it.

    ``kind`` is ``routed`` (``output`` names it as its Source), ``dead_lettered``
    (``dead_letter`` names it), ``pending`` (at or past the router group's committed offset),
    ``duplicate`` (``output`` was routed from another raw record of its EventId), or ``lost``.
    """

    kind: str
    output: OutputRecord | None = None
    dead_letter: DeadLetter | None = None


class Matcher:
    """Matches raw records with what the router wrote: the audit's rule, for one record at a time."""

    def __init__(self, observed: Observed) -> None:
        self._committed = observed.committed
        self._routed: dict[Coordinates, OutputRecord] = {}
        for output in observed.outputs:
            self._routed.setdefault(output.source, output)
        self._dead: dict[Coordinates, DeadLetter] = {}
        for letter in observed.dead_letters:
            self._dead.setdefault(letter.source, letter)
        self._outputs_of: dict[str, list[OutputRecord]] = defaultdict(list)
        for output in observed.outputs:
            self._outputs_of[output.event_id].append(output)

    def outputs_of(self, event_id: str | None) -> Sequence[OutputRecord]:
        """Every domain/unknown record of ``event_id``."""
        return self._outputs_of.get(event_id, ()) if event_id is not None else ()

    def fate(self, record: RawRecord) -> Fate:
        """What became of ``record``."""
        if record.at in self._routed:
            return Fate("routed", output=self._routed[record.at])
        if record.at in self._dead:
            return Fate("dead_lettered", dead_letter=self._dead[record.at])
        if record.at.offset >= max(self._committed.get(record.at.partition, 0), 0):
            return Fate("pending")
        copies = self.outputs_of(record.event_id)
        if copies:
            # The router drops a copy its partition routed before: name that one if it was read.
            earlier = [o for o in copies if o.source.partition == record.at.partition and o.source < record.at]
            return Fate("duplicate", output=(earlier or list(copies))[0])
        return Fate("lost")


def compare(observed: Observed, expected: Sequence[str] | None = None) -> AuditReport:
    """Compare raw with the outputs.

    Args:
        observed: what was read.
        expected: EventIds a sender was answered 200 for (``--expect``); each must be in
            raw, and have exactly one domain/unknown record or a DLQ record.
    """
    in_range = {record.at for record in observed.raw}
    matcher = Matcher(observed)

    fates: Counter[str] = Counter()
    lost: list[Finding] = []
    for record in observed.raw:
        kind = matcher.fate(record).kind
        fates[kind] += 1
        if kind == "lost":
            why = "no output record for its EventId" if record.event_id else "body does not parse"
            lost.append(_finding("lost", record.event_id, record.at, f"{why}, and no DLQ record at {record.at}"))

    # Only records whose Source lies in the audited range count: outside it, the raw side
    # was not read, so there is nothing to compare with.
    counted = [output for output in observed.outputs if output.source in in_range]
    duplicated = _duplicated(counted)

    if expected is not None:
        in_raw: dict[str, list[Coordinates]] = defaultdict(list)
        for record in observed.raw:
            if record.event_id is not None:
                in_raw[record.event_id].append(record.at)
        named = {finding.event_id for finding in duplicated}
        for event_id in dict.fromkeys(expected):
            if event_id not in in_raw:
                lost.append(Finding("lost", event_id, None, None, "answered 200, not in raw"))
            elif len(matcher.outputs_of(event_id)) > 1 and event_id not in named:
                duplicated.append(_duplicate(event_id, matcher.outputs_of(event_id)))
            # No output and no dead letter: its raw records are already lost or pending above.

    return AuditReport(
        raw_records=len(observed.raw),
        event_ids=len({record.event_id for record in observed.raw if record.event_id is not None}),
        routed=fates["routed"],
        dead_lettered=fates["dead_lettered"],
        duplicates_dropped=fates["duplicate"],
        pending=fates["pending"],
        lost=tuple(lost),
        duplicated=tuple(duplicated),
        out_of_order=tuple(_out_of_order(counted)),
        undecodable=tuple(
            Finding("undecodable", None, None, None, f"{item.at}: {item.reason}") for item in observed.unreadable
        ),
        unsettled=tuple(observed.unsettled),
    )


def _finding(kind: str, event_id: str | None, raw: Coordinates, detail: str) -> Finding:
    return Finding(kind, event_id, raw.partition, raw.offset, detail)


def _duplicated(outputs: Sequence[OutputRecord]) -> list[Finding]:
    by_id: dict[str, list[OutputRecord]] = defaultdict(list)
    for output in outputs:
        by_id[output.event_id].append(output)
    return [_duplicate(event_id, records) for event_id, records in by_id.items() if len(records) > 1]


def _duplicate(event_id: str, records: Sequence[OutputRecord]) -> Finding:
    first = min(records, key=lambda output: output.source)
    where = ", ".join(str(output.at) for output in sorted(records, key=lambda output: output.at))
    return _finding("duplicated", event_id, first.source, f"{len(records)} records: {where}")


def _out_of_order(outputs: Sequence[OutputRecord]) -> list[Finding]:
    """Records of one output partition and key whose raw offsets (per raw partition) go back."""
    furthest: dict[tuple[str, int, bytes | None, str, int], OutputRecord] = {}
    found = []
    for output in sorted(outputs, key=lambda output: output.at):
        lane = (output.at.topic, output.at.partition, output.key, output.source.topic, output.source.partition)
        before = furthest.get(lane)
        if before is not None and output.source.offset < before.source.offset:
            found.append(
                _finding(
                    "out_of_order",
                    output.event_id,
                    output.source,
                    f"{output.at} (raw offset {output.source.offset}) comes after {before.at} "
                    f"(raw offset {before.source.offset}), key {_text(output.key)}",
                )
            )
        else:
            furthest[lane] = output
    return found


def _text(key: bytes | None) -> str:
    return "none" if key is None else key.decode("utf-8", "replace")


# -- arguments ---------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """``--since``/``--until``: epoch milliseconds, or RFC 3339 with an offset.

    Raises:
        ValueError: neither.
    """
    if text.strip().isdigit():
        return int(text)
    try:
        return parse_event_time(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValidationError:
        raise ValueError(f"not epoch milliseconds nor RFC 3339 with an offset: {text!r}") from None


def read_expected(path: Path) -> list[str]:
    """The EventIds of an ``--expect`` file: one per line, blank lines ignored."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- reading Kafka (I/O) -----------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    """Raw records' timestamps, inclusive at both ends; None is unbounded."""

    since_ms: int | None = None
    until_ms: int | None = None

    def __contains__(self, timestamp_ms: object) -> bool:
        assert isinstance(timestamp_ms, int)
        return (self.since_ms is None or timestamp_ms >= self.since_ms) and (
            self.until_ms is None or timestamp_ms <= self.until_ms
        )


# on_progress(offsets read, offsets to read)
ProgressListener = Callable[[int, int], None]
# Seconds without a single record or end-of-partition before the read is given up.
_STALL_S = 30.0
_BATCH = 1000
# What decoding bytes that are not a record of the contract raises: the codec's own error,
# fastavro's on a body cut short, confluent-kafka's SerializationError (a KafkaException).
# A registry that cannot be reached (SchemaRegistryError) is infrastructure, not caught.
_UNDECODABLE = (EncodingError, ValueError, TypeError, KeyError, IndexError, EOFError, KafkaException)
_METADATA_TIMEOUT_S = 10.0
# How long lookups that a leader or coordinator moving fails are retried before the audit gives up.
_RETRY_S = 60.0


def read_pipeline(
    settings: Any,
    window: TimeRange = TimeRange(),
    *,
    group_id: str,
    settle_timeout_s: float = 60.0,
    on_progress: ProgressListener | None = None,
    outputs_since_ms: int | None = None,
) -> Observed:
    """Read the raw topic over ``window`` and every output whole, with ``read_committed``.

    ``outputs_since_ms`` reads the outputs only from their first record timestamped at or
    after it (the router's clock), instead of whole.

    After every partition reached its end, waits up to ``settle_timeout_s`` for each output
    partition's end (the last stable offset) to reach its high watermark: a killed router's
    open transaction holds it back until the broker aborts it. Partitions still held back
    then are in :attr:`Observed.unsettled`.

    Raises:
        RtcbusError: a topic does not exist, or the read stalled.
        KafkaException: the broker failed.
    """
    from consumer.codec import codec_from_settings
    from consumer.kafka.config import admin_config
    from consumer.routing import RoutingTable
    from consumer.schemas import contract

    raw_topic, dlq_topic = settings.raw_topic, settings.dlq_topic
    topics = [raw_topic, *RoutingTable.from_settings(settings).topics(), dlq_topic]
    partitions = _partitions(settings, topics)
    raw = [tp for tp in partitions if tp[0] == raw_topic]
    codec = codec_from_settings(settings, contract())
    # Committed offsets first: whatever the router committed by now has its outputs
    # committed too (same transaction), so reading the outputs afterwards sees them.
    committed = read_committed_offsets(settings, group_id, raw)

    admin = AdminClient({**admin_config(settings), "logger": log})
    highs = _list_offsets(admin, partitions, OffsetSpec.latest())
    starts = _list_offsets(admin, partitions, OffsetSpec.earliest())
    if window.since_ms is not None:
        found = _list_offsets(admin, raw, OffsetSpec.for_timestamp(window.since_ms))
        starts.update({tp: highs[tp] if offset < 0 else offset for tp, offset in found.items()})  # -1: none that recent
    if outputs_since_ms is not None:
        outputs = [tp for tp in partitions if tp[0] != raw_topic]
        found = _list_offsets(admin, outputs, OffsetSpec.for_timestamp(outputs_since_ms))
        starts.update({tp: highs[tp] if offset < 0 else offset for tp, offset in found.items()})

    consumer = _consumer(settings, f"rtcbus-audit-{uuid.uuid4().hex[:12]}", {"enable.partition.eof": "true"})
    try:
        consumer.assign([TopicPartition(topic, p, offset) for (topic, p), offset in starts.items()])

        collector = _Collector(raw_topic, dlq_topic, window, codec)
        read_to = dict(starts)  # the next offset of each partition to read
        at_end: set[tuple[str, int]] = set()
        # Raw is written without transactions: its end is its high watermark already.
        settled = set(raw)
        settle_deadline: float | None = None
        last_news = time.monotonic()

        def report_progress() -> None:
            if on_progress is not None:
                done = sum(read_to[tp] - starts[tp] for tp in partitions)
                on_progress(done, sum(max(highs[tp], read_to[tp]) - starts[tp] for tp in partitions))

        while True:
            messages = consumer.consume(_BATCH, timeout=0.2)
            for message in messages:
                tp = (message.topic(), message.partition())
                error = message.error()
                if error is None:
                    at_end.discard(tp)
                    read_to[tp] = message.offset() + 1
                    collector.add(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    # With read_committed, the end is the last stable offset, past any
                    # transaction markers: below the high watermark only while one is open.
                    at_end.add(tp)
                    read_to[tp] = max(read_to[tp], message.offset())
                elif error.fatal() or not is_transient(error):
                    raise KafkaException(error)
                else:
                    # A leader moving (a topic just created, a broker restarted): librdkafka
                    # fetches again by itself, and a read that stops moving is a stall below.
                    log.warning("audit: %s", error.str())
            if messages:
                last_news = time.monotonic()
                report_progress()
            if settle_deadline is None:
                if len(at_end) < len(partitions):
                    if time.monotonic() - last_news > _STALL_S:
                        stuck = ", ".join(f"{t}[{p}]" for t, p in sorted(set(partitions) - at_end))
                        raise RtcbusError(f"reading stalled for {_STALL_S:.0f} s at {stuck}")
                    continue
                # Everything was read once; from now on, only settling is waited for.
                settle_deadline = time.monotonic() + settle_timeout_s
            waiting = at_end - settled
            if waiting:
                highs.update(_list_offsets(admin, sorted(waiting), OffsetSpec.latest()))
                settled |= {tp for tp in waiting if read_to[tp] >= highs[tp]}
            if len(settled) == len(partitions) or time.monotonic() >= settle_deadline:
                break
            # The broker aborts a dead producer's transaction on its own clock; new records
            # (or a later end of partition) arrive through consume() above meanwhile.
        report_progress()
        unsettled = [
            f"{t}[{p}] read to {read_to[(t, p)]}, high watermark {highs[(t, p)]}"
            for t, p in sorted(set(partitions) - settled)
        ]
        return collector.to_observed(committed, unsettled)
    finally:
        consumer.close()


def read_committed_offsets(settings: Any, group_id: str, partitions: Sequence[tuple[str, int]]) -> dict[int, int]:
    """The committed offset of ``group_id`` per partition (negative: none yet).

    Asks the group coordinator without joining the group, so a running router is not disturbed.
    """
    consumer = _consumer(settings, group_id)

    def read() -> dict[int, int]:
        committed = committed_offsets(consumer, [TopicPartition(t, p) for t, p in partitions], _METADATA_TIMEOUT_S)
        return {tp.partition: tp.offset for tp in committed}

    try:
        return retrying(read, _never, _RETRY_S)  # a coordinator moving or still loading
    finally:
        consumer.close()


def _consumer(settings: Any, group_id: str, extra: Mapping[str, str] | None = None) -> Consumer:
    from consumer.kafka.config import consumer_config

    # librdkafka's log lines (a failed connect, every few ms) go to logging, not stderr.
    return Consumer({**consumer_config(settings, group_id), **(extra or {}), "logger": log})


def _partitions(settings: Any, topics: Sequence[str]) -> list[tuple[str, int]]:
    from consumer.kafka.admin import describe_topics

    found = describe_topics(settings, topics)  # says so when Kafka does not answer
    missing = [topic for topic, info in found.items() if info is None]
    if missing:
        raise RtcbusError(f"topic(s) not found: {', '.join(missing)} (`rtcbus topics create` makes them)")
    return [(topic, p) for topic in topics for p in range(found[topic].partitions)]


def _list_offsets(admin: AdminClient, partitions: Sequence[tuple[str, int]], spec: OffsetSpec) -> dict[tuple[str, int], int]:
    """The offset ``spec`` names in each partition.

    Asked READ_UNCOMMITTED: ``latest`` is then the high watermark, records of open
    transactions included; a read_committed consumer's ``get_watermark_offsets`` would
    answer the last stable offset, and an open transaction would go unnoticed.
    """

    def read() -> dict[tuple[str, int], int]:
        futures = admin.list_offsets(
            {TopicPartition(t, p): spec for t, p in partitions},
            isolation_level=IsolationLevel.READ_UNCOMMITTED,
            request_timeout=_METADATA_TIMEOUT_S,
        )
        return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}

    return retrying(read, _never, _RETRY_S)  # a leader moving: a topic just created, a broker lost


def _never() -> bool:
    return False


class _Collector:
    """Turns messages into the comparison's dataclasses, as they are read."""

    def __init__(self, raw_topic: str, dlq_topic: str, window: TimeRange, codec: Any) -> None:
        self._raw_topic, self._dlq_topic, self._window, self._codec = raw_topic, dlq_topic, window, codec
        self.raw: list[RawRecord] = []
        self.outputs: list[OutputRecord] = []
        self.dead_letters: list[DeadLetter] = []
        self.unreadable: list[Unreadable] = []

    def add(self, message: Message) -> None:
        at = Coordinates(message.topic(), message.partition(), message.offset())
        if at.topic == self._raw_topic:
            timestamp = message.timestamp()[1]
            if timestamp in self._window:
                self.raw.append(RawRecord(at, timestamp, _event_id(message.value()), message.key()))
        elif at.topic == self._dlq_topic:
            self._add_dead_letter(at, message)
        else:
            self._add_output(at, message)

    def _add_output(self, at: Coordinates, message: Message) -> None:
        try:
            record = self._codec.decode(message.value() or b"", at.topic)
        except _UNDECODABLE as exc:
            self.unreadable.append(Unreadable(at, f"does not decode: {exc}"))
            return
        source = record.get("Source") if isinstance(record, dict) else None
        event_id = record.get("EventId") if isinstance(record, dict) else None
        if not isinstance(source, dict) or not isinstance(event_id, str):
            self.unreadable.append(Unreadable(at, "decodes, but has no EventId or Source"))
            return
        self.outputs.append(
            OutputRecord(at, message.key(), event_id, Coordinates(source["Topic"], source["Partition"], source["Offset"]))
        )

    def _add_dead_letter(self, at: Coordinates, message: Message) -> None:
        # The router appends its headers after the raw record's: the last of a name wins.
        headers = {name: value for name, value in message.headers() or []}
        try:
            source = Coordinates(
                headers[HEADER_SOURCE_TOPIC].decode(),
                int(headers[HEADER_SOURCE_PARTITION]),
                int(headers[HEADER_SOURCE_OFFSET]),
            )
        except (KeyError, ValueError, AttributeError):
            self.unreadable.append(Unreadable(at, "DLQ record without valid rtcbus.source.* headers"))
            return
        def text(name: str) -> str:
            return (headers.get(name) or b"").decode("utf-8", "replace")

        self.dead_letters.append(
            DeadLetter(at, source, text(HEADER_ERROR_CLASS), text(HEADER_ERROR_MESSAGE), text(HEADER_ERROR_FIELD))
        )

    def to_observed(self, committed: Mapping[int, int], unsettled: Sequence[str]) -> Observed:
        return Observed(
            raw_topic=self._raw_topic,
            raw=self.raw,
            outputs=self.outputs,
            dead_letters=self.dead_letters,
            unreadable=self.unreadable,
            committed=committed,
            unsettled=unsettled,
        )


def _event_id(body: bytes | None) -> str | None:
    if body is None:
        return None
    try:
        return parse_envelope(body).event_id
    except ValidationError:
        return None  # must have been dead-lettered; matched by coordinates


# -- the report --------------------------------------------------------------------------------


@contextmanager
def progress_bar() -> Iterator[ProgressListener]:
    """A rich progress bar on stderr (stdout stays for the report), as a progress listener."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]reading"), BarColumn(), MofNCompleteColumn(), TextColumn("offsets"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("reading", total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def to_json(report: AuditReport) -> str:
    """The report as one JSON object (keys in :meth:`AuditReport.to_dict`)."""
    return json.dumps(report.to_dict(), ensure_ascii=False)


def print_report(report: AuditReport, console: Any = None) -> None:
    """The summary table, then the first examples of each finding."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    summary = Table(title="rtcbus audit", show_header=False)
    summary.add_column("what")
    summary.add_column("count", justify="right")
    for name, count in (
        ("raw records", report.raw_records),
        ("distinct EventIds", report.event_ids),
        ("routed", report.routed),
        ("dead-lettered", report.dead_lettered),
        ("dropped as duplicate", report.duplicates_dropped),
        ("pending", report.pending),
        ("lost", len(report.lost)),
        ("duplicated", len(report.duplicated)),
        ("out of order", len(report.out_of_order)),
        ("undecodable", len(report.undecodable)),
    ):
        summary.add_row(name, str(count))
    console.print(summary)
    for title, findings in (
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("out of order", report.out_of_order),
        ("undecodable", report.undecodable),
    ):
        if not findings:
            continue
        examples = Table(title=f"{title}: first {min(len(findings), EXAMPLES)} of {len(findings)}")
        for column in ("EventId", "raw partition", "raw offset", "detail"):
            examples.add_column(column)
        for finding in findings[:EXAMPLES]:
            examples.add_row(
                finding.event_id or "-",
                "-" if finding.raw_partition is None else str(finding.raw_partition),
                "-" if finding.raw_offset is None else str(finding.raw_offset),
                finding.detail,
            )
        console.print(examples)
    for partition in report.unsettled:
        console.print(f"[bold red]not settled:[/] {partition} (an open transaction; try a longer --settle-timeout)")
    console.print("[bold green]clean[/]" if report.clean else "[bold red]findings: see above[/]")
