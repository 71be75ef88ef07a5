"""Avro binary writers compiled from a record schema at start-up.

Written by hand because no maintained library does this: fastavro, the codec's encoder,
interprets the parsed schema for every value it writes (its logical-type lookup, the
type dispatch, a validation of each union branch), and that costs 0.3–0.7 µs per field,
about as much as the rest of the router's step for one record. A writer built once per
schema does the same walk as a tree of small functions.

It writes only what it is certain fastavro writes the same way, byte for byte: strings,
ints and longs (a logicalType on a long included) of exactly those Python types, records
as dicts, arrays as lists, maps as dicts of strings, and unions of null and one other
type. For any other value it raises :class:`Declined`, and the caller hands the record to
fastavro, which writes it or says why it cannot. A schema that uses anything else (floats,
booleans, bytes, enums, fixed, wider unions, recursion) gets no writer at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Writer = Callable[[Any, bytearray], None]

_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
# Lengths and small values are written often: their varints are looked up, not computed.
_BYTES = [bytes([n]) for n in range(0x80)]
_LENGTHS = 4096


class Declined(Exception):
    """A value the compiled writer does not write; fastavro must."""


class _Unsupported(Exception):
    """A schema construct the compiled writers do not cover."""


def _varint(value: int) -> bytes:
    """``value`` (zig-zag encoded already, so never negative) as an Avro varint."""
    if value < 0x80:
        return _BYTES[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The varint of a length n (a non-negative long: zig-zag makes it 2n).
_LENGTH_VARINTS = [_varint(n << 1) for n in range(_LENGTHS)]


def compile_writer(parsed: Mapping[str, Any]) -> Writer | None:
    """The writer of a parsed record schema (``fastavro.parse_schema``'s output), or None
    when the schema uses what the compiled writers do not cover.

    The writer appends the Avro binary body of a record to a bytearray, or raises
    :class:`Declined`; the bytearray then holds part of a record and must be dropped.
    """
    try:
        return _Compiler(parsed.get("__named_schemas", {})).writer(parsed)
    except _Unsupported:
        return None


class _Compiler:
    def __init__(self, named: Mapping[str, Any]) -> None:
        self._named = named
        self._building: set[str] = set()

    def writer(self, avro_type: Any) -> Writer:
        if isinstance(avro_type, str):
            if avro_type == "string":
                return _write_string
            if avro_type in _INT_RANGE:
                return _long_writer(*_INT_RANGE[avro_type])
            if avro_type in self._named:
                return self.writer(self._named[avro_type])
            raise _Unsupported(avro_type)
        if isinstance(avro_type, list):
            return self._optional(avro_type)
        kind = avro_type["type"]
        if kind == "record":
            return self._record(avro_type)
        if kind == "array":
            return _array_writer(self.writer(avro_type["items"]))
        if kind == "map":
            return _map_writer(self.writer(avro_type["values"]))
        if kind in _INT_RANGE:  # timestamp-millis and the like: fastavro passes an int through
            return _long_writer(*_INT_RANGE[kind])
        raise _Unsupported(kind)

    def _optional(self, branches: list) -> Writer:
        if len(branches) != 2 or branches.count("null") != 1:
            raise _Unsupported(str(branches))
        null_index = branches.index("null")
        null, some = _varint(null_index << 1), _varint((1 - null_index) << 1)
        write_some = self.writer(branches[1 - null_index])

        # fastavro tries the branches in order; null takes only None, so any other value
        # goes to the other branch or fails there, as it does here.
        def write_optional(value: Any, out: bytearray) -> None:
            if value is None:
                out += null
            else:
                out += some
                write_some(value, out)

        return write_optional

    def _record(self, record: Mapping[str, Any]) -> Writer:
        name = record["name"]
        if name in self._building:
            raise _Unsupported(f"{name} is recursive")
        self._building.add(name)
        # fastavro writes a missing field's default, None where there is none.
        fields = tuple(
            (field["name"], field.get("default"), self.writer(field["type"]))
            for field in record["fields"]
        )
        self._building.discard(name)

        def write_record(value: Any, out: bytearray) -> None:
            if type(value) is not dict:
                raise Declined(name)
            get = value.get
            for field_name, default, write in fields:
                write(get(field_name, default), out)

        return write_record


def _write_string(value: Any, out: bytearray) -> None:
    if type(value) is not str:
        raise Declined("string")
    data = value.encode()  # a lone surrogate raises, and fastavro says why
    size = len(data)
    out += _LENGTH_VARINTS[size] if size < _LENGTHS else _varint(size << 1)
    out += data


def _long_writer(low: int, high: int) -> Writer:
    def write_long(value: Any, out: bytearray) -> None:
        if type(value) is not int or not low <= value <= high:
            raise Declined("long")
        out += _varint((value << 1) ^ (value >> 63))

    return write_long


def _array_writer(write_item: Writer) -> Writer:
    def write_array(value: Any, out: bytearray) -> None:
        if type(value) is not list:
            raise Declined("array")
        if value:  # one block of every item, then the empty block, as fastavro writes it
            out += _varint(len(value) << 1)
            for item in value:
                write_item(item, out)
        out += b"\x00"

    return write_array


def _map_writer(write_value: Writer) -> Writer:
    def write_map(value: Any, out: bytearray) -> None:
        if type(value) is not dict:
            raise Declined("map")
        if value:
            out += _varint(len(value) << 1)
            for key, item in value.items():
                _write_string(key, out)
                write_value(item, out)
        out += b"\x00"

    return write_map
