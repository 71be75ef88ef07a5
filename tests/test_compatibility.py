"""``rtcbus schemas register`` and ``schemas check`` on a real Schema Registry, and the CI gate:
``avro/`` must stay compatible with the last released contract (``avro/released/``).

The registry is shared by the session (and may be a shared ``SCHEMA_REGISTRY_URL``): each test
names its subjects with a topic prefix of its own and never asserts the whole subject list.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from typer.testing import CliRunner

from consumer.cli import app
from consumer.codec import ConfluentCodec
from consumer.compatibility import incompatible_fields, subjects
from consumer.events import Source, models
from consumer.envelope import parse_envelope
from consumer.schemas import SchemaSet, contract
from consumer.settings import load_settings
from support import callback

AVRO = Path(__file__).parents[1] / "avro"
RELEASED = AVRO / "released" / "0.1.0"


@pytest.fixture
def schemas(schema_registry):
    """``schemas(*args, contract=None)`` runs ``rtcbus schemas …`` on the session's registry,
    with a topic prefix of this test's own; ``.prefix`` is that prefix."""
    prefix = f"t{uuid.uuid4().hex[:10]}"

    def run(*args: str, contract: Path | None = None):
        env = {"RTCBUS_SCHEMA_REGISTRY_URL": schema_registry.url, "RTCBUS_TOPIC_PREFIX": prefix}
        extra = ["--contract", str(contract)] if contract else []
        return CliRunner().invoke(app, ["schemas", *args, *extra], env=env, catch_exceptions=False)

    run.prefix = prefix
    return run


def copy_of_contract(tmp_path: Path) -> Path:
    """``avro/*.avsc`` (the current contract, not its history) in a folder of its own."""
    target = tmp_path / "avro"
    target.mkdir()
    for path in AVRO.glob("*.avsc"):
        shutil.copy(path, target)
    return target


def edit_event_data(folder: Path, event_type: str, edit) -> None:
    path = folder / f"{event_type}.avsc"
    schema = json.loads(path.read_text())
    data = next(field for field in schema["fields"] if field["name"] == "EventData")["type"]
    data["fields"] = edit(data["fields"])
    path.write_text(json.dumps(schema, indent=2))


# -- register ---------------------------------------------------------------------------------


def test_register_registers_every_subject_the_routers_codec_writes_with(schemas, schema_registry):
    result = schemas("register", "--compatibility", "BACKWARD")
    assert result.exit_code == 0, result.output
    settings = load_settings(topic_prefix=schemas.prefix, schema_registry_url=schema_registry.url)
    expected = subjects(settings, contract())
    assert len(expected) == len(contract()) == 39
    client = SchemaRegistryClient({"url": schema_registry.url, "timeout": 10})
    registered = set(client.get_subjects())
    assert {subject.name for subject in expected} <= registered
    assert all(subject.name in result.output for subject in expected)
    # The codec the routers use finds the same subject and schema id: one naming, one owner.
    subject = next(s for s in expected if s.event_type == "UserLeaveRoom")
    codec = ConfluentCodec(contract(), schema_registry.url)
    name, record = models().to_record(
        parse_envelope(callback("UserLeaveRoom", {"RoomId": "r", "UserId": "u"}, "s")), Source("raw", 0, 1)
    )
    codec.encode(name, record, subject.topic)
    assert codec.schema_id(name, subject.topic) == str(client.get_latest_version(subject.name).schema_id)
    assert client.get_compatibility(subject.name) == "BACKWARD"
    again = schemas("register")  # idempotent: the same schemas get the same ids
    assert again.exit_code == 0
    assert again.output.splitlines()[:-1] == result.output.splitlines()[:-1]


def test_check_before_anything_is_registered_says_new(schemas):
    result = schemas("check")
    assert result.exit_code == 0, result.output
    assert "39 new" in result.output


# -- the gate: avro/ against the last release ---------------------------------------------------


def test_the_released_snapshot_is_a_copy_of_a_whole_contract():
    released = SchemaSet.load(RELEASED)
    assert sorted(released) == sorted(contract())


def test_avro_is_compatible_with_the_last_released_contract(schemas):
    registered = schemas("register", contract=RELEASED)
    assert registered.exit_code == 0, registered.output
    result = schemas("check", "--compatibility", "BACKWARD")
    assert result.exit_code == 0, result.output
    assert "39 compatible" in result.output and "incompatible" not in result.output


