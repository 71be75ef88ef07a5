"""The quarantine: callbacks that failed the signature check, kept instead of lost, and their redrive.

A wrong or rotated secret in the shim's settings answers every callback 401, and after three
tries the sender drops each one for good. So the shim offers each body it refuses for its
signature to a :class:`QuarantineWriter`, which keeps it byte for byte in
``<prefix>.callbacks.quarantine`` (never routed), capped in records and bytes a second so that
whoever can reach the shim cannot fill the topic. Once the secret is fixed, :func:`redrive`
checks every kept body again with the settings' secrets and forwards those that now pass to
the raw topic, exactly once; the router takes them from there like any other callback.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from prometheus_client import CollectorRegistry, Counter

from consumer.envelope import (
    HEADER_APP_ID,
    HEADER_ERROR_MESSAGE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_RECEIVED_AT,
    HEADER_REMOTE,
    HEADER_VERSION,
    SignatureVerifier,
    header_text,
    parse_envelope,
    raw_headers,
)
from consumer.errors import CallbackError, ConfigError, InfrastructureError
from consumer.kafka.config import consumer_config, producer_config
from consumer.topic_range import (
    CALL_TIMEOUT_S, abort_transaction, assign_due, commit_transaction, due_ranges, partitions_of, read_batch, read_range,
)

log = logging.getLogger(__name__)

# Header values taken from an unverified body are cut to this: they are for people reading.
_HEADER_MAX_BYTES = 256
# Drops are counted always, but logged at most this often: under attack, a line per body
# would be the attack.
_LOG_EVERY_S = 60.0
DROP_REASONS = ("rate", "bytes", "error")

_BATCH = 500  # records per redrive transaction


class QuarantineMetrics:
    """The writer's counters (their names say ``shim``: the shim is where they are kept)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.kept = Counter(
            "rtcbus_shim_quarantined",
            "Bodies refused for their signature and kept in the quarantine topic (acknowledged).",
            registry=registry,
        )
        self.dropped = Counter(
            "rtcbus_shim_quarantine_dropped",
            "Bodies refused for their signature and not kept: over the records (rate) or bytes "
            "cap, or Kafka did not take them (error).",
            ["reason"],
            registry=registry,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)


