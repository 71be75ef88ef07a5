"""The contract in a Schema Registry: register its subjects, check a contract against them.

Subjects are named as :class:`consumer.codec.ConfluentCodec` names them when it writes
(:func:`consumer.codec.subject_name`), on the topics the routing table gives each EventType,
so what ``rtcbus schemas register`` registers is what the routers look up.

A compatibility check asks the registry (``test_compatibility``, the registry's own rules)
whether each schema may follow the latest version of its subject. The registry's answer is
only yes or no (Apicurio 2.6 names no field), so for a schema it refuses,
:func:`incompatible_fields` works out which fields are at fault by comparing the two
schemas itself, under the same level.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from consumer.codec import subject_name
from consumer.errors import ConfigError, InfrastructureError
from consumer.routing import RoutingTable
from consumer.schemas import EventSchema, SchemaSet

LEVELS = (
    "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE",
    "FULL", "FULL_TRANSITIVE", "NONE",
)


@dataclass(frozen=True)
class Subject:
    """One EventType's schema under the subject it is written with."""

    event_type: str
    topic: str
    name: str
    schema: EventSchema


@dataclass(frozen=True)
class Verdict:
    """What the registry said of one subject."""

    subject: Subject
    state: str
    """``compatible``, ``incompatible`` or ``new`` (the registry has no version of it yet)."""
    fields: tuple[str, ...] = ()
    """For ``incompatible``: each field at fault with why, e.g. ``EventData.Reason: added
    without a default``; computed here, not by the registry."""
    level_was: str | None = None
    """When the check set the subject's level (it differed from the one asked): the level before."""


def subjects(settings: Any, schemas: SchemaSet) -> list[Subject]:
    """Every schema of ``schemas`` (``UnknownEvent`` too) with its topic and subject.

    Raises:
        ConfigError: the routing settings and the contract disagree.
    """
    table = RoutingTable.from_settings(settings, schemas.event_types)
    found = []
    for name in schemas:
        topic = table.route(name).topic
        found.append(Subject(name, topic, subject_name(schemas[name], topic), schemas[name]))
    return found


def registry_client(settings: Any) -> Any:
    """A ``SchemaRegistryClient`` for ``settings.schema_registry_url``.

    Raises:
        ConfigError: no registry URL is configured.
    """
    from confluent_kafka.schema_registry import SchemaRegistryClient

    if not settings.schema_registry_url:
        raise ConfigError("no Schema Registry: set RTCBUS_SCHEMA_REGISTRY_URL (or --schema-registry-url)")
    return SchemaRegistryClient.new_client({"url": settings.schema_registry_url, "timeout": 10})


def register(client: Any, found: Iterable[Subject], level: str | None = None) -> dict[str, int]:
    """Register each schema under its subject, and set the subject's compatibility level
    when ``level`` is given, so the registry enforces it on every later version.

    Returns:
        subject → schema id.

    Raises:
        InfrastructureError: the registry refused a schema or failed.
    """
    from confluent_kafka.schema_registry import Schema
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    ids = {}
    for subject in found:
        try:
            ids[subject.name] = client.register_schema(subject.name, Schema(subject.schema.schema_json, "AVRO"))
            if level is not None:
                client.set_compatibility(subject.name, level)
        except SchemaRegistryError as exc:
            raise InfrastructureError(f"{subject.name}: the Schema Registry refused it: {exc.error_message}") from exc
    return ids


def check(client: Any, found: Iterable[Subject], level: str | None = None) -> list[Verdict]:
    """Whether each schema may follow the latest version of its subject under ``level``
    (None: under the subject's own level).

    The registry judges by the subject's own compatibility level, so when ``level`` differs
    from it, it is set on the subject first (the registry then enforces it on later versions
    too; the verdict's ``level_was`` says so). A subject already at ``level`` is not written to.

    Raises:
        InfrastructureError: the registry failed or is unreachable.
    """
    from confluent_kafka.schema_registry import Schema
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    verdicts = []
    for subject in found:
        candidate = Schema(subject.schema.schema_json, "AVRO")
        try:
            latest = client.get_latest_version(subject.name)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                verdicts.append(Verdict(subject, "new"))
                continue
            raise InfrastructureError(f"{subject.name}: the Schema Registry failed: {exc}") from exc
        try:
            own = _level_of(client, subject.name)
            level_was = own if level is not None and level != own else None
            if level_was is not None:
                client.set_compatibility(subject.name, level)
            compatible = client.test_compatibility(subject.name, candidate)
        except SchemaRegistryError as exc:
            raise InfrastructureError(f"{subject.name}: the Schema Registry failed: {exc}") from exc
        if compatible:
            verdicts.append(Verdict(subject, "compatible", level_was=level_was))
        else:
            registered = json.loads(latest.schema.schema_str)
            fields = incompatible_fields(registered, dict(subject.schema.schema), level or own)
            verdicts.append(Verdict(subject, "incompatible", tuple(fields), level_was))
    return verdicts


