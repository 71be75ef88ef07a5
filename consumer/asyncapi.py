"""The bus as an AsyncAPI 3.0 document, for subscribers' tooling (``rtcbus asyncapi``).

Pure: settings in, a dict out. Nothing in it is a table of its own: the topics come from the
routing table and the settings' topic names, the messages from the Avro contract (one per
EventType, its schema inline), the partitions and topic configuration from
:func:`consumer.kafka.admin.topic_specs`, the header names from :mod:`consumer.envelope`, the
key from its key policy, the wire format from the codec and the settings. What the document
adds is prose: what each header means, how to read a value.

The Avro schemas are given as the contract has them, with each named type's full name split
into ``name`` and ``namespace``: AsyncAPI's Avro meta-schema refuses a dotted ``name``, which
is how fastavro writes a loaded schema (``rtcbus.RoomCreate``). The two forms are the same
Avro schema, with the same fingerprint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import consumer
from consumer.codec import SINGLE_OBJECT_MAGIC, subject_name
from consumer.envelope import (
    HEADER_APP_ID,
    HEADER_ERROR_CLASS,
    HEADER_ERROR_FIELD,
    HEADER_ERROR_MESSAGE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_RECEIVED_AT,
    HEADER_REMOTE,
    HEADER_SCHEMA,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    HEADER_TRUNCATED,
    HEADER_VERSION,
    KEY_FALLBACK,
    KEY_FIELDS,
    REQUIRED_FIELDS,
    SIGNATURE_FIELDS,
)
from consumer.errors import ConfigError
from consumer.kafka.admin import topic_specs
from consumer.routing import UNKNOWN_DOMAIN, RoutingTable
from consumer.schemas import UNKNOWN_EVENT, SchemaSet, contract
from consumer.settings import Settings

ASYNCAPI_VERSION = "3.0.0"
AVRO_SCHEMA_FORMAT = "application/vnd.apache.avro+json;version=1.9.0"
KAFKA_BINDING_VERSION = "0.5.0"
# The content type Avro's own specification gives binary-encoded Avro (its HTTP transport).
AVRO_CONTENT_TYPE = "avro/binary"
# codec.subject_name_strategy() (confluent-kafka's topic_record_subject_name_strategy), by the
# name the Java serdes and the Kafka binding use for it; the subjects themselves come from the codec.
CONFLUENT_LOOKUP_STRATEGY = "TopicRecordNameStrategy"

# Channel ids of the topics that are no domain's.
RAW_CHANNEL = "callbacks.raw"
DLQ_CHANNEL = "callbacks.dlq"
QUARANTINE_CHANNEL = "callbacks.quarantine"
# Message ids of the records that are no EventType's.
CALLBACK_MESSAGE = "Callback"
DEAD_LETTER_MESSAGE = "DeadLetter"
QUARANTINED_MESSAGE = "QuarantinedCallback"

_HEADER_DOCS = {
    HEADER_EVENT_TYPE: "The callback's EventType, as received.",
    HEADER_EVENT_ID: "The callback's EventId: deduplicate on it.",
    HEADER_APP_ID: "The callback's AppId.",
    HEADER_VERSION: "The callback's Version (the callback format).",
    HEADER_RECEIVED_AT: "When the shim received the callback: epoch milliseconds, decimal.",
    HEADER_SCHEMA: (
        "The writer schema: the CRC-64-AVRO fingerprint in hex (single-object encoding), or "
        "the Schema Registry id in decimal (Confluent framing)."
    ),
    HEADER_ERROR_CLASS: "Why the record was dead-lettered: the error's class (ValidationError...).",
    HEADER_ERROR_MESSAGE: "Why, for a person: the error's message.",
    HEADER_ERROR_FIELD: "The field at fault, if one is (empty otherwise).",
    HEADER_SOURCE_TOPIC: "The raw record's topic.",
    HEADER_SOURCE_PARTITION: "The raw record's partition, decimal.",
    HEADER_SOURCE_OFFSET: "The raw record's offset, decimal.",
    HEADER_TRUNCATED: (
        "Present only when the dead letter was cut to fit the topic: what was cut, "
        "comma-separated (value, header:<name>, headers, key)."
    ),
    HEADER_REMOTE: "The address of the client that sent the callback.",
}
_RAW_HEADERS = (HEADER_EVENT_TYPE, HEADER_EVENT_ID, HEADER_APP_ID, HEADER_VERSION, HEADER_RECEIVED_AT)
_DOMAIN_HEADERS = (HEADER_EVENT_TYPE, HEADER_EVENT_ID, HEADER_SCHEMA)
_REASON_HEADERS = (
    HEADER_ERROR_CLASS, HEADER_ERROR_MESSAGE, HEADER_ERROR_FIELD,
    HEADER_SOURCE_TOPIC, HEADER_SOURCE_PARTITION, HEADER_SOURCE_OFFSET,
)
_QUARANTINE_HEADERS = (HEADER_ERROR_MESSAGE, HEADER_RECEIVED_AT)
# Copied from the body when it has them, as on a raw record.
_QUARANTINE_OPTIONAL = (HEADER_REMOTE, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_APP_ID, HEADER_VERSION)

# librdkafka's sasl.mechanism → the AsyncAPI security scheme type.
_SASL_SCHEMES = {
    "PLAIN": "plain",
    "SCRAM-SHA-256": "scramSha256",
    "SCRAM-SHA-512": "scramSha512",
    "GSSAPI": "gssapi",
}
_SAFE_ID = re.compile(r"[^\w.\-]")


def to_asyncapi(settings: Settings, schemas: SchemaSet | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the topics these settings describe.

    Args:
        settings: with ``bootstrap_servers`` resolved (the CLI puts in the local Kafka's
            address when it is unset).
        schemas: the contract (default: ``avro/``).

    Raises:
        ConfigError: no bootstrap servers, or the routing table and the contract disagree.
    """
    if not settings.bootstrap_servers:
        raise ConfigError("the AsyncAPI document needs the bootstrap servers")
    schemas = schemas or contract()
    routing = RoutingTable.from_settings(settings, schemas.event_types)
    specs = {spec.name: spec for spec in topic_specs(settings, broker_count=1)}
    messages = _messages(settings, schemas, routing)

    # Several domains may share a topic (settings.topics); the channel is the topic's.
    domains_of: dict[str, list[str]] = {}
    for domain, topic in routing.domains.items():
        domains_of.setdefault(topic, []).append(domain)
    members: dict[str, list[str]] = {topic: [] for topic in domains_of}
    for event_type in routing.event_types:
        members[routing.route(event_type).topic].append(event_type)
    members[routing.domains[UNKNOWN_DOMAIN]].append(UNKNOWN_EVENT)

    channels: dict[str, Any] = {}
    for topic in routing.topics():
        domains = sorted(domains_of[topic])
        description = (
            f"The domain topic of {', '.join(domains)}: one Avro record per event, keyed "
            "like the raw record, in the raw topic's order per key."
        )
        channels[_SAFE_ID.sub("_", "_".join(domains))] = _channel(
            topic, ", ".join(domains), description, members[topic], specs
        )
    for channel_id, topic, message, description in (
        (RAW_CHANNEL, settings.raw_topic, CALLBACK_MESSAGE,
         "Every callback the shim accepted, byte for byte, before routing."),
        (DLQ_CHANNEL, settings.dlq_topic, DEAD_LETTER_MESSAGE,
         "Raw records the router could not turn into a domain record, with the reason."),
        (QUARANTINE_CHANNEL, settings.quarantine_topic, QUARANTINED_MESSAGE,
         "Callbacks the shim refused for their signature, kept for `rtcbus quarantine redrive`; "
         "never routed."),
    ):
        if channel_id in channels:
            raise ConfigError(f"a domain's channel would be called {channel_id!r}; rename the domain")
        channels[channel_id] = _channel(topic, channel_id, description, [message], specs)

    operations = {
        f"receive.{channel_id}": {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Read {channel['address']}.",
            "description": (
                "Read with isolation.level=read_committed: the router writes in Kafka "
                "transactions, and an aborted transaction's records must not be seen."
            ),
            "messages": [
                {"$ref": f"#/channels/{channel_id}/messages/{name}"} for name in channel["messages"]
            ],
        }
        for channel_id, channel in channels.items()
    }

    servers, security_schemes = _servers(settings)
    components: dict[str, Any] = {"messages": messages}
    if security_schemes:
        components["securitySchemes"] = security_schemes
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "rtcbus",
            "version": consumer.__version__,
            "description": (
                f"{(consumer.__doc__ or '').strip()}\n\n"
                f"Domain records: {_wire_format(settings)} Records are keyed by {KEY_FIELDS[0]} where "
                "the event has one, so a room's events keep their order within a partition."
            ),
        },
        "defaultContentType": AVRO_CONTENT_TYPE,
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": components,
    }


