import hashlib
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.envelope import (
    DEFAULT_SKEW_S,
    SignatureVerifier,
    parse_envelope,
    partition_key,
    sign,
    signed_fields,
)
from consumer.errors import CallbackError, ConfigError, SignatureError, ValidationError

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


def object_form(object_text: str, signed_text: str, secret: str = "s3cret") -> str:
    """A body with EventData as the object ``object_text``, signed as if EventData were ``signed_text``."""
    others = {k: v for k, v in FIELDS.items() if k != "EventData"}
    document = {**FIELDS, "EventData": "@", "Signature": sign([*others.values(), signed_text], secret)}
    return json.dumps(document).replace('"@"', object_text)


def test_event_data_as_an_object_is_signed_as_its_text_in_the_body():
    data = {"RoomId": "room1", "UserId": "\u5f20", "Timestamp": 1}
    # Whitespace, escapes and key order as the sender wrote them: none of it is re-serialised.
    object_text = '{ "UserId":"\\u5f20",\n  "RoomId" : "room1", "Timestamp": 1 }'

    envelope = parse_envelope(object_form(object_text, object_text))

    assert envelope.event_data_text == object_text
    assert envelope.event_data() == data
    assert envelope.key() == "room1"
    SignatureVerifier(["s3cret"]).verify(envelope)


def test_object_event_data_signed_over_a_reserialisation_is_refused():
    # The compact form the shim used to guess: not the text this body carries.
    object_text = '{"RoomId": "room1", "UserId": "u1"}'
    compact = json.dumps(json.loads(object_text), separators=(",", ":"))
    with pytest.raises(SignatureError, match="Signature does not match"):
        SignatureVerifier(["s3cret"]).verify(parse_envelope(object_form(object_text, compact)))


def test_object_event_data_text_is_found_whatever_precedes_it():
    # Members before EventData with braces, quotes and escapes inside strings and objects.
    body = (
        '{"X": {"EventData": "not this"}, "Y": "}\\"{", "EventType": "UserJoinRoom",'
        ' "EventData"  :\t{"RoomId": "r"}  , "EventTime": "2021-01-27T16:40:12+08:00",'
        ' "EventId": "e", "AppId": "a", "Version": "v"}'
    )
    assert parse_envelope(body).event_data_text == '{"RoomId": "r"}'


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


def test_no_secrets_is_a_config_error_unless_unsigned_is_explicit():
    with pytest.raises(ConfigError, match="no callback secrets.*RTCBUS_SECRETS.*RTCBUS_UNSIGNED"):
        SignatureVerifier()
    with pytest.raises(ConfigError, match="no callback secrets"):
        SignatureVerifier([], app_secrets={})


def test_unsigned_checks_nothing_and_says_so_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="consumer.envelope"):
        verifier = SignatureVerifier(unsigned=True)
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING and "not authenticated" in warning.getMessage()
    old = parse_envelope(callback("anything"))
    verifier.verify(old, now_ms=old.event_time_ms + 10 * 86400_000)  # neither signature nor time
    assert not verifier.enabled
    assert len(caplog.records) == 1  # once, at construction


@pytest.mark.parametrize(
    "configured",
    [{"secrets": ["s"]}, {"app_secrets": {"app42": ["s"]}}],
    ids=["secrets", "app_secrets"],
)
def test_unsigned_with_secrets_is_a_contradiction(configured):
    with pytest.raises(ConfigError, match="unsigned is set together with callback secrets"):
        SignatureVerifier(**configured, unsigned=True)


@pytest.mark.parametrize(
    "configured",
    [{"secrets": ["ok", ""]}, {"app_secrets": {"app42": []}}, {"app_secrets": {"app42": ["ok", ""]}}],
    ids=["empty-secret", "app-without-secrets", "empty-app-secret"],
)
def test_an_empty_secret_is_refused_not_off(configured):
    with pytest.raises(ConfigError):
        SignatureVerifier(**configured)


