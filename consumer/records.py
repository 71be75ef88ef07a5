"""Avro-ready records straight from a callback's bytes: the router's lean path.

The typed pydantic models of :mod:`consumer.events` stay the API for subscribers and the
reference for what a valid callback is. Validating into them and dumping them costs more
per record than the rest of the router's step together, so the router first asks this
module: msgspec decodes and validates the JSON bytes in one pass in C, into Structs
generated at start-up from the same Avro schemas, and hands the encoder plain dicts.

It decides only where its answer is certainly the pydantic path's: every field of the
exact JSON type the schema names (a string for a string, an integer in range for an
int or a long, an object for a record), no duplicate key, and of the sender quirks only
the two the workload shows, each handled as pydantic handles it: an int or long field sent
as a plain decimal string (``"SampleRate": "44100"``), and EventData fields the schema does
not know (kept in ``ExtraFields`` as JSON text). For anything else (another coercion, an
unknown field deeper down, an unknown EventType, EventData sent as an object, broken input
of any kind) it returns None, and the caller takes the pydantic path, which coerces what
it can and words every dead letter. So a valid callback's record is the same either way,
and every dead letter is the pydantic path's.

Pure: no Kafka, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Optional

import msgspec

from consumer.envelope import (
    REQUIRED_FIELDS,
    SIGNATURE_FIELDS,
    Envelope,
    parse_envelope,
    parse_event_time,
    partition_key,
)
from consumer.errors import ValidationError
from consumer.events import Source, to_json_text
from consumer.schemas import SchemaSet

# What the Avro record holds beside EventData: the lean path builds exactly these.
_TOP_LEVEL = ("EventId", "EventType", "EventTime", "AppId", "Version", "EventData", "Source", "ExtraFields")
_SCALARS: Mapping[str, Any] = {
    "string": str,
    "int": Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)],
    "long": Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
}
# An int sent as a string: only a plain decimal, whose value pydantic reads as int() does.
_DECIMAL = Annotated[str, msgspec.Meta(pattern=r"^(-?[1-9][0-9]{0,18}|0)$")]
_INT_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
# A required envelope field must be a non-empty string (parse_envelope's rule).
_REQUIRED_TEXT = Annotated[str, msgspec.Meta(min_length=1)]
# gc=False: these Structs hold only strings, numbers, lists and dicts, never a cycle, so the
# collector need not track the one made for every record. omit_defaults: see _unique_keys.
_STRUCT_OPTIONS = {"forbid_unknown_fields": True, "omit_defaults": True, "gc": False, "kw_only": True}

LeanEnvelope = msgspec.defstruct(
    "LeanEnvelope",
    [(name, _REQUIRED_TEXT) for name in REQUIRED_FIELDS]
    + [(name, str, "") for name in SIGNATURE_FIELDS],
    **_STRUCT_OPTIONS,
)
LeanEnvelope.__doc__ = """The callback envelope as the lean path decoded it: the vendor's field names."""


# EventData with more containers than this takes the strict parser for its key: json and
# msgspec both stop at the interpreter's recursion limit, but not at the same depth.
_KEY_MAX_CONTAINERS = 100


class EnvelopeDecoder:
    """The callback envelope from a body's bytes, as :func:`consumer.envelope.parse_envelope`
    reads it, at a fraction of its cost: msgspec decodes where that is certain to be the
    strict parser's answer, and the strict parser decides the rest (and words every refusal).

    Shared by the shim (the envelope and the record key of every request) and the router's
    lean path (:class:`RecordDecoder`).
    """

    def __init__(self) -> None:
        self._decode = msgspec.json.Decoder(LeanEnvelope).decode
        self._encode = msgspec.json.Encoder().encode

    def lean(self, body: bytes) -> tuple[Any, int] | None:
        """The envelope of ``body`` as a :data:`LeanEnvelope` and its EventTime in epoch
        milliseconds, or None where :func:`consumer.envelope.parse_envelope` must decide
        (it may refuse the body, or accept it with extra fields or EventData as an object).

        Everything ``parse_envelope`` checks is checked here: strict UTF-8 and JSON (msgspec
        refuses NaN, Infinity, numbers out of range, a byte order mark, lone surrogates and
        raw control characters in strings, as the strict parser does), every field a string,
        the required ones non-empty, no unknown field, no duplicate key."""
        try:
            envelope = self._decode(body)
            event_time_ms = parse_event_time(envelope.EventTime)
        except Exception:  # any doubt at all: the strict parser decides, and says why
            return None
        if not _unique_keys(body, self._encode(envelope), b":", b"\\u003"):
            return None
        return envelope, event_time_ms

    def parse(self, body: bytes) -> tuple[Envelope, str]:
        """``parse_envelope(body)`` and that envelope's ``key()``: the same values, and the
        same :class:`consumer.errors.ValidationError` for a body it refuses.

        Raises:
            ValidationError: as ``parse_envelope``.
        """
        lean = self.lean(body)
        if lean is None:
            envelope = parse_envelope(body)
            return envelope, envelope.key()
        fields, event_time_ms = lean
        envelope = Envelope(
            event_type=fields.EventType,
            event_data_text=fields.EventData,
            event_time=fields.EventTime,
            event_time_ms=event_time_ms,
            event_id=fields.EventId,
            app_id=fields.AppId,
            version=fields.Version,
            nonce=fields.Nonce,
            signature=fields.Signature,
        )
        return envelope, self._key(envelope)

    def _key(self, envelope: Envelope) -> str:
        """``envelope.key()``: EventData decoded by msgspec where its reading is certainly
        the strict parser's (unique keys, nesting far from the recursion limit), else by
        the strict parser, which also decides what a broken EventData gets."""
        text = envelope.event_data_text
        if text.count("{") + text.count("[") <= _KEY_MAX_CONTAINERS:
            try:
                data = msgspec.json.decode(text)
            except Exception:  # not JSON as msgspec reads it: the strict parser decides
                data = None
            if type(data) is dict and _unique_keys(text, self._encode(data), ":", "\\u003"):
                return partition_key(data, envelope.app_id, envelope.event_id)
        return envelope.key()


