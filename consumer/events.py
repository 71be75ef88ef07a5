"""One typed pydantic model per EventType, derived from the Avro contract.

The models are built from the ``.avsc`` files when first asked for, so models and schemas
cannot drift: a field added to a schema is a field of its model, with the same name,
type and optionality. (The alternative, a test comparing hand-written models with the
schemas field by field, would catch drift only after someone wrote it twice.)

Validation is lenient where senders are untidy, strict where it matters:

- numbers sent as strings are coerced (``"SampleRate": "44100"``), and numbers sent for
  string fields become strings;
- optional fields may be missing;
- fields the schema does not know are kept in ``ExtraFields`` (path → JSON text), never
  dropped;
- a required field that is absent, or a value that cannot be coerced (or does not fit
  Avro's int/long), raises :class:`consumer.errors.ValidationError` naming the EventType,
  the field and the value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, create_model

from consumer.envelope import Envelope
from consumer.errors import ValidationError
from consumer.schemas import UNKNOWN_EVENT, SchemaSet, contract

_INT32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
_INT64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
_PRIMITIVES: Mapping[str, Any] = {
    "string": str,
    "int": _INT32,
    "long": _INT64,
    "float": float,
    "double": float,
    "boolean": bool,
    "bytes": bytes,
    "null": type(None),
}
_LENIENT = ConfigDict(extra="allow", coerce_numbers_to_str=True)


@dataclass(frozen=True, slots=True)
class Source:
    """Where the router read a record: the lineage every domain record carries."""

    topic: str
    partition: int
    offset: int

    def to_avro(self) -> dict[str, Any]:
        return {"Topic": self.topic, "Partition": self.partition, "Offset": self.offset}


class EventModels:
    """The models of every EventType in a :class:`SchemaSet`, built once."""

    def __init__(self, schemas: SchemaSet) -> None:
        self._records: dict[str, type[BaseModel]] = {}
        self._nested: dict[type[BaseModel], tuple[str, ...]] = {}
        self._models = {
            name: self._record_model(schemas[name].schema) for name in schemas.event_types
        }
        if UNKNOWN_EVENT in schemas:  # for readers of the unknown topic: record_model(UNKNOWN_EVENT)
            self._record_model(schemas[UNKNOWN_EVENT].schema)

    def __getitem__(self, event_type: str) -> type[BaseModel]:
        return self._models[event_type]

    def __contains__(self, event_type: object) -> bool:
        return event_type in self._models

    def __iter__(self):
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def record_model(self, name: str) -> type[BaseModel]:
        """The model of a named record type of the contract, e.g. ``RecordFile``."""
        return self._records[name]

    # -- from a callback to an Avro-ready record -------------------------------------------------

    def validate(self, envelope: Envelope, source: Source | None = None) -> BaseModel:
        """The typed event of a known EventType.

        Raises:
            ValidationError: EventData is not a JSON object, a required field is missing,
                or a value cannot be coerced; the message names EventType, field and value.
            KeyError: the EventType is not known (callers route those to ``UnknownEvent``).
        """
        model = self._models[envelope.event_type]
        document = {
            "EventId": envelope.event_id,
            "EventType": envelope.event_type,
            "EventTime": envelope.event_time_ms,
            "AppId": envelope.app_id,
            "Version": envelope.version,
            "EventData": envelope.event_data(),
            "Source": source.to_avro() if source else None,
            # Given, not defaulted: pydantic deep-copies a mutable default for every instance.
            "ExtraFields": {},
        }
        try:
            return model.model_validate(document)
        except pydantic.ValidationError as exc:
            raise _describe(exc, envelope) from None

    def to_record(self, envelope: Envelope, source: Source | None = None) -> tuple[str, dict]:
        """The Avro record for a callback: ``(schema name, record dict)``.

        Known EventTypes are validated into their model; an EventType nobody knows yet
        becomes an ``UnknownEvent`` carrying EventData as JSON text, so nothing is lost.

        Raises:
            ValidationError: as :meth:`validate`.
        """
        extras = {key: to_json_text(value) for key, value in envelope.extra.items()}
        if envelope.event_type not in self._models:
            envelope.event_data()  # broken JSON is a bad record even for an unknown type
            record = {
                "EventId": envelope.event_id,
                "EventType": envelope.event_type,
                "EventTime": envelope.event_time_ms,
                "AppId": envelope.app_id,
                "Version": envelope.version,
                "EventData": envelope.event_data_text,
                "Source": source.to_avro() if source else None,
                "ExtraFields": extras,
            }
            return UNKNOWN_EVENT, record
        event = self.validate(envelope, source)
        self._collect_extras(event.EventData, "EventData", extras)
        record = event.model_dump()
        record["ExtraFields"] = extras
        return envelope.event_type, record

    # -- building the models --------------------------------------------------------------------

    def _record_model(self, record: Mapping[str, Any]) -> type[BaseModel]:
        name = record["name"].rpartition(".")[2]
        if name in self._records:
            return self._records[name]
        fields: dict[str, Any] = {}
        nested: list[str] = []
        for avro_field in record["fields"]:
            annotation = self._annotation(avro_field["type"])
            if _holds_record(avro_field["type"]):
                nested.append(avro_field["name"])
            default = avro_field["default"] if "default" in avro_field else ...
            fields[avro_field["name"]] = (annotation, Field(default, description=avro_field.get("doc")))
        model = create_model(name, __config__=_LENIENT, __doc__=record.get("doc"), **fields)
        self._records[name] = model
        self._nested[model] = tuple(nested)
        return model

    def _annotation(self, avro_type: Any) -> Any:
        if isinstance(avro_type, str):
            if avro_type in _PRIMITIVES:
                return _PRIMITIVES[avro_type]
            return self._records[avro_type.rpartition(".")[2]]  # a named type seen before
        if isinstance(avro_type, list):
            members = [self._annotation(member) for member in avro_type if member != "null"]
            union = members[0] if len(members) == 1 else Union[tuple(members)]  # noqa: UP007
            return Optional[union] if "null" in avro_type else union  # noqa: UP007
        kind = avro_type["type"]
        if kind == "record":
            return self._record_model(avro_type)
        if kind == "array":
            return list[self._annotation(avro_type["items"])]
        if kind == "map":
            return dict[str, self._annotation(avro_type["values"])]
        if kind == "enum":
            return str
        return self._annotation(kind)  # a primitive with a logicalType

    def _collect_extras(self, model: BaseModel, path: str, out: dict[str, str]) -> None:
        for key, value in (model.__pydantic_extra__ or {}).items():
            out[f"{path}.{key}"] = to_json_text(value)
        for name in self._nested[type(model)]:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                self._collect_extras(value, f"{path}.{name}", out)
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        self._collect_extras(item, f"{path}.{name}[{index}]", out)


@cache
def models() -> EventModels:
    """The models of the project's contract, built once per process."""
    return EventModels(contract())


def _holds_record(avro_type: Any) -> bool:
    if isinstance(avro_type, list):
        return any(_holds_record(member) for member in avro_type)
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "record":
            return True
        if kind == "array":
            return _holds_record(avro_type["items"])
        if kind == "map":
            return _holds_record(avro_type["values"])
        return False
    return avro_type not in _PRIMITIVES  # a reference to a named record


def _describe(exc: pydantic.ValidationError, envelope: Envelope) -> ValidationError:
    first = exc.errors(include_url=False)[0]
    path = ".".join(str(part) for part in first["loc"])
    value = first.get("input")
    shown = "absent" if first["type"] == "missing" else f"value {to_json_text(value)[:80]}"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ValidationError(
        f"{envelope.event_type}: {path}: {first['msg']}, {shown}{more}",
        field=path,
        event_type=envelope.event_type,
        event_id=envelope.event_id,
    )


def to_json_text(value: Any) -> str:
    """``value`` as the JSON text ``ExtraFields`` holds: compact, not ASCII-escaped."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
