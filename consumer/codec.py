"""Avro encode and decode (fastavro), in one of two wire formats.

- **Single-object encoding** (the default; needs no registry): ``C3 01``, the 8-byte
  CRC-64-AVRO fingerprint of the schema's parsing canonical form (little-endian), then
  the Avro binary body. Byte-compatible with the Java library's ``BinaryMessageEncoder``,
  so any Avro library can decode it from the ``.avsc`` files in ``avro/``.
- **Confluent Schema Registry framing**: magic byte 0, 4-byte schema id, body, through
  confluent-kafka's ``AvroSerializer`` with ``TopicRecordNameStrategy``, because one
  domain topic carries several record types.

Schemas are parsed once, at construction; encoding a record does no schema work. The
single-object codec writes with writers compiled from each schema (:mod:`consumer.avro_writer`)
and leaves to fastavro every record they decline.

Encoding always writes the current contract. Decoding also reads single-object records written
with an earlier contract (``avro/history/``): the fingerprint names the old schema, which is the
writer, and the current one of the same name is the reader, so the record comes back in the
current shape.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any, Protocol

import fastavro
from fastavro.read import SchemaResolutionError

from consumer.avro_writer import compile_writer
from consumer.errors import EncodingError, InfrastructureError
from consumer.schemas import EventSchema, SchemaSet

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_HEADER_LENGTH = len(SINGLE_OBJECT_MAGIC) + 8
# What fastavro's writer raises for a record that does not fit its schema.
_WRITER_ERRORS = (ValueError, TypeError, KeyError, AttributeError, struct.error)
# What fastavro's reader raises for a body that does not decode (or resolve) with its schemas.
_READER_ERRORS = (ValueError, EOFError, IndexError, UnicodeDecodeError, SchemaResolutionError)


def _does_not_fit(name: str, record: Mapping[str, Any], exc: Exception) -> EncodingError:
    return EncodingError(
        f"{name}: record does not fit its schema: {exc}",
        event_type=record.get("EventType"),
        event_id=record.get("EventId"),
    )


class Codec(Protocol):
    """What the router and ``rtcbus tail`` need from a wire format."""

    def encode(self, name: str, record: Mapping[str, Any], topic: str) -> bytes:
        """Encode ``record`` with the schema ``name`` for ``topic``."""

    def decode(self, data: bytes, topic: str) -> dict[str, Any]:
        """Decode a value written by :meth:`encode`."""

    def schema_id(self, name: str, topic: str) -> str:
        """What identifies the writer schema on the wire, for a record header."""


class SingleObjectCodec:
    """Avro single-object encoding; needs no registry.

    Args:
        schemas: the contract.
        compiled_writers: write with writers compiled from the schemas, fastavro only for
            what they decline (False: fastavro alone, as a reference).
    """

    def __init__(self, schemas: SchemaSet, *, compiled_writers: bool = True) -> None:
        self._headers = {
            name: SINGLE_OBJECT_MAGIC + schema.fingerprint for name, schema in schemas.items()
        }
        self._parsed = {name: schema.parsed for name, schema in schemas.items()}
        self._ids = {name: schema.fingerprint.hex() for name, schema in schemas.items()}
        self._optional_records = {
            name: _optional_records(schema.parsed) for name, schema in schemas.items()
        }
        # Tried first; fastavro writes what they decline, and says why a record does not fit.
        self._writers = {
            name: compile_writer(schema.parsed) if compiled_writers else None
            for name, schema in schemas.items()
        }
        # fingerprint -> (what to call it in an error, writer schema, reader schema)
        self._readers = {
            fingerprint: (
                f"{writer.name} (avro/history/{writer.history})" if writer.history else writer.name,
                writer.parsed,
                schemas[writer.name].parsed,
            )
            for fingerprint, writer in schemas.writers.items()
        }

    def encode(self, name: str, record: Mapping[str, Any], topic: str = "") -> bytes:
        """Raises:
            EncodingError: the record does not fit the schema.
        """
        writer = self._writers[name]
        if writer is not None:
            out = bytearray(self._headers[name])
            try:
                writer(record, out)
            except Exception:  # Declined, or text that is not UTF-8: fastavro decides below
                pass
            else:
                return bytes(out)
        buffer = io.BytesIO()
        buffer.write(self._headers[name])
        optional = self._optional_records[name]
        if optional:
            # fastavro picks a union's branch by validating the value against each one, a
            # record branch field by field; its tuple notation names the branch instead.
            # For the Source lineage every record carries, that is a fifth of encode's time.
            record = dict(record)
            for field, record_name in optional:
                if isinstance(record.get(field), Mapping):
                    record[field] = (record_name, record[field])
        try:
            fastavro.schemaless_writer(buffer, self._parsed[name], record)
        except _WRITER_ERRORS as exc:
            raise _does_not_fit(name, record, exc) from exc
        return buffer.getvalue()

    def decode(self, data: bytes, topic: str = "") -> dict[str, Any]:
        """Decode a record written with the current contract or an earlier one; either way
        it comes back in the current shape (fields an old writer lacked get their defaults).

        Raises:
            EncodingError: not single-object encoded, or written with an unknown schema, or
                a body that does not decode with it.
        """
        if data[:2] != SINGLE_OBJECT_MAGIC or len(data) < _HEADER_LENGTH:
            raise EncodingError("not Avro single-object encoding (no C3 01 header)")
        reader = self._readers.get(data[2:_HEADER_LENGTH])
        if reader is None:
            raise EncodingError(f"unknown schema fingerprint {data[2:_HEADER_LENGTH].hex()}")
        label, writer_schema, reader_schema = reader
        try:
            return fastavro.schemaless_reader(
                io.BytesIO(data[_HEADER_LENGTH:]), writer_schema, reader_schema
            )
        except _READER_ERRORS as exc:
            raise EncodingError(f"{label}: body does not decode: {exc}") from exc

    def schema_id(self, name: str, topic: str = "") -> str:
        return self._ids[name]


def _optional_records(parsed: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The top-level fields of a parsed record schema whose type is ``["null", <record>]``,
    with the record's full name."""
    found = []
    for field in parsed["fields"]:
        branches = field["type"]
        if isinstance(branches, list) and len(branches) == 2 and "null" in branches:
            other = branches[1] if branches[0] == "null" else branches[0]
            if isinstance(other, Mapping) and other.get("type") == "record":
                found.append((field["name"], other["name"]))
            elif isinstance(other, str) and other in parsed.get("__named_schemas", {}):
                found.append((field["name"], other))
    return tuple(found)


