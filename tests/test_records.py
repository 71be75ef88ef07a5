"""The lean path against the pydantic path: the same outcome for every input.

Each test runs one raw record through two transforms built from the same settings, one
that tries the lean path first (the router's) and one with the pydantic path alone, and
compares the outcomes whole: topic, key, value bytes, headers, or the dead letter with its
headers. Where a test says the lean path decided, it checks that it did, so that a pass
is not the fallback agreeing with itself.
"""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Message

from consumer.envelope import HEADER_EVENT_TYPE
from consumer.events import Source
from consumer.examples import load_examples
from consumer.records import RecordDecoder
from consumer.router import DeadLetter, Duplicate, Routed, Transform
from consumer.schemas import contract
from consumer.settings import load_settings

SETTINGS = load_settings(bootstrap_servers="127.0.0.1:9", topic_prefix="unit")
JOIN = {"RoomId": "room-1", "UserId": "u1", "DeviceType": "web", "Timestamp": 1611736812853, "ExtraInfo": ""}
SOURCE = Source(SETTINGS.raw_topic, 2, 7)


def envelope_of(event_type: str = "UserJoinRoom", event_data: dict | str = JOIN, **fields) -> dict:
    return {
        "EventType": event_type,
        "EventData": event_data if isinstance(event_data, str) else json.dumps(event_data, ensure_ascii=False),
        "EventTime": "2024-05-01T12:00:00+08:00",
        "EventId": "e-1",
        "AppId": "app",
        "Version": "2020-12-01",
        "Nonce": "1",
        "Signature": "0" * 64,
        **fields,
    }


def body(event_type: str = "UserJoinRoom", event_data: dict | str = JOIN, **fields) -> bytes:
    return json.dumps(envelope_of(event_type, event_data, **fields), ensure_ascii=False).encode()


def raw(value: bytes) -> Message:
    return Message(
        topic=SETTINGS.raw_topic, partition=2, offset=7, key=b"room-1", value=value,
        headers=[(HEADER_EVENT_TYPE, b"UserJoinRoom")], timestamp=(2, 1_700_000_000_000),
    )


def never_seen(_partition: int, _event_id: str) -> bool:
    return False


@pytest.fixture(scope="module")
def lean() -> Transform:
    return Transform.from_settings(SETTINGS)


@pytest.fixture(scope="module")
def reference() -> Transform:
    return Transform.from_settings(SETTINGS, lean=False)


@pytest.fixture(scope="module")
def decoder() -> RecordDecoder:
    return RecordDecoder(contract())


def decides(decoder: RecordDecoder, value: bytes) -> bool:
    envelope = decoder.envelope(value)
    return envelope is not None and decoder.record(*envelope, SOURCE) is not None


def same_outcome(lean: Transform, reference: Transform, value: bytes):
    outcome = lean.apply(raw(value), never_seen)
    assert outcome == reference.apply(raw(value), never_seen)
    return outcome


def test_the_lean_path_covers_every_eventtype_of_the_contract(decoder):
    assert decoder.event_types == frozenset(contract().event_types)


@pytest.mark.parametrize("example", load_examples(), ids=lambda example: example.section)
def test_every_example_gives_the_same_record_both_ways(lean, reference, decoder, example):
    value = body(example.event_type, example.event_data, Version=example.version)
    outcome = same_outcome(lean, reference, value)
    assert type(outcome) is Routed
    assert decides(decoder, value)


