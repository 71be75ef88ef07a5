"""``rtcbus asyncapi``: the document passes the official AsyncAPI parser and covers the contract.

The parser (``@asyncapi/parser`` with ``@asyncapi/avro-schema-parser``, pinned in
``tests/asyncapi/package-lock.json``) runs in Node through ``tests/asyncapi/check.mjs``, which also
compiles every Avro payload with avsc: the v3 ruleset checks an Avro payload against a meta-schema
only, not as Avro. ``npm ci`` installs it once into ``tests/asyncapi/node_modules`` and again only
when the lock file changes. Everything the document must cover is derived here from the code
(the contract, the routing table, the topic names, the transform's headers), so drift fails.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastavro.schema
import pytest
import yaml
from confluent_kafka import Message

from consumer.asyncapi import (
    AVRO_SCHEMA_FORMAT,
    CALLBACK_MESSAGE,
    DEAD_LETTER_MESSAGE,
    QUARANTINED_MESSAGE,
    to_asyncapi,
)
from consumer.codec import subject_name
from consumer.envelope import parse_envelope, raw_headers
from consumer.kafka.admin import topic_names
from consumer.router import DeadLetter, Routed, Transform
from consumer.routing import RoutingTable
from consumer.schemas import UNKNOWN_EVENT, contract
from consumer.settings import load_settings

CHECKER = Path(__file__).parent / "asyncapi"
RTCBUS = str(Path(sys.executable).parent / "rtcbus")
BOOTSTRAP = "127.0.0.1:19092"
SECRET = "s3cret-sasl-password"
REGISTRY_PASSWORD = "s3cret-registry-password"
ERROR = 0  # the parser's DiagnosticSeverity.Error


def rtcbus(*args: str, **env: str) -> str:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    result = subprocess.run(
        [RTCBUS, *args], env={**environment, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the checker's packages installed (``npm ci``, skipped while the lock is unchanged)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail(
            "tests/test_asyncapi.py needs Node.js 18+ with npm (`node` and `npm` on PATH) to run "
            "the official AsyncAPI parser; install them (e.g. apt-get install nodejs npm)"
        )
    stamp = CHECKER / "node_modules" / ".rtcbus-package-lock.sha256"
    digest = hashlib.sha256((CHECKER / "package-lock.json").read_bytes()).hexdigest()
    if not stamp.is_file() or stamp.read_text().strip() != digest:
        # --ignore-scripts: no package of the checker needs one (one would only phone home).
        installed = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=CHECKER, capture_output=True, text=True, timeout=300,
        )
        if installed.returncode != 0:
            pytest.fail(f"npm ci in {CHECKER} failed:\n{installed.stdout}\n{installed.stderr}")
        stamp.write_text(digest)
    return node


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The command's output: YAML by default (with bootstrap servers), and JSON on the local Kafka."""
    home = tmp_path_factory.mktemp("rtcbus-home")
    return {
        "yaml": rtcbus("asyncapi", RTCBUS_BOOTSTRAP_SERVERS=BOOTSTRAP),
        "json": rtcbus("--home", str(home), "asyncapi", "--format", "json"),
    }


