"""The typed models: lenient where senders are untidy, strict where it matters."""

import json

import pytest

from consumer.envelope import parse_envelope
from consumer.errors import ValidationError
from consumer.events import models
from consumer.examples import load_examples


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
