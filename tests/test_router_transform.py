"""The router's pure step, without a broker: every input gives an outcome, none raises."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Message

from consumer.codec import SingleObjectCodec
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
)
from consumer.errors import ConfigError, InfrastructureError
from consumer.events import models
from consumer.router import DeadLetter, Duplicate, Routed, Transform
from consumer.router.dedupe import DedupeWindow
from consumer.router.transform import HEADER_VALUE_MAX_BYTES, record_size
from consumer.routing import RoutingTable
from consumer.schemas import contract
from consumer.settings import load_settings

SETTINGS = load_settings(bootstrap_servers="127.0.0.1:9", topic_prefix="unit")
JOIN = {"RoomId": "room-1", "UserId": "u1", "DeviceType": "web", "Timestamp": 1611736812853, "ExtraInfo": ""}


def body(event_type: str = "UserJoinRoom", event_data: dict | str = JOIN, event_id: str = "e-1") -> bytes:
    return json.dumps(
        {
            "EventType": event_type,
            "EventData": event_data if isinstance(event_data, str) else json.dumps(event_data),
            "EventTime": "2024-05-01T12:00:00+08:00",
            "EventId": event_id,
            "AppId": "app",
            "Version": "2020-12-01",
            "Nonce": "1",
            "Signature": "0" * 64,
        }
    ).encode()


def raw(value: bytes | None, *, key: bytes = b"room-1", offset: int = 7, headers=None) -> Message:
    return Message(
        topic=SETTINGS.raw_topic, partition=2, offset=offset, key=key, value=value,
        headers=headers if headers is not None else [(HEADER_EVENT_TYPE, b"UserJoinRoom")],
        timestamp=(2, 1_700_000_000_000),
    )


@pytest.fixture(scope="module")
def transform() -> Transform:
    return Transform.from_settings(SETTINGS)


def never_seen(_partition: int, _event_id: str) -> bool:
    return False


def headers_of(letter: DeadLetter) -> dict[str, bytes]:
    return dict(letter.headers)


def assert_fits(transform: Transform, letter: DeadLetter) -> None:
    assert all(isinstance(value, bytes) for _, value in letter.headers)
    assert record_size(letter.key, letter.value, letter.headers) <= SETTINGS.max_record_bytes - 16 * 1024
    headers = headers_of(letter)
    assert headers[HEADER_SOURCE_TOPIC] == SETTINGS.raw_topic.encode()
    assert headers[HEADER_SOURCE_PARTITION] == b"2"
    assert headers[HEADER_SOURCE_OFFSET] == b"7"


def test_a_callback_becomes_its_domain_record(transform):
    outcome = transform.apply(raw(body()), never_seen)
    assert isinstance(outcome, Routed)
    assert outcome.topic == "unit.events.room" and outcome.domain == "room"
    assert outcome.key == b"room-1" and outcome.event_id == "e-1"
    assert dict(outcome.headers)[HEADER_EVENT_ID] == b"e-1"
    decoded = SingleObjectCodec(contract()).decode(outcome.value)
    assert decoded["EventData"]["UserId"] == "u1"
    assert decoded["Source"] == {"Topic": SETTINGS.raw_topic, "Partition": 2, "Offset": 7}


def test_a_seen_event_id_is_a_duplicate(transform):
    window = DedupeWindow(60_000)
    window.add(2, "e-1", 1_700_000_000_000)
    outcome = transform.apply(raw(body()), window.seen)
    assert outcome == Duplicate("e-1", "UserJoinRoom")
    # Only the partition the EventId was routed from remembers it.
    assert isinstance(transform.apply(raw(body()), lambda p, e: window.seen(p + 1, e)), Routed)


def test_a_lone_surrogate_is_a_dead_letter_with_encodable_headers(transform):
    # Pure ASCII on the wire: EventData's string holds the six characters \ud83d.
    event_data = json.dumps(JOIN).replace('"u1"', '"u\\ud83d"')
    outcome = transform.apply(raw(body(event_data=event_data)), never_seen)
    assert isinstance(outcome, DeadLetter)
    assert_fits(transform, outcome)
    assert headers_of(outcome)[HEADER_ERROR_CLASS] == b"EncodingError"
    assert b"\\ud83d" in headers_of(outcome)[HEADER_ERROR_MESSAGE]


def test_a_huge_event_id_on_a_bad_record_still_gives_a_dead_letter_that_fits(transform):
    event_id = "x" * 300_000
    value = body(event_data={"UserId": "no-room"}, event_id=event_id)
    message = raw(value, headers=[(HEADER_EVENT_TYPE, b"UserJoinRoom"), (HEADER_EVENT_ID, event_id.encode())])
    outcome = transform.apply(message, never_seen)
    assert isinstance(outcome, DeadLetter) and outcome.error_class == "ValidationError"
    assert_fits(transform, outcome)
    assert all(len(value) <= HEADER_VALUE_MAX_BYTES for _, value in outcome.headers)
    assert outcome.value == value, "the raw bytes fit, so they are kept whole"
    assert outcome.truncated and b"header:rtcbus.event_id" in headers_of(outcome)[HEADER_TRUNCATED]


def test_a_raw_record_at_the_size_limit_is_cut_to_fit_and_says_so(transform):
    value = body(event_data="{broken")
    value = value + b" " * (SETTINGS.max_record_bytes - 16 * 1024 - len(value) - 10)
    outcome = transform.apply(raw(value), never_seen)
    assert isinstance(outcome, DeadLetter)
    assert_fits(transform, outcome)
    assert 0 < len(outcome.value) < len(value) and value.startswith(outcome.value)
    assert headers_of(outcome)[HEADER_TRUNCATED] == b"value"


def test_nesting_deep_enough_to_exhaust_the_stack_is_a_dead_letter(transform):
    deep = '{"RoomId":"room-1","UserId":"u1","ExtraInfo":' + "[" * 100_000 + "]" * 100_000 + "}"
    outcome = transform.apply(raw(body(event_data=deep)), never_seen)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_class == "ValidationError"
    assert headers_of(outcome)[HEADER_ERROR_FIELD] == b"EventData"
    assert b"nested too deeply" in headers_of(outcome)[HEADER_ERROR_MESSAGE]
    assert_fits(transform, outcome)


@pytest.mark.parametrize(
    "value",
    [None, b"", b"\xff\xfe", b"[]", b"{}", b'{"EventType": 1}', body(event_type="UserJoinRoom", event_data="[1]")],
)
def test_malformed_raw_values_are_dead_letters(transform, value):
    outcome = transform.apply(raw(value), never_seen)
    assert isinstance(outcome, DeadLetter)
    assert_fits(transform, outcome)


class _Exploding:
    """A codec whose encode fails as no codec is meant to: what any bug looks like."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def encode(self, name, record, topic):
        raise self.error

    def schema_id(self, name, topic):
        return ""


