"""The typed models: lenient where senders are untidy, strict where it matters."""

import json
from typing import Any

import pytest

from consumer.codec import SingleObjectCodec
from consumer.envelope import parse_envelope
from consumer.errors import ValidationError
from consumer.events import models
from consumer.examples import load_examples
from consumer.schemas import contract


def envelope(event_type: str, event_data: dict, **extra) -> object:
    return parse_envelope(
        json.dumps(
            {
                "EventType": event_type,
                "EventData": json.dumps(event_data),
                "EventTime": "2024-01-01T00:00:00Z",
                "EventId": "e-1",
                "AppId": "app",
                "Version": "2020-12-01",
                **extra,
            }
        )
    )


STREAM = {"RoomId": "r1", "UserId": "u1", "DeviceType": "web", "Timestamp": 1611736812853}


def test_numbers_sent_as_strings_are_coerced():
    _, record = models().to_record(envelope("UserAudioStreamStart", {**STREAM, "Timestamp": "1611736812853"}))
    assert record["EventData"]["Timestamp"] == 1611736812853


def test_numbers_sent_for_strings_become_strings():
    _, record = models().to_record(envelope("UserAudioStreamStart", {**STREAM, "UserId": 42}))
    assert record["EventData"]["UserId"] == "42"


def test_unknown_fields_go_to_the_map_not_the_floor():
    _, record = models().to_record(
        envelope("UserAudioStreamStart", {**STREAM, "Region": {"name": "cn"}}, Trace="t-1")
    )
    assert json.loads(record["ExtraFields"]["EventData.Region"]) == {"name": "cn"}
    assert json.loads(record["ExtraFields"]["Trace"]) == "t-1"


def test_missing_optional_fields_are_null():
    # RecordFile's version-specific fields (Vid, ObjectKey, ...) are optional.
    example = next(e for e in load_examples() if e.event_type == "RecordStopped")
    record_file = models().record_model("RecordFile")
    optional = [name for name, f in record_file.model_fields.items() if not f.is_required()]
    assert optional
    data = json.loads(json.dumps(example.event_data))
    for name in optional:
        data["RecordFileList"][0].pop(name, None)
    _, record = models().to_record(envelope("RecordStopped", data))
    assert all(record["EventData"]["RecordFileList"][0][name] is None for name in optional)


def test_missing_required_field_names_event_type_and_field():
    data = {k: v for k, v in STREAM.items() if k != "RoomId"}
    with pytest.raises(ValidationError) as raised:
        models().to_record(envelope("UserAudioStreamStart", data))
    assert raised.value.field == "EventData.RoomId"
    assert "UserAudioStreamStart" in str(raised.value) and "absent" in str(raised.value)


def test_uncoercible_value_is_named_with_its_value():
    with pytest.raises(ValidationError) as raised:
        models().to_record(envelope("UserAudioStreamStart", {**STREAM, "Timestamp": "soon"}))
    assert raised.value.field == "EventData.Timestamp"
    assert '"soon"' in str(raised.value)


def test_a_value_too_large_for_avro_long_is_refused():
    with pytest.raises(ValidationError, match="Timestamp"):
        models().to_record(envelope("UserAudioStreamStart", {**STREAM, "Timestamp": 2**64}))


def test_event_data_that_is_not_an_object_is_refused():
    body = {"EventType": "UserAudioStreamStart", "EventData": "[1, 2]",
            "EventTime": "2024-01-01T00:00:00Z", "EventId": "e", "AppId": "a", "Version": "v"}
    with pytest.raises(ValidationError, match="not a JSON object"):
        models().to_record(parse_envelope(json.dumps(body)))


def test_broken_event_data_of_an_unknown_type_is_refused_too():
    body = {"EventType": "Nope", "EventData": "{broken", "EventTime": "2024-01-01T00:00:00Z",
            "EventId": "e", "AppId": "a", "Version": "v"}
    with pytest.raises(ValidationError, match="not valid JSON"):
        models().to_record(parse_envelope(json.dumps(body)))


# -- a missing id is a dead letter, a missing detail is a null ------------------------------------

def encoded_and_decoded(name: str, record: dict) -> dict:
    codec = SingleObjectCodec(contract())
    return codec.decode(codec.encode(name, record))


def test_user_leave_room_without_device_type_and_reason_is_an_event():
    data = {"RoomId": "r1", "UserId": "u1", "Timestamp": 1611736812853}
    name, record = models().to_record(envelope("UserLeaveRoom", data))
    decoded = encoded_and_decoded(name, record)
    assert name == "UserLeaveRoom"
    assert decoded["EventData"] == {**data, "DeviceType": None, "Reason": None}