def test_skew_window_is_on_by_default():
    envelope = parse_envelope(callback())
    at = envelope.event_time_ms
    verifier = SignatureVerifier(["s3cret"])
    assert DEFAULT_SKEW_S == 300
    for now_ms in (at - 300_000, at, at + 300_000):
        verifier.verify(envelope, now_ms=now_ms)
    for now_ms in (at - 300_001, at + 300_001, at + 3600_000):
        with pytest.raises(SignatureError, match="skew window") as raised:
            verifier.verify(envelope, now_ms=now_ms)
        assert raised.value.field == "EventTime"


def test_a_narrower_skew_window_and_none_at_all():
    envelope = parse_envelope(callback())
    SignatureVerifier(["s3cret"], skew_s=60).verify(envelope, now_ms=envelope.event_time_ms + 30_000)
    with pytest.raises(SignatureError, match="60 s"):
        SignatureVerifier(["s3cret"], skew_s=60).verify(envelope, now_ms=envelope.event_time_ms + 61_000)
    for off in (None, 0, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="signature_skew_s"):
            SignatureVerifier(["s3cret"], skew_s=off)


def test_without_a_receive_time_only_the_signature_is_checked():
    # Re-checking a record read back from the raw topic, long after it was received.
    SignatureVerifier(["s3cret"]).verify(parse_envelope(callback()))


def test_the_skew_window_is_checked_only_for_a_valid_signature():
    envelope = parse_envelope(callback("wrong"))
    with pytest.raises(SignatureError, match="Signature does not match"):
        SignatureVerifier(["s3cret"]).verify(envelope, now_ms=envelope.event_time_ms + 3600_000)


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


# -- hostile input: a CallbackError (a 4xx at the shim, a dead letter in the router), nothing else --

STRING_FIELDS = (*FIELDS, "Signature")


def raw_body(**members: str) -> str:
    """A signed body with some members replaced by raw JSON text (``EventId='"\\\\ud800"'``)."""
    document = json.loads(callback())
    text = json.dumps(document)
    for name, raw in members.items():
        text = text.replace(f'"{name}": {json.dumps(document[name])}', f'"{name}": {raw}')
    return text


def refusal(body: str | bytes) -> CallbackError:
    """What the shim does with a body: parse, check the signature and the clock, key it."""
    try:
        envelope = parse_envelope(body)
        SignatureVerifier(["s3cret"]).verify(envelope, now_ms=envelope.event_time_ms)
        envelope.key()
        envelope.event_data()
    except CallbackError as exc:
        return exc
    raise AssertionError("accepted")


@pytest.mark.parametrize("name", STRING_FIELDS)
@pytest.mark.parametrize("surrogate", ["\\ud800", "\\udfff", "a\\ud83d", "\\ude00b"])
def test_a_lone_surrogate_in_any_envelope_string_is_a_validation_error_naming_it(name, surrogate):
    error = refusal(raw_body(**{name: f'"{surrogate}"'}))
    assert isinstance(error, ValidationError)
    assert error.field == name
    assert "lone surrogate" in str(error)
    str(error).encode("utf-8")  # the message itself is valid text: it goes into a 400 and a log
    for value in (error.event_type, error.event_id):
        assert value is None or value.encode("utf-8")


def test_a_surrogate_pair_is_valid_text():
    envelope = parse_envelope(raw_body(EventId='"\\ud83d\\ude00"'))
    assert envelope.event_id == "\U0001f600"


def test_surrogates_encoded_as_utf8_bytes_are_not_utf8():
    body = raw_body(EventId='"SURROGATE"').encode().replace(b"SURROGATE", "\ud800".encode("utf-8", "surrogatepass"))
    error = refusal(body)
    assert isinstance(error, ValidationError) and "not UTF-8" in str(error)


