"""``rtcbus find``: one event's whole lineage, the first thing asked when "we never got it".

Three parts, top to bottom:

- the lineage (pure): what the audit's reading observed and the quarantine records in, a
  :class:`FindReport` out, one :class:`Lineage` per EventId; each raw copy's fate is the
  audit's (:class:`consumer.audit.Matcher`), so ``find`` and ``audit`` never disagree;
- the reading (I/O): :func:`consumer.audit.read_pipeline` over the time range (raw from
  ``--since``, the outputs from a little before it, ``read_committed``), and the quarantine
  over the same range;
- the report: plain lines, or one JSON object for scripts.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.audit import (
    Coordinates,
    Fate,
    Matcher,
    Observed,
    ProgressListener,
    RawRecord,
    TimeRange,
    read_pipeline,
)
from consumer.envelope import HEADER_ERROR_MESSAGE, HEADER_EVENT_ID, HEADER_RECEIVED_AT, header_text, parse_envelope
from consumer.errors import RtcbusError, ValidationError

log = logging.getLogger(__name__)

# Lineages shown when --limit is not given (with --room; an EventId has one).
DEFAULT_LIMIT = 20
# Outputs are stamped by the router's clock, raw by the broker's: the outputs are read from
# this much before --since, so a router whose clock is behind still has its records found.
_CLOCK_SLACK_MS = 3600 * 1000
_CALL_TIMEOUT_S = 10.0
_STALL_S = 30.0


# -- the lineage (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """What to find: one EventId, or every event of a room, among raw records in ``window``."""

    event_id: str | None = None
    room: str | None = None
    window: TimeRange = TimeRange()

    def __post_init__(self) -> None:
        if (self.event_id is None) == (self.room is None):
            raise ValueError("give an EventId or a room, not both")

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "room": self.room,
            "since": _utc(self.window.since_ms),
            "until": _utc(self.window.until_ms),
        }


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A quarantine record: a body the shim refused for its signature.

    ``room`` is the key the shim would give its body (RoomId first), None if it does not parse.
    """

    at: Coordinates
    received_ms: int | None
    event_id: str | None
    room: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**_where(self.at), "received_ms": self.received_ms, "time": _utc(self.received_ms), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class RawCopy:
    """One raw record of the event, and what the router made of it."""

    record: RawRecord
    fate: Fate

    def verdict(self) -> str:
        """The fate in words."""
        fate = self.fate
        if fate.kind == "routed" and fate.output is not None:
            return f"routed to {fate.output.at}"
        if fate.kind == "dead_lettered" and fate.dead_letter is not None:
            letter = fate.dead_letter
            return f"dead-lettered to {letter.at}: {letter.error_class}: {letter.message}"
        if fate.kind == "duplicate" and fate.output is not None:
            return f"dropped as a duplicate of {fate.output.source} (routed to {fate.output.at})"
        if fate.kind == "pending":
            return "not processed yet: at or past the router group's committed offset"
        return "lost: no domain record and no dead letter, though the router committed past it"

    def to_dict(self) -> dict[str, Any]:
        fate, record = self.fate, self.record
        letter = fate.dead_letter
        return {
            **_where(record.at),
            "timestamp_ms": record.timestamp_ms,
            "time": _utc(record.timestamp_ms),
            "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
            "fate": fate.kind,
            "verdict": self.verdict(),
            "routed_to": _where(fate.output.at) if fate.kind == "routed" and fate.output else None,
            "dead_letter": (
                {**_where(letter.at), "error_class": letter.error_class, "reason": letter.message, "field": letter.field}
                if letter is not None
                else None
            ),
            "duplicate_of": (
                {**_where(fate.output.source), "routed_to": _where(fate.output.at)}
                if fate.kind == "duplicate" and fate.output
                else None
            ),
        }


