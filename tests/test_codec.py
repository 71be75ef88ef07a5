"""Every example of the events page, signed, through envelope → model → Avro bytes, and back
through readers that are not the project's codec."""

import io
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fastavro
import fastavro.schema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.codec import ConfluentCodec, SingleObjectCodec
from consumer.envelope import SignatureVerifier, parse_envelope, sign
from consumer.errors import EncodingError
from consumer.events import Source, models
from consumer.examples import load_examples
from consumer.schemas import SchemaSet, contract
from support import assert_carries

AVRO_DIR = Path(__file__).parents[1] / "avro"
SECRET = "contract-secret"
EXAMPLES = load_examples()
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def signed_callback(example, event_id="evt-1") -> bytes:
    fields = {
        "EventType": example.event_type,
        "EventData": json.dumps(example.event_data, ensure_ascii=False),
        "EventTime": "2024-05-01T12:00:00.250+08:00",
        "EventId": event_id,
        "AppId": "app-1",
        "Version": example.version,
        "Nonce": "7",
    }
    fields["Signature"] = sign(fields.values(), SECRET)
    return json.dumps(fields).encode()


# -- an independent single-object reader: the Avro spec's CRC-64-AVRO, written out here ------

_EMPTY = 0xC15D213AA4D7A795
_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY & -(_fp & 1))
    _TABLE.append(_fp)


def crc64_avro(data: bytes) -> int:
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def read_single_object(data: bytes, schema_path: Path) -> dict:
    schema = fastavro.schema.load_schema(schema_path)
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    assert data[:2] == b"\xc3\x01", "single-object marker"
    assert int.from_bytes(data[2:10], "little") == crc64_avro(canonical.encode()), "fingerprint"
    return fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)


def test_crc64_avro_matches_the_spec_vector():
    # Avro's documented fingerprint of the schema "null" (Java: SchemaNormalization).
    assert crc64_avro(b'"null"') == 0x63DD24E7CC258F8A


# -- comparing what was sent with what came back -----------------------------------------------


def test_there_are_45_examples_of_38_event_types():
    assert len(EXAMPLES) == 45
    assert len({e.event_type for e in EXAMPLES}) == 38


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.event_type}-{e.version}")
def test_example_round_trips_through_plain_fastavro(example):
    envelope = parse_envelope(signed_callback(example))
    SignatureVerifier([SECRET]).verify(envelope)
    name, record = models().to_record(envelope, Source("rtc.callbacks.raw", 3, 42))
    assert name == example.event_type

    data = SingleObjectCodec(contract()).encode(name, record)
    decoded = read_single_object(data, AVRO_DIR / f"{name}.avsc")

    assert decoded["EventId"] == "evt-1"
    assert decoded["EventType"] == example.event_type
    assert decoded["AppId"] == "app-1"
    assert decoded["Version"] == example.version
    assert decoded["EventTime"] == datetime(2024, 5, 1, 4, 0, 0, 250000, tzinfo=timezone.utc)
    assert decoded["Source"] == {"Topic": "rtc.callbacks.raw", "Partition": 3, "Offset": 42}
    assert_carries(decoded["EventData"], example.event_data, "EventData", decoded["ExtraFields"])


@pytest.mark.parametrize("source", [Source("rtc.callbacks.raw", 3, 42), None])
def test_naming_the_union_branch_writes_what_fastavro_would_resolve(source):
    codec, schemas = SingleObjectCodec(contract()), contract()
    for example in EXAMPLES:
        name, record = models().to_record(parse_envelope(signed_callback(example)), source)
        before = json.dumps(record, sort_keys=True)
        plain = io.BytesIO()
        fastavro.schemaless_writer(plain, schemas[name].parsed, record)
        assert codec.encode(name, record)[10:] == plain.getvalue(), name
        assert json.dumps(record, sort_keys=True) == before  # the caller's record is untouched


def ids_only(example) -> bytes:
    """The example's callback with only the EventData fields its model requires (its ids)."""
    data_model = models()[example.event_type].model_fields["EventData"].annotation
    kept = {k: v for k, v in example.event_data.items() if k in data_model.model_fields
            and data_model.model_fields[k].is_required()}
    return signed_callback(replace(example, event_data=kept))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.event_type}-{e.version}")
def test_a_record_of_nulls_picks_the_null_branches_in_both_wire_formats(example):
    name, record = models().to_record(parse_envelope(ids_only(example)), Source("raw", 0, 1))
    nulls = [k for k, v in record["EventData"].items() if v is None]
    assert nulls  # every EventType has details, and they were left out
    plain = io.BytesIO()
    fastavro.schemaless_writer(plain, contract()[name].parsed, record)
    single = SingleObjectCodec(contract())
    data = single.encode(name, record)
    assert data[10:] == plain.getvalue()
    assert single.decode(data)["EventData"] == record["EventData"]
    confluent = ConfluentCodec(contract(), "mock://null-branches")
    assert confluent.decode(confluent.encode(name, record, "t"), "t")["EventData"] == record["EventData"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.event_type}-{e.version}")
