"""Every example of the events page, signed, through envelope → model → Avro bytes, and back
through readers that are not the project's codec."""

import io
import json
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fastavro
import fastavro.schema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.codec import ConfluentCodec, SingleObjectCodec, subject_name
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


@pytest.fixture(scope="module")
def registry_codec(schema_registry):
    """A :class:`ConfluentCodec` on the session's real registry, and a topic of this module's
    own (subjects are ``<topic>-<record>``, so no other test's subjects are touched)."""
    return ConfluentCodec(contract(), schema_registry.url), f"test.codec.{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.event_type}-{e.version}")
def test_a_record_of_nulls_picks_the_null_branches_in_both_wire_formats(example, registry_codec):
    name, record = models().to_record(parse_envelope(ids_only(example)), Source("raw", 0, 1))
    nulls = [k for k, v in record["EventData"].items() if v is None]
    assert nulls  # every EventType has details, and they were left out
    plain = io.BytesIO()
    fastavro.schemaless_writer(plain, contract()[name].parsed, record)
    single = SingleObjectCodec(contract())
    data = single.encode(name, record)
    assert data[10:] == plain.getvalue()
    assert single.decode(data)["EventData"] == record["EventData"]
    confluent, topic = registry_codec
    assert confluent.decode(confluent.encode(name, record, topic), topic)["EventData"] == record["EventData"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.event_type}-{e.version}")
def test_example_round_trips_through_the_schema_registry_framing(example, registry_codec):
    codec, topic = registry_codec
    name, record = models().to_record(parse_envelope(signed_callback(example)))
    data = codec.encode(name, record, topic)
    assert data[:1] == b"\x00"
    decoded = codec.decode(data, topic)
    assert_carries(decoded["EventData"], example.event_data, "EventData", decoded["ExtraFields"])
    # TopicRecordNameStrategy: one subject per topic and record type, holding this schema.
    subject = subject_name(contract()[name], topic)
    assert subject == f"{topic}-rtcbus.{name}"
    latest = codec.registry.get_latest_version(subject)
    assert str(latest.schema_id) == codec.schema_id(name, topic) == str(int.from_bytes(data[1:5], "big"))


def test_mock_registry_framing_still_works_for_unit_tests():
    # The in-memory registry stays for pure unit tests (the property test below): it agrees
    # with the real one on the framing and the subject naming.
    codec = ConfluentCodec(contract(), f"mock://{uuid.uuid4().hex}")
    name, record = models().to_record(parse_envelope(signed_callback(EXAMPLES[0])))
    assert codec.decode(codec.encode(name, record, "t"), "t")["EventId"] == "evt-1"
    assert codec.registry.get_subjects() == [subject_name(contract()[name], "t")]


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


FIRST_CONTRACT = AVRO_DIR / "history" / "v1"


def test_the_contract_knows_the_first_contracts_writers_but_lists_each_event_type_once():
    schemas, first = contract(), SchemaSet.load(FIRST_CONTRACT)
    assert sorted(schemas) == sorted(p.stem for p in AVRO_DIR.glob("*.avsc") if "." not in p.stem)
    assert sorted(schemas.event_types) == sorted(set(schemas.event_types))
    assert all(schemas[name].history is None for name in schemas)
    changed = [name for name in first if first[name].fingerprint != schemas[name].fingerprint]
    assert len(changed) == 36  # every schema that got an optional field
    for name in first:
        writer = schemas.by_fingerprint(first[name].fingerprint)
        assert writer.name == name
        assert writer.history == ("v1" if name in changed else None)
    assert len(schemas.writers) == len(schemas) + len(changed)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.event_type}-{e.version}")
def test_single_object_records_of_the_first_contract_decode_in_the_current_shape(example):
    name, record = models().to_record(parse_envelope(signed_callback(example)), Source("raw", 1, 2))
    old = SingleObjectCodec(SchemaSet.load(FIRST_CONTRACT)).encode(name, record)
    current = SingleObjectCodec(contract())
    # All but UnknownEvent and the two whiteboard events (no field of theirs changed) are historic.
    unchanged = {"UnknownEvent", "WbTranscodeProgressChanged", "WbTranscodeFinished"}
    assert contract().by_fingerprint(old[2:10]).history == (None if name in unchanged else "v1")
    decoded = current.decode(old)
    assert decoded == current.decode(current.encode(name, record))
    assert_carries(decoded["EventData"], example.event_data, "EventData", decoded["ExtraFields"])


