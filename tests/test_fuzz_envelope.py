"""Fuzzing the pure core: the envelope, its key, its EventData, the signature check, the
models' validation and the router's transform, with inputs hypothesis generates.

The properties:

- parsing, keying, EventData, verifying and validating either succeed or raise a
  :class:`consumer.errors.CallbackError` subclass, for any bytes at all;
- a parsed envelope is writable: its key and header fields encode as UTF-8 (the shim
  writes them to Kafka; anything else is a 500);
- a signature made with :func:`consumer.envelope.sign` verifies, with that secret only;
- the pristine vendor example of every EventType validates;
- :meth:`Transform.apply` never raises: it returns a Routed, Duplicate or DeadLetter whose
  headers are bytes and whose size fits the topic.

``RTCBUS_FUZZ_EXAMPLES`` sets the examples per test (default 300: the file runs in well
under 30 s). The default run is derandomized: CI tries the same inputs every time, so a red
CI is the change's doing, not the dice's. A run with ``RTCBUS_FUZZ_EXAMPLES`` set is random,
to explore; with no example database (nothing written to the shared checkout), a failure is
replayed from the ``@reproduce_failure`` blob hypothesis prints. The session's summary
lists how many inputs each test ran.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from confluent_kafka import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from consumer.envelope import (
    HEADER_EVENT_TYPE,
    REQUIRED_FIELDS,
    Envelope,
    SignatureVerifier,
    parse_envelope,
    sign,
    signed_fields,
)
from consumer.errors import CallbackError, SignatureError
from consumer.events import Source, models
from consumer.examples import load_examples
from consumer.records import EnvelopeDecoder
from consumer.router import DeadLetter, Duplicate, Routed, Transform
from consumer.router.transform import record_size
from consumer.settings import load_settings

# -- how much, and the run's summary -----------------------------------------------------------

EXAMPLES_SET = "RTCBUS_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("RTCBUS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared 2-core machine has slow moments; a timing flake is no finding
    database=None,  # no .hypothesis/ in a checkout several people share
    derandomize=not EXAMPLES_SET,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


class FuzzReport:
    """Inputs run per test, written in the session's terminal summary (a pytest plugin)."""

    name = "rtcbus-fuzz-report"

    def __init__(self) -> None:
        self.inputs: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def counted(self, test: Callable[..., None]) -> Callable[..., None]:
        """Count each call of ``test`` (under ``@given``: each input, shrinking included)."""

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            self.inputs[test.__name__] += 1
            test(*args, **kwargs)

        return run

    def summary(self) -> tuple[str, list[str]] | None:
        """Inputs per test, for the session's summary (tests/conftest.py prints it)."""
        if not self.inputs:
            return None
        lines = [f"{name}: {count} inputs in {self.seconds[name]:.1f} s" for name, count in sorted(self.inputs.items())]
        lines.append(f"total: {sum(self.inputs.values())} inputs in {sum(self.seconds.values()):.1f} s")
        return "fuzz inputs", lines


REPORT = FuzzReport()


@pytest.fixture(autouse=True)
def fuzz_report(request: pytest.FixtureRequest):
    """Registers :data:`REPORT` for the summary and times each test."""
    if not request.config.pluginmanager.has_plugin(FuzzReport.name):
        request.config.pluginmanager.register(REPORT, FuzzReport.name)
    started = time.monotonic()
    yield REPORT
    REPORT.seconds[request.node.originalname] += time.monotonic() - started


# -- strategies ----------------------------------------------------------------------------------

EXAMPLE_EVENTS = load_examples()
EVENT_TYPES = sorted({example.event_type for example in EXAMPLE_EVENTS})
VERSIONS = sorted({example.version for example in EXAMPLE_EVENTS})
ENVELOPE_FIELDS = (*REQUIRED_FIELDS, "Nonce", "Signature")
SECRET = "fuzz-secret"

