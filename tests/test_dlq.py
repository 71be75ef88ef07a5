"""Dead letters on the real broker: listed, then redriven through the current transform, exactly once.

The strict setting is a real one: the contract as it was before every field that is not an id
became optional (``avro/history/v1``), under which a ``UserLeaveRoom`` without ``DeviceType``
or ``Reason`` is dead-lettered. The current contract, the relaxed one, routes it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import pytest
from confluent_kafka import Message, Producer

from consumer.audit import TimeRange
from consumer.codec import codec_from_settings
from consumer.dlq import Filters, Letter, list_dlq, raw_record, redrive
from consumer.envelope import HEADER_EVENT_ID, HEADER_EVENT_TYPE
from consumer.router import Router
from consumer.router.transform import Transform
from consumer.schemas import SchemaSet, contract, contract_dir
from consumer.settings import load_settings
from support import RTCBUS, Stack, callback, read_topic, running

ROOM = "room-dlq"


def leave(**fields: object) -> dict:
    return {"RoomId": ROOM, "UserId": "u1", "Timestamp": 1, **fields}


def produce_raw(stack: Stack, bodies: list[bytes]) -> None:
    """Callbacks straight to raw, keyed and with the headers the shim gives them."""
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    for body in bodies:
        event = json.loads(body)
        headers = [(HEADER_EVENT_TYPE, event["EventType"].encode()), (HEADER_EVENT_ID, event["EventId"].encode())]
        producer.produce(stack.raw_topic, body, key=ROOM.encode(), headers=headers)
    assert producer.flush(30) == 0


def room_event_ids(stack: Stack) -> Counter:
    return Counter(dict(m.headers())[HEADER_EVENT_ID].decode() for m in read_topic(stack.bootstrap, stack.topic("room")))


def route(stack: Stack, settings, transform: Transform) -> None:
    """Run a router with ``transform`` until it has committed the whole raw topic."""
    with running(Router(settings, transform=transform)) as errors:
        stack.wait_caught_up(60)
    assert errors == []


def cli(stack: Stack, *args: str) -> str:
    done = subprocess.run(
        [RTCBUS, "dlq", *args], env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.kafka
def test_dead_letters_of_a_strict_contract_are_redriven_exactly_once_after_it_is_relaxed(stack, kafka):
    settings = kafka.settings(topic_prefix=stack.prefix, group_id=stack.group, partitions=3, metrics_port=0)
    secret = stack.secret
    bodies = [
        callback("UserJoinRoom", {"RoomId": ROOM, "UserId": "u1", "DeviceType": "web", "Timestamp": 0, "ExtraInfo": ""}, secret, event_id="join-1"),
        callback("UserJoinRoom", "{not json", secret, event_id="bad-json"),  # fails under any contract
        callback("UserLeaveRoom", leave(Reason="userLeave"), secret, event_id="leave-1"),
        callback("UserLeaveRoom", leave(Reason="userLeave"), secret, event_id="leave-2"),
        callback("UserLeaveRoom", leave(Reason="userLeave"), secret, event_id="leave-2"),  # the sender's retry
        callback("UserLeaveRoom", leave(DeviceType="web", Reason="userLeave"), secret, event_id="leave-3"),
        callback("UserLeaveRoom", leave(DeviceType="web"), secret, event_id="leave-4"),
    ]
    produce_raw(stack, bodies)
    route(stack, settings, Transform.from_settings(settings, SchemaSet.load(contract_dir() / "history" / "v1")))
    assert room_event_ids(stack) == Counter(["join-1", "leave-3"])
    assert len(read_topic(stack.bootstrap, stack.dlq_topic)) == 5

    # list: by class, by field, the time range, an example of each kind.
    listing = json.loads(cli(stack, "list", "--json"))
    assert listing["total"] == 5
    assert listing["by_error_class"] == {"ValidationError": 5}
    assert listing["by_field"] == {"EventData.DeviceType": 3, "EventData.Reason": 1, "EventData": 1}
    assert listing["first"] and listing["last"]
    assert {(e["event_id"], e["field"]) for e in listing["examples"]} == {
        ("bad-json", "EventData"), ("leave-1", "EventData.DeviceType"), ("leave-4", "EventData.Reason"),
    }
    assert all(e["event_type"] and e["reason"] and e["offset"] >= 0 for e in listing["examples"])
    assert list_dlq(settings).to_dict() == listing

    current = Transform.from_settings(settings)
    # A filter that takes nothing writes nothing, and loses nothing for the next run.
    left_out = redrive(settings, current, error_classes=["EncodingError"])
    assert (left_out.skipped, sum(left_out.redriven.values())) == (5, 0)
    # Dry: what would happen, nothing written.
    dry = cli(stack, "redrive", "--dry-run")
    assert "would redrive 3 to their domain topics, 1 already there, 1 still failing" in dry, dry
    assert room_event_ids(stack) == Counter(["join-1", "leave-3"])

    # The contract is relaxed, and the sender's retry of leave-1 gets through on its own.
    produce_raw(stack, [bodies[2]])
    route(stack, settings, current)
    assert room_event_ids(stack) == Counter(["join-1", "leave-3", "leave-1"])

    summary = redrive(settings, current)
    assert summary.redriven == {stack.topic("room"): 2}
    assert summary.already_present == 2  # leave-1, on the room topic; leave-2's second dead letter
    assert summary.still_failing == {"ValidationError EventData": 1}
    assert "bad-json" in summary.failing_examples[0]
    assert room_event_ids(stack) == Counter(["join-1", "leave-3", "leave-1", "leave-2", "leave-4"])
    # Each record names its raw record as Source, the redriven ones as if the router had routed them.
    raw = {(m.topic(), m.partition(), m.offset()): json.loads(m.value())["EventId"] for m in read_topic(stack.bootstrap, stack.raw_topic)}
    codec = codec_from_settings(settings, contract())
    for message in read_topic(stack.bootstrap, stack.topic("room")):
        record = codec.decode(message.value(), message.topic())
        source = record["Source"]
        assert raw[(source["Topic"], source["Partition"], source["Offset"])] == record["EventId"]
    # Still failing: reported, not appended to the DLQ again.
    assert len(read_topic(stack.bootstrap, stack.dlq_topic)) == 5

    # Again: the group resumes at the record still failing and re-reads what follows it, and
    # every EventId it finds is on the room topic already.
    again = redrive(settings, current)
    assert sum(again.redriven.values()) == 0
    assert again.already_present == 4
    assert sum(again.still_failing.values()) == 1
    assert room_event_ids(stack) == Counter(["join-1", "leave-3", "leave-1", "leave-2", "leave-4"])
    assert len(read_topic(stack.bootstrap, stack.dlq_topic)) == 5

    # The window filter: dead letters from the future are none.
    future = redrive(settings, current, window=TimeRange(since_ms=2**41))
    assert (future.skipped, sum(future.redriven.values())) == (5, 0)


def test_filters_take_by_error_class_and_dead_letter_time():
    def letter(error_class: str, timestamp_ms: int) -> Letter:
        message = Message(
            topic="t.callbacks.dlq", partition=0, offset=1, value=b"{}",
            headers=[("rtcbus.error.class", error_class.encode())], timestamp=(1, timestamp_ms),
        )
        return Letter.from_message(message)

    assert Filters().take(letter("ValidationError", 5))
    assert not Filters(frozenset({"EncodingError"})).take(letter("ValidationError", 5))
    assert Filters(window=TimeRange(since_ms=5, until_ms=5)).take(letter("ValidationError", 5))
    assert not Filters(window=TimeRange(since_ms=6)).take(letter("ValidationError", 5))


def test_a_dead_letter_is_handed_back_to_the_transform_as_the_raw_record_it_was():
    offline = load_settings(bootstrap_servers="127.0.0.1:1", topic_prefix="t")
    strict = Transform.from_settings(offline, SchemaSet.load(contract_dir() / "history" / "v1"))
    body = callback("UserLeaveRoom", leave(Reason="userLeave"), "s", event_id="leave-x")
    raw = Message(
        topic="t.callbacks.raw", partition=2, offset=41, key=ROOM.encode(), value=body,
        headers=[(HEADER_EVENT_TYPE, b"UserLeaveRoom"), (HEADER_EVENT_ID, b"leave-x")], timestamp=(2, 1_700_000_000_000),
    )
    letter = strict.dead_letter(raw, ValueError("strict"))
    dead = Message(topic="t.callbacks.dlq", partition=0, offset=7, key=letter.key, value=letter.value,
                   headers=letter.headers, timestamp=(1, 1_700_000_000_500))

    again = raw_record(dead)
    assert (again.topic(), again.partition(), again.offset()) == ("t.callbacks.raw", 2, 41)
    assert (again.key(), again.value(), again.headers()) == (raw.key(), raw.value(), raw.headers())
    routed = Transform.from_settings(offline).apply(again, lambda _p, _e: False)
    assert (type(routed).__name__, routed.event_id) == ("Routed", "leave-x")

    cut = Message(topic="t.callbacks.dlq", partition=0, offset=8, key=letter.key, value=body[:10],
                  headers=[*letter.headers, ("rtcbus.dlq.truncated", b"value")], timestamp=(1, 1))
    assert raw_record(cut) == "value cut in the DLQ; the original is at t.callbacks.raw 2:41"
    assert Letter.from_message(dead).to_dict() == {
        "event_id": "leave-x", "event_type": "UserLeaveRoom", "partition": 0, "offset": 7,
        "timestamp_ms": 1_700_000_000_500, "error_class": "ValueError", "field": None,
        "reason": "ValueError: strict (topic=t.callbacks.raw, partition=2, offset=41)",
    }