@dataclass(frozen=True)
class Lineage:
    """Everything found for one EventId (None: a raw body that does not parse)."""

    event_id: str | None
    raw: tuple[RawCopy, ...] = ()
    quarantined: tuple[Quarantined, ...] = ()

    @property
    def first_ms(self) -> int:
        times = [copy.record.timestamp_ms for copy in self.raw]
        times += [q.received_ms for q in self.quarantined if q.received_ms is not None]
        return min(times, default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "raw": [copy.to_dict() for copy in self.raw],
            "quarantine": [record.to_dict() for record in self.quarantined],
        }


@dataclass(frozen=True)
class FindReport:
    """The lineages found, oldest first, at most the limit; ``more`` counts those left out."""

    query: Query
    lineages: tuple[Lineage, ...] = ()
    more: int = 0
    unsettled: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return bool(self.lineages)

    @property
    def exit_code(self) -> int:
        """0 when something was found, 1 when nothing was."""
        return 0 if self.found else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query.to_dict(),
            "found": self.found,
            "events": [lineage.to_dict() for lineage in self.lineages],
            "more": self.more,
            "unsettled_partitions": list(self.unsettled),
        }


def trace(observed: Observed, quarantined: Sequence[Quarantined], query: Query, limit: int = DEFAULT_LIMIT) -> FindReport:
    """The lineages of what ``query`` names, from what was read.

    A raw record matches by its EventId, or, for a room, by its key (the shim keys a record
    by RoomId first); a quarantine record by the EventId or the key of its body.
    """
    if query.event_id is not None:
        raw = [record for record in observed.raw if record.event_id == query.event_id]
        held = [record for record in quarantined if record.event_id == query.event_id]
    else:
        room = query.room.encode() if query.room is not None else None
        raw = [record for record in observed.raw if record.key == room]
        held = [record for record in quarantined if record.room == query.room]

    matcher = Matcher(observed)
    copies: dict[object, list[RawCopy]] = defaultdict(list)
    for record in sorted(raw, key=lambda r: (r.timestamp_ms, r.at)):
        # A body that does not parse has no EventId: it is a lineage of its own.
        copies[record.event_id if record.event_id is not None else record.at].append(
            RawCopy(record, matcher.fate(record))
        )
    kept: dict[object, list[Quarantined]] = defaultdict(list)
    for record in held:
        kept[record.event_id if record.event_id is not None else record.at].append(record)

    lineages = sorted(
        (
            Lineage(
                name if isinstance(name, str) else None,
                tuple(copies.get(name, ())),
                tuple(sorted(kept.get(name, ()), key=lambda q: q.at)),
            )
            for name in dict.fromkeys([*copies, *kept])
        ),
        key=lambda lineage: lineage.first_ms,
    )
    return FindReport(query, tuple(lineages[:limit]), max(len(lineages) - limit, 0), tuple(observed.unsettled))


# -- reading Kafka (I/O) -----------------------------------------------------------------------