# Text as a sender could send it, lone surrogates (as JSON escapes) and JSON's own syntax included.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# Joined from a list: st.text() would drop the surrogates from a mixed alphabet.
_any_char = st.one_of(st.characters(codec="utf-8"), surrogates, st.sampled_from('"\\{}[]:,\x00\u2028'))
# Joined from a list: st.text() would drop the surrogates from a mixed alphabet.
any_text = st.lists(_any_char, max_size=12).map("".join)
some_text = st.lists(_any_char, min_size=1, max_size=12).map("".join)
clean_text = st.text(st.characters(codec="utf-8"), max_size=16)  # what sign() can hash
huge_ints = st.integers(min_value=2**63 - 2, max_value=10**400) | st.integers(max_value=-(2**63) + 1, min_value=-(10**400))
numbers = st.integers() | huge_ints | st.floats()  # floats: NaN and ±Infinity included
json_leaves = st.none() | st.booleans() | numbers | any_text
field_names = st.sampled_from(ENVELOPE_FIELDS + ("RoomId", "PublicStreamId", "TaskId", "UserId")) | any_text
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(field_names, children, max_size=4),
    max_leaves=12,
)


def deep(depth: int, opener: str) -> str:
    """JSON text ``depth`` levels deep: ``[[[…]]]`` or ``{"a":{"a":…1}}``."""
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# Around the interpreter's recursion limit (1000) is where the stages disagree about what fits.
depths = st.integers(1, 1200) | st.sampled_from([900, 980, 995, 1000, 1010, 5000, 100_000])
deep_json = st.builds(deep, depths, st.sampled_from("[{"))

offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda minutes: timezone(timedelta(minutes=minutes)))
rfc3339 = st.builds(
    lambda moment, tz, sep: moment.replace(tzinfo=tz).isoformat(sep=sep),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    offsets,
    st.sampled_from("T t"),
)
event_times = rfc3339 | st.sampled_from(["2021-08-17T19:22:02Z", "2021-08-17T19:22:02", "2021-08-17", "now"]) | any_text


@st.composite
def event_data(draw: st.DrawFn, clean: bool = False) -> tuple[str, str, Any]:
    """``(EventType, Version, EventData)``: a vendor example, mutated or not, or anything;
    with ``clean``, only an example with fields dropped or numbers sent as strings."""
    example = draw(st.sampled_from(EXAMPLE_EVENTS))
    data: Any = json.loads(json.dumps(example.event_data))
    kinds = ["drop", "stringify"] if clean else ["drop", "replace", "stringify", "add", "deep"]
    for _ in range(draw(st.integers(0, 4))):
        if not isinstance(data, dict) or not data:
            break
        name = draw(st.sampled_from(sorted(data)))
        how = draw(st.sampled_from(kinds))
        if how == "drop":
            del data[name]
        elif how == "replace":
            data[name] = draw(json_values)
        elif how == "stringify":  # the events page's own "SampleRate": "44100"
            data[name] = json.dumps(data[name]) if not isinstance(data[name], str) else data[name]
        elif how == "add":
            data[draw(field_names)] = draw(json_values)
        else:
            data[name] = json.loads(deep(draw(st.integers(1, 300)), "["))
    if clean:
        return example.event_type, example.version, data
    event_type = draw(st.sampled_from([example.event_type] * 8) | st.sampled_from(EVENT_TYPES) | some_text)
    version = draw(st.sampled_from([example.version] * 8) | st.sampled_from(VERSIONS) | some_text)
    data = draw(st.one_of(st.just(data), st.just(data), json_values))
    return event_type, version, data


@st.composite
def envelope_documents(draw: st.DrawFn, clean: bool = False) -> dict[str, Any]:
    """An envelope dict; with ``clean``, every field a well-formed string, else mutated:
    a few fields missing, empty, of another type or deeply nested, and the strings any text."""
    text = clean_text.filter(bool) if clean else st.one_of(clean_text.filter(bool), some_text)
    event_type, version, data = draw(event_data(clean))
    as_object = draw(st.booleans()) and isinstance(data, dict)
    document: dict[str, Any] = {
        "EventType": event_type,
        "EventData": data if as_object else json.dumps(data, ensure_ascii=draw(st.booleans())),
        "EventTime": draw(rfc3339 if clean else st.one_of(rfc3339, rfc3339, event_times)),
        "EventId": draw(text),
        "AppId": draw(text),
        "Version": version,
        "Nonce": draw(clean_text if clean else any_text),
    }
    if clean:
        if not as_object:
            document["EventData"] = json.dumps(data, ensure_ascii=False)
        return document  # serialised compactly: an object's text in the body is its compact form
    for name in draw(st.lists(st.sampled_from(ENVELOPE_FIELDS), max_size=2, unique=True)):
        how = draw(st.sampled_from(["missing", "empty", "wrong type", "deep"]))
        if how == "missing":
            document.pop(name, None)
        elif how == "empty":
            document[name] = ""
        elif how == "wrong type":
            document[name] = draw(json_values)
        else:
            document[name] = deep(draw(depths), draw(st.sampled_from("[{")))
    document.update(draw(st.dictionaries(field_names, json_values, max_size=2)))
    document["Signature"] = draw(st.sampled_from([sign(_signed_strings(document), SECRET)]) | text)
    return document