def test_user_join_room_without_extra_info_is_an_event():
    data = {"RoomId": "r1", "UserId": "u1", "DeviceType": "web", "Timestamp": 1611736812853}
    name, record = models().to_record(envelope("UserJoinRoom", data))
    decoded = encoded_and_decoded(name, record)
    assert decoded["EventData"] == {**data, "ExtraInfo": None}


def test_user_join_room_without_room_id_is_refused_naming_the_field():
    data = {"UserId": "u1", "DeviceType": "web", "Timestamp": 1611736812853, "ExtraInfo": ""}
    with pytest.raises(ValidationError) as raised:
        models().to_record(envelope("UserJoinRoom", data))
    assert raised.value.field == "EventData.RoomId"
    assert raised.value.event_type == "UserJoinRoom" and "absent" in str(raised.value)


def _required(avro_type, named: dict) -> Any:
    """``avro_type`` with only its required fields, as {field: nested or None}; None if optional."""
    if isinstance(avro_type, list):
        return None
    if isinstance(avro_type, str):
        return _required(named[avro_type], named) if avro_type in named else True
    if avro_type["type"] == "record":
        named[avro_type["name"]] = avro_type
        named[f"rtcbus.{avro_type['name']}"] = avro_type
        return {
            f["name"]: _required(f["type"], named)
            for f in avro_type["fields"]
            if not isinstance(f["type"], list)
        }
    if avro_type["type"] == "array":
        return [_required(avro_type["items"], named)]
    return True


def _keep_only(value, shape):
    """``value`` stripped to the fields of ``shape`` (a :func:`_required` result)."""
    if isinstance(shape, dict):
        return {k: _keep_only(value[k], s) for k, s in shape.items() if k in value}
    if isinstance(shape, list):
        return [_keep_only(item, shape[0]) for item in value]
    return value


def _event_data_shape(event_type: str) -> dict:
    schema = contract()[event_type].schema
    event_data = next(f["type"] for f in schema["fields"] if f["name"] == "EventData")
    return _required(event_data, {})


@pytest.mark.parametrize("example", load_examples(), ids=lambda e: e.section)
def test_an_event_with_only_its_ids_validates_and_encodes(example):
    shape = _event_data_shape(example.event_type)
    data = _keep_only(example.event_data, shape)
    assert len(json.dumps(data)) < len(json.dumps(example.event_data))  # details were dropped
    name, record = models().to_record(envelope(example.event_type, data))
    decoded = encoded_and_decoded(name, record)
    for field, value in decoded["EventData"].items():
        if field not in shape:
            assert value is None, field
    assert _keep_only(decoded["EventData"], shape) == data


REQUIRED_IDS = [
    (event_type, field)
    for event_type in contract().event_types
    for field in _event_data_shape(event_type)
]


@pytest.mark.parametrize("event_type, field", REQUIRED_IDS, ids=lambda v: str(v))
def test_an_event_without_one_of_its_ids_is_refused_naming_it(event_type, field):
    example = next(e for e in load_examples() if e.event_type == event_type)
    data = {k: v for k, v in example.event_data.items() if k != field}
    with pytest.raises(ValidationError) as raised:
        models().to_record(envelope(event_type, data))
    assert raised.value.field == f"EventData.{field}"


def test_the_ids_of_nested_records_are_required_too():
    example = next(e for e in load_examples() if e.event_type == "RecordStopped")
    data = json.loads(json.dumps(example.event_data))
    del data["RecordFileList"][0]["StreamList"][0]["UserId"]
    with pytest.raises(ValidationError) as raised:
        models().to_record(envelope("RecordStopped", data))
    assert raised.value.field == "EventData.RecordFileList.0.StreamList.0.UserId"


def test_numbers_sent_as_strings_are_coerced_in_optional_fields():
    # SegmentRealTimeData sends its Int fields as strings (avro/README.md, Decisions 2).
    example = next(e for e in load_examples() if e.event_type == "SegmentRealTimeData")
    assert example.event_data["Data"][0]["SampleRate"] == "44100"
    assert not models().record_model("AudioData").model_fields["SampleRate"].is_required()
    name, record = models().to_record(envelope("SegmentRealTimeData", example.event_data))
    decoded = encoded_and_decoded(name, record)
    audio = decoded["EventData"]["Data"][0]
    assert (audio["SampleRate"], audio["BitsPerSample"], audio["Channels"]) == (44100, 16, 2)
    data = {"RoomId": "r1", "UserId": "u1", "Timestamp": "1611736812853"}
    _, record = models().to_record(envelope("UserLeaveRoom", data))
    assert record["EventData"]["Timestamp"] == 1611736812853


def test_an_optional_field_that_cannot_be_coerced_is_still_refused():
    data = {"RoomId": "r1", "UserId": "u1", "Timestamp": "soon"}
    with pytest.raises(ValidationError) as raised:
        models().to_record(envelope("UserLeaveRoom", data))
    assert raised.value.field == "EventData.Timestamp"
