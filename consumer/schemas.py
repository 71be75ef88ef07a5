"""The Avro contract in ``avro/``, loaded and parsed once.

Each ``<EventType>.avsc`` is one record; shared named types live beside them as
``rtcbus.<Name>.avsc``, which is where fastavro's ``load_schema`` looks them up. Everything
else (the pydantic models, the codec, ``rtcbus schemas list``) is derived from what this
module loads, so the ``.avsc`` files stay the single source of truth.

Earlier contracts are kept in ``avro/history/v<N>/`` (same layout): records on the topics were
written with them, so their schemas are loaded too, as writers known by fingerprint only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import fastavro.schema

from consumer.errors import ConfigError

UNKNOWN_EVENT = "UnknownEvent"
HISTORY_DIR = "history"
ENVELOPE_FIELDS = ("EventId", "EventType", "EventTime", "AppId", "Version")


def contract_dir() -> Path:
    """Where ``avro/`` is: inside the installed wheel, or at the top of a source checkout."""
    packaged = Path(__file__).parent / "_avro"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "avro"


@dataclass(frozen=True)
class EventSchema:
    """One EventType's record schema.

    Attributes:
        name: the EventType (or ``UnknownEvent``).
        schema: the self-contained schema, shared types inlined where first used; this is
            what a Schema Registry is given.
        parsed: the same, parsed by fastavro, ready for its writer and reader.
        fingerprint: the 8-byte CRC-64-AVRO fingerprint of the parsing canonical form, in
            the little-endian order Avro single-object encoding puts on the wire.
        history: for a schema of an earlier contract, its folder in ``avro/history/``
            (``"v1"``); ``None`` for the current contract.
    """

    name: str
    schema: Mapping[str, Any]
    parsed: Any
    fingerprint: bytes
    history: str | None = None

    @property
    def schema_json(self) -> str:
        return json.dumps(self.schema)

    @property
    def data_fields(self) -> list[str]:
        """The names of the EventData record's fields (empty for ``UnknownEvent``)."""
        event_data = next(f for f in self.schema["fields"] if f["name"] == "EventData")
        return [f["name"] for f in event_data["type"]["fields"]] if isinstance(
            event_data["type"], dict
        ) else []


class SchemaSet(Mapping[str, EventSchema]):
    """Every EventType's schema, by EventType, plus ``UnknownEvent``; also by fingerprint.

    As a mapping it holds the current contract only. The writer schemas of earlier contracts
    (``history``) are reached only through :meth:`by_fingerprint` and :attr:`writers`, so
    nothing that lists EventTypes sees them.
    """

    def __init__(
        self, schemas: Mapping[str, EventSchema], history: Iterable[EventSchema] = ()
    ) -> None:
        self._by_name = MappingProxyType(dict(schemas))
        writers: dict[bytes, EventSchema] = {}
        for old in history:
            # A record name the contract no longer has has no reader schema to resolve to.
            if old.name in self._by_name:
                writers.setdefault(old.fingerprint, old)
        # An unchanged schema keeps its fingerprint: the current one answers for it.
        writers.update({schema.fingerprint: schema for schema in self._by_name.values()})
        self._writers = MappingProxyType(writers)

    @classmethod
    def load(cls, directory: Path | None = None) -> SchemaSet:
        """Load every ``<EventType>.avsc`` of ``directory`` (default: the contract), and as
        historic writers those of each ``history/v<N>/`` below it.

        Raises:
            ConfigError: a folder is missing or empty, or a schema does not parse.
        """
        directory = directory or contract_dir()
        current = _load_folder(directory, None)
        history: list[EventSchema] = []
        for folder in sorted((directory / HISTORY_DIR).glob("v*")):
            if folder.is_dir():
                history.extend(_load_folder(folder, folder.name).values())
        return cls(current, history)

    def __getitem__(self, name: str) -> EventSchema:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def by_fingerprint(self, fingerprint: bytes) -> EventSchema | None:
        """The schema a record with this fingerprint was written with: current or historic
        (its ``history`` says which; its reader is ``self[schema.name]``)."""
        return self._writers.get(fingerprint)

    @property
    def writers(self) -> Mapping[bytes, EventSchema]:
        """Every writer schema a record may carry, current and historic, by fingerprint."""
        return self._writers

    @property
    def event_types(self) -> list[str]:
        """The known EventTypes: every schema but ``UnknownEvent``."""
        return [name for name in self._by_name if name != UNKNOWN_EVENT]


def _load_folder(directory: Path, history: str | None) -> dict[str, EventSchema]:
    paths = sorted(p for p in directory.glob("*.avsc") if "." not in p.stem)
    if not paths:
        raise ConfigError(f"no Avro schemas in {directory}")
    schemas = {}
    for path in paths:
        try:
            schema = fastavro.schema.load_schema(path, _write_hint=False)
            parsed = fastavro.schema.parse_schema(schema)
        except (ValueError, KeyError, fastavro.schema.SchemaParseException) as exc:
            where = f"{HISTORY_DIR}/{history}/{path.name}" if history else path.name
            raise ConfigError(f"{where}: {exc}") from exc
        canonical = fastavro.schema.to_parsing_canonical_form(parsed)
        fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
        schemas[path.stem] = EventSchema(path.stem, schema, parsed, fingerprint, history)
    return schemas


@cache
def contract() -> SchemaSet:
    """The project's contract, loaded once per process."""
    return SchemaSet.load()