class _Unsupported(Exception):
    """A schema construct the lean path does not model: that EventType takes the pydantic path."""


class RecordDecoder:
    """Decodes callback bytes into Avro records where that is certain; built once.

    Args:
        schemas: the contract; an EventType whose schema uses what this decoder does not
            model (floats, booleans, enums, unions of several types…) is always left to
            the pydantic path.
    """

    def __init__(self, schemas: SchemaSet) -> None:
        self._envelopes = EnvelopeDecoder()
        self._encode = msgspec.json.Encoder().encode
        self._structs: dict[str, type[msgspec.Struct]] = {}
        self._data: dict[str, msgspec.json.Decoder] = {}
        self._data_structs: dict[str, type[msgspec.Struct]] = {}
        for event_type in schemas.event_types:
            parsed = schemas[event_type].parsed
            try:
                struct = self._event_data(parsed)
            except _Unsupported:
                continue
            self._data_structs[event_type] = struct
            self._data[event_type] = msgspec.json.Decoder(struct)

    @property
    def event_types(self) -> frozenset[str]:
        """The EventTypes this decoder can decide."""
        return frozenset(self._data)

    def envelope(self, body: bytes) -> tuple[Any, int] | None:
        """The envelope of ``body`` as a :data:`LeanEnvelope` and its EventTime in epoch
        milliseconds, or None where :func:`consumer.envelope.parse_envelope` must decide
        (it may refuse the body, or accept it with extra fields or EventData as an object).

        Everything ``parse_envelope`` checks is checked here, before the dedupe window is
        asked: a body it refuses is a dead letter even when its EventId was seen."""
        return self._envelopes.lean(body)

    def record(
        self, envelope: Any, event_time_ms: int, source: Source
    ) -> tuple[str, dict[str, Any]] | None:
        """``(schema name, Avro record)`` of an envelope :meth:`envelope` decoded, exactly
        what :meth:`consumer.events.EventModels.to_record` returns for it, or None where the
        pydantic path must decide."""
        decoder = self._data.get(envelope.EventType)
        if decoder is None:
            return None
        text = envelope.EventData
        extras: dict[str, str] = {}
        try:
            data = decoder.decode(text)
            unique = _unique_keys(text, self._encode(data), ":", "\\u003")
        except msgspec.ValidationError:  # perhaps fields the schema does not know
            try:
                data, extras, unique = self._with_extras(envelope.EventType, text)
            except Exception:  # e.g. an extra value nested too deeply to write as JSON text
                return None
            if data is None:
                return None
        except Exception:  # any doubt at all: the pydantic path decides, and says why
            return None
        if not unique:
            return None
        return envelope.EventType, {
            "EventId": envelope.EventId,
            "EventType": envelope.EventType,
            "EventTime": event_time_ms,
            "AppId": envelope.AppId,
            "Version": envelope.Version,
            # Fields left at their default are omitted; the encoder writes the default.
            "EventData": msgspec.to_builtins(data),
            "Source": source.to_avro(),
            "ExtraFields": extras,
        }

    def _with_extras(self, event_type: str, text: str) -> tuple[Any, dict[str, str], bool]:
        """EventData with fields its schema does not know: ``(Struct, ExtraFields, whether
        the keys were unique)``, or a None Struct where the pydantic path must decide."""
        struct = self._data_structs[event_type]
        try:
            document = msgspec.json.decode(text)
        except msgspec.MsgspecError:
            return None, {}, False
        if type(document) is not dict:
            return None, {}, False
        known = struct.__struct_fields__
        extras = {
            f"EventData.{key}": to_json_text(value) for key, value in document.items() if key not in known
        }
        if not extras:
            return None, {}, False
        try:
            data = msgspec.convert({k: v for k, v in document.items() if k in known}, struct)
        except msgspec.MsgspecError:
            return None, {}, False
        # Every key is in the document decoded as it came: the count needs no defaults.
        return data, extras, _unique_keys(text, self._encode(document), ":", "\\u003")

    # -- Structs from the Avro schemas ---------------------------------------------------------

    def _event_data(self, parsed: Mapping[str, Any]) -> type[msgspec.Struct]:
        fields = {field["name"]: field for field in parsed["fields"]}
        if tuple(fields) != _TOP_LEVEL:
            raise _Unsupported(parsed["name"])
        data = fields["EventData"]["type"]
        named = parsed.get("__named_schemas", {})
        if isinstance(data, str):
            data = named.get(data, data)
        if not isinstance(data, Mapping) or data.get("type") != "record":
            raise _Unsupported(parsed["name"])
        return self._struct(data, named)

    def _struct(self, record: Mapping[str, Any], named: Mapping[str, Any]) -> type[msgspec.Struct]:
        name = record["name"]
        if name not in self._structs:
            fields = []
            decimals: list[tuple[str, int, int]] = []
            for field in record["fields"]:
                annotation = self._annotation(field["type"], named)
                kind = _int_kind(field["type"])
                if kind is not None:
                    # A plain decimal string too; __post_init__ makes it the int.
                    annotation = annotation | _DECIMAL
                    decimals.append((field["name"], *_INT_RANGES[kind]))
                if "default" not in field:
                    fields.append((field["name"], annotation))
                    continue
                default = field["default"]
                if not (default is None or type(default) in (str, int)):
                    raise _Unsupported(f"{name}.{field['name']}: default {default!r}")
                fields.append((field["name"], annotation, default))
            namespace = {"__post_init__": _decimals_to_ints(tuple(decimals))} if decimals else None
            try:
                self._structs[name] = msgspec.defstruct(
                    name.rpartition(".")[2], fields, namespace=namespace, **_STRUCT_OPTIONS
                )
            except (TypeError, ValueError) as exc:  # a field name msgspec cannot take
                raise _Unsupported(name) from exc
        return self._structs[name]

    def _annotation(self, avro_type: Any, named: Mapping[str, Any]) -> Any:
        if isinstance(avro_type, str):
            if avro_type in _SCALARS:
                return _SCALARS[avro_type]
            if avro_type in named:
                return self._annotation(named[avro_type], named)
            raise _Unsupported(avro_type)
        if isinstance(avro_type, list):
            others = [member for member in avro_type if member != "null"]
            if len(avro_type) != 2 or len(others) != 1:
                raise _Unsupported(str(avro_type))
            return Optional[self._annotation(others[0], named)]  # noqa: UP007
        kind = avro_type["type"]
        if kind == "record":
            return self._struct(avro_type, named)
        if kind == "array":
            return list[self._annotation(avro_type["items"], named)]
        if kind == "map":
            return dict[str, self._annotation(avro_type["values"], named)]
        if kind in _SCALARS:  # a primitive with a logicalType: the model takes it as the primitive
            return _SCALARS[kind]
        raise _Unsupported(kind)


