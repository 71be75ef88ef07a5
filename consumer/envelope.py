"""The callback envelope: parsing it, checking its signature, and its partition key.

Pure: no Kafka, no HTTP. The shim uses it to accept or refuse a request, the router to
start turning a raw record into an event. Protocol facts are in
``shared/spec/callback-protocol.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from consumer.errors import ConfigError, SignatureError, ValidationError

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("EventType", "EventData", "EventTime", "EventId", "AppId", "Version")
SIGNATURE_FIELDS = ("Nonce", "Signature")
KNOWN_FIELDS = frozenset(REQUIRED_FIELDS + SIGNATURE_FIELDS)
_ENVELOPE_FIELDS = REQUIRED_FIELDS + SIGNATURE_FIELDS
_REQUIRED = frozenset(REQUIRED_FIELDS)
# Fields tried in order for the record key; the envelope's AppId and EventId come last.
KEY_FIELDS = ("RoomId", "PublicStreamId", "TaskId")
# Where none of KEY_FIELDS is in EventData, the key is the first of these envelope fields.
KEY_FALLBACK = ("AppId", "EventId")
# How far EventTime may be from the time a signed callback is received (see SignatureVerifier).
DEFAULT_SKEW_S = 300.0

# Headers of the raw record, written by the shim beside the body.
HEADER_EVENT_TYPE = "rtcbus.event_type"
HEADER_EVENT_ID = "rtcbus.event_id"
HEADER_APP_ID = "rtcbus.app_id"
HEADER_VERSION = "rtcbus.version"
HEADER_RECEIVED_AT = "rtcbus.received_at"
# Headers the router adds: on a domain record, its schema; on a dead letter, why and from where.
HEADER_SCHEMA = "rtcbus.schema"
HEADER_ERROR_CLASS = "rtcbus.error.class"
HEADER_ERROR_MESSAGE = "rtcbus.error.message"
HEADER_ERROR_FIELD = "rtcbus.error.field"
HEADER_SOURCE_TOPIC = "rtcbus.source.topic"
HEADER_SOURCE_PARTITION = "rtcbus.source.partition"
HEADER_SOURCE_OFFSET = "rtcbus.source.offset"
HEADER_TRUNCATED = "rtcbus.dlq.truncated"
# On a quarantined record (a body refused for its signature): the client's address. Its
# reason is HEADER_ERROR_MESSAGE, when it was received HEADER_RECEIVED_AT.
HEADER_REMOTE = "rtcbus.remote"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed callback envelope.

    Every string field is valid Unicode text (no lone surrogate), so it can be hashed,
    written as a header and shown in an error.

    Attributes:
        event_data_text: EventData exactly as the signature covers it: the JSON string's
            value as received (after JSON unescaping), or, for a sender that sent an
            object, the object's JSON text exactly as it appears in the body.
        event_time: EventTime exactly as received (the signature covers the text).
        event_time_ms: EventTime as epoch milliseconds.
        extra: envelope fields the protocol does not define, kept rather than dropped.
    """

    event_type: str
    event_data_text: str
    event_time: str
    event_time_ms: int
    event_id: str
    app_id: str
    version: str
    nonce: str = ""
    signature: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def event_data(self) -> dict[str, Any]:
        """EventData parsed as a JSON object.

        Raises:
            ValidationError: EventData is not a JSON object (not JSON, nested too deeply,
                a duplicate key, NaN or a number out of range, not an object).
        """
        try:
            data = _decode(self.event_data_text)
        except ValueError as exc:
            raise self._error(f"EventData is not valid JSON: {_short(exc)}", "EventData") from None
        except RecursionError:
            raise self._error("EventData is nested too deeply to parse", "EventData") from None
        if not isinstance(data, dict):
            raise self._error("EventData is not a JSON object", "EventData")
        return data

    def key(self) -> str:
        """The record key (RoomId, else PublicStreamId, TaskId, AppId, EventId).

        Never raises: an EventData that does not parse still gets a key (AppId, else
        EventId), so the raw record can be written and then dead-lettered by the router with
        its reason.
        """
        try:
            data = self.event_data()
        except ValidationError:
            data = {}
        return partition_key(data, self.app_id, self.event_id)

    def _error(self, message: str, field_name: str) -> ValidationError:
        return ValidationError(
            message, field=field_name, event_type=self.event_type, event_id=self.event_id
        )