EDGE_CASES = {
    # Decided by the lean path: exact JSON types, no unknown field.
    "optional fields missing": ({"RoomId": "r", "UserId": "u"}, True),
    "unicode text": ({"RoomId": "房间-😀", "UserId": "ü\u2028\u0000", "ExtraInfo": "a:b\"c\\"}, True),
    "a long at its limits": ({**JOIN, "Timestamp": 2**63 - 1}, True),
    "a negative long": ({**JOIN, "Timestamp": -(2**63)}, True),
    "colons and escaped quotes in values": ({**JOIN, "ExtraInfo": '{\\"a\\":1}": "x'}, True),
    "extra fields": ({**JOIN, "Vid": "v", "Nested": {"a": [1, 2.5, -0.0, 1e300, 10**30], "b": None}}, True),
    "an extra field beside a null": ({**JOIN, "DeviceType": None, "Vid": "v"}, True),
    "a long as a decimal string": ({**JOIN, "Timestamp": "1611736812853"}, True),
    "a long as a negative decimal string": ({**JOIN, "Timestamp": "-5"}, True),
    "a long as zero in a string": ({**JOIN, "Timestamp": "0"}, True),
    # Left to the pydantic path, which coerces or refuses.
    "an optional field null": ({**JOIN, "DeviceType": None}, False),
    "an extra field and a number for a string": ({**JOIN, "Vid": "v", "UserId": 42}, False),
    "a float in an extra field out of range": (
        '{"RoomId":"r","UserId":"u","Vid":1e400}', False),
    "a duplicate extra field": ('{"RoomId":"r","UserId":"u","Vid":1,"Vid":2}', False),
    "a long as a string with a plus": ({**JOIN, "Timestamp": "+5"}, False),
    "a long as a string with spaces": ({**JOIN, "Timestamp": " 5"}, False),
    "a long as a string with leading zeros": ({**JOIN, "Timestamp": "005"}, False),
    "a long as a string with an exponent": ({**JOIN, "Timestamp": "1e3"}, False),
    "a long as a string with a fraction": ({**JOIN, "Timestamp": "5.0"}, False),
    "a long as a string beyond 64 bits": ({**JOIN, "Timestamp": str(2**63)}, False),
    "a number for a string": ({**JOIN, "UserId": 42}, False),
    "a float for a string": ({**JOIN, "UserId": 4.5}, False),
    "a long beyond 64 bits": ({**JOIN, "Timestamp": 2**63}, False),
    "a huge int": ({**JOIN, "Timestamp": 10**30}, False),
    "a float for a long": ({**JOIN, "Timestamp": 1.5}, False),
    "a whole float for a long": ({**JOIN, "Timestamp": 2.0}, False),
    "a boolean for a long": ({**JOIN, "Timestamp": True}, False),
    "a required field missing": ({"UserId": "u"}, False),
    "a required field null": ({**JOIN, "RoomId": None}, False),
    "an array for a string": ({**JOIN, "RoomId": ["r"]}, False),
}


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_edge_cases_give_the_same_outcome_both_ways(lean, reference, decoder, case):
    event_data, decided = EDGE_CASES[case]
    value = body(event_data=event_data)
    same_outcome(lean, reference, value)
    assert decides(decoder, value) is decided


def test_an_int_field_out_of_its_32_bits_is_the_same_dead_letter(lean, reference, decoder):
    example = next(e for e in load_examples() if e.event_type == "RecordStopped")
    data = dict(example.event_data, Code=2**31)
    outcome = same_outcome(lean, reference, body("RecordStopped", data, Version=example.version))
    assert type(outcome) is DeadLetter


RAW_TEXTS = {
    # Duplicate keys: the protocol refuses them; msgspec alone would keep the last.
    "duplicate envelope key": b'{"EventType":"UserJoinRoom","EventType":"UserLeaveRoom",'
    b'"EventData":"{\\"RoomId\\":\\"r\\",\\"UserId\\":\\"u\\"}","EventTime":"2024-05-01T12:00:00+08:00",'
    b'"EventId":"e-1","AppId":"app","Version":"2020-12-01"}',
    "duplicate EventData key": body(event_data='{"RoomId":"r","UserId":"u","UserId":"v"}'),
    "duplicate key, spaced": body(event_data='{"RoomId" : "r", "UserId" : "u", "UserId" : "v"}'),
    # A colon written as \u003a would hide a key's colon from a count that trusted it.
    "duplicate key beside an escaped colon": body(
        event_data='{"RoomId":"r","UserId":"u","ExtraInfo":"\\u003a","UserId":"v"}'
    ),
    "escaped colon, no duplicate": body(event_data='{"RoomId":"r","UserId":"u","ExtraInfo":"a\\u003ab"}'),
    "duplicate in a nested record": body(
        "RecordStopped",
        '{"AppId":"a","BusinessId":"b","RoomId":"r","TaskId":"t","Code":0,"ErrorMessage":"",'
        '"RecordFileList":[{"Vid":"v","Vid":"w"}]}',
    ),
    "a byte order mark": b"\xef\xbb\xbf" + body(),
    "a lone surrogate in EventId": body().replace(b'"e-1"', b'"\\ud800"'),
    "a lone surrogate in EventData": body(event_data='{"RoomId":"\\ud800","UserId":"u"}'),
    "not UTF-8": body().replace(b"room-1", b"room-\xff"),
    "NaN in EventData": body(event_data='{"RoomId":"r","UserId":"u","Timestamp":NaN}'),
    "EventData not JSON": body(event_data='{"RoomId":'),
    "EventData an array": body(event_data="[1]"),
    "EventData as an object": json.dumps({**envelope_of(), "EventData": JOIN}).encode(),
    "an envelope extra field": body(Extra={"a": 1}),
    "Nonce null": body(Nonce=None),
    "Nonce empty": body(Nonce=""),
    "no Signature": json.dumps({k: v for k, v in envelope_of().items() if k != "Signature"}).encode(),
    "EventId empty": body(EventId=""),
    "EventTime without offset": body(EventTime="2024-05-01T12:00:00"),
    "an unknown EventType": body("SomethingNew", {"a": 1}),
    "not an object": b'["EventType"]',
    "pretty-printed": json.dumps(envelope_of(), indent=2).encode(),
    "an extra field nested too deeply": body(
        event_data='{"RoomId":"r","UserId":"u","Deep":' + "[" * 50_000 + "]" * 50_000 + "}"
    ),
    "a known field nested too deeply": body(event_data='{"RoomId":' + "[" * 50_000 + "]" * 50_000 + "}"),
    "an envelope nested too deeply": b'{"EventType":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
}