def _signed_strings(document: dict[str, Any]) -> list[str]:
    strings = []
    for name in ("EventType", "EventData", "EventTime", "EventId", "AppId", "Version", "Nonce"):
        value = document.get(name, "")
        if not isinstance(value, str):
            value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        strings.append(value.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    return strings


@st.composite
def serialised(draw: st.DrawFn, documents: st.SearchStrategy[Any]) -> bytes | str:
    """A document as a sender's bytes: escaped or raw UTF-8 (a lone surrogate raw too),
    UTF-16/32 (``json.loads`` detects them), or a str, sometimes with a deep value spliced in."""
    document = draw(documents)
    ascii_only = draw(st.sampled_from([True, True, False]))
    text = json.dumps(document, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 0, "\t"])))
    if isinstance(document, dict) and document and draw(st.integers(0, 3)) == 0:
        # A deep value spliced in as text: json.dumps itself would refuse to write it.
        text = text[:-1] + f', "Deep": {draw(deep_json)}}}'
    encoding = draw(st.sampled_from(["utf-8"] * 5 + ["utf-16", "utf-32", "str", "str"]))
    if encoding == "str":
        return text
    return text.encode(encoding, "surrogatepass")


bodies = st.one_of(
    st.binary(max_size=256),
    serialised(json_values),
    serialised(envelope_documents()),
    serialised(envelope_documents(clean=True)),
    deep_json,
    deep_json.map(str.encode),
)


# -- the properties --------------------------------------------------------------------------------

VERIFIER = SignatureVerifier([SECRET, "rotated-out"])
SOURCE = Source("fuzz.callbacks.raw", 2, 7)


def exercise(body: bytes | str) -> Envelope | None:
    """Every stage of the pure core on ``body``; only a CallbackError may stop it."""
    try:
        envelope = parse_envelope(body)
    except CallbackError as exc:
        event(f"refused: {exc.field or 'body'}")  # --hypothesis-show-statistics shows the mix
        return None
    assert isinstance(envelope.event_time_ms, int)
    key = envelope.key()
    assert isinstance(key, str)
    # What the shim writes to Kafka: the key and these headers, as UTF-8.
    for value in (key, envelope.event_type, envelope.event_id, envelope.app_id, envelope.version):
        value.encode("utf-8")
    try:
        assert isinstance(envelope.event_data(), dict)
    except CallbackError:
        pass
    for now_ms in (None, envelope.event_time_ms):
        try:
            VERIFIER.verify(envelope, now_ms=now_ms)
        except CallbackError:
            pass
    try:
        name, record = models().to_record(envelope, SOURCE)
        assert isinstance(name, str) and isinstance(record, dict)
        event("validated")
    except CallbackError:
        event("parsed, not validated")
    return envelope


@FUZZ
@given(body=st.binary(max_size=512))
@REPORT.counted
def test_any_bytes_parse_or_raise_a_callback_error(body):
    exercise(body)


@FUZZ
@given(body=serialised(json_values))
@REPORT.counted
def test_any_json_parses_or_raises_a_callback_error(body):
    exercise(body)