def parse_envelope(body: bytes | str) -> Envelope:
    """Parse a callback body into an :class:`Envelope`.

    Only the envelope is checked here; EventData is parsed on demand by
    :meth:`Envelope.event_data`, so a callback whose EventData is broken can still be
    accepted, written and dead-lettered with its reason.

    Raises:
        ValidationError: the body is not UTF-8 JSON (or has a duplicate key, NaN, Infinity,
            a number out of range, nesting too deep to parse), is not a JSON object, or an
            envelope field is missing, of the wrong type, holds a lone surrogate or is
            malformed; ``field`` names the field.
    """
    try:
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
    except UnicodeDecodeError as exc:
        raise ValidationError(f"body is not UTF-8: {_short(exc)}") from None
    try:
        document = _decode(text)
    except _NotStrict as exc:
        raise ValidationError(f"body is not strict JSON: {_short(exc)}") from None
    except ValueError as exc:
        raise ValidationError(f"body is not JSON: {_short(exc)}") from None
    except RecursionError:
        raise ValidationError("body is nested too deeply to parse") from None
    if not isinstance(document, dict):
        raise ValidationError("body is not a JSON object")

    for name in _ENVELOPE_FIELDS:
        value = document.get(name)
        if value.__class__ is str:
            valid = (value or name not in _REQUIRED) and (
                value.isascii() or _lone_surrogate(value) is None
            )
        elif name == "EventData":
            valid = isinstance(value, dict)
        else:
            valid = name not in _REQUIRED and name not in document
        if not valid:
            raise _field_error(document, name)

    event_data = document["EventData"]
    if isinstance(event_data, dict):
        # Some senders send an object. No string was received, so the signature covers the
        # object's text as it stands in the body; a re-serialisation would be a guess.
        event_data = _member_text(text, "EventData")
        if not event_data.isascii() and _lone_surrogate(event_data) is not None:
            # Only from a str body (bytes are decoded strictly): the text that would be
            # signed and written cannot be encoded.
            raise _field_error({**document, "EventData": event_data}, "EventData")

    return Envelope(
        event_type=document["EventType"],
        event_data_text=event_data,
        event_time=document["EventTime"],
        event_time_ms=parse_event_time(
            document["EventTime"], document["EventType"], document["EventId"]
        ),
        event_id=document["EventId"],
        app_id=document["AppId"],
        version=document["Version"],
        nonce=document.get("Nonce", ""),
        signature=document.get("Signature", ""),
        extra={k: v for k, v in document.items() if k not in KNOWN_FIELDS},
    )


def _field_error(document: dict[str, Any], name: str) -> ValidationError:
    """Why envelope field ``name`` of ``document`` is refused."""
    value = document.get(name)
    if name in _REQUIRED and (value is None or value == ""):
        message = f"{name} is missing"
    elif not isinstance(value, str):
        kind = "a JSON string or object" if name == "EventData" else "a string"
        message = f"{name} must be {kind}, got {_json_type(value)}"
    else:
        where = _lone_surrogate(value)
        message = (
            f"{name} holds a lone surrogate (U+{ord(value[where or 0]):04X} at character "
            f"{where}), which is not Unicode text"
        )
    # Only valid text goes into an error: it is shown, logged and written as a header.
    return ValidationError(
        message,
        field=name,
        event_type=_text_or_none(document.get("EventType")),
        event_id=_text_or_none(document.get("EventId")),
    )


def parse_event_time(text: str, event_type: str | None = None, event_id: str | None = None) -> int:
    """RFC 3339 with an offset (``2021-08-17T19:22:02+08:00``) to epoch milliseconds.

    Raises:
        ValidationError: not RFC 3339, or without an offset (the instant would be a guess).
    """
    try:
        moment = datetime.fromisoformat(text)
        # Integer arithmetic: a float timestamp() * 1000 can land a millisecond short.
        millis = (moment - _EPOCH) // _MILLISECOND if moment.tzinfo else None
    except (ValueError, OverflowError):
        millis = None
    if millis is None:
        raise ValidationError(
            f"EventTime is not RFC 3339 with an offset: {text[:64]!r}",
            field="EventTime",
            event_type=event_type,
            event_id=event_id,
        )
    return millis