@pytest.fixture(scope="module")
def document(documents: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(documents["yaml"])


def confluent_settings():
    return load_settings(
        bootstrap_servers="b1.example:9093, b2.example:9093",
        wire_format="confluent",
        schema_registry_url=f"https://registry-user-7f3a:{REGISTRY_PASSWORD}@registry.example:8081/apis/ccompat/v7",
        kafka_config={
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "sasl-user-7f3a",
            "sasl.password": SECRET,
        },
    )


def broken(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Documents the checker must refuse, one flaw each."""
    dotted = copy.deepcopy(document)
    schema = dotted["components"]["messages"]["RoomCreate"]["payload"]["schema"]
    schema["name"] = f"{schema.pop('namespace')}.{schema['name']}"

    bad_reference = copy.deepcopy(document)
    bad_reference["channels"]["room"]["messages"]["RoomCreate"] = {"$ref": "#/components/messages/NoSuchEvent"}

    # Valid for the meta-schema (any dotted identifier may name a type), meaningless as Avro.
    unknown_type = copy.deepcopy(document)
    fields = unknown_type["components"]["messages"]["RoomCreate"]["payload"]["schema"]["fields"]
    fields[0]["type"] = "rtcbus.NoSuchType"
    return {"dotted-name": dotted, "bad-reference": bad_reference, "unknown-avro-type": unknown_type}


@pytest.fixture(scope="module")
def reports(
    node: str, documents: dict[str, str], document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """The checker's report on each document, from one run of Node."""
    folder = tmp_path_factory.mktemp("asyncapi")
    files = {"default": folder / "default.yaml"}
    files["default"].write_text(documents["yaml"])
    cases = {"confluent-sasl": to_asyncapi(confluent_settings()), **broken(document)}
    for name, case in cases.items():
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps(case))
    checked = subprocess.run(
        [node, str(CHECKER / "check.mjs"), *map(str, files.values())],
        cwd=CHECKER, capture_output=True, text=True, timeout=120,
    )
    lines = [json.loads(line) for line in checked.stdout.splitlines() if line.strip()]
    assert checked.returncode in (0, 1) and len(lines) == len(files), checked.stdout + checked.stderr
    by_file = {line["file"]: line for line in lines}
    return {name: by_file[str(path)] for name, path in files.items()}


def errors(report: dict[str, Any]) -> list[str]:
    found = [
        f"{d['code']}: {d['message']} at {'/'.join(d['path'])}"
        for d in report["diagnostics"]
        if d["severity"] == ERROR
    ]
    return found + [f"avsc: {a['error']} at {'/'.join(a['path'])}" for a in report["avro"] if a["error"]]


# -- the official parser ---------------------------------------------------------------------


def test_the_document_passes_the_parser_and_every_payload_compiles(reports):
    report = reports["default"]
    assert errors(report) == []
    compiled = {entry["name"] for entry in report["avro"]}
    assert compiled == {f"rtcbus.{name}" for name in contract()}


def test_the_confluent_framing_over_sasl_ssl_passes_and_keeps_secrets_out(reports):
    assert errors(reports["confluent-sasl"]) == []
    document = to_asyncapi(confluent_settings())
    text = json.dumps(document)
    assert SECRET not in text and REGISTRY_PASSWORD not in text and "user-7f3a" not in text

    servers = document["servers"]
    assert [server["host"] for server in servers.values()] == ["b1.example:9093", "b2.example:9093"]
    for server in servers.values():
        assert server["protocol"] == "kafka-secure"
        assert server["security"] == [{"$ref": "#/components/securitySchemes/sasl"}]
        assert server["bindings"]["kafka"]["schemaRegistryUrl"] == "https://registry.example:8081/apis/ccompat/v7"
    assert document["components"]["securitySchemes"]["sasl"]["type"] == "scramSha512"
    message = document["components"]["messages"]["RoomCreate"]
    assert message["bindings"]["kafka"]["schemaIdLocation"] == "payload"
    assert message["bindings"]["kafka"]["schemaLookupStrategy"] == "TopicRecordNameStrategy"
    topic = RoutingTable.from_settings(confluent_settings()).route("RoomCreate").topic
    assert message["x-rtcbus-subject"] == subject_name(contract()["RoomCreate"], topic)
    assert message["x-rtcbus-subject"] == f"{topic}-rtcbus.RoomCreate"  # TopicRecordNameStrategy


def test_a_tls_client_certificate_is_an_x509_scheme_and_its_key_password_stays_out():
    settings = load_settings(
        bootstrap_servers=BOOTSTRAP,
        kafka_config={
            "security.protocol": "SSL",
            "ssl.certificate.location": "/etc/rtcbus/client.pem",
            "ssl.key.location": "/etc/rtcbus/client.key",
            "ssl.key.password": SECRET,
        },
    )
    document = to_asyncapi(settings)
    assert SECRET not in json.dumps(document) and "/etc/rtcbus" not in json.dumps(document)
    assert document["servers"]["kafka"]["protocol"] == "kafka-secure"
    assert document["components"]["securitySchemes"] == {
        "tls-client": {"type": "X509", "description": "A TLS client certificate."}
    }


@pytest.mark.parametrize("flaw", ["dotted-name", "bad-reference", "unknown-avro-type"])
def test_a_broken_document_is_refused(reports, flaw):
    report = reports[flaw]
    assert errors(report), f"the checker let a document with a {flaw} pass"
    parser_errors = [d for d in report["diagnostics"] if d["severity"] == ERROR]
    if flaw == "unknown-avro-type":
        # Only the Avro compilation sees this one: the reason it runs beside the parser.
        assert parser_errors == []
        assert any("NoSuchType" in (entry["error"] or "") for entry in report["avro"])
    elif flaw == "bad-reference":
        assert any(d["code"] == "invalid-ref" for d in parser_errors)
    else:
        assert any("RoomCreate" in "/".join(d["path"]) for d in parser_errors)


# -- derived from the code: drift fails ------------------------------------------------------


def test_yaml_and_json_are_one_document_and_the_local_kafka_is_the_default_server(documents, document):
    as_json = json.loads(documents["json"])
    assert {**as_json, "servers": None} == {**document, "servers": None}
    assert [server["host"] for server in as_json["servers"].values()] == ["127.0.0.1:9092"]
    assert [server["host"] for server in document["servers"].values()] == [BOOTSTRAP]
    assert document["info"]["title"] == "rtcbus" and document["info"]["version"]


def test_every_event_type_has_a_message_in_its_topics_channel(document):
    settings = load_settings(bootstrap_servers=BOOTSTRAP)
    schemas = contract()
    routing = RoutingTable.from_settings(settings, schemas.event_types)
    channels_by_address = {channel["address"]: channel for channel in document["channels"].values()}
    messages = document["components"]["messages"]
    for name in [*schemas.event_types, UNKNOWN_EVENT]:
        assert name in messages, f"no message for {name}"
        channel = channels_by_address[routing.route(name).topic]
        assert channel["messages"][name] == {"$ref": f"#/components/messages/{name}"}

    dedupe = settings.dedupe_topic  # the router's own changelog, not for subscribers
    assert set(channels_by_address) == {topic for topic in topic_names(settings) if topic != dedupe}
    for topic, name in (
        (settings.raw_topic, CALLBACK_MESSAGE),
        (settings.dlq_topic, DEAD_LETTER_MESSAGE),
        (settings.quarantine_topic, QUARANTINED_MESSAGE),
    ):
        assert list(channels_by_address[topic]["messages"]) == [name]

    for channel_id, channel in document["channels"].items():
        (operation,) = [
            op for op in document["operations"].values() if op["channel"] == {"$ref": f"#/channels/{channel_id}"}
        ]
        assert operation["action"] == "receive"
        assert len(operation["messages"]) == len(channel["messages"])


def test_each_payload_is_its_contract_schema_with_the_same_fingerprint(document):
    for name, schema in contract().items():
        payload = document["components"]["messages"][name]["payload"]
        assert payload["schemaFormat"] == AVRO_SCHEMA_FORMAT
        parsed = fastavro.schema.parse_schema(payload["schema"], _write_hint=False)
        canonical = fastavro.schema.to_parsing_canonical_form(parsed)
        assert fastavro.schema.fingerprint(canonical, "CRC-64-AVRO") == schema.fingerprint.hex(), name
        assert document["components"]["messages"][name]["x-rtcbus-fingerprint"] == schema.fingerprint.hex()


def test_the_keys_and_the_wire_format_are_described(document):
    messages = document["components"]["messages"]
    assert "EventData.RoomId" in messages["RoomCreate"]["bindings"]["kafka"]["key"]["description"]
    assert "EventData.PublicStreamId" in messages["PushPublicStream"]["bindings"]["kafka"]["key"]["description"]
    assert "C3 01" in messages["RoomCreate"]["description"]


def callback_body(event_data: str) -> bytes:
    return json.dumps(
        {
            "EventType": "UserJoinRoom", "EventData": event_data,
            "EventTime": "2024-05-01T12:00:00+08:00", "EventId": "e-1", "AppId": "app",
            "Version": "2020-12-01", "Nonce": "1", "Signature": "0" * 64,
        }
    ).encode()


def assert_headers_documented(headers: list[tuple[str, bytes]], schema: dict[str, Any]) -> None:
    names = {name for name, _ in headers}
    assert names <= set(schema["properties"]), names - set(schema["properties"])
    assert set(schema["required"]) <= names, set(schema["required"]) - names


def test_the_headers_are_those_the_shim_and_the_router_write(document):
    settings = load_settings(bootstrap_servers=BOOTSTRAP)
    messages = document["components"]["messages"]
    good = callback_body(json.dumps({"RoomId": "room-1", "UserId": "u1"}))
    received = raw_headers(parse_envelope(good), 1_700_000_000_000)
    assert {name for name, _ in received} == set(messages[CALLBACK_MESSAGE]["headers"]["properties"])
    assert_headers_documented(received, messages[CALLBACK_MESSAGE]["headers"])

    transform = Transform.from_settings(settings)
    for body, kind, message_name in (
        (good, Routed, "UserJoinRoom"),
        (callback_body("{not json"), DeadLetter, DEAD_LETTER_MESSAGE),
    ):
        raw = Message(
            topic=settings.raw_topic, partition=0, offset=1, key=b"room-1", value=body,
            headers=received, timestamp=(2, 1_700_000_000_000),
        )
        outcome = transform.apply(raw, lambda _partition, _event_id: False)
        assert isinstance(outcome, kind)
        assert_headers_documented(outcome.headers, messages[message_name]["headers"])
