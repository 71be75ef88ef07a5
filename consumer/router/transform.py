"""The router's pure step: one raw record in, one outcome out.

parse the envelope → drop a duplicate → validate into the typed model → route → encode.
Each record first takes the lean path (:mod:`consumer.records`: msgspec, no pydantic);
where that cannot decide, the pydantic path decides, with the same result for a valid
callback and the dead letter for any other.
The outcome is a :class:`Routed` record for its domain topic, a :class:`Duplicate` to drop,
or a :class:`DeadLetter` for the DLQ. The step is total: whatever a record holds (broken
JSON, a lone surrogate, nesting deep enough to exhaust the stack, a value too large for
the topic), it becomes a dead letter; it never raises into the loop. Only an
:class:`consumer.errors.InfrastructureError` (the Schema Registry away) passes through,
because retrying cures it and dead-lettering would lose the record's domain record.

Every header it writes is valid bytes and bounded in size, and every record it returns
fits under the topic's size limit, so the loop can always produce what it gets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Message

from consumer.codec import Codec, codec_from_settings
from consumer.envelope import (
    HEADER_ERROR_CLASS,
    HEADER_ERROR_FIELD,
    HEADER_ERROR_MESSAGE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_SCHEMA,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    HEADER_TRUNCATED,
    parse_envelope,
)
from consumer.errors import CallbackError, EncodingError, InfrastructureError, ValidationError
from consumer.events import EventModels, Source, models
from consumer.records import RecordDecoder
from consumer.routing import UNKNOWN_DOMAIN, RoutingTable
from consumer.schemas import SchemaSet, contract

HEADER_VALUE_MAX_BYTES = 1024
# Room left under the topic's limit for the record batch's own overhead.
_BATCH_OVERHEAD_BYTES = 16 * 1024

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Routed:
    """A domain record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    event_id: str
    event_type: str
    """The EventType as a metric label: a known one, or ``unknown``."""
    domain: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A callback whose EventId this partition has already routed: nothing to produce."""

    event_id: str
    event_type: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A DLQ record: the raw bytes (cut only if they would not fit), the reason, the source."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    event_type: str
    error_class: str
    truncated: bool

    def shrunk(self) -> DeadLetter:
        """This dead letter cut to what fits any topic: no value, the raw headers dropped,
        the reason and the source coordinates kept (the original is still in raw there).

        For a key too large to keep, or a DLQ topic whose ``max.message.bytes`` is smaller
        than the raw topic's.
        """
        kept = [(name, value) for name, value in self.headers if name in _KEPT_HEADERS]
        key = self.key if self.key is None or len(self.key) <= HEADER_VALUE_MAX_BYTES else None
        cut = "value,headers" if key is self.key else "value,headers,key"
        return DeadLetter(
            key, None, [*kept, (HEADER_TRUNCATED, cut.encode())], self.event_type, self.error_class, True
        )


# What a shrunk dead letter keeps: the reason and the source coordinates.
_KEPT_HEADERS = frozenset(
    {
        HEADER_ERROR_CLASS, HEADER_ERROR_MESSAGE, HEADER_ERROR_FIELD,
        HEADER_SOURCE_TOPIC, HEADER_SOURCE_PARTITION, HEADER_SOURCE_OFFSET,
    }
)

Outcome = Routed | Duplicate | DeadLetter


class Transform:
    """Turns raw callback records into outcomes; built once, holds no per-record state.

    Args:
        models: the typed models of the contract.
        routing: EventType → domain → topic; must route exactly the models' EventTypes.
        codec: the wire format.
        max_record_bytes: the largest record the output topics take, key and headers in.
        records: the lean path, tried first for every record; None: the pydantic path alone.

    Raises:
        ConfigError: the routing table and the models disagree on the EventTypes.
    """

    def __init__(
        self,
        models: EventModels,
        routing: RoutingTable,
        codec: Codec,
        max_record_bytes: int,
        records: RecordDecoder | None = None,
    ) -> None:
        routing.require(models)
        self._models = models
        self._routing = routing
        self._codec = codec
        self._budget = max_record_bytes - _BATCH_OVERHEAD_BYTES
        self._labels = {event_type: event_type for event_type in routing.event_types}
        self._records = records
        # Per EventType and per schema and topic, not per record: the headers naming them.
        self._type_headers = {
            event_type: (HEADER_EVENT_TYPE, header_value(event_type)) for event_type in models
        }
        self._schema_headers: dict[tuple[str, str], tuple[str, bytes]] = {}

    @classmethod
    def from_settings(
        cls, settings: object, schemas: SchemaSet | None = None, *, lean: bool = True
    ) -> Transform:
        """The transform the settings describe, for ``schemas`` (default: the contract).

        Args:
            lean: try the lean path first (False: the pydantic path alone, as a reference).
        """
        schemas = schemas or contract()
        return cls(
            models() if schemas is contract() else EventModels(schemas),
            RoutingTable.from_settings(settings),
            codec_from_settings(settings, schemas),
            settings.max_record_bytes,  # type: ignore[attr-defined]
            RecordDecoder(schemas) if lean else None,
        )

    @property
    def routing(self) -> RoutingTable:
        return self._routing

    def label(self, event_type: str) -> str:
        """``event_type`` as a metric label: only known EventTypes, else ``unknown``, so a
        sender cannot grow the label set."""
        return self._labels.get(event_type, UNKNOWN_DOMAIN)

    def apply(self, message: Message, seen: Callable[[int, str], bool]) -> Outcome:
        """The outcome of one raw record.

        Args:
            seen: whether an EventId was already routed from a partition (the dedupe window).

        Raises:
            InfrastructureError: a service the encoding needs is away; retry the record.
        """
        try:
            return self._route(message, seen)
        except InfrastructureError:
            raise
        except Exception as exc:  # any failure of one record's transform: total, see above
            return self.dead_letter(message, exc)

    def _route(self, message: Message, seen: Callable[[int, str], bool]) -> Routed | Duplicate:
        raw = message.value()
        if raw is None:
            raise ValidationError("raw record has no value")
        if self._records is not None:
            lean = self._records.envelope(raw)
            if lean is not None:
                outcome = self._route_lean(message, *lean, seen)
                if outcome is not None:
                    return outcome
        return self._route_checked(message, raw, seen)

    def _route_lean(
        self, message: Message, envelope, event_time_ms: int, seen: Callable[[int, str], bool]
    ) -> Routed | Duplicate | None:
        """The outcome by the lean path, or None where the pydantic path must decide.

        Every failure leaves the record to the pydantic path, so that a dead letter's
        reason is always worded by one path."""
        event_type, event_id = envelope.EventType, envelope.EventId
        partition = message.partition()
        if seen(partition, event_id):
            return Duplicate(event_id, self.label(event_type))
        source = Source(message.topic(), partition, message.offset())
        decided = self._records.record(envelope, event_time_ms, source)
        if decided is None:
            return None
        schema_name, record = decided
        route = self._routing.route(event_type)
        try:
            value = self._codec.encode(schema_name, record, route.topic)
        except InfrastructureError:
            raise
        except Exception:  # the pydantic path encodes it again and words the dead letter
            return None
        schema_header = self._schema_headers.get((schema_name, route.topic))
        if schema_header is None:
            schema_header = (HEADER_SCHEMA, header_value(self._codec.schema_id(schema_name, route.topic)))
            if schema_header[1]:  # a registry's id is known only once a record was encoded
                self._schema_headers[(schema_name, route.topic)] = schema_header
        headers = [self._type_headers[event_type], (HEADER_EVENT_ID, header_value(event_id)), schema_header]
        key = message.key()
        if record_size(key, value, headers) > self._budget:
            return None
        return Routed(route.topic, key, value, headers, event_id, self.label(event_type), route.domain)

    def _route_checked(
        self, message: Message, raw: bytes, seen: Callable[[int, str], bool]
    ) -> Routed | Duplicate:
        """The outcome by the pydantic path: every check, every coercion, every reason."""
        envelope = parse_envelope(raw)
        label = self.label(envelope.event_type)
        partition = message.partition()
        if seen(partition, envelope.event_id):
            return Duplicate(envelope.event_id, label)
        source = Source(message.topic(), partition, message.offset())
        schema_name, record = self._models.to_record(envelope, source)
        route = self._routing.route(envelope.event_type)
        value = self._codec.encode(schema_name, record, route.topic)
        headers = [
            (HEADER_EVENT_TYPE, header_value(envelope.event_type)),
            (HEADER_EVENT_ID, header_value(envelope.event_id)),
            (HEADER_SCHEMA, header_value(self._codec.schema_id(schema_name, route.topic))),
        ]
        key = message.key()
        size = record_size(key, value, headers)
        if size > self._budget:
            # Produced anyway, the broker would refuse it at commit, and the aborted
            # transaction would be retried for ever: a poison pill for the partition.
            raise EncodingError(
                f"{schema_name}: the domain record of {size} bytes is over the "
                f"{self._budget}-byte limit",
                event_type=envelope.event_type,
                event_id=envelope.event_id,
            )
        return Routed(route.topic, key, value, headers, envelope.event_id, label, route.domain)

    def dead_letter(self, message: Message, error: BaseException) -> DeadLetter:
        """The DLQ record for ``message``, which failed with ``error``.

        The raw headers are kept and the reason and the source coordinates added, each
        header bounded. If the whole would not fit the topic, the value is cut to fit and
        ``rtcbus.dlq.truncated`` says what was cut; the coordinates are always kept, so the
        original can be read back from the raw topic.
        """
        truncated: list[str] = []
        headers: Headers = []
        for name, value in message.headers() or ():
            bounded = header_value(value or b"")
            if len(bounded) < len(value or b""):
                truncated.append(f"header:{name}")
            headers.append((name, bounded))
        headers += self._reason_headers(message, error)

        key, value = message.key(), message.value()
        overflow = record_size(key, value, headers) + 64 - self._budget  # 64: the marker header
        if overflow > 0 and value:
            value = value[: max(len(value) - overflow, 0)]
            truncated.append("value")
        if truncated:
            headers.append((HEADER_TRUNCATED, header_value(",".join(truncated))))
        letter = DeadLetter(
            key, value, headers, self._event_type_label(message), type(error).__name__, bool(truncated)
        )
        return letter if record_size(key, value, headers) <= self._budget else letter.shrunk()

    def _reason_headers(self, message: Message, error: BaseException) -> Headers:
        if isinstance(error, CallbackError):
            error.at(message.topic(), message.partition(), message.offset())
            field = error.field or ""
            reason = _text(error)
        else:
            field = ""
            reason = (
                f"{type(error).__name__}: {_text(error)} (topic={message.topic()}, "
                f"partition={message.partition()}, offset={message.offset()})"
            )
        return [
            (HEADER_ERROR_CLASS, header_value(type(error).__name__)),
            (HEADER_ERROR_MESSAGE, header_value(reason)),
            (HEADER_ERROR_FIELD, header_value(field)),
            (HEADER_SOURCE_TOPIC, header_value(message.topic() or "")),
            (HEADER_SOURCE_PARTITION, str(message.partition()).encode()),
            (HEADER_SOURCE_OFFSET, str(message.offset()).encode()),
        ]

    def _event_type_label(self, message: Message) -> str:
        for name, value in message.headers() or ():
            if name == HEADER_EVENT_TYPE and value is not None:
                return self.label(value.decode("utf-8", "replace"))
        return UNKNOWN_DOMAIN


def header_value(value: str | bytes, limit: int = HEADER_VALUE_MAX_BYTES) -> bytes:
    """``value`` as header bytes: always encodable (a lone surrogate becomes ``\\udXXX``),
    and at most ``limit`` bytes, cut on a character boundary."""
    data = value if isinstance(value, bytes) else value.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8", "backslashreplace")[:limit]


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """What a record weighs against ``max.message.bytes``, near enough: key, value, headers."""
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(name) + len(data or b"") + 8 for name, data in headers)
    )


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # an exception whose own __str__ fails must still be described
        return f"<{type(error).__name__} that cannot be printed>"