def _contract(folder: Path, data_fields: list, name: str = "Thing") -> None:
    """One EventType ``name`` with the given EventData fields, as ``folder/<name>.avsc``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"type": "record", "name": f"{name}Data", "fields": data_fields}
    schema = {
        "type": "record", "name": name, "namespace": "rtcbus", "fields": [
            {"name": "EventId", "type": "string"}, {"name": "EventData", "type": data},
        ],
    }
    (folder / f"{name}.avsc").write_text(json.dumps(schema))


def test_an_old_record_gets_the_current_shape_new_optional_fields_null(tmp_path):
    _contract(tmp_path / "history" / "v1", [{"name": "RoomId", "type": "string"}])
    _contract(tmp_path, [
        {"name": "RoomId", "type": "string"},
        {"name": "Reason", "type": ["null", "string"], "default": None},
    ])
    old = SingleObjectCodec(SchemaSet.load(tmp_path / "history" / "v1"))
    data = old.encode("Thing", {"EventId": "e-1", "EventData": {"RoomId": "r-1"}})
    decoded = SingleObjectCodec(SchemaSet.load(tmp_path)).decode(data)
    assert decoded == {"EventId": "e-1", "EventData": {"RoomId": "r-1", "Reason": None}}


def test_a_schema_neither_current_nor_historic_is_an_unknown_fingerprint(tmp_path):
    _contract(tmp_path / "history" / "v1", [{"name": "RoomId", "type": "string"}])
    _contract(tmp_path, [{"name": "RoomId", "type": ["null", "string"], "default": None}])
    _contract(tmp_path / "elsewhere", [{"name": "RoomId", "type": "long"}])
    foreign = SingleObjectCodec(SchemaSet.load(tmp_path / "elsewhere"))
    data = foreign.encode("Thing", {"EventId": "e-1", "EventData": {"RoomId": 7}})
    with pytest.raises(EncodingError, match=f"unknown schema fingerprint {data[2:10].hex()}"):
        SingleObjectCodec(SchemaSet.load(tmp_path)).decode(data)
    # The real contract: an old schema that never existed is no writer either.
    first = SchemaSet.load(FIRST_CONTRACT)["UserLeaveRoom"]
    edited = {**first.schema, "fields": [*first.schema["fields"], {"name": "X", "type": "int"}]}
    parsed = fastavro.parse_schema(edited)
    fingerprint = fastavro.schema.fingerprint(
        fastavro.schema.to_parsing_canonical_form(parsed), "CRC-64-AVRO"
    )
    with pytest.raises(EncodingError, match="unknown schema fingerprint"):
        SingleObjectCodec(contract()).decode(b"\xc3\x01" + bytes.fromhex(fingerprint) + b"\x00")


def test_a_historic_schema_of_a_record_the_contract_dropped_is_no_writer(tmp_path):
    _contract(tmp_path / "history" / "v1", [{"name": "RoomId", "type": "string"}], name="Gone")
    _contract(tmp_path, [{"name": "RoomId", "type": "string"}])
    schemas = SchemaSet.load(tmp_path)
    assert list(schemas) == ["Thing"] and len(schemas.writers) == 1
    data = SingleObjectCodec(SchemaSet.load(tmp_path / "history" / "v1")).encode(
        "Gone", {"EventId": "e-1", "EventData": {"RoomId": "r-1"}}
    )
    with pytest.raises(EncodingError, match="unknown schema fingerprint"):
        SingleObjectCodec(schemas).decode(data)


def test_an_old_record_that_does_not_resolve_to_the_current_schema_is_an_encoding_error(tmp_path):
    _contract(tmp_path / "history" / "v1", [{"name": "RoomId", "type": "string"}])
    _contract(tmp_path, [{"name": "RoomId", "type": "long"}])  # no Avro promotion string -> long
    old = SingleObjectCodec(SchemaSet.load(tmp_path / "history" / "v1"))
    data = old.encode("Thing", {"EventId": "e-1", "EventData": {"RoomId": "r-1"}})
    with pytest.raises(EncodingError, match=r"Thing \(avro/history/v1\): body does not decode"):
        SingleObjectCodec(SchemaSet.load(tmp_path)).decode(data)


def test_encoding_always_writes_the_current_contract():
    schemas = contract()
    codec = SingleObjectCodec(schemas)
    example = next(e for e in EXAMPLES if e.event_type == "UserLeaveRoom")
    name, record = models().to_record(parse_envelope(signed_callback(example)))
    assert codec.encode(name, record)[2:10] == schemas[name].fingerprint
    assert schemas.by_fingerprint(schemas[name].fingerprint).history is None