@FUZZ
@given(nesting=deep_json, where=st.sampled_from(["body", "EventData string", "EventData object", "extra field"]))
@REPORT.counted
def test_deep_nesting_parses_or_raises_a_callback_error(nesting, where):
    document = {
        "EventType": "UserJoinRoom", "EventData": '{"RoomId":"r"}', "EventTime": "2024-05-01T12:00:00+08:00",
        "EventId": "e", "AppId": "a", "Version": "2020-12-01", "Nonce": "n", "Signature": "0" * 64,
    }
    if where == "body":
        body = nesting
    elif where == "EventData string":
        body = json.dumps({**document, "EventData": nesting})
    elif where == "EventData object":
        body = json.dumps(document)[:-1] + f', "EventData": {nesting}}}'  # the later key wins
    else:
        body = json.dumps(document)[:-1] + f', "Vendor": {nesting}}}'
    exercise(body)


@FUZZ
@given(body=serialised(envelope_documents()))
@REPORT.counted
def test_mutated_envelopes_parse_or_raise_a_callback_error(body):
    exercise(body)


@FUZZ
@given(document=envelope_documents(clean=True), secret=clean_text.filter(bool), upper=st.booleans())
@REPORT.counted
def test_a_signature_made_with_sign_verifies_with_its_secret_only(document, secret, upper):
    fields = _signed_strings(document)
    signature = sign(fields, secret)
    assert len(signature) == 64 and signature == signature.lower()
    document = {**document, "Signature": signature.upper() if upper else signature}
    envelope = parse_envelope(json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode())
    assert list(signed_fields(envelope)) == fields
    SignatureVerifier(["another", secret]).verify(envelope)
    SignatureVerifier(["other"], app_secrets={envelope.app_id: [secret]}).verify(envelope)
    with pytest.raises(SignatureError):
        SignatureVerifier([secret + "x"]).verify(envelope)
    with pytest.raises(SignatureError):  # an AppId with secrets of its own is checked against those only
        SignatureVerifier([secret], app_secrets={envelope.app_id: ["other"]}).verify(envelope)


@pytest.mark.parametrize("example", EXAMPLE_EVENTS, ids=lambda example: example.section)
def test_every_pristine_example_validates(example):
    envelope = parse_envelope(json.dumps({
        "EventType": example.event_type, "EventData": json.dumps(example.event_data),
        "EventTime": "2024-05-01T12:00:00+08:00", "EventId": "e", "AppId": "a", "Version": example.version,
    }))
    name, record = models().to_record(envelope, SOURCE)
    assert name == example.event_type and record["EventData"]


# -- the router's transform: total -------------------------------------------------------------------

SETTINGS = load_settings(bootstrap_servers="127.0.0.1:9", topic_prefix="fuzz")
TRANSFORM = Transform.from_settings(SETTINGS)
BUDGET = SETTINGS.max_record_bytes - 16 * 1024
header_values = st.none() | st.binary(max_size=64) | any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))
raw_headers = st.none() | st.lists(
    st.tuples(st.sampled_from([HEADER_EVENT_TYPE, "rtcbus.event_id", "x"]) | clean_text, header_values), max_size=4
)