@pytest.mark.parametrize("case", RAW_TEXTS, ids=str)
def test_awkward_bodies_give_the_same_outcome_both_ways(lean, reference, case):
    same_outcome(lean, reference, RAW_TEXTS[case])


@pytest.mark.parametrize(
    "case", ["duplicate envelope key", "duplicate EventData key", "duplicate key, spaced",
             "duplicate key beside an escaped colon", "duplicate in a nested record"]
)
def test_a_duplicate_key_is_never_decided_by_the_lean_path(decoder, lean, case):
    assert not decides(decoder, RAW_TEXTS[case])
    assert type(lean.apply(raw(RAW_TEXTS[case]), never_seen)) is DeadLetter


@pytest.mark.parametrize("case", ["EventTime without offset", "Nonce null", "duplicate envelope key"])
def test_a_body_the_envelope_refuses_is_a_dead_letter_even_when_its_eventid_was_seen(lean, reference, case):
    def seen(_partition: int, _event_id: str) -> bool:
        return True

    outcome = lean.apply(raw(RAW_TEXTS[case]), seen)
    assert type(outcome) is DeadLetter
    assert outcome == reference.apply(raw(RAW_TEXTS[case]), seen)


def test_a_duplicate_eventid_is_dropped_by_the_lean_path_too(lean, reference):
    def seen(_partition: int, event_id: str) -> bool:
        return event_id == "e-1"

    outcome = lean.apply(raw(body()), seen)
    assert outcome == reference.apply(raw(body()), seen)
    assert type(outcome) is Duplicate


def test_a_record_over_the_size_limit_is_the_same_dead_letter():
    small_lean = Transform(*_parts(), 16 * 1024 + 200, RecordDecoder(contract()))
    small_reference = Transform(*_parts(), 16 * 1024 + 200)
    value = body(event_data={**JOIN, "ExtraInfo": "x" * 400})
    outcome = small_lean.apply(raw(value), never_seen)
    assert type(outcome) is DeadLetter
    assert outcome == small_reference.apply(raw(value), never_seen)


def _parts():
    from consumer.codec import SingleObjectCodec
    from consumer.events import models
    from consumer.routing import RoutingTable

    return models(), RoutingTable(topic_prefix="unit"), SingleObjectCodec(contract())


def test_in_the_confluent_wire_format_every_example_gives_the_same_record_both_ways():
    from consumer.codec import ConfluentCodec
    from consumer.events import models
    from consumer.routing import RoutingTable

    codec = ConfluentCodec(contract(), "mock://test-records")
    parts = (models(), RoutingTable(topic_prefix="unit"), codec, SETTINGS.max_record_bytes)
    confluent_lean, confluent_reference = Transform(*parts, RecordDecoder(contract())), Transform(*parts)
    for example in load_examples():
        value = body(example.event_type, example.event_data, Version=example.version)
        outcome = confluent_lean.apply(raw(value), never_seen)
        assert type(outcome) is Routed and outcome.value[:1] == b"\x00"
        assert outcome == confluent_reference.apply(raw(value), never_seen), example.section
