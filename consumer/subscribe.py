"""The typed subscribe API: domain topics in, typed events with their coordinates out.

A microservice names domains (``room``) or EventTypes (``UserJoinRoom``) and a consumer group,
and gets each record as a :class:`Delivery`: the pydantic model of its EventType (the models
of :mod:`consumer.events`) with its topic, partition, offset, key, timestamp, EventId and
headers. Reading is ``read_committed`` (what the router committed, nothing of an aborted
transaction) in the wire format the settings name, with the router's own codec.

Delivery is **at least once**: a record's offset is committed only after the caller is done
with it, so a crash or a handler error means the record comes again on the next start. The
router already drops duplicate callbacks, but a redelivery after a subscriber crash is the
subscriber's to absorb: make the effect idempotent by EventId (README, "Subscribing").

The path of one record, top to bottom in :meth:`Subscriber.__next__`: poll → filter by
EventType → decode → validate into the model → hand out; the previous record counts as handled
when the next one is asked for, and handled offsets are committed in batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import httpx
import pydantic
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from pydantic import BaseModel

from consumer.codec import Codec, codec_from_settings
from consumer.envelope import HEADER_EVENT_ID, HEADER_EVENT_TYPE
from consumer.errors import BadRecord, ConfigError, EncodingError, InfrastructureError
from consumer.events import EventModels, models
from consumer.kafka.config import consumer_config
from consumer.router.output import ATTEMPT_S, committed_offsets, retrying
from consumer.routing import UNKNOWN_DOMAIN, RoutingTable
from consumer.schemas import UNKNOWN_EVENT, SchemaSet, contract

log = logging.getLogger(__name__)

_POLL_S = 0.2
_CLOSE_COMMIT_TIMEOUT_S = 30.0
# Where a partition with no committed offset starts, by auto.offset.reset's spellings; any
# other ("error") is left to librdkafka.
_RESET_OFFSETS = {
    **dict.fromkeys(("earliest", "smallest", "beginning"), OFFSET_BEGINNING),
    **dict.fromkeys(("latest", "largest", "end"), OFFSET_END),
}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One domain record, typed, with where it sits.

    Attributes:
        event: the pydantic model of its EventType (``UnknownEvent``'s on the ``unknown`` topic).
        event_type, event_id: the event's EventType and EventId, the key to deduplicate on.
        topic, partition, offset: its coordinates.
        key: the record key (RoomId, else the next id of the key policy), as text.
        timestamp: the record's Kafka timestamp (UTC), None if it has none.
        headers: the record's headers as written by the router (``rtcbus.event_type``...).
    """

    event: BaseModel
    event_type: str
    event_id: str
    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp: datetime | None
    headers: tuple[tuple[str, bytes], ...]


OnBadRecord = Callable[[BadRecord], None]


def subscription(
    table: RoutingTable, domains: Iterable[str] = (), event_types: Iterable[str] = ()
) -> dict[str, frozenset[str] | None]:
    """topic → the EventTypes wanted from it (None: every record of the topic).

    Raises:
        ConfigError: nothing asked for, or a domain or an EventType the contract does not
            have, naming it.
    """
    domains, event_types = list(domains), list(event_types)
    if not domains and not event_types:
        raise ConfigError("subscribe to at least one domain or EventType")
    unknown_domains = [d for d in domains if d not in table.domains]
    if unknown_domains:
        raise ConfigError(
            f"unknown domain(s): {', '.join(unknown_domains)}; known: {', '.join(sorted(table.domains))}"
        )
    unknown_types = [t for t in event_types if not table.is_known(t)]
    if unknown_types:
        raise ConfigError(f"unknown EventType(s): {', '.join(unknown_types)}")
    wanted: dict[str, frozenset[str] | None] = {table.domains[d]: None for d in domains}
    for event_type in event_types:
        topic = table.route(event_type).topic
        if topic in wanted and wanted[topic] is None:
            continue  # the whole domain is asked for already
        wanted[topic] = (wanted.get(topic) or frozenset()) | {event_type}
    return wanted


