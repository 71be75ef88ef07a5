"""The project's errors: one shallow hierarchy, each raised ``from`` its cause.

Bad-input errors carry what a person needs to find the record; none of them ever
carries a secret.
"""

from __future__ import annotations


class RtcbusError(Exception):
    """Base of every error rtcbus raises on purpose."""


class ConfigError(RtcbusError):
    """A setting is wrong: raised at start-up, naming the setting."""


class CallbackError(RtcbusError):
    """A callback that can never be processed, however often it is retried.

    Attributes:
        field: the envelope or EventData field at fault, when one is.
        event_type, event_id: filled in as soon as they are known.
        topic, partition, offset: where the record sits, once it is in Kafka.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        event_type: str | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.event_type = event_type
        self.event_id = event_id
        self.topic: str | None = None
        self.partition: int | None = None
        self.offset: int | None = None

    def at(self, topic: str, partition: int, offset: int) -> CallbackError:
        """Record where the offending record sits; returns self for chaining."""
        self.topic, self.partition, self.offset = topic, partition, offset
        return self

    def __str__(self) -> str:
        where = [
            f"{name}={value}"
            for name, value in (
                ("EventType", self.event_type),
                ("EventId", self.event_id),
                ("topic", self.topic),
                ("partition", self.partition),
                ("offset", self.offset),
            )
            if value is not None
        ]
        return f"{self.message} ({', '.join(where)})" if where else self.message


class ValidationError(CallbackError):
    """The envelope or the EventData does not have the shape the contract requires."""


class SignatureError(CallbackError):
    """The callback's Signature matches none of the configured secrets."""


class EncodingError(CallbackError):
    """A validated event could not be encoded to, or decoded from, Avro."""


class BadRecord(CallbackError):
    """A domain record a subscriber cannot decode or validate into its EventType's model.

    Raised ``from`` the cause, with the record's coordinates (``topic``, ``partition``,
    ``offset``) and, from its headers, ``event_type`` and ``event_id``.

    Attributes:
        key, value, headers: the record as read, so that a caller can keep it (a log line,
            a dead-letter store of its own).
    """

    def __init__(
        self,
        message: str,
        *,
        event_type: str | None = None,
        event_id: str | None = None,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        super().__init__(message, event_type=event_type, event_id=event_id)
        self.key, self.value, self.headers = key, value, headers


class InfrastructureError(RtcbusError):
    """A service the work depends on (Kafka, the Schema Registry) failed or is unreachable.

    Never a reason to dead-letter a record: the work is retried or the process stops.
    """


class KafkaLaunchError(RtcbusError):
    """The local Kafka could not be provisioned, started or stopped."""


class RegistryLaunchError(RtcbusError):
    """The local Schema Registry could not be provisioned, started or stopped."""