@pytest.mark.parametrize("field", ["RoomId", "PublicStreamId", "TaskId"])
def test_a_lone_surrogate_in_a_key_field_of_event_data_falls_back_to_a_writable_key(field):
    # Valid envelope text: the surrogate appears only once EventData is parsed. The shim must
    # still key and write it (the router dead-letters it with its reason), never fail.
    envelope = parse_envelope(callback(EventData=json.dumps({field: "\ud800"})))
    SignatureVerifier(["s3cret"]).verify(envelope, now_ms=envelope.event_time_ms)
    assert envelope.key() == "app42"
    assert envelope.key().encode("utf-8")


@pytest.mark.parametrize(
    "value", [[1, 2], {"a": 1}, [[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]], ids=["list", "object", "nested"]
)
def test_a_key_field_that_is_not_a_scalar_is_skipped(value):
    assert partition_key({"RoomId": value, "TaskId": "t"}, "app", "e") == "t"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_event_data_nested_too_deeply_as_a_string(depth):
    envelope = parse_envelope(callback(EventData="[" * depth + "]" * depth))
    SignatureVerifier(["s3cret"]).verify(envelope, now_ms=envelope.event_time_ms)
    assert envelope.key() == "app42"
    with pytest.raises(ValidationError, match="nested too deeply") as raised:
        envelope.event_data()
    assert raised.value.field == "EventData"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_event_data_nested_too_deeply_as_an_object(depth):
    error = refusal(raw_body(EventData='{"RoomId": "r", "Deep": ' + "[" * depth + "]" * depth + "}"))
    assert isinstance(error, ValidationError) and "nested too deeply" in str(error)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_a_deep_extra_member_is_refused(depth):
    body = raw_body(Nonce='"4821", "Extra": ' + "{\"a\": " * depth + "1" + "}" * depth)
    assert isinstance(refusal(body), ValidationError)


@pytest.mark.parametrize(
    "members",
    [
        pytest.param({"EventId": "1" * 5000}, id="envelope-int-beyond-the-digit-limit"),
        pytest.param({"EventId": "1e999"}, id="envelope-float-overflow"),
        pytest.param({"EventId": "-1e999"}, id="envelope-negative-overflow"),
        pytest.param({"EventData": '{"RoomId": "r", "Timestamp": ' + "9" * 5000 + "}"}, id="object-int"),
        pytest.param({"EventData": '{"RoomId": "r", "Timestamp": 1e400}'}, id="object-float"),
    ],
)
def test_huge_numbers_are_validation_errors(members):
    assert isinstance(refusal(raw_body(**members)), ValidationError)


@pytest.mark.parametrize("number", ["9" * 5000, "1e400", "-1e400", "1" + "0" * 400 + ".5"])
def test_huge_numbers_inside_event_data_text_fail_on_use_not_on_accept(number):
    envelope = parse_envelope(callback(EventData='{"RoomId": "r", "Timestamp": ' + number + "}"))
    assert envelope.key() == "app42"
    with pytest.raises(ValidationError) as raised:
        envelope.event_data()
    assert raised.value.field == "EventData"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(literal):
    assert "not a JSON value" in str(refusal(raw_body(EventId=literal)))
    assert "not a JSON value" in str(refusal(raw_body(EventData='{"RoomId": "r", "V": ' + literal + "}")))
    envelope = parse_envelope(callback(EventData='{"RoomId": "r", "V": ' + literal + "}"))
    with pytest.raises(ValidationError, match="not a JSON value"):
        envelope.event_data()


@pytest.mark.parametrize("name", [*FIELDS, "Signature", "Extra"])
def test_a_duplicate_envelope_key_is_refused(name):
    body = raw_body(Nonce=f'"4821", "{name}": "a", "{name}": "b"')
    error = refusal(body)
    assert isinstance(error, ValidationError) and "duplicate key" in str(error)


def test_a_duplicate_key_inside_event_data_is_refused():
    assert "duplicate key 'RoomId'" in str(refusal(raw_body(EventData='{"RoomId": "a", "RoomId": "b"}')))
    envelope = parse_envelope(callback(EventData='{"RoomId": "a", "RoomId": "b"}'))
    with pytest.raises(ValidationError, match="duplicate key"):
        envelope.event_data()


@pytest.mark.parametrize(
    "body",
    ['[]', '"EventType"', "1", "null", "true", "", " ", '["EventType", "UserJoinRoom"]', "\ufeff{}"],
    ids=["array", "string", "number", "null", "bool", "empty", "blank", "list", "bom"],
)
def test_a_body_that_is_not_a_json_object(body):
    error = refusal(body)
    assert isinstance(error, ValidationError) and error.field is None


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("5", "a number"), ("true", "a boolean"), ('["{}"]', "an array"), ("1.5", "a number")],
)
def test_event_data_neither_string_nor_object(raw, kind):
    error = refusal(raw_body(EventData=raw))
    assert isinstance(error, ValidationError) and error.field == "EventData"
    assert f"must be a JSON string or object, got {kind}" in str(error)