def window(settings: Any, since_ms: int | None, until_ms: int | None, now_ms: int | None = None) -> TimeRange:
    """The range to scan: since defaults to the raw topic's retention back from now."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return TimeRange(since_ms if since_ms is not None else now_ms - settings.raw_retention_ms, until_ms)


def find(
    settings: Any,
    query: Query,
    *,
    limit: int = DEFAULT_LIMIT,
    settle_timeout_s: float = 15.0,
    on_progress: ProgressListener | None = None,
) -> FindReport:
    """Read raw, the outputs and the quarantine over ``query.window``, and trace ``query``.

    Raises:
        RtcbusError: a topic does not exist, or a read stalled.
        KafkaException: the broker failed.
    """
    since_ms = query.window.since_ms
    observed = read_pipeline(
        settings,
        query.window,
        group_id=settings.group_id,
        settle_timeout_s=settle_timeout_s,
        on_progress=on_progress,
        outputs_since_ms=None if since_ms is None else max(since_ms - _CLOCK_SLACK_MS, 0),
    )
    return trace(observed, read_quarantine(settings, query.window), query, limit)


def read_quarantine(settings: Any, window: TimeRange) -> list[Quarantined]:
    """The quarantine records received within ``window`` (none if the topic does not exist)."""
    from consumer.kafka.config import consumer_config

    topic = settings.quarantine_topic
    consumer = Consumer(
        {**consumer_config(settings, f"rtcbus-find-{uuid.uuid4().hex[:12]}"), "enable.partition.eof": "true", "logger": log}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=_CALL_TIMEOUT_S).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        partitions = sorted(metadata.partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=_CALL_TIMEOUT_S)[1] for p in partitions}
        # Timestamp 0 (no --since) finds each partition's first record.
        since_ms = window.since_ms if window.since_ms is not None else 0
        starts = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in partitions], timeout=_CALL_TIMEOUT_S)
        due = {tp.partition for tp in starts if 0 <= tp.offset < ends[tp.partition]}  # -1: none that recent
        if not due:
            return []
        consumer.assign([tp for tp in starts if tp.partition in due])
        found: list[Quarantined] = []
        last_news = time.monotonic()
        while due:
            messages = consumer.consume(500, timeout=0.5)
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    due.discard(message.partition())
                    continue
                if message.offset() + 1 >= ends[message.partition()]:
                    due.discard(message.partition())
                record = to_quarantined(message)
                if record.received_ms is None or record.received_ms in window:
                    found.append(record)
            if messages:
                last_news = time.monotonic()
            elif time.monotonic() - last_news > _STALL_S:
                raise RtcbusError(f"reading {topic} stalled for {_STALL_S:.0f} s")
        return found
    finally:
        consumer.close()


def to_quarantined(message: Message) -> Quarantined:
    """A quarantine record as found: EventId from its header (else its body), the reason,
    when it was received. Never raises: the body is not trusted to be anything."""
    headers = {name: value for name, value in message.headers() or []}
    received = header_text(headers.get(HEADER_RECEIVED_AT))
    if received is not None and received.isdigit():
        received_ms: int | None = int(received)
    else:
        kind, timestamp = message.timestamp()  # the shim's produce time: nearly the same moment
        received_ms = timestamp if kind != TIMESTAMP_NOT_AVAILABLE else None
    event_id, room = header_text(headers.get(HEADER_EVENT_ID)), None
    try:
        envelope = parse_envelope(message.value() or b"")
        event_id, room = envelope.event_id, envelope.key()
    except ValidationError:
        pass
    return Quarantined(
        Coordinates(message.topic(), message.partition(), message.offset()),
        received_ms,
        event_id,
        room,
        header_text(headers.get(HEADER_ERROR_MESSAGE)) or "",
    )


def _where(at: Coordinates) -> dict[str, Any]:
    return {"topic": at.topic, "partition": at.partition, "offset": at.offset}


def _utc(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the report --------------------------------------------------------------------------------


def to_json(report: FindReport) -> str:
    """The report as one JSON object (keys in :meth:`FindReport.to_dict`)."""
    return json.dumps(report.to_dict(), ensure_ascii=False)


def to_text(report: FindReport) -> str:
    """The lineages as lines for a person: each raw copy with its verdict, then the quarantine."""
    query = report.query
    what = f"EventId {query.event_id}" if query.event_id is not None else f"room {query.room}"
    since, until = _utc(query.window.since_ms) or "the beginning", _utc(query.window.until_ms) or "now"
    if not report.found:
        return f"not found: {what}: no raw or quarantine record from {since} to {until}"
    lines: list[str] = []
    for lineage in report.lineages:
        lines.append(f"EventId {lineage.event_id}" if lineage.event_id is not None else "a raw body that does not parse")
        for copy in lineage.raw:
            lines.append(f"  raw {copy.record.at}  {_utc(copy.record.timestamp_ms)}")
            lines.append(f"    {copy.verdict()}")
        if not lineage.raw:
            lines.append("  not in raw")
        for record in lineage.quarantined:
            lines.append(f"  quarantined {record.at}  {_utc(record.received_ms)}: {record.reason}")
    if report.more:
        lines.append(f"... and {report.more} more events (raise --limit, or narrow --since/--until)")
    for partition in report.unsettled:
        lines.append(f"not settled: {partition} (an open transaction: its records may be missing above)")
    return "\n".join(lines)