def _level_of(client: Any, subject: str) -> str:
    """The level the registry judges ``subject`` by: its own, else the registry's default."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    try:
        return client.get_compatibility(subject)
    except SchemaRegistryError as exc:
        if exc.http_status_code != 404:
            raise
        return client.get_compatibility()


# -- which fields make two schemas incompatible -------------------------------------------------

_PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}


def incompatible_fields(registered: Mapping[str, Any], candidate: Mapping[str, Any], level: str) -> list[str]:
    """The fields that keep ``candidate`` from following ``registered`` under ``level``,
    each as ``<path>: <why>``; empty when this comparison finds nothing (the registry may
    still know better: it has the last word).

    BACKWARD: a reader of ``candidate`` must read what ``registered`` wrote; FORWARD the
    other way round; FULL both. The transitive levels are compared with the latest version.
    """
    base = level.removesuffix("_TRANSITIVE")
    problems: list[str] = []
    if base in ("BACKWARD", "FULL"):
        problems += _unreadable(candidate, registered, "", {}, {}, "the registered schema")
    if base in ("FORWARD", "FULL"):
        problems += _unreadable(registered, candidate, "", {}, {}, "the new schema")
    return list(dict.fromkeys(problems))


def _resolve(schema: Any, named: dict[str, Any], namespace: str = "") -> Any:
    """A named type's definition; records every definition met on the way."""
    if isinstance(schema, dict) and schema.get("type") in ("record", "enum", "fixed"):
        space = schema.get("namespace", namespace)
        full = schema["name"] if "." in schema["name"] or not space else f"{space}.{schema['name']}"
        named[full] = schema
        named.setdefault(schema["name"], schema)
        return schema
    if isinstance(schema, str) and schema in named:
        return named[schema]
    if isinstance(schema, str) and namespace and f"{namespace}.{schema}" in named:
        return named[f"{namespace}.{schema}"]
    return schema


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return schema["type"] if isinstance(schema["type"], str) else _kind(schema["type"])
    return schema


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return "[" + ", ".join(_describe(branch) for branch in schema) + "]"
    if isinstance(schema, dict) and schema.get("type") in ("record", "enum", "fixed"):
        return schema["name"]
    if isinstance(schema, dict):
        return _kind(schema)
    return str(schema)


def _unreadable(
    reader: Any, writer: Any, path: str, reader_named: dict, writer_named: dict, writer_label: str
) -> list[str]:
    """Why a reader of ``reader`` cannot read data written with ``writer``, field by field."""
    reader = _resolve(reader, reader_named)
    writer = _resolve(writer, writer_named)
    where = path or "the record"
    if isinstance(writer, list):
        # Every branch the writer may use must be readable.
        problems = []
        for branch in writer:
            problems += _unreadable(reader, branch, path, reader_named, writer_named, writer_label)
        return problems
    if isinstance(reader, list):
        if any(not _unreadable(branch, writer, path, dict(reader_named), dict(writer_named), writer_label) for branch in reader):
            return []
        return [f"{where}: type {_describe(writer)} in {writer_label} is not among {_describe(reader)}"]
    reader_kind, writer_kind = _kind(reader), _kind(writer)
    if reader_kind == "record" and writer_kind == "record":
        written = {field["name"]: field for field in writer["fields"]}
        problems = []
        for field in reader["fields"]:
            names = [field["name"], *field.get("aliases", [])]
            source = next((written[name] for name in names if name in written), None)
            field_path = f"{path}.{field['name']}" if path else field["name"]
            if source is None:
                if "default" not in field:
                    problems.append(f"{field_path}: not in {writer_label} and has no default")
                continue
            problems += _unreadable(field["type"], source["type"], field_path, reader_named, writer_named, writer_label)
        return problems
    if reader_kind == "enum" and writer_kind == "enum":
        missing = sorted(set(writer["symbols"]) - set(reader["symbols"]))
        if missing and "default" not in reader:
            return [f"{where}: symbols {', '.join(missing)} missing and no default"]
        return []
    if reader_kind == "array" and writer_kind == "array":
        return _unreadable(reader["items"], writer["items"], f"{path}[]", reader_named, writer_named, writer_label)
    if reader_kind == "map" and writer_kind == "map":
        return _unreadable(reader["values"], writer["values"], f"{path}{{}}", reader_named, writer_named, writer_label)
    if reader_kind in _PROMOTIONS.get(writer_kind, {writer_kind}):
        return []
    return [f"{where}: type {_describe(writer)} in {writer_label} cannot be read as {_describe(reader)}"]