def sign(envelope_fields: Iterable[str], secret: str) -> str:
    """The vendor's signature: sort the seven envelope strings and the secret by byte
    order, concatenate, SHA-256, lowercase hex.

    ``envelope_fields`` are EventType, EventData, EventTime, EventId, AppId, Version and
    Nonce, each exactly as received (valid text: :func:`parse_envelope` refuses the rest).
    """
    # Python orders str by code point, which for UTF-8 text is the same as byte order.
    parts = sorted([*envelope_fields, secret])
    return hashlib.sha256("".join(parts).encode("utf-8")).hexdigest()


def signed_fields(envelope: Envelope) -> tuple[str, ...]:
    """The seven envelope strings the signature covers, as received."""
    return (
        envelope.event_type,
        envelope.event_data_text,
        envelope.event_time,
        envelope.event_id,
        envelope.app_id,
        envelope.version,
        envelope.nonce,
    )


def raw_headers(envelope: Envelope, received_ms: int) -> list[tuple[str, bytes]]:
    """The headers of a raw record: what the router reads without parsing the body.

    Written by the shim, and by a quarantine redrive for a body that passes now.
    """
    return [
        (HEADER_EVENT_TYPE, envelope.event_type.encode()),
        (HEADER_EVENT_ID, envelope.event_id.encode()),
        (HEADER_APP_ID, envelope.app_id.encode()),
        (HEADER_VERSION, envelope.version.encode()),
        (HEADER_RECEIVED_AT, str(received_ms).encode()),
    ]


def header_text(value: bytes | None) -> str | None:
    """A header's value as text (bytes that are not UTF-8 replaced), None if it is absent."""
    return value.decode("utf-8", "replace") if value is not None else None


class SignatureVerifier:
    """Checks callback signatures against the active secrets, and EventTime against the clock.

    Several secrets can be active at once, for rotation; an AppId with secrets of its own
    is checked against those only. Every candidate is compared in constant time.

    A signed callback is also refused when its EventTime is more than ``skew_s`` (default
    300 s) from the time it is received: a captured callback replayed later fails, and one
    replayed sooner is a duplicate the router's EventId dedupe drops, as long as its window
    covers ``2 * skew_s`` (:class:`consumer.settings.Settings` requires it). The sender
    retries a failed callback with the same EventTime, so the window must leave room for
    its retries and for clock differences.

    Args:
        secrets: the shared secrets.
        app_secrets: AppId -> that app's secrets.
        skew_s: the largest accepted distance of EventTime from the time of receipt.
        unsigned: check nothing at all (no secrets may be given then): callbacks are not
            authenticated, which is logged as a warning.

    Raises:
        ConfigError: no secret and not ``unsigned``; secrets and ``unsigned``; an empty
            secret, an AppId without secrets, or a ``skew_s`` that is not positive.
    """

    def __init__(
        self,
        secrets: Iterable[str] = (),
        app_secrets: Mapping[str, Iterable[str]] | None = None,
        skew_s: float = DEFAULT_SKEW_S,
        *,
        unsigned: bool = False,
    ) -> None:
        self._secrets = tuple(secrets)
        self._app_secrets = {app: tuple(s) for app, s in (app_secrets or {}).items()}
        if not (isinstance(skew_s, (int, float)) and math.isfinite(skew_s) and skew_s > 0):
            raise ConfigError("signature_skew_s must be a positive number of seconds")
        self._skew_ms = int(skew_s * 1000)
        configured = bool(self._secrets or self._app_secrets)
        if unsigned and configured:
            raise ConfigError(
                "unsigned is set together with callback secrets (secrets or app_secrets): "
                "either signatures are checked or they are not; unset one of them"
            )
        if not unsigned and not configured:
            raise ConfigError(
                "no callback secrets: set secrets (RTCBUS_SECRETS, rtcbus shim --secrets) or "
                "app_secrets (RTCBUS_APP_SECRETS), or, to accept callbacks nobody signed, "
                "unsigned (RTCBUS_UNSIGNED=true, rtcbus shim --unsigned)"
            )
        if any(not secret for secret in self._secrets):
            raise ConfigError("secrets: a callback secret is empty")
        for app, app_secrets_of in self._app_secrets.items():
            if not app_secrets_of or any(not secret for secret in app_secrets_of):
                raise ConfigError(f"app_secrets[{app!r}]: no secret, or an empty one")
        self._unsigned = unsigned
        if unsigned:
            log.warning(
                "SIGNATURES ARE NOT CHECKED (unsigned): callbacks are not authenticated, and "
                "anyone who can reach the shim can write any callback to the raw topic"
            )

    @classmethod
    def from_settings(cls, settings: Any) -> SignatureVerifier:
        """The verifier ``settings`` describe (``secrets``, ``app_secrets``,
        ``signature_skew_s``, ``unsigned``).

        Raises:
            ConfigError: as the constructor.
        """
        return cls(
            secrets=[s.get_secret_value() for s in settings.secrets],
            app_secrets={
                app: [s.get_secret_value() for s in secrets]
                for app, secrets in settings.app_secrets.items()
            },
            skew_s=settings.signature_skew_s,
            unsigned=settings.unsigned,
        )

    @property
    def enabled(self) -> bool:
        """Whether signatures are checked (False only for ``unsigned``)."""
        return not self._unsigned

    def verify(self, envelope: Envelope, now_ms: int | None = None) -> None:
        """Accept the envelope or raise.

        Args:
            now_ms: when the callback was received, epoch ms. The receiver always gives it;
                None checks the signature alone (re-checking a stored record later).

        Raises:
            SignatureError: no secret matches, or EventTime is outside the skew window.
        """
        if self._unsigned:
            return
        candidates = self._app_secrets.get(envelope.app_id, self._secrets)
        fields = signed_fields(envelope)
        received = envelope.signature.lower().encode("ascii", "replace")
        matched = False
        for secret in candidates:
            # No early exit: the time taken does not tell which secret, if any, matched.
            matched |= hmac.compare_digest(sign(fields, secret).encode("ascii"), received)
        if not matched:
            raise SignatureError(
                "Signature does not match",
                field="Signature",
                event_type=envelope.event_type,
                event_id=envelope.event_id,
            )
        if now_ms is not None and abs(now_ms - envelope.event_time_ms) > self._skew_ms:
            raise SignatureError(
                f"EventTime is more than {self._skew_ms / 1000:g} s from the time of receipt "
                "(the accepted skew window): a late replay, or a clock far off",
                field="EventTime",
                event_type=envelope.event_type,
                event_id=envelope.event_id,
            )