# -- servers ------------------------------------------------------------------------------------


def _servers(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """One server per bootstrap address, and the security schemes they name.

    Only ``security.protocol`` and ``sasl.mechanism`` are read from the Kafka properties;
    no other value of them is ever put in the document.
    """
    config = settings.kafka_config
    security_protocol = _plain(config.get("security.protocol")) or "PLAINTEXT"
    protocol = "kafka-secure" if "SSL" in security_protocol.upper() else "kafka"
    schemes: dict[str, Any] = {}
    if security_protocol.upper().startswith("SASL_"):
        # librdkafka's default mechanism is GSSAPI.
        mechanism = (
            _plain(config.get("sasl.mechanism")) or _plain(config.get("sasl.mechanisms")) or "GSSAPI"
        ).upper()
        scheme = _SASL_SCHEMES.get(mechanism)
        if scheme:
            schemes["sasl"] = {"type": scheme, "description": f"SASL {mechanism} ({security_protocol})."}
    if security_protocol.upper() in ("SSL", "SASL_SSL") and any(
        key in config
        for key in ("ssl.certificate.location", "ssl.certificate.pem", "ssl.keystore.location")
    ):
        schemes["tls-client"] = {"type": "X509", "description": "A TLS client certificate."}

    registry = _registry_binding(settings)
    servers: dict[str, Any] = {}
    addresses = [part.strip() for part in (settings.bootstrap_servers or "").split(",") if part.strip()]
    for number, address in enumerate(addresses, 1):
        server: dict[str, Any] = {
            "host": address,
            "protocol": protocol,
            "description": f"A Kafka bootstrap server; security.protocol {security_protocol}.",
        }
        if schemes:
            server["security"] = [{"$ref": f"#/components/securitySchemes/{name}"} for name in schemes]
        if registry:
            server["bindings"] = {"kafka": registry}
        servers["kafka" if len(addresses) == 1 else f"kafka-{number}"] = server
    return servers, schemes


def _registry_binding(settings: Settings) -> dict[str, Any] | None:
    if settings.wire_format != "confluent" or not settings.schema_registry_url:
        return None
    # A URL may carry credentials (https://user:password@host); they stay out of the document.
    parts = urlsplit(settings.schema_registry_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return {
        "schemaRegistryUrl": urlunsplit((parts.scheme, netloc, parts.path, "", "")),
        "schemaRegistryVendor": "confluent",
        "bindingVersion": KAFKA_BINDING_VERSION,
    }


def _plain(value: Any) -> str:
    """A Kafka property that is no secret, as text."""
    if value is None:
        return ""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


# -- channels ------------------------------------------------------------------------------------


def _channel(
    topic: str, title: str, description: str, message_names: list[str], specs: Mapping[str, Any]
) -> dict[str, Any]:
    spec = specs[topic]
    configuration: dict[str, Any] = {}
    for name in ("retention.ms", "retention.bytes", "max.message.bytes"):
        if name in spec.config:
            configuration[name] = int(spec.config[name])
    if "cleanup.policy" in spec.config:
        configuration["cleanup.policy"] = spec.config["cleanup.policy"].split(",")
    return {
        "address": topic,
        "title": title,
        "description": description,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in message_names},
        "bindings": {
            "kafka": {
                "partitions": spec.partitions,
                "topicConfiguration": configuration,
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


# -- messages ------------------------------------------------------------------------------------


def _messages(settings: Settings, schemas: SchemaSet, routing: RoutingTable) -> dict[str, Any]:
    messages: dict[str, Any] = {}
    for name, schema in schemas.items():
        data_fields = schema.data_fields
        key_fields = [f"EventData.{field}" for field in KEY_FIELDS if field in data_fields]
        key_fields += list(KEY_FALLBACK)
        message: dict[str, Any] = {
            "name": name,
            "title": name,
            "summary": schema.schema.get("doc", name),
            "description": _wire_format(settings),
            "contentType": AVRO_CONTENT_TYPE,
            "headers": _headers(_DOMAIN_HEADERS),
            "payload": {"schemaFormat": AVRO_SCHEMA_FORMAT, "schema": to_avro_names(schema.schema)},
            "bindings": {"kafka": _value_binding(settings, _key(key_fields))},
        }
        if settings.wire_format == "confluent":
            message["x-rtcbus-subject"] = subject_name(schema, routing.route(name).topic)
        else:
            message["x-rtcbus-fingerprint"] = schema.fingerprint.hex()
        messages[name] = message

    raw_key = _key([*KEY_FIELDS, *KEY_FALLBACK])
    envelope = {
        "type": "object",
        "description": "The callback envelope; EventData is a JSON string (or, from some senders, an object).",
        "required": list(REQUIRED_FIELDS),
        "properties": {
            name: {"type": ["string", "object"]} if name == "EventData" else {"type": "string"}
            for name in (*REQUIRED_FIELDS, *SIGNATURE_FIELDS)
        },
    }
    messages[CALLBACK_MESSAGE] = {
        "name": CALLBACK_MESSAGE,
        "title": "A raw callback",
        "summary": "The callback body, byte for byte as the shim received it.",
        "contentType": "application/json",
        "headers": _headers(_RAW_HEADERS),
        "payload": envelope,
        "bindings": {"kafka": {"key": raw_key, "bindingVersion": KAFKA_BINDING_VERSION}},
    }
    messages[DEAD_LETTER_MESSAGE] = {
        "name": DEAD_LETTER_MESSAGE,
        "title": "A dead letter",
        "summary": "A raw record the router could not route: its bytes, the reason and where it came from.",
        "description": (
            "The value is the raw record's bytes (cut, or absent, if they would not fit: see "
            f"{HEADER_TRUNCATED}), with the raw record's key and headers; the {HEADER_SOURCE_TOPIC}, "
            f"{HEADER_SOURCE_PARTITION} and {HEADER_SOURCE_OFFSET} headers find the original."
        ),
        "contentType": "application/octet-stream",
        "headers": _headers(_REASON_HEADERS, optional=(*_RAW_HEADERS, HEADER_TRUNCATED)),
        "payload": {"type": ["string", "null"], "description": "The raw record's value, as bytes."},
        "bindings": {"kafka": {"key": raw_key, "bindingVersion": KAFKA_BINDING_VERSION}},
    }
    messages[QUARANTINED_MESSAGE] = {
        "name": QUARANTINED_MESSAGE,
        "title": "A quarantined callback",
        "summary": "A body the shim refused for its signature, byte for byte.",
        "contentType": "application/octet-stream",
        "headers": _headers(_QUARANTINE_HEADERS, optional=_QUARANTINE_OPTIONAL),
        "payload": {"type": "string", "description": "The request body as received, as bytes."},
        "bindings": {
            "kafka": {
                "key": {"type": ["string", "null"], "description": "The body's EventId, if it has one."},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }
    return messages


def _key(fields: list[str]) -> dict[str, Any]:
    return {
        "type": "string",
        "description": "The first of these that is not empty: " + ", ".join(fields) + ".",
    }


def _headers(required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    names = list(dict.fromkeys((*required, *optional)))
    return {
        "type": "object",
        "description": "Kafka record headers; every value is UTF-8 text.",
        "required": list(required),
        "properties": {name: {"type": "string", "description": _HEADER_DOCS[name]} for name in names},
    }


def _value_binding(settings: Settings, key: dict[str, Any]) -> dict[str, Any]:
    binding: dict[str, Any] = {"key": key}
    if settings.wire_format == "confluent":
        binding.update(
            schemaIdLocation="payload",
            schemaIdPayloadEncoding="confluent",
            schemaLookupStrategy=CONFLUENT_LOOKUP_STRATEGY,
        )
    binding["bindingVersion"] = KAFKA_BINDING_VERSION
    return binding


def _wire_format(settings: Settings) -> str:
    if settings.wire_format == "confluent":
        return (
            "Confluent Schema Registry framing: a zero byte, the 4-byte big-endian schema id, "
            f"then the Avro binary body; subjects by {CONFLUENT_LOOKUP_STRATEGY} "
            "(<topic>-<record full name>; x-rtcbus-subject)."
        )
    magic = SINGLE_OBJECT_MAGIC.hex(" ").upper()
    return (
        f"Avro single-object encoding: {magic}, the 8-byte CRC-64-AVRO fingerprint of the "
        "schema's parsing canonical form (little-endian; x-rtcbus-fingerprint), then the Avro "
        "binary body. No registry is needed: the schema is the payload's."
    )


# -- Avro names ------------------------------------------------------------------------------------

_NAMED_TYPES = frozenset({"record", "enum", "fixed", "error"})


def to_avro_names(schema: Any) -> Any:
    """``schema`` with every named type's full name split into ``name`` and ``namespace``.

    References to named types (``"rtcbus.Source"``) stay full names, which the meta-schema
    allows and which resolve the same.
    """
    if isinstance(schema, list):
        return [to_avro_names(branch) for branch in schema]
    if not isinstance(schema, Mapping):
        return schema
    copy = {key: to_avro_names(value) for key, value in schema.items()}
    kind, name = copy.get("type"), copy.get("name")
    if isinstance(kind, str) and kind in _NAMED_TYPES and isinstance(name, str) and "." in name:
        copy["namespace"], _, copy["name"] = name.rpartition(".")
    return copy
