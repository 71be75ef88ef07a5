"""One settings object, read once from ``RTCBUS_*`` environment variables and CLI flags.

Every other module receives a :class:`Settings` (or the part of it it needs) as an
argument; none reads the environment itself. Secrets are ``SecretStr`` and are never
printed: ``Settings.describe()`` is the only way to show a configuration, and it masks them.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumer.envelope import DEFAULT_SKEW_S
from consumer.errors import ConfigError

_log = logging.getLogger(__name__)

# librdkafka properties a user may pass through (security, networking, tuning).
# Anything else is rejected by name at start-up, so a typo fails loudly instead of
# being silently ignored by the client. Kept as an explicit list because librdkafka
# offers no way to ask which properties exist without constructing a client.
PASSTHROUGH_KAFKA_KEYS = frozenset(
    {
        "client.id", "client.rack", "debug", "statistics.interval.ms",
        "broker.address.family", "socket.timeout.ms", "socket.keepalive.enable",
        "socket.connection.setup.timeout.ms", "connections.max.idle.ms",
        "reconnect.backoff.ms", "reconnect.backoff.max.ms", "metadata.max.age.ms",
        "metadata.recovery.strategy", "metadata.recovery.rebootstrap.trigger.ms",
        "topic.metadata.refresh.interval.ms", "request.timeout.ms", "retry.backoff.ms",
        "retry.backoff.max.ms", "message.max.bytes", "receive.message.max.bytes",
        "linger.ms", "batch.size", "batch.num.messages", "compression.type",
        "queue.buffering.max.messages", "queue.buffering.max.kbytes",
        "fetch.min.bytes", "fetch.wait.max.ms", "fetch.max.bytes",
        "max.partition.fetch.bytes", "session.timeout.ms", "heartbeat.interval.ms",
        "max.poll.interval.ms", "transaction.timeout.ms",
        "security.protocol",
        "ssl.cipher.suites", "ssl.curves.list", "ssl.sigalgs.list", "ssl.key.location",
        "ssl.key.password", "ssl.key.pem", "ssl.certificate.location", "ssl.certificate.pem",
        "ssl.ca.location", "ssl.ca.pem", "ssl.ca.certificate.stores", "ssl.crl.location",
        "ssl.keystore.location", "ssl.keystore.password", "ssl.providers", "ssl.engine.id",
        "enable.ssl.certificate.verification", "ssl.endpoint.identification.algorithm",
        "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
        "sasl.kerberos.service.name", "sasl.kerberos.principal", "sasl.kerberos.kinit.cmd",
        "sasl.kerberos.keytab", "sasl.kerberos.min.time.before.relogin",
        "sasl.oauthbearer.config", "enable.sasl.oauthbearer.unsecure.jwt",
        "sasl.oauthbearer.method", "sasl.oauthbearer.client.id",
        "sasl.oauthbearer.client.secret", "sasl.oauthbearer.scope",
        "sasl.oauthbearer.extensions", "sasl.oauthbearer.token.endpoint.url",
    }
)

# Properties rtcbus sets itself because its guarantees depend on them.
OWNED_KAFKA_KEYS = frozenset(
    {
        "bootstrap.servers", "acks", "enable.idempotence", "transactional.id",
        "isolation.level", "group.id", "enable.auto.commit", "enable.auto.offset.store",
        "auto.offset.reset", "partition.assignment.strategy", "max.in.flight.requests.per.connection",
    }
)


def _split_secrets(value: object, where: str = "") -> object:
    """A comma-separated list of secrets; an empty string is none.

    An empty entry (``"a,,b"``, ``"a, "``, ``" , "``) is an error, not a secret that is
    off, and so is one that is not valid UTF-8 (the signature hashes UTF-8). The message
    gives the entry's position, never a value.
    """
    if isinstance(value, str):
        if value == "":
            return []
        parts = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = [p.get_secret_value() if isinstance(p, SecretStr) else p for p in value]
    else:
        return value
    for number, part in enumerate(parts, 1):
        if not isinstance(part, str):
            continue  # pydantic names the wrong type
        if not part.strip():
            raise ValueError(f"{where}entry {number} of {len(parts)} is empty")
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}entry {number} of {len(parts)} is not valid UTF-8") from None
    return parts


class Settings(BaseSettings):
    """Everything rtcbus can be told. Flags given to the CLI override the environment."""

    model_config = SettingsConfigDict(env_prefix="RTCBUS_", frozen=True, extra="forbid")

    # -- Kafka ------------------------------------------------------------------------------
    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers; unset means the embedded local Kafka."
    )
    kafka_config: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Extra librdkafka properties (security, tuning), as JSON in the environment.",
    )
    topic_prefix: str = "rtc"
    partitions: int = Field(6, ge=1, description="Partitions of raw, domain, DLQ and dedupe topics.")
    replication_factor: int | None = Field(
        None, ge=1, description="Unset: 3 on a cluster of 3 or more brokers, else 1."
    )
    raw_retention_ms: int = 7 * 24 * 3600 * 1000
    events_retention_ms: int = 7 * 24 * 3600 * 1000
    dlq_retention_ms: int = 30 * 24 * 3600 * 1000
    quarantine_retention_ms: int = Field(7 * 24 * 3600 * 1000, ge=3600 * 1000)
    quarantine_retention_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024,
        description="Bound of the quarantine topic (retention.bytes; the topic has one partition).",
    )

    # -- the embedded local Kafka -------------------------------------------------------------
    kafka_home: Path | None = Field(
        None,
        validation_alias=AliasChoices("RTCBUS_KAFKA_HOME", "KAFKA_HOME", "kafka_home"),
        description="An unpacked Apache Kafka distribution to use instead of downloading one.",
    )
    home: Path = Field(
        Path.home() / ".rtcbus",
        description="Where the local Kafka's jars, data and logs live.",
    )
    kafka_version: str = "4.4.0"
    local_port: int = Field(9092, ge=1, le=65535, description="First port of the local Kafka.")
    brokers: int = Field(1, ge=1, le=5, description="Brokers in the local Kafka cluster.")

    # -- the embedded local Schema Registry ------------------------------------------------------
    registry_version: str = Field(
        "2.6.13.Final",
        description="Apicurio Registry version of the local Schema Registry (2.x: 3.x needs Java 21).",
    )
    registry_port: int = Field(
        8081, ge=1, le=65535, description="Port of the local Schema Registry on 127.0.0.1."
    )

    # -- callbacks: signature -------------------------------------------------------------------
    secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Active callback secrets, comma-separated (rotation)."
    )
    app_secrets: dict[str, Annotated[list[SecretStr], NoDecode]] = Field(
        default_factory=dict, description="Per-AppId secrets, JSON: {\"app\": \"s1,s2\"}."
    )
    signature_skew_s: float = Field(
        DEFAULT_SKEW_S, gt=0,
        description=(
            "Refuse callbacks whose EventTime is further than this from now: a replay older "
            "than the dedupe window is refused. At most dedupe_window_s / 2."
        ),
    )
    unsigned: bool = Field(
        False,
        description=(
            "Accept callbacks without checking signatures (no secrets may be set then): "
            "anyone who reaches the shim can write to the raw topic."
        ),
    )

    # -- shim -------------------------------------------------------------------------------------
    shim_host: str = "127.0.0.1"
    shim_port: int = Field(8080, ge=0, le=65535)
    shim_admin_host: str = Field(
        "127.0.0.1", description="Where /metrics and /openapi.json listen: apart from callbacks."
    )
    shim_admin_port: int = Field(9109, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    ack_timeout_s: float = Field(
        3.0, gt=0, lt=5,
        description="The longest a callback waits for its answer; 503 after it (sender: 5 s).",
    )
    shim_max_concurrency: int = Field(
        1000, ge=1, description="Connections and requests at once; past it a fast 503."
    )
    shim_header_timeout_s: float = Field(
        5.0, gt=0, description="Close a connection that has not sent its request head by then."
    )
    shim_body_timeout_s: float = Field(
        5.0, gt=0, description="Answer 408 to a request whose body has not arrived by then."
    )

    # -- shim: the quarantine -------------------------------------------------------------------
    quarantine: bool = Field(
        True,
        description=(
            "Keep bodies that fail the signature check in the quarantine topic, so a wrong "
            "secret costs no events (`rtcbus quarantine redrive` once it is fixed)."
        ),
    )
    quarantine_max_per_s: float = Field(
        20.0, gt=0, description="At most this many quarantined bodies a second; the rest are counted, not kept."
    )
    quarantine_max_bytes_per_s: int = Field(
        1024 * 1024, ge=1024,
        description="At most this many quarantined bytes a second; a larger body is never kept.",
    )

    # -- shim: the local spool ------------------------------------------------------------------
    spool: bool = Field(
        True, description="Keep callbacks Kafka cannot take in time in a local spool (fsynced)."
    )
    spool_dir: Path | None = Field(
        None, description="The spool's directory; unset means <home>/spool. One shim per directory."
    )
    spool_max_bytes: int = Field(
        1024**3, ge=1024 * 1024, description="Past this many bytes spooled, answer 503."
    )
    spool_after_s: float = Field(
        1.0, gt=0, lt=5,
        description="Wait this long for Kafka's acknowledgement before spooling the callback.",
    )

    # -- router -------------------------------------------------------------------------------------
    group_id: str = "rtcbus-router"
    instance_id: str | None = Field(
        None,
        description=(
            "The router's transactional.id is <group_id>-<instance_id>. Unset (the default): "
            "unique per process, so replicas with identical settings never fence each other."
        ),
    )
    commit_interval_ms: int = Field(100, ge=1)
    commit_max_records: int = Field(1000, ge=1)
    # False: the router commits consumer offsets after flushing its output instead of using
    # transactions, so a crash can duplicate the records since the last commit.
    exactly_once: bool = True
    dedupe_window_s: float = Field(15 * 60, gt=0)
    metrics_host: str = Field(
        "127.0.0.1", description="Where the router's /metrics, /healthz and /readyz listen."
    )
    metrics_port: int = Field(9108, ge=0, le=65535)
    router_stall_s: float = Field(
        120.0, gt=0,
        description="/healthz fails when the routing loop has not made a pass for this long.",
    )
    router_processes: int = Field(
        1, ge=1, le=64,
        description="Router group members `rtcbus router` runs, one process each (ports metrics_port + i).",
    )

    # -- contract -------------------------------------------------------------------------------------
    routes: dict[str, str] = Field(
        default_factory=dict, description="EventType -> domain overrides, JSON."
    )
    topics: dict[str, str] = Field(
        default_factory=dict, description="domain -> topic name overrides, JSON."
    )
    wire_format: Literal["single-object", "confluent"] = "single-object"
    schema_registry_url: str | None = None

    @field_validator("secrets", mode="before")
    @classmethod
    def _secrets_from_commas(cls, value: object) -> object:
        return _split_secrets(value)

    @field_validator("app_secrets", mode="before")
    @classmethod
    def _app_secrets_from_commas(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        split = {}
        for app, secrets in value.items():
            if isinstance(app, str) and not app.strip():
                raise ValueError("an AppId is empty")
            parts = _split_secrets(secrets, f"AppId {app!r}: ")
            if parts == []:
                raise ValueError(f"AppId {app!r}: no secret")
            split[app] = parts
        return split

    @field_validator("kafka_config")
    @classmethod
    def _known_kafka_keys(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        owned = sorted(set(value) & OWNED_KAFKA_KEYS)
        if owned:
            raise ValueError(f"rtcbus sets these Kafka properties itself: {', '.join(owned)}")
        unknown = sorted(set(value) - PASSTHROUGH_KAFKA_KEYS)
        if unknown:
            raise ValueError(f"unknown Kafka properties: {', '.join(unknown)}")
        return value

    @model_validator(mode="after")
    def _skew_within_dedupe_window(self) -> Settings:
        # A replay is accepted only within signature_skew_s of its EventTime, and the
        # original was received no earlier than EventTime - skew: two accepted copies are at
        # most 2 * skew apart, and only a dedupe window that long drops the second. Unsigned,
        # anyone can forge a fresh callback, so the bound protects nothing and is not required.
        if not self.unsigned and 2 * self.signature_skew_s > self.dedupe_window_s:
            raise ValueError(
                f"signature_skew_s ({self.signature_skew_s:g}) must be at most half of "
                f"dedupe_window_s ({self.dedupe_window_s:g}): a signed callback is accepted "
                "within signature_skew_s of its EventTime, so a replay can arrive up to "
                "2 * signature_skew_s after the original, and the router's dedupe window must "
                "still remember the original's EventId then"
            )
        return self

    @model_validator(mode="after")
    def _spool_before_the_deadline(self) -> Settings:
        # A callback is spooled after spool_after_s and answered 503 at ack_timeout_s: the
        # other way round the spool would never be reached in time.
        if self.spool and self.spool_after_s >= self.ack_timeout_s:
            raise ValueError(
                f"spool_after_s ({self.spool_after_s:g}) must be less than ack_timeout_s "
                f"({self.ack_timeout_s:g}): a callback is spooled only before its deadline"
            )
        return self

    @model_validator(mode="after")
    def _registry_for_confluent_format(self) -> Settings:
        if self.wire_format == "confluent" and not self.schema_registry_url:
            raise ValueError("wire_format 'confluent' needs schema_registry_url")
        return self

    # -- derived names ---------------------------------------------------------------------------------
    @property
    def raw_topic(self) -> str:
        return f"{self.topic_prefix}.callbacks.raw"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.callbacks.dlq"

    @property
    def max_record_bytes(self) -> int:
        """The largest raw or DLQ record: a whole body plus key, headers and batch overhead."""
        return self.max_body_bytes + 64 * 1024

    @property
    def quarantine_topic(self) -> str:
        return f"{self.topic_prefix}.callbacks.quarantine"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.home / "spool"

    @property
    def dedupe_topic(self) -> str:
        return f"{self.topic_prefix}.router.dedupe"

    def kafka_client_config(self) -> dict[str, str]:
        """The pass-through librdkafka properties, secrets revealed: for client construction only."""
        return {key: value.get_secret_value() for key, value in self.kafka_config.items()}

    def describe(self) -> dict[str, object]:
        """The settings as a printable dict, every secret masked."""
        return self.model_dump(mode="json")


def load_settings(**overrides: object) -> Settings:
    """Read the settings once, flags (``overrides``, None meaning 'not given') over environment.

    Raises:
        ConfigError: naming every setting that is wrong.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(_describe_validation_error(exc)) from None
    _warn_unknown_variables(os.environ)
    return settings


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """Log the ``RTCBUS_*`` variables that are no setting, with the nearest that is.

    pydantic-settings ignores them, so a typo in an env file (``RTCBUS_SPOOL_DRI``) would
    silently mean the default. A warning rather than an error: the project's own scripts and
    tests read a few ``RTCBUS_*`` variables of their own (``RTCBUS_TOOLS_CACHE``...). Names
    only: a value may be a secret.
    """
    known = {f"RTCBUS_{name.upper()}" for name in Settings.model_fields}
    for name in sorted(key for key in environ if key.startswith("RTCBUS_") and key not in known):
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        _log.warning("%s is not an rtcbus setting and is ignored%s", name, hint)


def _describe_validation_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    # Only the location and pydantic's message: the input may be a secret, so it is left out.
    lines = [
        f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
        for error in errors(include_input=False, include_url=False)
    ]
    return "invalid settings: " + "; ".join(lines)