@FUZZ
@given(
    value=st.none() | bodies.map(lambda body: body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")),
    key=st.none() | st.binary(max_size=32),
    headers=raw_headers,
    seen=st.booleans(),
)
@REPORT.counted
def test_the_transform_is_total(value, key, headers, seen):
    message = Message(
        topic=SETTINGS.raw_topic, partition=2, offset=7, key=key, value=value, headers=headers,
        timestamp=(2, 1_700_000_000_000),
    )
    outcome = TRANSFORM.apply(message, lambda _partition, _event_id: seen)
    assert isinstance(outcome, Routed | Duplicate | DeadLetter)
    event(type(outcome).__name__)
    if isinstance(outcome, Duplicate):
        return
    assert all(isinstance(name, str) and isinstance(value, bytes) for name, value in outcome.headers)
    assert record_size(outcome.key, outcome.value, outcome.headers) <= BUDGET
    if isinstance(outcome, DeadLetter):
        assert dict(outcome.headers)["rtcbus.source.offset"] == b"7"


REFERENCE = Transform.from_settings(SETTINGS, lean=False)


@FUZZ
@given(
    value=bodies.map(lambda body: body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")),
    seen=st.booleans(),
)
@REPORT.counted
def test_the_lean_path_and_the_pydantic_path_agree_on_every_input(value, seen):
    # The router's transform tries the lean path (consumer/records.py) first; the reference
    # has the pydantic path alone. Same record bytes, same dead letter, same duplicate.
    message = Message(
        topic=SETTINGS.raw_topic, partition=2, offset=7, key=b"k", value=value,
        headers=[(HEADER_EVENT_TYPE, b"UserJoinRoom")], timestamp=(2, 1_700_000_000_000),
    )
    outcome = TRANSFORM.apply(message, lambda _partition, _event_id: seen)
    event(type(outcome).__name__)
    assert outcome == REFERENCE.apply(message, lambda _partition, _event_id: seen)


ENVELOPES = EnvelopeDecoder()


def strict_parse(body: bytes) -> tuple[Envelope, str] | tuple[str, str | None]:
    """What the shim got from the strict parser alone: the envelope and its key, or the
    refusal's message and field."""
    try:
        envelope = parse_envelope(body)
    except CallbackError as exc:
        return str(exc), exc.field
    return envelope, envelope.key()


def shim_parse(body: bytes) -> tuple[Envelope, str] | tuple[str, str | None]:
    try:
        return ENVELOPES.parse(body)
    except CallbackError as exc:
        return str(exc), exc.field


@FUZZ
@given(value=bodies.map(lambda body: body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")))
@REPORT.counted
def test_the_shims_envelope_decoder_agrees_with_the_strict_parser_on_every_input(value):
    # The shim parses with EnvelopeDecoder (msgspec where certain): the same envelope, the
    # same key, the same refusal, for anything a sender can send.
    outcome = shim_parse(value)
    event("accepted" if isinstance(outcome[0], Envelope) else "refused")
    assert outcome == strict_parse(value)


def _body(event_data: str, **fields: str) -> bytes:
    envelope = {
        "EventType": "UserJoinRoom", "EventData": event_data, "EventTime": "2021-01-27T16:40:12+08:00",
        "EventId": "e-1", "AppId": "app-1", "Version": "2020-12-01", "Nonce": "n", "Signature": "s",
        **fields,
    }
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    "body",
    [
        _body('{"RoomId": "r-1", "UserId": "u"}'),
        _body('{"RoomId": "r-1", "RoomId": "r-2"}'),  # a duplicate key: strict refuses EventData
        _body('{"UserId": "u", "Room\\u003aId": "x", "TaskId": "t"}'),  # an escaped colon
        _body('{"RoomId": 12345678901234567890123, "TaskId": "t"}'),
        _body('{"RoomId": 1e20}'),
        _body('{"RoomId": 1e400}'),  # out of a double's range: strict refuses EventData
        _body('{"RoomId": true}'),
        _body('{"RoomId": {"a": 1}, "PublicStreamId": [1], "TaskId": ""}'),
        _body('{"RoomId": "\\ud800"}'),  # a lone surrogate
        _body('{"RoomId": NaN}'),
        _body("[1, 2]"),
        _body("{broken"),
        _body("\ufeff{}"),
        _body('{"RoomId": "r", "Deep": ' + "[" * 150 + "]" * 150 + "}"),
        _body('{"RoomId": "r", "Deep": ' + "[" * 5000 + "]" * 5000 + "}"),
        _body('{"RoomId": "r"}', Extra="kept"),
        _body('{"RoomId": "r"}', Nonce=""),
        _body('{"RoomId": "r"}', EventTime="2021-01-27T16:40:12"),
        _body('{"RoomId": "r"}', EventId=""),
        _body('{"RoomId": "r"}').replace(b'"EventId": "e-1"', b'"EventId": "e-1", "EventId": "e-2"'),
        _body('{"RoomId": "r"}').replace(b'"Nonce": "n"', b'"Nonce": "\\ud800"'),
        json.dumps({"EventType": "UserJoinRoom", "EventData": {"RoomId": "r"}, "EventTime": "2021-01-27T16:40:12+08:00",
                    "EventId": "e", "AppId": "a", "Version": "v"}).encode(),
        b'{"EventType": "A", "EventData": "{}", "EventTime": "2021-01-27T16:40:12+08:00", "EventId": "e", '
        b'"AppId": "a", "Version": "\xff"}',
    ],
    ids=lambda body: body[:60].decode("utf-8", "replace"),
)
def test_the_shims_envelope_decoder_agrees_with_the_strict_parser_on_awkward_bodies(body):
    assert shim_parse(body) == strict_parse(body)