@pytest.mark.parametrize(
    ("level", "edit", "field", "why"),
    [
        ("BACKWARD", lambda fields: [*fields, {"name": "Region", "type": "string"}],
         "EventData.Region", "not in the registered schema and has no default"),
        ("FORWARD", lambda fields: [f for f in fields if f["name"] != "RoomId"],
         "EventData.RoomId", "not in the new schema and has no default"),
    ],
    ids=["BACKWARD-required-field-added", "FORWARD-required-field-removed"],
)
def test_an_incompatible_change_fails_the_check_naming_the_field(schemas, tmp_path, level, edit, field, why):
    assert schemas("register", contract=RELEASED).exit_code == 0
    changed = copy_of_contract(tmp_path)
    edit_event_data(changed, "UserLeaveRoom", edit)
    result = schemas("check", "--compatibility", level, contract=changed)
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("UserLeaveRoom ")]
    assert "incompatible" in line and f"{field}: {why}" in line
    assert "38 compatible, 1 incompatible" in result.output
    # A compatible change (a new optional field) passes.
    shutil.copy(RELEASED / "UserLeaveRoom.avsc", changed)
    edit_event_data(changed, "UserLeaveRoom", lambda fields: [
        *fields, {"name": "Region", "type": ["null", "string"], "default": None},
    ])
    assert schemas("check", "--compatibility", level, contract=changed).exit_code == 0


def test_an_unknown_level_is_refused(schemas):
    result = schemas("check", "--compatibility", "SIDEWAYS")
    assert result.exit_code == 2 and "SIDEWAYS" in result.output


# -- which field: the comparison, without a registry ---------------------------------------------


def _user_leave_room() -> dict:
    return json.loads(json.dumps(dict(contract()["UserLeaveRoom"].schema)))


def test_identical_schemas_have_no_incompatible_field():
    for name in contract():
        schema = json.loads(json.dumps(dict(contract()[name].schema)))
        assert incompatible_fields(schema, schema, "FULL") == [], name


def test_a_type_change_is_named_with_both_types():
    old, new = _user_leave_room(), _user_leave_room()
    data = next(f for f in new["fields"] if f["name"] == "EventData")["type"]
    room = next(f for f in data["fields"] if f["name"] == "RoomId")
    room["type"] = "long"
    assert incompatible_fields(old, new, "BACKWARD") == [
        "EventData.RoomId: type string in the registered schema cannot be read as long"
    ]
    # int → long is a promotion Avro readers make; long → int is not.
    old_int, new_long = _user_leave_room(), _user_leave_room()
    for schema, kind in ((old_int, "int"), (new_long, "long")):
        data = next(f for f in schema["fields"] if f["name"] == "EventData")["type"]
        next(f for f in data["fields"] if f["name"] == "RoomId")["type"] = kind
    assert incompatible_fields(old_int, new_long, "BACKWARD") == []
    assert incompatible_fields(old_int, new_long, "FORWARD") == [
        "EventData.RoomId: type long in the new schema cannot be read as int"
    ]


def test_a_required_field_made_optional_is_backward_but_not_forward_compatible():
    # What avro/history/v1 → avro/ did: old readers cannot read the null a new writer may write.
    old = json.loads(json.dumps(dict(SchemaSet.load(AVRO / "history" / "v1")["UserLeaveRoom"].schema)))
    assert incompatible_fields(old, _user_leave_room(), "BACKWARD") == []
    assert "EventData.Reason: type null in the new schema cannot be read as string" in incompatible_fields(
        old, _user_leave_room(), "FORWARD"
    )


def test_check_sets_a_subjects_level_only_when_it_differs_and_says_so(schemas, schema_registry):
    registry_client = SchemaRegistryClient({"url": schema_registry.url, "timeout": 10})
    registered = schemas("register", "--compatibility", "FORWARD", contract=RELEASED)
    assert registered.exit_code == 0, registered.output

    first = schemas("check")
    assert first.exit_code == 0, first.output
    assert "to BACKWARD (was FORWARD)" in first.output, first.output
    subject = next(line.split()[1] for line in first.output.splitlines()[1:] if " compatible" in line)
    assert registry_client.get_compatibility(subject) == "BACKWARD"

    again = schemas("check")
    assert again.exit_code == 0, again.output
    assert "set the compatibility level" not in again.output, again.output
