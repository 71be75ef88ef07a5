"""Avro binary writers compiled from a record schema at start-up.

Written by hand because no maintained library does this: fastavro, the codec's encoder,
interprets the parsed schema for every value it writes (its logical-type lookup, the
type dispatch, a validation of each union branch), and that costs 0.3–0.7 µs per field,
about as much as the rest of the router's step for one record. A writer built once per
schema does the same walk as one compiled function per schema, with no decision left that
the schema already made.

It writes only what it is certain fastavro writes the same way, byte for byte: strings,
ints and longs (a logicalType on a long included) of exactly those Python types, records
as dicts, arrays as lists, maps as dicts of strings, and unions of null and one other
type. For any other value it raises :class:`Declined`, and the caller hands the record to
fastavro, which writes it or says why it cannot. A schema that uses anything else (floats,
booleans, bytes, enums, fixed, wider unions, recursion) gets no writer at all.
"""

from __future__ import annotations

import itertools
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
        return _Compiler(parsed.get("__named_schemas", {})).compile(parsed)
    except _Unsupported:
        return None


class _Compiler:
    """Writes the source of one function that writes a record, field by field, top to
    bottom, and compiles it (as :mod:`dataclasses` does for ``__init__``): a tree of small
    functions instead, one call per field, measured 1.7 times slower."""

    def __init__(self, named: Mapping[str, Any]) -> None:
        self._named = named
        self._building: set[str] = set()
        self._lines = ["def write(record, out):"]
        self._constants: dict[str, Any] = {}
        self._names = itertools.count()

    def compile(self, parsed: Mapping[str, Any]) -> Writer:
        self._value(parsed, "record", 1)
        namespace = {
            "Declined": Declined, "LENGTHS": _LENGTH_VARINTS, "varint": _varint, **self._constants,
        }
        exec("\n".join(self._lines), namespace)  # noqa: S102 - our own source, from the schema
        return namespace["write"]

    def _name(self, prefix: str) -> str:
        return f"{prefix}{next(self._names)}"

    def _constant(self, value: Any) -> str:
        name = self._name("constant")
        self._constants[name] = value
        return name

    def _emit(self, depth: int, line: str) -> None:
        self._lines.append("    " * depth + line)

    def _value(self, avro_type: Any, var: str, depth: int) -> None:
        """Lines writing the value in ``var``, of ``avro_type``, at indentation ``depth``."""
        emit = self._emit
        if isinstance(avro_type, str):
            if avro_type == "string":
                data = self._name("data")
                emit(depth, f"if type({var}) is not str: raise Declined({avro_type!r})")
                emit(depth, f"{data} = {var}.encode()")  # a lone surrogate raises: fastavro says why
                emit(depth, f"out += LENGTHS[len({data})] if len({data}) < {_LENGTHS} else varint(len({data}) << 1)")
                emit(depth, f"out += {data}")
            elif avro_type in _INT_RANGE:
                low, high = _INT_RANGE[avro_type]
                emit(depth, f"if type({var}) is not int or not {low} <= {var} <= {high}: raise Declined({avro_type!r})")
                emit(depth, f"out += varint(({var} << 1) ^ ({var} >> 63))")
            elif avro_type in self._named:
                self._value(self._named[avro_type], var, depth)
            else:
                raise _Unsupported(avro_type)
            return
        if isinstance(avro_type, list):
            if len(avro_type) != 2 or avro_type.count("null") != 1:
                raise _Unsupported(str(avro_type))
            # fastavro tries the branches in order; null takes only None, so any other value
            # goes to the other branch or fails there, as it does here.
            null_index = avro_type.index("null")
            emit(depth, f"if {var} is None: out += {self._constant(_varint(null_index << 1))}")
            emit(depth, "else:")
            emit(depth + 1, f"out += {self._constant(_varint((1 - null_index) << 1))}")
            self._value(avro_type[1 - null_index], var, depth + 1)
            return
        kind = avro_type["type"]
        if kind == "record":
            name = avro_type["name"]
            if name in self._building:
                raise _Unsupported(f"{name} is recursive")
            self._building.add(name)
            fields = self._name("fields")
            emit(depth, f"if type({var}) is not dict: raise Declined({name!r})")
            emit(depth, f"{fields} = {var}.get")
            for field in avro_type["fields"]:
                # fastavro writes a missing field's default, None where there is none.
                value = self._name("value")
                default = self._constant(field.get("default"))
                emit(depth, f"{value} = {fields}({field['name']!r}, {default})")
                self._value(field["type"], value, depth)
            self._building.discard(name)
        elif kind in ("array", "map"):
            # One block of every item, then the empty block, as fastavro writes them.
            emit(depth, f"if type({var}) is not {'list' if kind == 'array' else 'dict'}: raise Declined({kind!r})")
            emit(depth, f"if {var}:")
            emit(depth + 1, f"out += varint(len({var}) << 1)")
            item = self._name("item")
            if kind == "array":
                emit(depth + 1, f"for {item} in {var}:")
                self._value(avro_type["items"], item, depth + 2)
            else:
                key = self._name("key")
                emit(depth + 1, f"for {key}, {item} in {var}.items():")
                self._value("string", key, depth + 2)
                self._value(avro_type["values"], item, depth + 2)
            emit(depth, "out += b'\\x00'")
        elif kind in _INT_RANGE:  # timestamp-millis and the like: fastavro passes an int through
            self._value(kind, var, depth)
        else:
            raise _Unsupported(kind)