def test_example_round_trips_through_the_schema_registry_framing(example):
    codec = ConfluentCodec(contract(), "mock://contract-tests")
    name, record = models().to_record(parse_envelope(signed_callback(example)))
    data = codec.encode(name, record, "rtc.events.test")
    assert data[:1] == b"\x00"
    decoded = codec.decode(data, "rtc.events.test")
    assert_carries(decoded["EventData"], example.event_data, "EventData", decoded["ExtraFields"])
    # TopicRecordNameStrategy: one subject per topic and record type.
    assert codec.registry.get_subjects() == [f"rtc.events.test-rtcbus.{name}"]


def test_unknown_event_type_becomes_a_generic_record():
    example = EXAMPLES[0]
    body = json.loads(signed_callback(example))
    body["EventType"] = "BrandNewVendorEvent"
    name, record = models().to_record(parse_envelope(json.dumps(body)))
    assert name == "UnknownEvent"
    decoded = read_single_object(
        SingleObjectCodec(contract()).encode(name, record), AVRO_DIR / "UnknownEvent.avsc"
    )
    assert decoded["EventType"] == "BrandNewVendorEvent"
    assert json.loads(decoded["EventData"]) == example.event_data


def test_decode_refuses_foreign_bytes():
    codec = SingleObjectCodec(contract())
    with pytest.raises(EncodingError, match="single-object"):
        codec.decode(b"\x00\x00\x00\x00\x01payload")
    with pytest.raises(EncodingError, match="fingerprint"):
        codec.decode(b"\xc3\x01" + bytes(8) + b"body")


# -- property: any valid model instance round-trips through both wire formats ----------------


def _strategy(avro_type, named):
    if isinstance(avro_type, list):
        return st.one_of([_strategy(member, named) for member in avro_type])
    if isinstance(avro_type, str):
        simple = {
            "null": st.none(),
            "string": st.text(max_size=12),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.integers(-(2**63), 2**63 - 1),
            "double": st.floats(allow_nan=False),
            "float": st.floats(allow_nan=False, width=32),
            "boolean": st.booleans(),
        }
        if avro_type in simple:
            return simple[avro_type]
        return st.deferred(lambda: _strategy(named[avro_type], named))
    kind = avro_type["type"]
    if kind == "record":
        named[avro_type["name"]] = avro_type
        return st.fixed_dictionaries(
            {f["name"]: _strategy(f["type"], named) for f in avro_type["fields"]}
        )
    if kind == "array":
        return st.lists(_strategy(avro_type["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=8), _strategy(avro_type["values"], named), max_size=3)
    if avro_type.get("logicalType") == "timestamp-millis":
        return st.integers(0, 2**41)
    return _strategy(kind, named)


RECORDS = st.sampled_from(contract().event_types).flatmap(
    lambda name: st.tuples(st.just(name), _strategy(dict(contract()[name].schema), {}))
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(RECORDS)
def test_any_valid_model_instance_round_trips_both_wire_formats(generated):
    name, record = generated
    event = models()[name].model_validate(record)
    as_avro = event.model_dump()
    # fastavro reads timestamp-millis back as an aware datetime.
    expected = {**as_avro, "EventTime": EPOCH + timedelta(milliseconds=as_avro["EventTime"])}
    single = SingleObjectCodec(contract())
    assert single.decode(single.encode(name, as_avro)) == expected
    confluent = ConfluentCodec(contract(), "mock://property-tests")
    assert confluent.decode(confluent.encode(name, as_avro, "t"), "t") == expected


# -- models are derived from the schemas, so they agree field by field ----------------------------


@pytest.mark.parametrize("name", contract().event_types)
def test_model_fields_are_the_schema_fields(name):
    schema = contract()[name].schema
    model = models()[name]
    assert list(model.model_fields) == [f["name"] for f in schema["fields"]]
    data_model = model.model_fields["EventData"].annotation
    data_schema = next(f for f in schema["fields"] if f["name"] == "EventData")["type"]
    for avro_field in data_schema["fields"]:
        pydantic_field = data_model.model_fields[avro_field["name"]]
        assert pydantic_field.is_required() == ("default" not in avro_field), avro_field["name"]


# -- records on the topics from before the contract changed ---------------------------------------


@pytest.mark.xfail(
    strict=True,
    raises=EncodingError,
    reason="SingleObjectCodec.decode knows only the current fingerprints; a record written with "
    "tests/data/contract-v1 needs that schema as the writer (not fixed yet: consumer/codec.py)",
)
def test_single_object_records_of_the_first_contract_still_decode():
    old = SchemaSet.load(Path(__file__).parent / "data" / "contract-v1")
    example = next(e for e in EXAMPLES if e.event_type == "UserLeaveRoom")
    name, record = models().to_record(parse_envelope(signed_callback(example)))
    data = SingleObjectCodec(old).encode(name, record)
    assert SingleObjectCodec(contract()).decode(data)["EventData"] == record["EventData"]