@pytest.mark.parametrize("error", [ZeroDivisionError("boom"), RecursionError("boom"), KeyError("boom")])
def test_any_exception_of_a_stage_is_a_dead_letter_naming_it(error):
    transform = Transform(models(), RoutingTable(topic_prefix="unit"), _Exploding(error), SETTINGS.max_record_bytes)
    outcome = transform.apply(raw(body()), never_seen)
    name = type(error).__name__
    assert isinstance(outcome, DeadLetter) and outcome.error_class == name
    assert f"{name}: ".encode() in headers_of(outcome)[HEADER_ERROR_MESSAGE]


def test_an_infrastructure_failure_is_not_a_dead_letter():
    transform = Transform(
        models(), RoutingTable(topic_prefix="unit"), _Exploding(InfrastructureError("registry away")),
        SETTINGS.max_record_bytes,
    )
    with pytest.raises(InfrastructureError):
        transform.apply(raw(body()), never_seen)


def test_a_domain_record_over_the_limit_is_a_dead_letter(transform):
    small = Transform(models(), RoutingTable(topic_prefix="unit"), SingleObjectCodec(contract()), 16 * 1024 + 200)
    outcome = small.apply(raw(body()), never_seen)
    assert isinstance(outcome, DeadLetter) and outcome.error_class == "EncodingError"
    assert b"over the" in headers_of(outcome)[HEADER_ERROR_MESSAGE]


def test_event_type_labels_are_bounded(transform):
    outcome = transform.apply(raw(body(event_type="VendorThing-" + "x" * 50)), never_seen)
    assert isinstance(outcome, Routed) and outcome.topic == "unit.events.unknown"
    assert outcome.event_type == "unknown"
    assert transform.label("UserJoinRoom") == "UserJoinRoom"


def test_a_shrunk_dead_letter_keeps_the_reason_and_the_source(transform):
    letter = transform.apply(raw(body(event_data="{broken")), never_seen).shrunk()
    assert letter.value is None and letter.truncated
    headers = headers_of(letter)
    assert HEADER_EVENT_TYPE not in headers
    assert headers[HEADER_ERROR_CLASS] == b"ValidationError"
    assert headers[HEADER_SOURCE_OFFSET] == b"7"


def test_a_routing_table_that_disagrees_with_the_contract_is_refused():
    table = RoutingTable(topic_prefix="unit")
    with pytest.raises(ConfigError, match="without a schema: UserJoinRoom"):
        table.require([t for t in models() if t != "UserJoinRoom"])
    with pytest.raises(ConfigError, match="without a domain: BrandNew"):
        table.require([*models(), "BrandNew"])
