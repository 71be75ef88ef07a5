"""The compiled Avro writers against fastavro: the same bytes, or a decline."""

from __future__ import annotations

import functools
import io

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.avro_writer import Declined, compile_writer
from consumer.codec import SINGLE_OBJECT_MAGIC, SingleObjectCodec
from consumer.envelope import parse_envelope
from consumer.errors import EncodingError
from consumer.events import Source, models
from consumer.examples import load_examples
from consumer.schemas import contract
from consumer.sender import build_callback

SCHEMAS = contract()
NAMES = sorted(name for name, _ in SCHEMAS.items())
CODEC = SingleObjectCodec(SCHEMAS)


def by_fastavro(name: str, record: dict) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, SCHEMAS[name].parsed, record)
    return buffer.getvalue()


def by_compiled(name: str, record: dict) -> bytes:
    out = bytearray()
    compile_writer(SCHEMAS[name].parsed)(record, out)
    return bytes(out)


def test_every_schema_of_the_contract_gets_a_writer():
    assert [name for name in NAMES if compile_writer(SCHEMAS[name].parsed) is None] == []


def test_a_schema_with_what_the_writers_do_not_cover_gets_none():
    for field_type in ("double", "boolean", "bytes", ["null", "string", "long"],
                       {"type": "enum", "name": "E", "symbols": ["A"]}):
        schema = fastavro.parse_schema(
            {"type": "record", "name": "T", "fields": [{"name": "f", "type": field_type}]}
        )
        assert compile_writer(schema) is None, field_type


@pytest.mark.parametrize("example", load_examples(), ids=lambda example: example.section)
def test_every_example_is_written_as_fastavro_writes_it(example):
    callback = build_callback(example.event_type, example.event_data, version=example.version)
    name, record = models().to_record(parse_envelope(callback.body), Source("raw", 1, 2**40))
    assert by_compiled(name, record) == by_fastavro(name, record)


def test_values_it_does_not_write_exactly_are_declined():
    name, record = models().to_record(
        parse_envelope(build_callback("UserJoinRoom", {"RoomId": "r", "UserId": "u"}).body)
    )
    writer = compile_writer(SCHEMAS[name].parsed)
    for change in ({"Source": ("rtcbus.Source", {"Topic": "t", "Partition": 0, "Offset": 0})},
                   {"EventTime": True}, {"EventTime": 2**63}, {"EventTime": 1.0}, {"AppId": 1},
                   {"EventData": {**record["EventData"], "Timestamp": "1"}}):
        with pytest.raises(Declined):
            writer({**record, **change}, bytearray())


def _values(avro_type, named, wrong):
    """Values for ``avro_type``: valid ones only (``wrong`` None), or with ``wrong`` ones
    mixed in at every level."""
    if isinstance(avro_type, str):
        if avro_type == "string":
            right = st.text() | st.sampled_from(["", "é" * 3000])
            wrong_here = st.just("\ud800")
        elif avro_type in ("int", "long"):
            bits = 31 if avro_type == "int" else 63
            right = st.integers(-(2**bits), 2**bits - 1) | st.integers(-300, 300)
            wrong_here = st.sampled_from([-(2**bits) - 1, 2**bits])
        else:
            return _values(named[avro_type], named, wrong)
    elif isinstance(avro_type, list):
        (other,) = [member for member in avro_type if member != "null"]
        right, wrong_here = st.none() | _values(other, named, wrong), st.nothing()
    elif avro_type["type"] == "record":
        fields = {f["name"]: _values(f["type"], named, wrong) for f in avro_type["fields"]}
        required = {n: v for n, v in fields.items() if "default" not in _field(avro_type, n)}
        optional = {n: v for n, v in fields.items() if n not in required}
        right = st.fixed_dictionaries(required, optional={**optional, "NotInSchema": st.integers()})
        wrong_here = st.nothing()
    elif avro_type["type"] == "array":
        right, wrong_here = st.lists(_values(avro_type["items"], named, wrong), max_size=3), st.nothing()
    elif avro_type["type"] == "map":
        right = st.dictionaries(st.text(), _values(avro_type["values"], named, wrong), max_size=3)
        wrong_here = st.nothing()
    else:
        return _values(avro_type["type"], named, wrong)
    if wrong is None:
        return right
    # Mostly right: a record with one wrong value somewhere is what tests the declines.
    return st.one_of(right, right, right, right, right, right, wrong_here | wrong)


def _field(record, name):
    return next(f for f in record["fields"] if f["name"] == name)


WRONG = st.sampled_from([None, True, 1.5, "1", 7, b"x", ("string", "x"), [], {}])


@functools.cache
def records(name: str, mixed: bool) -> st.SearchStrategy[dict]:
    """Records of schema ``name``: valid ones, or ``mixed`` with wrong values."""
    parsed = SCHEMAS[name].parsed
    values = _values(parsed, parsed["__named_schemas"], WRONG if mixed else None)
    return values.filter(lambda record: type(record) is dict)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_valid_record_is_written_as_fastavro_writes_it(name, data):
    record = data.draw(records(name, False), label="record")
    assert by_compiled(name, record) == by_fastavro(name, record)


MIXED = ["RecordStopped", "SegmentRealTimeData", "SnapshotRealTimeData", "UserJoinRoom", "UnknownEvent"]


@pytest.mark.parametrize("name", MIXED)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_record_is_written_as_fastavro_writes_it_or_declined(name, data):
    record = data.draw(records(name, True), label="record")
    out = bytearray()
    try:
        compile_writer(SCHEMAS[name].parsed)(record, out)
    except Exception:  # declined: the codec hands it to fastavro
        return
    assert bytes(out) == by_fastavro(name, record)


@pytest.mark.parametrize("name", ["RecordStopped", "SegmentRealTimeData", "UserJoinRoom"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_codec_encodes_as_fastavro_alone_or_fails_as_it_does(name, data):
    record = data.draw(records(name, True), label="record")
    codec = CODEC
    try:
        expected = SINGLE_OBJECT_MAGIC + SCHEMAS[name].fingerprint + by_fastavro(name, record)
    except Exception as exc:  # then the codec fails as fastavro does: the same error, or wrapped
        with pytest.raises(Exception) as raised:
            codec.encode(name, record)
        assert type(raised.value) in (EncodingError, type(exc))
        if str(exc) not in str(raised.value):
            # A record with more than one bad value: the compiled writer, writing field by
            # field, may name another one first (a surrogate in Source.Topic, where fastavro
            # named the out-of-range Source.Offset that fails its union). Its reason must then
            # be a real fault of a value, as Python raised it writing that value.
            cause = raised.value.__cause__
            assert isinstance(cause, (ValueError, TypeError, OverflowError)), (exc, raised.value)
            assert str(cause) in str(raised.value)
        return
    assert codec.encode(name, record) == expected
