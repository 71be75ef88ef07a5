"""The callback envelope: parsing it, checking its signature, and its partition key.

Pure: no Kafka, no HTTP. The shim uses it to accept or refuse a request, the router to
start turning a raw record into an event. Protocol facts are in
``shared/spec/callback-protocol.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from consumer.errors import SignatureError, ValidationError

REQUIRED_FIELDS = ("EventType", "EventData", "EventTime", "EventId", "AppId", "Version")
SIGNATURE_FIELDS = ("Nonce", "Signature")
KNOWN_FIELDS = frozenset(REQUIRED_FIELDS + SIGNATURE_FIELDS)
# Fields tried in order for the record key; the envelope's AppId and EventId come last.
KEY_FIELDS = ("RoomId", "PublicStreamId", "TaskId")

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

    Attributes:
        event_data_text: EventData exactly as the signature covers it: the JSON string's
            value as received (after JSON unescaping), or, for a sender that sent an
            object, its compact serialisation (there is no received string to use then).
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
            ValidationError: EventData is not a JSON object.
        """
        try:
            data = json.loads(self.event_data_text)
        except ValueError as exc:
            raise self._error(f"EventData is not valid JSON: {exc}", "EventData") from None
        except RecursionError:
            raise self._error("EventData is nested too deeply to parse", "EventData") from None
        if not isinstance(data, dict):
            raise self._error("EventData is not a JSON object", "EventData")
        return data

    def key(self) -> str:
        """The record key (RoomId, else PublicStreamId, TaskId, AppId, EventId).

        An EventData that does not parse still gets a key (AppId, else EventId), so the raw
        record can be written and then dead-lettered by the router with its reason.
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
        ValidationError: the body is not a JSON object, or an envelope field is missing or
            malformed; ``field`` names it.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValidationError(f"body is not JSON: {_short(exc)}") from None
    if not isinstance(document, dict):
        raise ValidationError("body is not a JSON object")

    event_type = document.get("EventType")
    event_id = document.get("EventId")
    for name in REQUIRED_FIELDS:
        if document.get(name) in (None, ""):
            raise ValidationError(
                f"{name} is missing",
                field=name,
                event_type=_text_or_none(event_type),
                event_id=_text_or_none(event_id),
            )
    for name in (*REQUIRED_FIELDS, *SIGNATURE_FIELDS):
        if name != "EventData" and name in document and not isinstance(document[name], str):
            raise ValidationError(
                f"{name} must be a string, got {type(document[name]).__name__}",
                field=name,
                event_type=_text_or_none(event_type),
                event_id=_text_or_none(event_id),
            )

    event_data = document["EventData"]
    if isinstance(event_data, dict):
        # Some senders send an object; the compact form is the best guess at what they signed.
        event_data = json.dumps(event_data, separators=(",", ":"), ensure_ascii=False)
    elif not isinstance(event_data, str):
        raise ValidationError(
            f"EventData must be a JSON string or object, got {type(event_data).__name__}",
            field="EventData",
            event_type=event_type,
            event_id=event_id,
        )

    return Envelope(
        event_type=event_type,
        event_data_text=event_data,
        event_time=document["EventTime"],
        event_time_ms=parse_event_time(document["EventTime"], event_type, event_id),
        event_id=event_id,
        app_id=document["AppId"],
        version=document["Version"],
        nonce=document.get("Nonce", ""),
        signature=document.get("Signature", ""),
        extra={k: v for k, v in document.items() if k not in KNOWN_FIELDS},
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
    Nonce, each exactly as received.
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


class SignatureVerifier:
    """Checks callback signatures against the active secrets.

    Several secrets can be active at once, for rotation; an AppId with secrets of its own
    is checked against those only. Every candidate is compared in constant time.

    The optional EventTime skew window is off by default: the sender retries a failed
    callback with the same EventTime up to minutes later, so a tight window would refuse
    legitimate retries, and replays inside the dedupe window are already defused by
    EventId dedupe. Turn it on to refuse replays older than the window.
    """

    def __init__(
        self,
        secrets: Iterable[str] = (),
        app_secrets: Mapping[str, Iterable[str]] | None = None,
        skew_s: float | None = None,
    ) -> None:
        self._secrets = tuple(secrets)
        self._app_secrets = {app: tuple(s) for app, s in (app_secrets or {}).items()}
        self._skew_ms = None if skew_s is None else int(skew_s * 1000)

    @classmethod
    def from_settings(cls, settings: Any) -> SignatureVerifier:
        return cls(
            secrets=[s.get_secret_value() for s in settings.secrets],
            app_secrets={
                app: [s.get_secret_value() for s in secrets]
                for app, secrets in settings.app_secrets.items()
            },
            skew_s=settings.signature_skew_s,
        )

    @property
    def enabled(self) -> bool:
        return bool(self._secrets or self._app_secrets)

    def verify(self, envelope: Envelope, now_ms: int | None = None) -> None:
        """Accept the envelope or raise.

        Raises:
            SignatureError: no secret matches, or EventTime is outside the skew window.
        """
        if not self.enabled:
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
        if self._skew_ms is not None and now_ms is not None:
            if abs(now_ms - envelope.event_time_ms) > self._skew_ms:
                raise SignatureError(
                    "EventTime is outside the accepted skew window",
                    field="EventTime",
                    event_type=envelope.event_type,
                    event_id=envelope.event_id,
                )


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _short(exc: Exception) -> str:
    return str(exc)[:200]


def partition_key(event_data: Mapping[str, object], app_id: str, event_id: str) -> str:
    """The record key: RoomId, else PublicStreamId, else TaskId, else AppId, else EventId.

    Duplicates of one event share it, so they land in one partition, which is what makes
    per-partition dedupe correct; all events of a room share it, which keeps their order.
    """
    for name in KEY_FIELDS:
        value = event_data.get(name)
        if value not in (None, ""):
            return str(value)
    return app_id or event_id