class Subscriber:
    """Typed events of domain topics, for one consumer group; an iterator, closed with ``with``.

    ::

        with Subscriber(settings, "presence", domains=["room"]) as subscriber:
            for delivery in subscriber:
                handle(delivery.event)

    A delivery counts as handled when the loop asks for the next one, or when the ``with``
    block is left without an exception; only handled offsets are committed (asynchronously, in
    batches; synchronously when partitions are revoked and on close). When the loop body raises,
    that delivery is not committed: the next start of the group gets it again.
    :meth:`run` is the same loop around a handler.

    Args:
        settings: the :class:`consumer.settings.Settings` (brokers, topics, wire format).
        group_id: the consumer group; its committed offsets are where a restart resumes.
        domains: domains to read whole (``unknown`` too: its records are ``UnknownEvent``).
        event_types: EventTypes to read; other records of their domains are skipped (and
            committed past).
        on_bad_record: called with the :class:`BadRecord` of a record that does not decode or
            validate; when it returns, the record is skipped (and committed past); what it
            raises stops the subscriber. Unset: the BadRecord is raised.
        auto_offset_reset: where a group without committed offsets starts.
        commit_interval_s, commit_max_records: handled offsets are committed when either is
            reached.
        codec: the wire format; by default the one the settings name, as the router's
            (``codec_from_settings``).

    Raises:
        ConfigError: nothing asked for, or an unknown domain or EventType (named); the
            routing settings disagree with the contract.
    """

    def __init__(
        self,
        settings: Any,
        group_id: str,
        *,
        domains: Iterable[str] = (),
        event_types: Iterable[str] = (),
        on_bad_record: OnBadRecord | None = None,
        auto_offset_reset: str = "earliest",
        commit_interval_s: float = 1.0,
        commit_max_records: int = 1000,
        codec: Codec | None = None,
    ) -> None:
        schemas = contract()
        table = RoutingTable.from_settings(settings, schemas.event_types)
        self._wanted = subscription(table, domains, event_types)
        self._reader = RecordReader(
            codec or codec_from_settings(settings, schemas),
            models(),
            schemas,
            table.domains[UNKNOWN_DOMAIN],
        )
        self._on_bad_record = on_bad_record
        self._commit_interval_s = commit_interval_s
        self._commit_max_records = commit_max_records
        self._stop = threading.Event()
        self._owned: set[tuple[str, int]] = set()
        self._handled: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._uncommitted: set[tuple[str, int]] = set()
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._current: Delivery | None = None
        self._closed = False
        self._start_offset = _RESET_OFFSETS.get(auto_offset_reset, OFFSET_INVALID)
        self._consumer = Consumer(
            {
                **consumer_config(settings, group_id, auto_offset_reset=auto_offset_reset),
                "on_commit": self._on_commit,
            }
        )
        self._consumer.subscribe(
            sorted(self._wanted),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    @property
    def topics(self) -> list[str]:
        """The topics read."""
        return sorted(self._wanted)

    # -- the loop -------------------------------------------------------------------------------

    def __iter__(self) -> Subscriber:
        return self

    def __next__(self) -> Delivery:
        """The next wanted record; the one handed out before counts as handled.

        Raises:
            StopIteration: :meth:`stop` was called.
            BadRecord: a record does not decode or validate, and no ``on_bad_record`` is set.
            InfrastructureError: a fatal Kafka error, or the Schema Registry is away.
        """
        if self._current is not None:
            self._mark_handled(self._current.topic, self._current.partition, self._current.offset)
            self._current = None
        while not self._stop.is_set():
            self._commit_if_due()
            message = self._consumer.poll(_POLL_S)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise InfrastructureError(f"Kafka: {error.str()}") from KafkaException(error)
                # A broker lost, a topic not created yet: librdkafka recovers by itself.
                log.warning("subscriber: %s", error.str())
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if (topic, partition) not in self._owned:
                continue  # fetched before its partition was revoked
            wanted = self._wanted[topic]
            if wanted is not None:
                event_type = _header(message, HEADER_EVENT_TYPE)
                if event_type is not None and event_type not in wanted:
                    self._mark_handled(topic, partition, offset)
                    continue
            try:
                delivery = self._reader.read(message)
            except BadRecord as bad:
                if self._on_bad_record is None:
                    raise
                self._on_bad_record(bad)  # returning means: skip it
                self._mark_handled(topic, partition, offset)
                continue
            if wanted is not None and delivery.event_type not in wanted:
                self._mark_handled(topic, partition, offset)
                continue
            self._current = delivery
            return delivery
        raise StopIteration

    def run(self, handler: Callable[[Delivery], object]) -> None:
        """Call ``handler`` for every delivery until :meth:`stop`, then close.

        Raises:
            Exception: what ``handler`` raised, after closing; that delivery is not committed.
            BadRecord, InfrastructureError: as :meth:`__next__`.
        """
        with self:
            for delivery in self:
                handler(delivery)

    def stop(self) -> None:
        """Make the iteration end (within a poll, 0.2 s); safe from any thread or a signal handler."""
        self._stop.set()

    # -- closing --------------------------------------------------------------------------------

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close(handled=True)
            return
        try:
            self.close()
        except InfrastructureError as error:  # the handler's exception is the one to raise
            log.warning("subscriber: %s", error)

    def close(self, handled: bool = False) -> None:
        """Commit what was handled, synchronously, and leave the group.

        Args:
            handled: whether the delivery handed out last was handled too (``with`` says
                so when its block ends without an exception); by default it is not, and
                comes again to the group's next reader.

        Raises:
            InfrastructureError: the commit failed (those records will be read again).
        """
        if self._closed:
            return
        self._closed = True
        if handled and self._current is not None:
            self._mark_handled(self._current.topic, self._current.partition, self._current.offset)
        self._current = None
        try:
            self._commit(list(self._handled), asynchronous=False)
        except KafkaException as exc:
            raise InfrastructureError(f"committing on close failed: {exc}") from exc
        finally:
            self._handled.clear()  # nothing left for the revoke that leaving the group calls
            self._consumer.close()

    # -- offsets --------------------------------------------------------------------------------

    def _mark_handled(self, topic: str, partition: int, offset: int) -> None:
        self._handled[(topic, partition)] = offset + 1
        self._uncommitted.add((topic, partition))
        self._since_commit += 1

    def _commit_if_due(self) -> None:
        if self._uncommitted and (
            self._since_commit >= self._commit_max_records
            or time.monotonic() - self._last_commit >= self._commit_interval_s
        ):
            self._commit(list(self._uncommitted), asynchronous=True)

    def _commit(self, partitions: list[tuple[str, int]], asynchronous: bool) -> None:
        offsets = [
            TopicPartition(topic, partition, self._handled[(topic, partition)])
            for topic, partition in partitions
            if (topic, partition) in self._handled
        ]
        self._uncommitted.difference_update(partitions)
        self._since_commit = 0
        self._last_commit = time.monotonic()
        if not offsets:
            return
        if asynchronous:
            self._consumer.commit(offsets=offsets, asynchronous=True)
            return
        # commit() answers per partition too; a partition's error fails the commit as a whole.
        for tp in self._consumer.commit(offsets=offsets, asynchronous=False) or ():
            if tp.error is not None:
                raise KafkaException(tp.error)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # An asynchronous commit that failed is covered by the next one, or by the synchronous
        # one on revoke and close; until then a restart would read those records again.
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            log.warning("subscriber: commit failed, will retry with the next: %s", error.str())

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Assigned at the committed offsets read here, with the router's retries, not left to
        # librdkafka to look up: its own OffsetFetch, answered NOT_COORDINATOR as a whole
        # while the group coordinator moves, leaves the partitions unfetched for good
        # (confluentinc/librdkafka#5586; see Router._on_assign). A lookup still failing
        # after the retries raises out of the poll: a subscriber that reads nothing must not
        # look healthy.
        found = retrying(lambda: committed_offsets(consumer, partitions, ATTEMPT_S), self._stop.is_set)
        consumer.incremental_assign(
            [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else self._start_offset) for tp in found]
        )
        self._owned.update((tp.topic, tp.partition) for tp in partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The next owner starts at what is committed: commit what was handled, now.
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        try:
            self._commit(revoked, asynchronous=False)
        except KafkaException as exc:
            log.warning("subscriber: commit on revoke failed, records will come again: %s", exc)
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Already someone else's: a commit would be refused; their records come again.
        self._forget([(tp.topic, tp.partition) for tp in partitions])

    def _forget(self, partitions: list[tuple[str, int]]) -> None:
        for key in partitions:
            self._owned.discard(key)
            self._handled.pop(key, None)
            self._uncommitted.discard(key)
        current = self._current
        if current is not None and (current.topic, current.partition) in partitions:
            self._current = None


class AsyncSubscriber:
    """:class:`Subscriber` for asyncio: the blocking poll runs in a thread of its own.

    ::

        async with AsyncSubscriber(settings, "presence", domains=["room"]) as subscriber:
            async for delivery in subscriber:
                await handle(delivery.event)

    The same arguments and the same at-least-once rules as :class:`Subscriber`: a delivery is
    handled when the next is asked for, or when the ``async with`` block ends without an
    exception. Every call on the Kafka client runs in one dedicated thread, one at a time, so
    the event loop is never blocked and the client never used from two threads at once.
    """

    def __init__(self, settings: Any, group_id: str, **options: Any) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtcbus-subscriber")
        self._subscriber: Subscriber | None = None
        self._settings, self._group_id, self._options = settings, group_id, options

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def __aenter__(self) -> AsyncSubscriber:
        await self.start()
        return self

    async def start(self) -> None:
        """Build the client and subscribe (in the subscriber's thread).

        Raises:
            ConfigError: as :class:`Subscriber`.
        """
        if self._subscriber is None:
            self._subscriber = await self._call(
                lambda: Subscriber(self._settings, self._group_id, **self._options)
            )

    def __aiter__(self) -> AsyncSubscriber:
        return self

    async def __anext__(self) -> Delivery:
        await self.start()
        delivery = await self._call(_next_or_none, self._subscriber)
        if delivery is None:
            raise StopAsyncIteration
        return delivery

    async def run(self, handler: Callable[[Delivery], Awaitable[object]]) -> None:
        """Await ``handler`` for every delivery until :meth:`stop`, then close; as
        :meth:`Subscriber.run`."""
        async with self:
            async for delivery in self:
                await handler(delivery)

    def stop(self) -> None:
        """Make the iteration end within a poll; safe from any thread."""
        if self._subscriber is not None:
            self._subscriber.stop()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose(handled=exc_type is None)

    async def aclose(self, handled: bool = False) -> None:
        """As :meth:`Subscriber.close`; waits for a poll under way to return first."""
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is None:
            self._executor.shutdown(wait=False)
            return
        subscriber.stop()
        try:
            await self._call(subscriber.close, handled)
        finally:
            self._executor.shutdown(wait=False)


def _next_or_none(subscriber: Subscriber) -> Delivery | None:
    # StopIteration cannot cross a Future, so the end of the iteration is None.
    return next(subscriber, None)


class RecordReader:
    """A domain record's bytes → a :class:`Delivery`, or a :class:`BadRecord`; no Kafka client.

    Args:
        codec: the wire format (``codec_from_settings``).
        event_models: the typed models of the contract.
        schemas: the contract, for the fields the codec decodes as datetimes.
        unknown_topic: the ``unknown`` domain's topic, whose records are ``UnknownEvent``.
    """

    def __init__(
        self, codec: Codec, event_models: EventModels, schemas: SchemaSet, unknown_topic: str
    ) -> None:
        self._codec = codec
        self._models = {name: event_models[name] for name in event_models}
        self._unknown_model = event_models.record_model(UNKNOWN_EVENT)
        self._unknown_topic = unknown_topic
        # Avro's timestamp-millis decodes to a datetime; the models hold epoch milliseconds,
        # as the router validated them.
        self._millis = {
            name: tuple(
                f["name"]
                for f in schema.schema["fields"]
                if isinstance(f["type"], Mapping) and f["type"].get("logicalType") == "timestamp-millis"
            )
            for name, schema in schemas.items()
        }

    def read(self, message: Message) -> Delivery:
        """Raises:
            BadRecord: no value, a value that does not decode, or a record its model refuses;
                with the record's coordinates and bytes, raised from the cause.
            InfrastructureError: the Schema Registry failed or is unreachable.
        """
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        value = message.value()
        try:
            if value is None:
                raise EncodingError("the record has no value")
            record = self._decode(value, topic)
            event_type = record.get("EventType")
            model = self._unknown_model if topic == self._unknown_topic else self._models.get(event_type)
            if model is None:
                raise EncodingError(f"no model for EventType {event_type!r} on {topic}")
            for field in self._millis[model.__name__]:
                if isinstance(record.get(field), datetime):
                    record[field] = _to_millis(record[field])
            event = model.model_validate(record)
        except InfrastructureError:
            raise
        except Exception as exc:  # whatever the bytes hold: a bad record, never the loop's crash
            raise self._bad(message, exc) from exc
        kind, millis = message.timestamp()
        return Delivery(
            event=event,
            event_type=event.EventType,
            event_id=event.EventId,
            topic=topic,
            partition=partition,
            offset=offset,
            key=_text(message.key()),
            timestamp=datetime.fromtimestamp(millis / 1000, timezone.utc) if kind else None,
            headers=tuple(message.headers() or ()),
        )

    def _decode(self, value: bytes, topic: str) -> dict[str, Any]:
        try:
            return self._codec.decode(value, topic)
        except (OSError, httpx.TransportError) as exc:
            raise InfrastructureError(f"the Schema Registry is unreachable: {exc}") from exc
        except Exception as exc:
            status = getattr(exc, "http_status_code", None)  # the registry's SchemaRegistryError
            if isinstance(status, int) and (status >= 500 or status < 0):
                raise InfrastructureError(f"the Schema Registry failed: {exc}") from exc
            raise

    def _bad(self, message: Message, exc: Exception) -> BadRecord:
        if isinstance(exc, pydantic.ValidationError):
            first = exc.errors(include_url=False)[0]
            reason = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        else:
            reason = str(exc)
        bad = BadRecord(
            f"cannot read the record: {type(exc).__name__}: {reason}"[:1000],
            event_type=_header(message, HEADER_EVENT_TYPE),
            event_id=_header(message, HEADER_EVENT_ID),
            key=message.key(),
            value=message.value(),
            headers=tuple(message.headers() or ()),
        ).at(message.topic(), message.partition(), message.offset())
        bad.__cause__ = exc  # also when handed to on_bad_record rather than raised
        return bad


def _header(message: Message, name: str) -> str | None:
    for key, value in message.headers() or ():
        if key == name and value is not None:
            return value.decode("utf-8", "replace")
    return None


def _text(key: bytes | None) -> str | None:
    return key.decode("utf-8", "replace") if key is not None else None


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _to_millis(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(milliseconds=1)  # exact, unlike a float
