import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.envelope import SignatureVerifier, parse_envelope, sign, signed_fields
from consumer.errors import SignatureError, ValidationError

EVENT_DATA = '{"RoomId":"room1","UserId":"u1","DeviceType":"android","Timestamp":1611736812853}'
FIELDS = {
    "EventType": "UserJoinRoom",
    "EventData": EVENT_DATA,
    "EventTime": "2021-01-27T16:40:12+08:00",
    "EventId": "a9f0c6b2",
    "AppId": "app42",
    "Version": "2020-12-01",
    "Nonce": "4821",
}


def callback(secret: str = "s3cret", **changes: str) -> bytes:
    document = {**FIELDS, **changes}
    document["Signature"] = sign(
        [document[k] for k in ("EventType", "EventData", "EventTime", "EventId", "AppId", "Version", "Nonce")],
        secret,
    )
    return json.dumps(document).encode()


def test_known_vector_sorted_by_hand():
    # The eight strings in ascending byte order, sorted by hand:
    # '2' (0x32) < '4' (0x34) < 'U' < 'a' < 's' < '{'.
    by_hand = (
        "2020-12-01"
        "2021-01-27T16:40:12+08:00"
        "4821"
        "UserJoinRoom"
        "a9f0c6b2"
        "app42"
        "s3cret"
        + EVENT_DATA
    )
    expected = hashlib.sha256(by_hand.encode()).hexdigest()
    envelope = parse_envelope(callback())
    assert envelope.signature == expected
    SignatureVerifier(["s3cret"]).verify(envelope)


def test_parses_every_field():
    envelope = parse_envelope(callback())
    assert envelope.event_type == "UserJoinRoom"
    assert envelope.event_data() == json.loads(EVENT_DATA)
    assert envelope.event_time_ms == 1611736812000
    assert (envelope.event_id, envelope.app_id, envelope.version, envelope.nonce) == (
        "a9f0c6b2", "app42", "2020-12-01", "4821",
    )
    assert envelope.key() == "room1"


def test_event_data_as_object_is_accepted():
    document = json.loads(callback())
    document["EventData"] = json.loads(EVENT_DATA)
    envelope = parse_envelope(json.dumps(document))
    assert envelope.event_data()["RoomId"] == "room1"
    # The sender signed the compact string, which is what an object-form EventData is checked as.
    SignatureVerifier(["s3cret"]).verify(envelope)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: d.update(Nonce="1"), id="tampered-nonce"),
        pytest.param(lambda d: d.update(EventData=EVENT_DATA.replace("u1", "u2")), id="tampered-event-data"),
        pytest.param(lambda d: d.update(EventData=json.dumps(json.loads(EVENT_DATA), indent=1)), id="reserialised-event-data"),
    ],
)
def test_tampering_is_rejected(tamper):
    document = json.loads(callback())
    tamper(document)
    with pytest.raises(SignatureError, match="Signature does not match"):
        SignatureVerifier(["s3cret"]).verify(parse_envelope(json.dumps(document)))


def test_wrong_secret_is_rejected():
    with pytest.raises(SignatureError):
        SignatureVerifier(["other"]).verify(parse_envelope(callback("s3cret")))


def test_rotation_accepts_either_active_secret():
    verifier = SignatureVerifier(["new", "old"])
    verifier.verify(parse_envelope(callback("old")))
    verifier.verify(parse_envelope(callback("new")))
    with pytest.raises(SignatureError):
        verifier.verify(parse_envelope(callback("retired")))


def test_per_app_secrets_replace_the_global_ones():
    verifier = SignatureVerifier(["global"], app_secrets={"app42": ["mine"]})
    verifier.verify(parse_envelope(callback("mine")))
    with pytest.raises(SignatureError):
        verifier.verify(parse_envelope(callback("global")))
    verifier.verify(parse_envelope(callback("global", AppId="other-app")))


def test_no_secrets_means_no_check():
    SignatureVerifier().verify(parse_envelope(callback("anything")))