def _int_kind(avro_type: Any) -> str | None:
    """``int`` or ``long`` for a field of that type (optional or not, a logicalType on it
    included), else None."""
    if isinstance(avro_type, list):
        others = [member for member in avro_type if member != "null"]
        return _int_kind(others[0]) if len(others) == 1 else None
    if isinstance(avro_type, Mapping):
        avro_type = avro_type.get("type")
    return avro_type if avro_type in _INT_RANGES else None


def _decimals_to_ints(fields: tuple[tuple[str, int, int], ...]):
    """A ``__post_init__`` turning the decimal strings of ``(field, low, high)`` into ints,
    as pydantic's lax mode does; a value out of range fails the decode."""

    def __post_init__(self) -> None:
        for name, low, high in fields:
            value = getattr(self, name)
            if value.__class__ is str:
                value = int(value)
                if not low <= value <= high:
                    raise ValueError(f"{name} is out of range")
                setattr(self, name, value)

    return __post_init__


def _unique_keys(text, decoded, colon, colon_escape) -> bool:
    """Whether JSON ``text``, already decoded, had no duplicate key; ``decoded`` is what was
    decoded from it, encoded again.

    msgspec, like orjson and pydantic-core, keeps the last of duplicate keys without a
    word, and the protocol refuses them (which copy would the signer have meant?), so this
    check is ours. Every key is followed by one colon, and a colon outside a string is
    always a key's. A colon inside a string is written as itself in both texts unless it
    is escaped (``\\u003a``), which sends the record to the pydantic path. ``decoded`` holds
    every key of ``text`` once, less the fields left at their default (omit_defaults), and
    the values of the kept keys. So ``text`` has as many colons as ``decoded`` only if no
    key came twice; a field given explicitly at its default (a null) makes ``decoded``
    shorter, and the record takes the pydantic path, which is merely slower.
    """
    return colon_escape not in text and text.count(colon) == decoded.count(b":")
