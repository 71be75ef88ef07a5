"""The Avro contract (``avro/``) against the vendor's events page and its examples.

The page's field tables are parsed here, independently of the schemas, and every schema field is
checked against them: names, types, which versions have it, and whether it is required.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import load_schema
from fastavro.validation import validate

from consumer.envelope import KEY_FIELDS
from consumer.examples import Example, load_examples
from consumer.routing import DEFAULT_DOMAINS

AVRO = Path(__file__).parents[1] / "avro"
PAGE = Path(__file__).parents[2] / "shared" / "spec" / "rtc-callback-events.md"
README = AVRO / "README.md"
# The first contract, as it was before every non-id field became optional: the writer of old data.
OLD_AVRO = AVRO / "history" / "v1"

ENVELOPE = ["EventId", "EventType", "EventTime", "AppId", "Version"]
SHARED_TYPES = ["Source", "Stream", "RecordFile", "AudioData", "ImageData", "SongUpdate", "Image"]
EVENT_TYPES = sorted(t for types in DEFAULT_DOMAINS.values() for t in types)

# Fields of the page's examples that their tables lack: they go to ExtraFields (avro/README.md).
SCHEMA_UNKNOWN = {"RelayStreamStateChanged": ["EventData.Vid"]}
# Numbers the page's examples send as strings (avro/README.md, Decisions).
STRING_NUMBERS = {
    "SegmentRealTimeData": [
        "EventData.Data[0].SampleRate", "EventData.Data[0].BitsPerSample", "EventData.Data[0].Channels",
    ],
}
# Millisecond timestamps the page types as Int (avro/README.md, Decisions): long.
WIDENED = {("MusicRemoved", "Timestamp"), ("SongUpdate", "UpdateAt")}
VENDOR_TYPES = {
    "String": "string", "Int": "int", "int": "int", "Int32": "int",
    "Uint32": "long", "Int64": "long", "Uint64": "long",
    "Float": "double", "Double": "double", "Boolean": "boolean",
}
# Prose that makes a field conditional, i.e. marked optional (rule clause 2).
CONDITIONAL = re.compile(r"仅|才|有效")


# ---------------------------------------------------------------------------------- the page

@dataclass(frozen=True)
class Row:
    """One row of a field table."""

    vendor_type: str  # "Uint32", or the linked type's name for objects
    nested: bool  # an object (record) of type vendor_type
    array: bool
    marked_optional: bool  # 必填 否, or a conditional description


@dataclass(frozen=True)
class Variant:
    """One event section of the page: an EventType, or one version of it."""

    event_type: str
    version: str
    section: str
    tables: dict[str, dict[str, Row]]  # "EventData" or a nested type's name -> field -> row


_LINK = re.compile(r"\[`?(\w+)`?\]\(#([^)]+)\)")


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("*`").strip() for cell in line.strip()[1:].split("|")]


def _read_table(body: str, anchor: str | None, type_name: str, tables: dict) -> None:
    marker = re.search(rf'<span id=\s*"{anchor}"' if anchor else r"\*\*EventData\*\*", body)
    assert marker, f"no table for {type_name}"
    lines = body[marker.end() :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    header = _cells(lines[start])
    type_col = next(i for i, cell in enumerate(header) if "类型" in cell)
    required_col = next((i for i, cell in enumerate(header) if "必填" in cell), None)
    doc_col = next(i for i, cell in enumerate(header) if "描述" in cell or "说明" in cell)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line) + [""] * len(header)
        name, kind = cells[0], cells[type_col]
        if not name:  # continuation of a multi-line cell
            continue
        link = _LINK.search(kind)
        if link and link.group(1) not in tables:
            _read_table(body, link.group(2), link.group(1), tables)
        rows[name] = Row(
            vendor_type=link.group(1) if link else kind,
            nested=bool(link),
            array=kind.lower().startswith("array of"),
            marked_optional=(required_col is not None and cells[required_col] == "否")
            or bool(CONDITIONAL.search(cells[doc_col])),
        )
    tables[type_name] = rows


@cache
def page_variants() -> tuple[Variant, ...]:
    text = PAGE.read_text(encoding="utf-8")
    headings = list(re.finditer(r"^#{1,3} (.+)$", text, re.M))
    variants = []
    for heading, following in zip(headings, headings[1:] + [None]):
        if not heading.group(0).startswith("### "):
            continue
        body = text[heading.end() : following.start() if following else len(text)]
        section = heading.group(1).strip()
        event_type, version = re.fullmatch(r"(\w+)(?:\((\d{4}-\d{2}-\d{2})\))?", section).groups()
        tables: dict = {}
        _read_table(body, None, "EventData", tables)
        variants.append(Variant(event_type, version or "2020-12-01", section, tables))
    return tuple(variants)


def variants_of(event_type: str) -> list[Variant]:
    return [v for v in page_variants() if v.event_type == event_type]


def tables_of(record: str) -> list[tuple[Variant, dict[str, Row]]]:
    """Every table of ``record`` (an EventType's EventData, or a shared type) on the page."""
    if record in EVENT_TYPES:
        return [(v, v.tables["EventData"]) for v in variants_of(record)]
    return [(v, v.tables[record]) for v in page_variants() if record in v.tables]


def example_objects(record: str) -> list[dict]:
    """Every object of ``record`` in the page's own examples (not the built ones)."""
    if record in EVENT_TYPES:
        return [e.event_data for e in load_examples() if e.event_type == record and not e.built]
    by_section = {v.section: v for v in page_variants()}
    found = []

    def walk(obj: dict, type_name: str, variant: Variant) -> None:
        if type_name == record:
            found.append(obj)
        for name, value in obj.items():
            row = variant.tables[type_name].get(name)
            if row and row.nested:
                for item in value if row.array else [value]:
                    walk(item, row.vendor_type, variant)

    for example in load_examples():
        if not example.built:
            variant = by_section[example.section]
            walk(example.event_data, "EventData", variant)
    return found


def appears_in(record: str, field: str) -> str:
    """Where a shared type's field appears, as its doc says it: "ET v1, v2; ET2"."""
    parts: dict[str, list[str]] = {}
    for variant, table in tables_of(record):
        if field in table:
            parts.setdefault(variant.event_type, []).append(variant.version)
    return "; ".join(
        f"{event_type} {', '.join(versions)}" if len(variants_of(event_type)) > 1 else event_type
        for event_type, versions in parts.items()
    )


# ---------------------------------------------------------------------------------- the schemas

def raw(name: str, directory: Path = AVRO) -> dict:
    return json.loads((directory / f"{name}.avsc").read_text(encoding="utf-8"))


def record_json(record: str, directory: Path = AVRO) -> dict:
    """The JSON of an EventType's EventData record, or of a shared type."""
    if record in EVENT_TYPES:
        return next(f["type"] for f in raw(record, directory)["fields"] if f["name"] == "EventData")
    return raw(f"rtcbus.{record}", directory)


def fields_of(record: str, directory: Path = AVRO) -> dict[str, dict]:
    return {f["name"]: f for f in record_json(record, directory)["fields"]}


def old_fields_of(record: str) -> dict[str, dict]:
    return fields_of(record, OLD_AVRO)


def base_type(field: dict):
    kind = field["type"]
    return kind[1] if isinstance(kind, list) else kind


def is_optional(field: dict) -> bool:
    return isinstance(field["type"], list)


def resolve(kind):
    if isinstance(kind, str) and kind.startswith("rtcbus."):
        return raw(kind)
    return kind


@cache
def parsed(name: str) -> dict:
    return load_schema(AVRO / f"{name}.avsc")


RECORDS = EVENT_TYPES + SHARED_TYPES[1:]  # Source is ours, not the page's
ALL_FILES = EVENT_TYPES + ["UnknownEvent"] + [f"rtcbus.{t}" for t in SHARED_TYPES]


def walk_json(node, visit) -> None:
    visit(node)
    if isinstance(node, dict):
        for value in node.values():
            walk_json(value, visit)
    elif isinstance(node, list):
        for value in node:
            walk_json(value, visit)


# ---------------------------------------------------------------------------------- files

def test_one_schema_per_event_type_of_the_routing_table_and_the_page():
    files = {p.stem for p in AVRO.glob("*.avsc")}
    assert files == set(ALL_FILES)
    assert len(EVENT_TYPES) == 38
    assert set(EVENT_TYPES) == {v.event_type for v in page_variants()}


def test_the_page_has_45_variants_and_three_versioned_event_types():
    variants = page_variants()
    assert len(variants) == 45
    versions = {t: [v.version for v in variants_of(t)] for t in EVENT_TYPES}
    assert {t: vs for t, vs in versions.items() if len(vs) > 1} == {
        "RecordStopped": ["2020-12-01", "2022-06-01", "2023-06-01", "2023-11-01"],
        "SegmentRealTimeData": ["2020-12-01", "2022-06-01", "2023-11-01"],
        "SnapshotRealTimeData": ["2020-12-01", "2022-06-01", "2023-11-01"],
    }


@pytest.mark.parametrize("name", ALL_FILES)
def test_schema_loads_and_is_named_after_its_file(name):
    schema = load_schema(AVRO / f"{name}.avsc")
    expected = name if name.startswith("rtcbus.") else f"rtcbus.{name}"
    assert schema["type"] == "record"
    assert schema["name"] == expected
    assert raw(name)["namespace"] == "rtcbus"


@pytest.mark.parametrize("name", EVENT_TYPES + ["UnknownEvent"])
def test_record_carries_envelope_event_data_source_and_extra_fields(name):
    fields = raw(name)["fields"]
    assert [f["name"] for f in fields] == ENVELOPE + ["EventData", "Source", "ExtraFields"]
    by_name = {f["name"]: f for f in fields}
    for envelope_field in ("EventId", "EventType", "AppId", "Version"):
        assert by_name[envelope_field]["type"] == "string"
    assert by_name["EventTime"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    assert by_name["Source"]["type"] == ["null", "rtcbus.Source"]
    assert by_name["Source"]["default"] is None
    assert by_name["ExtraFields"]["type"] == {"type": "map", "values": "string"}
    assert by_name["ExtraFields"]["default"] == {}
    event_data = by_name["EventData"]["type"]
    if name == "UnknownEvent":
        assert event_data == "string"
    else:
        assert event_data["type"] == "record"
        assert event_data["name"] == f"{name}Data"


def test_source_is_topic_partition_offset():
    assert [(f["name"], f["type"]) for f in raw("rtcbus.Source")["fields"]] == [
        ("Topic", "string"), ("Partition", "int"), ("Offset", "long"),
    ]


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_record_and_field_has_a_doc(name):
    undocumented = []

    def visit(node):
        if isinstance(node, dict) and node.get("type") == "record":
            if not node.get("doc", "").strip():
                undocumented.append(node["name"])
            undocumented.extend(
                f"{node['name']}.{f['name']}" for f in node["fields"] if not f.get("doc", "").strip()
            )

    walk_json(raw(name), visit)
    assert undocumented == []


@pytest.mark.parametrize("name", ALL_FILES)
def test_no_enums_and_only_optional_unions(name):
    problems = []

    def visit(node):
        if isinstance(node, dict) and node.get("type") in ("enum", "fixed"):
            problems.append(f"{node['type']} {node.get('name')}")
        if isinstance(node, dict) and "fields" in node:
            for field in node["fields"]:
                if isinstance(field["type"], list) and not (
                    len(field["type"]) == 2 and field["type"][0] == "null" and field.get("default", 0) is None
                ):
                    problems.append(f"union {field['name']}: {field['type']} default {field.get('default')}")

    walk_json(raw(name), visit)
    assert problems == []


@pytest.mark.parametrize("name", EVENT_TYPES + ["UnknownEvent"])
def test_shared_types_are_defined_once_in_their_own_files(name):
    defined = []
    referenced = []

    def visit(node):
        if isinstance(node, dict) and node.get("type") == "record":
            defined.append(node["name"])
        if isinstance(node, str) and node.startswith("rtcbus."):
            referenced.append(node)

    walk_json(raw(name), visit)
    assert defined == ([name] if name == "UnknownEvent" else [name, f"{name}Data"])
    assert {r.removeprefix("rtcbus.") for r in referenced} <= set(SHARED_TYPES)


# ---------------------------------------------------------------------------------- the page's tables

@pytest.mark.parametrize("record", RECORDS)
def test_fields_are_the_page_tables_fields_in_their_order(record):
    schema_fields = list(fields_of(record))
    tables = tables_of(record)
    assert tables, f"{record} has no table on the page"
    assert set(schema_fields) == {name for _, table in tables for name in table}
    for variant, table in tables:  # each table's fields keep their order in the schema
        assert [f for f in schema_fields if f in table] == list(table), variant.section


@pytest.mark.parametrize("record", RECORDS)
def test_field_types_follow_the_page_types(record):
    fields = fields_of(record)
    for variant, table in tables_of(record):
        for name, row in table.items():
            if row.nested:
                expected = f"rtcbus.{row.vendor_type}"
            elif (record, name) in WIDENED:
                expected = "long"
            else:
                expected = VENDOR_TYPES[row.vendor_type]
            if row.array:
                expected = {"type": "array", "items": expected}
            assert base_type(fields[name]) == expected, f"{variant.section}: {record}.{name}"


def required_of(record: str) -> set[str]:
    return {name for name, field in fields_of(record).items() if not is_optional(field)}


@cache
def documented_required() -> dict[str, set[str]]:
    """avro/README.md's table "Required fields per record": record -> its required fields."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Required fields per record") :]
    section = section[: section.index("\n## ")]
    rows = {}
    for line in section.splitlines():
        row = re.match(r"\| `(\w+)` \| ([^|]+) \|", line)
        if row:
            cell = row.group(2).strip()
            rows[row.group(1)] = set() if cell == "none" else {n.strip() for n in cell.split(",")}
    return rows


def test_the_readme_table_names_every_record_once():
    assert sorted(documented_required()) == sorted(RECORDS + ["Source"])


@pytest.mark.parametrize("record", RECORDS + ["Source"])
def test_required_fields_are_the_ones_the_readme_table_gives(record):
    assert required_of(record) == documented_required()[record]


@pytest.mark.parametrize("record", RECORDS)
def test_a_required_field_is_never_one_the_page_makes_optional(record):
    """avro/README.md, limit 1: in every table, not marked optional, in every page example."""
    tables = tables_of(record)
    objects = example_objects(record)
    for name in required_of(record):
        assert all(name in table for _, table in tables), f"{record}.{name}: not in every table"
        assert not any(table[name].marked_optional for _, table in tables), f"{record}.{name}: marked"
        assert objects and all(name in obj for obj in objects), f"{record}.{name}: not in every example"


@pytest.mark.parametrize("record", RECORDS)
def test_a_required_field_is_an_id_or_carries_ids(record):
    """A missing id is a dead letter, a missing detail is a null: only ids are required."""
    for name in required_of(record):
        kind = resolve(base_type(fields_of(record)[name]))
        if isinstance(kind, dict) and kind["type"] == "array":  # e.g. MusicRemoved.SongUpdate
            item = kind["items"].removeprefix("rtcbus.")
            assert any(field.endswith("Id") for field in required_of(item)), f"{record}.{name}"
        else:
            assert name.endswith("Id") and name not in ("AppId", "BusinessId"), f"{record}.{name}"


@pytest.mark.parametrize("record", RECORDS)
def test_every_other_field_is_optional_with_a_null_default_and_says_why(record):
    for name, field in fields_of(record).items():
        if name not in required_of(record):
            assert field["type"][0] == "null" and field["default"] is None, f"{record}.{name}"
            assert " Optional: " in field["doc"], f"{record}.{name}"


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_the_record_key_field_is_required_unless_an_old_contract_had_it_optional(event_type):
    key_field = next((name for name in KEY_FIELDS if name in fields_of(event_type)), None)
    if key_field is None:  # MusicRemoved: keyed by the envelope's AppId
        assert event_type == "MusicRemoved"
        return
    was_optional = is_optional(old_fields_of(event_type)[key_field])
    assert is_optional(fields_of(event_type)[key_field]) is was_optional, f"{event_type}.{key_field}"


@pytest.mark.parametrize("event_type", [t for t in EVENT_TYPES if len(variants_of(t)) > 1])
def test_versioned_fields_name_their_versions_in_the_doc(event_type):
    for name, field in fields_of(event_type).items():
        versions = [v.version for v in variants_of(event_type) if name in v.tables["EventData"]]
        assert f"Versions: {', '.join(versions)}." in field["doc"], name


@pytest.mark.parametrize("record", SHARED_TYPES[1:])
def test_shared_fields_name_where_they_appear_in_the_doc(record):
    for name, field in fields_of(record).items():
        assert f"Appears in: {appears_in(record, name)}." in field["doc"], name


# ---------------------------------------------------------------------------------- the examples

def _fit(value, kind, path: str, report: dict):
    """``value`` shaped for the Avro type ``kind``; what did not fit goes to ``report``."""
    kind = resolve(base_type({"type": kind}))
    if isinstance(kind, dict) and kind["type"] == "record":
        fields = {f["name"]: f for f in kind["fields"]}
        out = {}
        for name, item in value.items():
            if name in fields:
                out[name] = _fit(item, fields[name]["type"], f"{path}.{name}", report)
            else:
                report["unknown"][f"{path}.{name}"] = json.dumps(item, ensure_ascii=False)
        for name, field in fields.items():
            if name not in value:
                if not is_optional(field):
                    report["missing"].append(f"{path}.{name}")
                out[name] = None
        return out
    if isinstance(kind, dict) and kind["type"] == "array":
        return [_fit(item, kind["items"], f"{path}[{i}]", report) for i, item in enumerate(value)]
    if kind in ("int", "long") and isinstance(value, str):
        report["string_numbers"].append(path)
        return int(value)
    return value


def _record_of(example: Example) -> tuple[dict, dict]:
    report: dict = {"unknown": {}, "missing": [], "string_numbers": []}
    event_data_type = record_json(example.event_type)
    event_data = _fit(example.event_data, event_data_type, "EventData", report)
    record = {
        "EventId": "9f0c6b2e", "EventType": example.event_type,
        "EventTime": datetime(2021, 8, 17, 11, 22, 2, tzinfo=timezone.utc),
        "AppId": "Your_AppId", "Version": example.version,
        "EventData": event_data, "Source": {"Topic": "rtc.callbacks.raw", "Partition": 3, "Offset": 42},
        "ExtraFields": report["unknown"],
    }
    return record, report


@pytest.mark.parametrize("example", load_examples(), ids=lambda e: e.section)
def test_example_fits_its_schema_and_round_trips(example):
    record, report = _record_of(example)
    assert list(report["unknown"]) == SCHEMA_UNKNOWN.get(example.event_type, [])
    assert report["missing"] == []
    assert report["string_numbers"] == STRING_NUMBERS.get(example.event_type, [])
    schema = parsed(example.event_type)
    assert validate(record, schema, raise_errors=True)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    buffer.seek(0)
    assert fastavro.schemaless_reader(buffer, schema, schema) == record


def test_schema_unknown_fields_are_in_the_examples_and_not_the_schemas():
    examples = {e.event_type: e for e in load_examples()}
    for event_type, paths in SCHEMA_UNKNOWN.items():
        for path in paths:
            field = path.removeprefix("EventData.")
            assert field in examples[event_type].event_data
            assert field not in fields_of(event_type)
    assert _record_of(examples["RelayStreamStateChanged"])[0]["ExtraFields"] == {"EventData.Vid": '"xxxxvvv"'}


# ---------------------------------------------------------------------------------- versions

def _writer_type(kind, variant: Variant, defined: set):
    """The writer's view of ``kind`` in ``variant``: only that variant's fields, none of them null."""
    kind = base_type({"type": kind})
    if isinstance(kind, str) and kind.startswith("rtcbus."):
        if kind in defined:
            return kind
        defined.add(kind)
        return _writer_record(raw(kind), variant.tables[kind.removeprefix("rtcbus.")], variant, defined)
    if isinstance(kind, dict) and kind["type"] == "array":
        return {"type": "array", "items": _writer_type(kind["items"], variant, defined)}
    return kind


def _writer_record(record: dict, table: dict, variant: Variant, defined: set) -> dict:
    return {
        "type": "record", "name": record["name"], "namespace": "rtcbus",
        "fields": [
            {"name": f["name"], "type": _writer_type(f["type"], variant, defined)}
            for f in record["fields"] if f["name"] in table
        ],
    }


def _value(kind, name: str, named: dict):
    """A value of the Avro type ``kind``, distinct enough to notice a mix-up."""
    if isinstance(kind, str) and kind in named:
        kind = named[kind]
    if isinstance(kind, dict) and kind["type"] == "record":
        named[f"rtcbus.{kind['name']}"] = kind
        return {f["name"]: _value(f["type"], f["name"], named) for f in kind["fields"]}
    if isinstance(kind, dict) and kind["type"] == "array":
        return [_value(kind["items"], name, named)]
    if isinstance(kind, dict) and kind["type"] == "map":
        return {"EventData.New": '"x"'}
    if isinstance(kind, dict) and kind.get("logicalType") == "timestamp-millis":
        return datetime(2023, 11, 1, tzinfo=timezone.utc)
    return {"string": f"{name}-value", "int": 7, "long": 2**40 + 7}[kind]


def _with_defaults(value, kind):
    """``value`` as the reader sees it: fields the writer lacks are null."""
    kind = resolve(base_type({"type": kind}))
    if isinstance(kind, dict) and kind["type"] == "record" and isinstance(value, dict):
        return {f["name"]: _with_defaults(value.get(f["name"]), f["type"]) for f in kind["fields"]}
    if isinstance(kind, dict) and kind["type"] == "array" and value is not None:
        return [_with_defaults(item, kind["items"]) for item in value]
    return value


@pytest.mark.parametrize("variant", page_variants(), ids=lambda v: v.section)
def test_one_reader_schema_reads_every_variants_writer_shape(variant):
    reader = raw(variant.event_type)
    envelope = [f for f in reader["fields"] if f["name"] != "EventData"]
    event_data = next(f["type"] for f in reader["fields"] if f["name"] == "EventData")
    defined: set = set()
    writer = {
        "type": "record", "name": variant.event_type, "namespace": "rtcbus",
        "fields": [
            *[{"name": f["name"], "type": _writer_type(f["type"], variant, defined)} for f in envelope[:5]],
            {"name": "EventData",
             "type": _writer_record(event_data, variant.tables["EventData"], variant, defined)},
            {"name": "Source", "type": raw("rtcbus.Source")},
            {"name": "ExtraFields", "type": {"type": "map", "values": "string"}},
        ],
    }
    value = _value(writer, variant.event_type, {})
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(writer), value)
    buffer.seek(0)
    read = fastavro.schemaless_reader(buffer, fastavro.parse_schema(writer), parsed(variant.event_type))
    assert read == _with_defaults(value, reader)
    absent = set(fields_of(variant.event_type)) - set(variant.tables["EventData"])
    assert all(read["EventData"][name] is None for name in absent)


# ---------------------------------------------------------------------------------- compatibility

OLD_FILES = sorted(p.stem for p in OLD_AVRO.glob("*.avsc"))


def test_the_first_contract_is_kept_whole():
    assert OLD_FILES == sorted(ALL_FILES)


@cache
def old_parsed(name: str) -> dict:
    return load_schema(OLD_AVRO / f"{name}.avsc")


def _field_resolves(old, new, path: str, problems: list) -> None:
    """Avro schema resolution of writer type ``old`` against reader type ``new``, field by field."""
    if isinstance(new, list) and not isinstance(old, list):
        if old not in new and not any(_same_record(old, branch) for branch in new):
            problems.append(f"{path}: {old} is no branch of {new}")
        else:
            match = next(b for b in new if b == old or _same_record(old, b))
            _field_resolves(old, match, path, problems)
        return
    if isinstance(old, list) and not isinstance(new, list):
        problems.append(f"{path}: optional became required")
        return
    if isinstance(old, dict) and old.get("type") == "record":
        new_fields = {f["name"]: f for f in new["fields"]}
        old_fields = {f["name"]: f for f in old["fields"]}
        for name, field in new_fields.items():
            if name not in old_fields and "default" not in field:
                problems.append(f"{path}.{name}: new and without a default")
        for name, field in old_fields.items():
            if name in new_fields:
                _field_resolves(field["type"], new_fields[name]["type"], f"{path}.{name}", problems)
        return
    if isinstance(old, dict) and old.get("type") == "array":
        _field_resolves(old["items"], new["items"], f"{path}[]", problems)
        return
    if old != new:
        problems.append(f"{path}: {old} became {new}")


def _same_record(old, new) -> bool:
    return isinstance(old, dict) and isinstance(new, dict) and old.get("name") == new.get("name")


@pytest.mark.parametrize("name", OLD_FILES)
def test_every_change_since_the_first_contract_resolves(name):
    """Each field keeps its type or gains a null branch; none becomes required; new ones have defaults."""
    problems: list = []
    _field_resolves(raw(name, OLD_AVRO), raw(name), name, problems)
    assert problems == []


def _sample(kind, name: str, named: dict, fill: bool):
    """A value of the Avro type ``kind``; optional fields filled (``fill``) or null."""
    if isinstance(kind, str) and kind in named:
        kind = named[kind]
    if isinstance(kind, list):
        branch = next(b for b in kind if b != "null") if fill else "null"
        return None if branch == "null" else _sample(branch, name, named, fill)
    if isinstance(kind, dict) and kind["type"] == "record":
        named[kind["name"]] = kind
        return {f["name"]: _sample(f["type"], f["name"], named, fill) for f in kind["fields"]}
    if isinstance(kind, dict) and kind["type"] == "array":
        return [_sample(kind["items"], name, named, fill)]
    if isinstance(kind, dict) and kind["type"] == "map":
        return {"EventData.New": '"x"'} if fill else {}
    if isinstance(kind, dict) and kind.get("logicalType") == "timestamp-millis":
        return datetime(2023, 11, 1, tzinfo=timezone.utc)
    return {"string": f"{name}-value", "int": 7, "long": 2**40 + 7}[kind]


def _write_old_read_new(name: str, value: dict) -> dict:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, old_parsed(name), value)
    buffer.seek(0)
    return fastavro.schemaless_reader(buffer, old_parsed(name), parsed(name))


@pytest.mark.parametrize("fill", [True, False], ids=["optional-filled", "optional-null"])
@pytest.mark.parametrize("name", EVENT_TYPES + ["UnknownEvent"])
def test_records_written_with_the_first_contract_read_with_the_current_one(name, fill):
    value = _sample(old_parsed(name), name, {}, fill)
    assert _write_old_read_new(name, value) == value


@pytest.mark.parametrize("example", load_examples(), ids=lambda e: e.section)
def test_the_pages_examples_written_with_the_first_contract_read_with_the_current_one(example):
    record, _ = _record_of(example)
    assert validate(record, old_parsed(example.event_type), raise_errors=True)
    assert _write_old_read_new(example.event_type, record) == record