def partition_key(event_data: Mapping[str, object], app_id: str, event_id: str) -> str:
    """The record key: RoomId, else PublicStreamId, else TaskId, else AppId, else EventId.

    Duplicates of one event share it, so they land in one partition, which is what makes
    per-partition dedupe correct; all events of a room share it, which keeps their order.
    A key field that is empty, not a scalar, or not valid text (a lone surrogate) counts as
    absent: the key must be writable, and the router dead-letters such a record anyway.
    """
    for name in KEY_FIELDS:
        value = event_data.get(name)
        if value in (None, "") or isinstance(value, (dict, list)):
            continue
        text = str(value)
        if _lone_surrogate(text) is None:
            return text
    return app_id or event_id  # KEY_FALLBACK


# -- JSON as the protocol means it ---------------------------------------------------------------


class _NotStrict(ValueError):
    """Syntactically JSON, but what the protocol's JSON cannot mean."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrict(f"number {text[:32]} is out of range")
    return value


def _no_constant(name: str) -> object:
    raise _NotStrict(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotStrict(f"duplicate key {key[:64]!r}")
            seen.add(key)
    return document


# Strict JSON: a duplicate key (which copy would the signer have meant?), NaN, Infinity and
# numbers beyond a double are refused rather than read one way here and another elsewhere.
_DECODER = json.JSONDecoder(
    parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys
)
_WHITESPACE = json.decoder.WHITESPACE


def _decode(text: str) -> Any:
    if text.startswith("\ufeff"):
        raise _NotStrict("a byte order mark precedes the JSON")
    return _DECODER.decode(text)


def _member_text(text: str, name: str) -> str:
    """The JSON text of member ``name`` of the top-level object in ``text``, as written.

    ``text`` has been decoded already, so it is valid JSON with unique keys.
    """
    index = _WHITESPACE.match(text, 0).end() + 1  # past the "{"
    while True:
        index = _WHITESPACE.match(text, index).end()
        key, index = json.decoder.scanstring(text, index + 1)  # past the opening quote
        index = _WHITESPACE.match(text, index).end() + 1  # past the ":"
        start = _WHITESPACE.match(text, index).end()
        _, end = _DECODER.raw_decode(text, start)
        if key == name:
            return text[start:end]
        index = _WHITESPACE.match(text, end).end() + 1  # past the ","


def _lone_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (JSON's ``\\ud800`` escapes allow it), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and _lone_surrogate(value) is None else None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(exc: Exception) -> str:
    return str(exc)[:200]