def subject_name_strategy():
    """The subject naming of the Confluent wire format: ``TopicRecordNameStrategy``
    (``<topic>-<record full name>``), because one domain topic carries several record types."""
    from confluent_kafka.schema_registry import topic_record_subject_name_strategy

    return topic_record_subject_name_strategy


def subject_name(schema: EventSchema, topic: str) -> str:
    """The subject :class:`ConfluentCodec` registers ``schema`` under when it writes to ``topic``."""
    from confluent_kafka.serialization import MessageField, SerializationContext

    # fastavro's parsed schema carries the full name, as the serializer reads it.
    return subject_name_strategy()(SerializationContext(topic, MessageField.VALUE), schema.parsed["name"])


class ConfluentCodec:
    """Confluent Schema Registry framing with ``TopicRecordNameStrategy``.

    Args:
        schemas: the contract.
        registry_url: the registry, or ``mock://<scope>`` for confluent-kafka's in-memory one.
        registry_config: further ``SchemaRegistryClient`` settings (auth, TLS).
    """

    def __init__(
        self,
        schemas: SchemaSet,
        registry_url: str,
        registry_config: Mapping[str, Any] | None = None,
    ) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer

        # new_client() also understands ``mock://``, confluent-kafka's in-memory registry.
        self.registry = SchemaRegistryClient.new_client(
            {"url": registry_url, **(registry_config or {})}
        )
        conf = {
            "auto.register.schemas": True,
            "subject.name.strategy": subject_name_strategy(),
        }
        self._serializers = {
            name: AvroSerializer(self.registry, schema.schema_json, conf=conf)
            for name, schema in schemas.items()
        }
        self._deserializer = AvroDeserializer(self.registry)
        self._schema_ids: dict[tuple[str, str], str] = {}

    def encode(self, name: str, record: Mapping[str, Any], topic: str) -> bytes:
        from confluent_kafka.serialization import MessageField, SerializationContext

        import httpx
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            data = self._serializers[name](record, SerializationContext(topic, MessageField.VALUE))
        except _WRITER_ERRORS as exc:
            raise _does_not_fit(name, record, exc) from exc
        except SchemaRegistryError as exc:
            # A 4xx (say, an incompatible schema) will fail for this record however often it
            # is retried; a 5xx or no answer is the registry's outage, not the record's fault.
            if 400 <= exc.http_status_code < 500:
                raise EncodingError(
                    f"{name}: the Schema Registry refused the schema: {exc.error_message}",
                    event_type=record.get("EventType"),
                    event_id=record.get("EventId"),
                ) from exc
            raise InfrastructureError(f"the Schema Registry failed: {exc}") from exc
        except (OSError, httpx.TransportError) as exc:  # no answer at all
            raise InfrastructureError(f"the Schema Registry is unreachable: {exc}") from exc
        self._schema_ids.setdefault((name, topic), str(struct.unpack(">I", data[1:5])[0]))
        return data

    def decode(self, data: bytes, topic: str) -> dict[str, Any]:
        from confluent_kafka.serialization import MessageField, SerializationContext

        if data[:1] != b"\x00" or len(data) < 5:
            raise EncodingError("not Confluent Schema Registry framing (no magic byte 0)")
        return self._deserializer(data, SerializationContext(topic, MessageField.VALUE))

    def schema_id(self, name: str, topic: str) -> str:
        return self._schema_ids.get((name, topic), "")


def codec_from_settings(settings: Any, schemas: SchemaSet) -> Codec:
    """The codec the settings ask for."""
    if settings.wire_format == "confluent":
        return ConfluentCodec(schemas, settings.schema_registry_url)
    return SingleObjectCodec(schemas)
