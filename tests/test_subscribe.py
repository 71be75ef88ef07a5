"""consumer/subscribe.py on the real broker: typed events in order, read_committed, at least
once, bad records surfaced, both wire formats, the asyncio variant."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from consumer.codec import ConfluentCodec, SingleObjectCodec
from consumer.envelope import HEADER_EVENT_ID, HEADER_EVENT_TYPE, parse_envelope
from consumer.errors import BadRecord, ConfigError, EncodingError
from consumer.events import models
from consumer.kafka.admin import TopicSpec, create_topics
from consumer.kafka.config import producer_config
from consumer.schemas import contract
from consumer.routing import RoutingTable
from consumer.settings import load_settings
from consumer.subscribe import AsyncSubscriber, Delivery, Subscriber, subscription
from support import callback, wait_for

pytestmark = pytest.mark.kafka


def take(subscriber: Subscriber, count: int, timeout_s: float = 30) -> list[Delivery]:
    """The next ``count`` deliveries; the subscriber is stopped at the deadline."""
    timer = threading.Timer(timeout_s, subscriber.stop)
    timer.start()
    taken = []
    try:
        for delivery in subscriber:
            taken.append(delivery)
            if len(taken) == count:
                break
    finally:
        timer.cancel()
    assert len(taken) == count, f"{len(taken)} deliveries of {count} within {timeout_s} s"
    return taken


class RoomTopic:
    """The room domain topic of a unique prefix, one partition, written as the router writes."""

    def __init__(self, kafka, codec=None) -> None:
        self.prefix = f"tsub{uuid.uuid4().hex[:10]}"
        self.settings = kafka.settings(topic_prefix=self.prefix)
        self.topic = f"{self.prefix}.events.room"
        self.codec = codec or SingleObjectCodec(contract())
        create_topics(self.settings, [TopicSpec(self.topic, 1, 1, {})])
        self.producer = Producer(producer_config(self.settings))

    def record(self, event_type: str, room: str, user: str | None = None) -> tuple[bytes, list, str]:
        """(value, headers, EventId) of a room event, encoded with the contract."""
        data = {"RoomId": room, **({"UserId": user} if user else {})}
        envelope = parse_envelope(callback(event_type, data, "secret"))
        name, record = models().to_record(envelope)
        value = self.codec.encode(name, record, self.topic)
        headers = [(HEADER_EVENT_TYPE, event_type.encode()), (HEADER_EVENT_ID, envelope.event_id.encode())]
        return value, headers, envelope.event_id

    def send(self, event_type: str, room: str, user: str | None = None) -> str:
        value, headers, event_id = self.record(event_type, room, user)
        self.put(value, headers, room)
        return event_id

    def put(self, value: bytes, headers: list, key: str) -> int:
        """Produce one record and return its offset."""
        offsets = []
        self.producer.produce(
            self.topic, value, key=key.encode(), headers=headers,
            on_delivery=lambda error, message: offsets.append(message.offset()),
        )
        self.producer.flush(10)
        return offsets[0]

    def committed(self, group: str) -> int:
        consumer = Consumer({"bootstrap.servers": self.settings.bootstrap_servers, "group.id": group})
        try:
            return consumer.committed([TopicPartition(self.topic, 0)], timeout=10)[0].offset
        finally:
            consumer.close()


def test_typed_events_in_order_per_room_and_filtered_by_event_type(stack, kafka):
    stack.start_shim()
    stack.start_router()
    rooms = {f"room-{n}-{uuid.uuid4().hex[:6]}": [] for n in range(3)}
    for step in range(4):
        for room, sent in rooms.items():
            event_type = "UserJoinRoom" if step % 2 == 0 else "UserLeaveRoom"
            event_id = uuid.uuid4().hex
            data = {"RoomId": room, "UserId": f"user-{step}"}
            assert stack.post(callback(event_type, data, stack.secret, event_id=event_id)) == 200
            sent.append((event_type, event_id))
    # A room event of another type and room, and a stream event, which is on another topic.
    assert stack.post(callback("RoomCreate", {"RoomId": "elsewhere"}, stack.secret)) == 200
    stream = {"RoomId": "elsewhere", "UserId": "u", "StreamId": "s"}
    assert stack.post(callback("UserAudioStreamStart", stream, stack.secret)) == 200
    settings = kafka.settings(topic_prefix=stack.prefix)

    with Subscriber(settings, f"sub-{uuid.uuid4().hex}", domains=["room"]) as subscriber:
        deliveries = take(subscriber, 13)
    by_room: dict[str, list] = {room: [] for room in rooms}
    for delivery in deliveries:
        event = delivery.event
        assert type(event) is models()[delivery.event_type]
        assert delivery.topic == stack.topic("room")
        assert delivery.key == event.EventData.RoomId
        assert delivery.event_id == event.EventId
        assert dict(delivery.headers)[HEADER_EVENT_ID] == event.EventId.encode()
        assert delivery.timestamp is not None and isinstance(event.EventTime, int)
        assert event.Source.Topic == stack.raw_topic
        if event.EventData.RoomId in by_room:
            by_room[event.EventData.RoomId].append((delivery.event_type, delivery.event_id))
    assert by_room == rooms

    # Only some EventTypes: the others are skipped, and committed past.
    group = f"sub-{uuid.uuid4().hex}"
    with Subscriber(settings, group, event_types=["UserLeaveRoom"]) as subscriber:
        leaves = take(subscriber, 6)
    assert {d.event_type for d in leaves} == {"UserLeaveRoom"}
    assert sorted(d.event_id for d in leaves) == sorted(
        event_id for sent in rooms.values() for event_type, event_id in sent if event_type == "UserLeaveRoom"
    )
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": group})
    try:
        partitions = [
            TopicPartition(stack.topic("room"), p)
            for p in consumer.list_topics(stack.topic("room"), timeout=10).topics[stack.topic("room")].partitions
        ]
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
        last_leave = {}
        for d in leaves:
            last_leave[d.partition] = max(last_leave.get(d.partition, -1), d.offset)
        for partition, offset in last_leave.items():
            assert committed[partition] >= offset + 1
    finally:
        consumer.close()


def test_unknown_names_fail_with_the_name():
    settings = load_settings(bootstrap_servers="127.0.0.1:9")  # refused before any client exists
    with pytest.raises(ConfigError, match="nowhere"):
        Subscriber(settings, "g", domains=["nowhere"])
    with pytest.raises(ConfigError, match="UserJoinRum"):
        Subscriber(settings, "g", event_types=["UserJoinRoom", "UserJoinRum"])
    with pytest.raises(ConfigError, match="at least one"):
        Subscriber(settings, "g")


def test_a_subscription_reads_whole_domains_or_some_event_types_of_theirs():
    table = RoutingTable(topic_prefix="p")
    assert subscription(table, ["room"], ["UserJoinRoom", "RecordStarted", "RecordStopped"]) == {
        "p.events.room": None,
        "p.events.recording": frozenset({"RecordStarted", "RecordStopped"}),
    }
    assert subscription(table, ["unknown"]) == {"p.events.unknown": None}


def test_records_of_an_aborted_transaction_are_never_seen(kafka):
    room = RoomTopic(kafka)
    producer = Producer(producer_config(room.settings, transactional_id=f"tx-{uuid.uuid4().hex}"))
    producer.init_transactions(30)
    ids = {}
    for name, commit in (("first", True), ("aborted", False), ("last", True)):
        value, headers, ids[name] = room.record("UserJoinRoom", "r1", name)
        producer.begin_transaction()
        producer.produce(room.topic, value, key=b"r1", headers=headers)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.flush(10)
            producer.abort_transaction(30)

    with Subscriber(room.settings, f"sub-{uuid.uuid4().hex}", domains=["room"]) as subscriber:
        deliveries = take(subscriber, 2)
    assert [d.event_id for d in deliveries] == [ids["first"], ids["last"]]
    assert [d.event.EventData.UserId for d in deliveries] == ["first", "last"]


def test_a_handler_exception_stops_without_committing_and_the_group_gets_it_again(kafka):
    room = RoomTopic(kafka)
    sent = [room.send("UserJoinRoom", "r1", f"user-{n}") for n in range(3)]
    group = f"sub-{uuid.uuid4().hex}"
    handled = []

    def handler(delivery: Delivery) -> None:
        if delivery.event_id == sent[1]:
            raise RuntimeError("the handler failed")
        handled.append(delivery.event_id)

    with pytest.raises(RuntimeError, match="the handler failed"):
        Subscriber(room.settings, group, domains=["room"]).run(handler)
    assert handled == [sent[0]]
    assert room.committed(group) == 1  # past the first, not past the one that failed

    with Subscriber(room.settings, group, domains=["room"]) as subscriber:
        again = take(subscriber, 2)
    assert [d.event_id for d in again] == sent[1:]
    assert room.committed(group) == 3


def test_a_new_group_starts_where_auto_offset_reset_says(kafka):
    """The subscriber assigns each partition itself, at its committed offset or, for a group
    with none, where auto_offset_reset says: earliest reads what is there; latest only
    what comes after the assignment."""
    room = RoomTopic(kafka)
    before = room.send("UserJoinRoom", "r1", "early")

    with Subscriber(room.settings, f"sub-{uuid.uuid4().hex}", domains=["room"]) as subscriber:
        assert [d.event_id for d in take(subscriber, 1)] == [before]

    sent, taken = [], []
    with Subscriber(
        room.settings, f"sub-{uuid.uuid4().hex}", domains=["room"], auto_offset_reset="latest"
    ) as subscriber:
        reader = threading.Thread(target=lambda: taken.extend(take(subscriber, 1)))
        reader.start()
        # Records sent before the assignment are skipped too: send until one arrives.
        wait_for(lambda: taken or sent.append(room.send("UserJoinRoom", "r1", "late")), 30, "a record sent after the assignment")
        reader.join(30)
    assert len(taken) == 1
    assert taken[0].event_id in sent
    assert taken[0].event_id != before


def test_a_bad_record_raises_with_its_coordinates_or_goes_to_on_bad_record(kafka):
    room = RoomTopic(kafka)
    first = room.send("UserJoinRoom", "r1", "ann")
    garbage = room.put(b"\xc3\x01not avro at all", [(HEADER_EVENT_ID, b"bad-event")], "r1")
    last = room.send("UserLeaveRoom", "r1", "ann")
    group = f"sub-{uuid.uuid4().hex}"

    subscriber = Subscriber(room.settings, group, domains=["room"])
    with pytest.raises(BadRecord) as raised, subscriber:
        assert take(subscriber, 1)[0].event_id == first
        next(subscriber)
    bad = raised.value
    assert (bad.topic, bad.partition, bad.offset, bad.event_id) == (room.topic, 0, garbage, "bad-event")
    assert isinstance(bad.__cause__, EncodingError)
    assert bad.value == b"\xc3\x01not avro at all"
    assert f"offset={garbage}" in str(bad) and "EventId=bad-event" in str(bad)
    assert room.committed(group) == garbage  # the bad record is not committed past

    # The same group again, now with a callback that logs and skips: the flow goes on.
    skipped: list[BadRecord] = []
    with Subscriber(room.settings, group, domains=["room"], on_bad_record=skipped.append) as subscriber:
        deliveries = take(subscriber, 1)
    assert [d.event_id for d in deliveries] == [last]
    assert [(b.offset, b.event_id) for b in skipped] == [(garbage, "bad-event")]
    assert room.committed(group) == garbage + 2


def test_the_confluent_wire_format_on_a_real_registry(kafka, schema_registry):
    # The writer registers with a client of its own; the subscriber builds its codec from the
    # settings, as a service would, and looks each writer schema up by the id in the frame.
    writer = ConfluentCodec(contract(), schema_registry.url)
    room = RoomTopic(kafka, writer)
    sent = [room.send("UserJoinRoom", "r1", "ann"), room.send("RoomDestroy", "r1")]
    settings = kafka.settings(topic_prefix=room.prefix, wire_format="confluent", schema_registry_url=schema_registry.url)
    with Subscriber(settings, f"sub-{uuid.uuid4().hex}", domains=["room"]) as subscriber:
        deliveries = take(subscriber, 2)
    assert [d.event_id for d in deliveries] == sent
    assert [type(d.event).__name__ for d in deliveries] == ["UserJoinRoom", "RoomDestroy"]
    assert deliveries[0].event.EventData.UserId == "ann"
    # Each schema was registered in the registry under the subject the subscriber looked up.
    subjects = SchemaRegistryClient({"url": schema_registry.url, "timeout": 10}).get_subjects()
    assert {f"{room.topic}-rtcbus.UserJoinRoom", f"{room.topic}-rtcbus.RoomDestroy"} <= set(subjects)


def test_the_asyncio_variant_does_not_block_the_loop_and_commits_on_close(kafka):
    room = RoomTopic(kafka)
    group = f"sub-{uuid.uuid4().hex}"

    async def main() -> tuple[list[str], int]:
        ticks = 0
        received = []

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        async with AsyncSubscriber(room.settings, group, domains=["room"]) as subscriber:
            # Nothing there yet: the poll waits in its thread while the loop goes on.
            writer = asyncio.get_running_loop().call_later(
                1.0, lambda: [room.send("UserJoinRoom", "r1", f"user-{n}") for n in range(3)]
            )
            async for delivery in subscriber:
                received.append(delivery.event.EventData.UserId)
                if len(received) == 3:
                    break
            writer.cancel()
        ticker.cancel()
        return received, ticks

    received, ticks = asyncio.run(asyncio.wait_for(main(), 60))
    assert received == ["user-0", "user-1", "user-2"]
    assert ticks > 30  # the loop kept turning through the second the poll waited
    wait_for(lambda: room.committed(group) == 3, 10, "the async subscriber's commit on close")