@pytest.mark.parametrize("name", [name for name in STRING_FIELDS if name != "EventData"])
@pytest.mark.parametrize("raw", ["7", "1.5", "true", "false", "[]", '{"a": "b"}', '["x"]'])
def test_a_wrong_type_in_any_envelope_field_is_named(name, raw):
    error = refusal(raw_body(**{name: raw}))
    assert isinstance(error, ValidationError) and error.field == name
    assert f"{name} must be a string" in str(error)


@pytest.mark.parametrize("name", ["EventType", "EventData", "EventTime", "EventId", "AppId", "Version"])
def test_a_required_field_that_is_null_or_empty_is_missing(name):
    for raw in ("null", '""'):
        error = refusal(raw_body(**{name: raw}))
        assert isinstance(error, ValidationError) and error.field == name and "missing" in str(error)


def test_an_optional_field_that_is_null_is_the_wrong_type():
    error = refusal(raw_body(Nonce="null"))
    assert error.field == "Nonce" and "must be a string, got null" in str(error)


@pytest.mark.parametrize(
    "event_time",
    ["2021-01-27T16:40:12", "99999-01-01T00:00:00+00:00", "nonsense", "\u0661" * 4],
)
def test_an_event_time_that_is_not_an_instant_is_named(event_time):
    error = refusal(callback(EventTime=event_time))
    assert isinstance(error, ValidationError) and error.field == "EventTime"


SURROGATE_TEXT = st.text(st.characters(exclude_categories=()), max_size=8)
HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | SURROGATE_TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(SURROGATE_TEXT, children, max_size=3),
    max_leaves=12,
)


SIGNED_ENVELOPE = st.fixed_dictionaries(
    {name: st.just(value) for name, value in FIELDS.items()}, optional={"Signature": SURROGATE_TEXT}
)


@settings(max_examples=400)
@given(SIGNED_ENVELOPE, st.dictionaries(st.sampled_from(STRING_FIELDS), HOSTILE | SURROGATE_TEXT, max_size=3))
def test_hostile_values_in_an_envelope_raise_only_callback_errors(document, changes):
    body = json.dumps({**document, **changes})  # ensure_ascii: a surrogate travels as an escape
    try:
        envelope = parse_envelope(body)
        SignatureVerifier(["s3cret"]).verify(envelope, now_ms=envelope.event_time_ms)
    except CallbackError:
        return
    envelope.key().encode("utf-8")


def test_object_eventdata_with_a_raw_lone_surrogate_in_a_str_body_is_a_validation_error():
    # Found by the long fuzz run: a str body (bytes are decoded strictly) whose object
    # EventData holds a lone surrogate deep inside; its text could not be signed.
    body = (
        '{"EventType": "UserAudioStreamStart", "EventData": {"UserId": "u", "Timestamp": ["\ud800"]}, '
        '"EventTime": "2000-01-01T00:00:00+00:00", "EventId": "0", "AppId": "0", "Version": "2020-12-01", '
        '"Nonce": "", "Signature": ""}'
    )
    with pytest.raises(ValidationError, match="EventData holds a lone surrogate") as refused:
        parse_envelope(body)
    assert refused.value.field == "EventData"