def test_skew_window_is_off_by_default_and_refuses_old_events_when_on():
    old = parse_envelope(callback())
    far_future_ms = old.event_time_ms + 3600_000
    SignatureVerifier(["s3cret"]).verify(old, now_ms=far_future_ms)
    with pytest.raises(SignatureError, match="skew"):
        SignatureVerifier(["s3cret"], skew_s=60).verify(old, now_ms=far_future_ms)
    SignatureVerifier(["s3cret"], skew_s=60).verify(old, now_ms=old.event_time_ms + 30_000)


def test_signature_error_never_shows_the_secret():
    with pytest.raises(SignatureError) as raised:
        SignatureVerifier(["hunter2"]).verify(parse_envelope(callback("s3cret")))
    assert "hunter2" not in str(raised.value) and "s3cret" not in str(raised.value)


@pytest.mark.parametrize("missing", ["EventType", "EventData", "EventTime", "EventId", "AppId", "Version"])
def test_missing_envelope_field_is_named(missing):
    document = json.loads(callback())
    del document[missing]
    with pytest.raises(ValidationError) as raised:
        parse_envelope(json.dumps(document))
    assert raised.value.field == missing
    assert missing in str(raised.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("EventTime", "yesterday"), ("EventTime", "2021-01-27T16:40:12"), ("EventId", 7), ("EventData", 3)],
)
def test_malformed_envelope_field_is_named(field, value):
    document = json.loads(callback())
    document[field] = value
    with pytest.raises(ValidationError) as raised:
        parse_envelope(json.dumps(document))
    assert raised.value.field == field


def test_event_time_keeps_milliseconds_exactly():
    envelope = parse_envelope(callback(EventTime="2021-01-27T16:40:12.853+08:00"))
    assert envelope.event_time_ms == 1611736812853


def test_broken_event_data_parses_as_an_envelope_and_fails_on_use():
    envelope = parse_envelope(callback(EventData="{not json"))
    assert envelope.key() == "app42"  # still keyed, so the router can dead-letter it
    with pytest.raises(ValidationError) as raised:
        envelope.event_data()
    assert raised.value.field == "EventData"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"RoomId": "r", "TaskId": "t"}, "r"),
        ({"PublicStreamId": "p", "TaskId": "t"}, "p"),
        ({"TaskId": "t"}, "t"),
        ({"RoomId": ""}, "app42"),
    ],
)
def test_key_policy(data, key):
    assert parse_envelope(callback(EventData=json.dumps(data))).key() == key


def test_key_falls_back_to_event_id_without_app_id():
    from consumer.envelope import partition_key

    assert partition_key({}, "", "evt-1") == "evt-1"


def test_signed_fields_are_the_received_strings():
    envelope = parse_envelope(callback())
    assert signed_fields(envelope) == tuple(FIELDS.values())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
ENVELOPE_LIKE = st.fixed_dictionaries(
    {},
    optional={name: JSON | st.text() for name in (*FIELDS, "Signature")},
)


@settings(max_examples=300)
@given(st.binary())
def test_arbitrary_bytes_raise_only_validation_error(body):
    try:
        envelope = parse_envelope(body)
    except ValidationError:
        return
    envelope.key()


@settings(max_examples=500)
@given(JSON | ENVELOPE_LIKE)
def test_arbitrary_json_raises_only_validation_error(document):
    try:
        envelope = parse_envelope(json.dumps(document))
    except ValidationError:
        return
    envelope.key()
    try:
        envelope.event_data()
    except ValidationError:
        pass


def test_event_data_nested_too_deeply_is_a_validation_error_and_still_has_a_key():
    deep = "[" * 100_000 + "]" * 100_000
    envelope = parse_envelope(json.dumps({
        "EventType": "UserJoinRoom", "EventData": deep, "EventTime": "2024-01-01T00:00:00Z",
        "EventId": "e-deep", "AppId": "app-deep", "Version": "2020-12-01",
    }))
    with pytest.raises(ValidationError, match="nested too deeply"):
        envelope.event_data()
    assert envelope.key() == "app-deep"