class _TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up.

    Written by hand: it is a dozen lines with no I/O, and the rate-limiting libraries wrap the
    same arithmetic in async, per-key or storage machinery this one call does not need.
    """

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self._updated = capacity, now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(now - self._updated, 0.0) * self.rate)
        self._updated = now


class QuarantineWriter:
    """Keeps bodies refused for their signature in the quarantine topic, within caps.

    Args:
        producer: the shim's Producer. Its delivery reports are served by whoever polls it
            (the shim's poll thread); this writer never polls it.
        topic: the quarantine topic (``settings.quarantine_topic``).
        max_records_per_s, max_bytes_per_s: the caps, as token buckets holding one second's
            worth: a body larger than ``max_bytes_per_s`` is never kept.
        registry: where the metrics go (the shim's registry).
        clock: seconds, monotonic (a test seam).
    """

    def __init__(
        self,
        producer: Producer,
        topic: str,
        max_records_per_s: float,
        max_bytes_per_s: float,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._clock = clock
        now = clock()
        # At least one record's worth saved up, so a cap below 1/s still keeps some.
        self._records = _TokenBucket(max_records_per_s, max(max_records_per_s, 1.0), now)
        self._bytes = _TokenBucket(max_bytes_per_s, max_bytes_per_s, now)
        self.metrics = QuarantineMetrics(registry)
        # offer() runs on the event loop, delivery reports on the poll thread.
        self._lock = threading.Lock()
        self._unlogged: Tally[str] = Tally()
        self._last_error = ""
        self._logged_at: float | None = None

    @classmethod
    def from_settings(cls, settings: Any, producer: Producer, registry: CollectorRegistry) -> QuarantineWriter:
        """The writer ``settings`` describe (the caller checks ``settings.quarantine``)."""
        return cls(
            producer,
            settings.quarantine_topic,
            max_records_per_s=settings.quarantine_max_per_s,
            max_bytes_per_s=settings.quarantine_max_bytes_per_s,
            registry=registry,
        )

    def offer(self, body: bytes, reason: str, received_ms: int, remote: str | None = None) -> bool:
        """Queue ``body`` for the quarantine topic, unless a cap says no. Never blocks, never raises.

        Args:
            body: the request body, produced byte for byte.
            reason: why it was refused, e.g. ``SignatureError.message``; written as the
                ``rtcbus.error.message`` header, so it must not hold a secret (the
                signature check's messages never do).
            received_ms: when the shim received it, epoch ms: a redrive checks EventTime
                against it.
            remote: the client's address, kept as the ``rtcbus.remote`` header.

        Returns:
            True if the record was queued (``rtcbus_shim_quarantined`` counts it once Kafka
            has acknowledged it), False if it was dropped (counted by reason).
        """
        try:
            return self._offer(body, reason, received_ms, remote)
        except Exception as exc:  # the caller is answering a 401 and must not fail on us
            self._dropped("error", f"{type(exc).__name__}: {exc}")
            return False

    def _offer(self, body: bytes, reason: str, received_ms: int, remote: str | None) -> bool:
        with self._lock:
            now = self._clock()
            self._records.refill(now)
            self._bytes.refill(now)
            if self._records.tokens < 1:
                refused = "rate"
            elif self._bytes.tokens < len(body):
                refused = "bytes"
            else:
                refused = None
                self._records.tokens -= 1
                self._bytes.tokens -= len(body)
        if refused is not None:
            self._dropped(refused, "over the quarantine's cap")
            return False
        # Parsed only once admitted: at most max_records_per_s bodies a second get this far.
        key, headers = _describe(body, reason, received_ms, remote)
        try:
            self._producer.produce(
                self._topic, value=body, key=key, headers=headers, on_delivery=self._on_delivery
            )
        except BufferError:
            self._dropped("error", "the producer's queue is full")
            return False
        except KafkaException as exc:
            self._dropped("error", exc.args[0].str())
            return False
        return True

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self.metrics.kept.inc()
        else:
            self._dropped("error", error.str())

    def _dropped(self, reason: str, detail: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        with self._lock:
            self._unlogged[reason] += 1
            if reason == "error":
                self._last_error = detail
            now = self._clock()
            if self._logged_at is not None and now - self._logged_at < _LOG_EVERY_S:
                return
            self._logged_at = now
            counts, self._unlogged = self._unlogged, Tally()
            last_error = self._last_error
        log.warning(
            "quarantine: not kept since the last report: %s%s",
            ", ".join(f"{count} over the {r} cap" if r != "error" else f"{count} refused by Kafka"
                      for r, count in sorted(counts.items())),
            f" (last error: {last_error})" if counts.get("error") else "",
        )


def _describe(
    body: bytes, reason: str, received_ms: int, remote: str | None
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The quarantined record's key (the EventId) and headers, from what the body gives."""
    headers = [
        (HEADER_ERROR_MESSAGE, _header(reason)),
        (HEADER_RECEIVED_AT, str(received_ms).encode()),
    ]
    if remote:
        headers.append((HEADER_REMOTE, _header(remote)))
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # the shim offers envelopes only; no harm if not
        document = None
    if not isinstance(document, dict):
        return None, headers
    for name, header in (
        ("EventId", HEADER_EVENT_ID), ("EventType", HEADER_EVENT_TYPE),
        ("AppId", HEADER_APP_ID), ("Version", HEADER_VERSION),
    ):
        value = document.get(name)
        if isinstance(value, str):
            headers.append((header, _header(value)))
    event_id = document.get("EventId")
    return (_header(event_id) if isinstance(event_id, str) and event_id else None), headers


def _header(text: str) -> bytes:
    # Always encodable (a lone surrogate becomes \udXXX) and bounded.
    data = text.encode("utf-8", "backslashreplace")
    return data if len(data) <= _HEADER_MAX_BYTES else data[:_HEADER_MAX_BYTES].decode("utf-8", "ignore").encode()


# -- redrive --------------------------------------------------------------------------------


@dataclass
class RedriveSummary:
    """What a redrive did (or, dry, would do).

    Attributes:
        forwarded: records that now pass and were written to raw (dry: would be).
        still_failing: records that still fail the check, by reason.
        unparseable: records whose body is not an envelope at all.
        expired: records the quarantine's retention deleted before any redrive reached them.
    """

    dry_run: bool = False
    forwarded: int = 0
    still_failing: Tally[str] = field(default_factory=Tally)
    unparseable: int = 0
    expired: int = 0

    @property
    def examined(self) -> int:
        return self.forwarded + sum(self.still_failing.values()) + self.unparseable

    def describe(self) -> str:
        verb = "would forward" if self.dry_run else "forwarded"
        failing = sum(self.still_failing.values())
        lines = [f"{self.examined} quarantined records examined: {verb} {self.forwarded} to raw, "
                 f"{failing} still failing, {self.unparseable} unparseable"]
        lines += [f"  still failing: {count}  {reason}" for reason, count in self.still_failing.most_common()]
        if self.expired:
            lines.append(f"  {self.expired} records expired from the quarantine before a redrive reached them")
        return "\n".join(lines)


@dataclass(frozen=True)
class Recheck:
    """One quarantined record, checked again: forward it (``key`` and ``headers``), or why not."""

    event_id: str | None
    key: str | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    failure: str | None = None
    unparseable: bool = False


def recheck(message: Message, verifier: SignatureVerifier) -> Recheck:
    """Verify a quarantined record again, EventTime against when it was first received.

    Total: returns a verdict for every record, never raises.
    """
    headers = dict(message.headers() or ())
    event_id = header_text(headers.get(HEADER_EVENT_ID))
    received_ms = _received_ms(message, headers)
    try:
        envelope = parse_envelope(message.value() or b"")
    except CallbackError as exc:
        return Recheck(event_id, failure=exc.message, unparseable=True)
    except Exception as exc:  # total: a body nobody foresaw is reported, not fatal
        return Recheck(event_id, failure=f"{type(exc).__name__}", unparseable=True)
    try:
        verifier.verify(envelope, now_ms=received_ms)
    except CallbackError as exc:
        return Recheck(envelope.event_id, failure=exc.message)
    return Recheck(envelope.event_id, key=envelope.key(), headers=raw_headers(envelope, received_ms))


def redrive(
    settings: Any,
    *,
    dry_run: bool = False,
    report: Callable[[str], None] = lambda line: None,
    batch_size: int = _BATCH,
) -> RedriveSummary:
    """Forward the quarantined records that pass the signature check now to the raw topic.

    Reads the quarantine as consumer group ``<group_id>-quarantine-redrive`` (read_committed)
    from its committed offsets to the end offsets seen at the start. Each record is checked
    with ``settings``' secrets, EventTime against its ``rtcbus.received_at`` (when the shim
    first received it). Those that pass are written to raw with the shim's key and headers,
    in a transaction that also commits the group's offsets: a redrive run twice forwards
    nothing twice, and one that fails half-way resumes where its last transaction ended.
    Records that still fail are passed over (the offsets advance past them) and reported
    with their EventId and reason. The fixed ``transactional.id``
    ``<group_id>-quarantine-redrive`` fences a second redrive running at the same time.

    Args:
        dry_run: check and report, write and commit nothing.
        report: called with one line per record that does not pass (its EventId and reason),
            once the transaction that passed over it has committed.
        batch_size: records per transaction.

    Raises:
        ConfigError: no secret is configured (everything would pass unchecked).
        RtcbusError: the quarantine topic does not exist.
        InfrastructureError: Kafka failed; nothing of the open transaction was written.
    """
    verifier = SignatureVerifier.from_settings(settings)
    if not verifier.enabled:
        raise ConfigError("redrive needs the callback secrets (RTCBUS_SECRETS): without them nothing is checked")
    group = f"{settings.group_id}-quarantine-redrive"
    topic = settings.quarantine_topic
    consumer = Consumer(consumer_config(settings, group))
    producer: Producer | None = None
    summary = RedriveSummary(dry_run=dry_run)
    try:
        due, summary.expired = due_ranges(consumer, topic)
        if not due:
            return summary
        if not dry_run:
            producer = Producer(producer_config(settings, transactional_id=group))
            producer.init_transactions(CALL_TIMEOUT_S)
        ends = assign_due(consumer, topic, due)
        while ends:
            batch = read_batch(consumer, topic, ends, batch_size)
            _settle(batch, verifier, producer, consumer, settings.raw_topic, summary, report)
    except KafkaException as exc:
        if producer is not None:
            abort_transaction(producer)
        raise InfrastructureError(f"redrive stopped, nothing of its open transaction written: {exc.args[0].str()}") from exc
    finally:
        consumer.close()
        if producer is not None:
            producer.flush(CALL_TIMEOUT_S)
    return summary


def _settle(
    batch: list[Message],
    verifier: SignatureVerifier,
    producer: Producer | None,
    consumer: Consumer,
    raw_topic: str,
    summary: RedriveSummary,
    report: Callable[[str], None],
) -> None:
    """Check ``batch``; forward what passes and commit the offsets past it, in one transaction."""
    if not batch:
        return
    verdicts = [(message, recheck(message, verifier)) for message in batch]
    if producer is not None:
        producer.begin_transaction()
        for message, verdict in verdicts:
            if verdict.failure is None:
                producer.produce(raw_topic, value=message.value(), key=verdict.key, headers=list(verdict.headers))
        offsets: dict[int, int] = {}
        for message in batch:
            offsets[message.partition()] = message.offset() + 1
        commit_transaction(producer, consumer, batch[0].topic(), offsets)
    # Counted and reported once the transaction committed: a failed one counts nothing.
    for message, verdict in verdicts:
        if verdict.failure is None:
            summary.forwarded += 1
            continue
        if verdict.unparseable:
            summary.unparseable += 1
        else:
            summary.still_failing[verdict.failure] += 1
        report(
            f"{'unparseable' if verdict.unparseable else 'still failing'}: "
            f"EventId={verdict.event_id or '?'} offset={message.partition()}:{message.offset()} "
            f"{verdict.failure}"
        )


def _received_ms(message: Message, headers: dict[str, bytes | None]) -> int | None:
    text = header_text(headers.get(HEADER_RECEIVED_AT))
    if text is not None and text.isdigit():
        return int(text)
    kind, timestamp = message.timestamp()  # the shim's produce time: nearly the same moment
    return timestamp if kind != TIMESTAMP_NOT_AVAILABLE else None


# -- listing --------------------------------------------------------------------------------


@dataclass
class QuarantineListing:
    """What the quarantine holds: records by reason and AppId, and how many a redrive has not reached."""

    by_reason_and_app: Tally[tuple[str, str]] = field(default_factory=Tally)
    pending: int = 0
    first_received_ms: int | None = None
    last_received_ms: int | None = None

    @property
    def total(self) -> int:
        return sum(self.by_reason_and_app.values())

    def describe(self) -> str:
        lines = [f"{self.total} quarantined records, {self.pending} not redriven yet"]
        if self.first_received_ms is not None and self.last_received_ms is not None:
            lines.append(f"received from {_utc(self.first_received_ms)} to {_utc(self.last_received_ms)}")
        if self.by_reason_and_app:
            lines.append(f"{'records':>8}  AppId  reason")
        lines += [
            f"{count:>8}  {app_id}  {reason}" for (reason, app_id), count in self.by_reason_and_app.most_common()
        ]
        return "\n".join(lines)


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def list_quarantine(settings: Any) -> QuarantineListing:
    """Read the whole quarantine once (no offsets committed) and count what it holds.

    ``pending`` counts the records at or past the redrive group's committed offsets.

    Raises:
        RtcbusError: the quarantine topic does not exist.
        InfrastructureError: Kafka did not deliver the records up to the end.
    """
    topic = settings.quarantine_topic
    redrive_group = Consumer(consumer_config(settings, f"{settings.group_id}-quarantine-redrive"))
    try:
        due, _expired = due_ranges(redrive_group, topic)
    finally:
        redrive_group.close()
    reader = Consumer(consumer_config(settings, f"rtcbus-quarantine-list-{uuid.uuid4().hex[:12]}"))
    listing = QuarantineListing()
    try:
        starts = {p: OFFSET_BEGINNING for p in partitions_of(reader, topic)}
        for message in read_range(reader, topic, starts):
            headers = dict(message.headers() or ())
            reason = header_text(headers.get(HEADER_ERROR_MESSAGE)) or "?"
            app = header_text(headers.get(HEADER_APP_ID)) or "?"
            listing.by_reason_and_app[(reason, app)] += 1
            start = due.get(message.partition(), (None, None))[0]
            if start is not None and message.offset() >= start:
                listing.pending += 1
            received = _received_ms(message, headers)
            if received is not None:
                listing.first_received_ms = min(received, listing.first_received_ms or received)
                listing.last_received_ms = max(received, listing.last_received_ms or received)
    finally:
        reader.close()
    return listing
