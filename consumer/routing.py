"""EventType → domain → topic, as data.

The default table is ARCHITECTURE.md's; settings may move EventTypes to other domains
(``routes``) or rename a domain's topic (``topics``). An EventType nobody knows yet is
routed to the ``unknown`` domain, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from consumer.errors import ConfigError

UNKNOWN_DOMAIN = "unknown"

DEFAULT_DOMAINS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "stream": (
            "UserAudioStreamStart", "UserAudioStreamStop",
            "UserVideoStreamStart", "UserVideoStreamStop",
            "UserScreenAudioStreamStart", "UserScreenAudioStreamStop",
            "UserScreenVideoStreamStart", "UserScreenVideoStreamStop",
        ),
        "recording": (
            "RecordStarted", "RecordStopped",
            "RecordUploadStarted", "RecordUploadProcessing", "RecordUploadDone",
            "RecordUploadBackuped",
            "RecordAudioStreamStateChanged", "RecordVideoStreamStateChanged",
            "RecordSyncUploadStarted", "RecordSyncUploadFailed",
        ),
        "room": (
            "UserJoinRoom", "UserLeaveRoom", "InvisibleUserJoinRoom", "InvisibleUserLeaveRoom",
            "RoleChangeInvisible2Visible", "RoleChangeVisible2Invisible",
            "RoomCreate", "RoomDestroy",
        ),
        "segment": ("SegmentRealTimeData",),
        "snapshot": ("SnapshotRealTimeData",),
        "relay": ("RelayStreamStateChanged",),
        "webcast": ("Webcast",),
        "transcode": (
            "TranscodeStarted", "TranscodeStopped", "TranscodeUpdated", "TranscodeStateChanged",
        ),
        "publicstream": ("PushPublicStream",),
        "music": ("MusicRemoved",),
        "whiteboard": ("WbTranscodeProgressChanged", "WbTranscodeFinished"),
    }
)


@dataclass(frozen=True)
class Route:
    """Where one EventType goes."""

    event_type: str
    domain: str
    topic: str


class RoutingTable:
    """Maps an EventType to its domain and topic; built once at start-up."""

    def __init__(
        self,
        topic_prefix: str = "rtc",
        routes: Mapping[str, str] | None = None,
        topics: Mapping[str, str] | None = None,
    ) -> None:
        """
        Args:
            topic_prefix: prefix of the default topic names, ``<prefix>.events.<domain>``.
            routes: EventType → domain overrides; a new domain name creates that domain.
            topics: domain → topic name overrides.

        Raises:
            ConfigError: an override names an EventType or a domain that does not exist.
        """
        domain_of = {
            event_type: domain
            for domain, event_types in DEFAULT_DOMAINS.items()
            for event_type in event_types
        }
        unknown_types = sorted(set(routes or {}) - set(domain_of))
        if unknown_types:
            raise ConfigError(f"routes: unknown EventType(s): {', '.join(unknown_types)}")
        domain_of.update(routes or {})

        domains = sorted(set(domain_of.values()) | {UNKNOWN_DOMAIN})
        unknown_domains = sorted(set(topics or {}) - set(domains))
        if unknown_domains:
            raise ConfigError(f"topics: unknown domain(s): {', '.join(unknown_domains)}")
        topic_of = {domain: f"{topic_prefix}.events.{domain}" for domain in domains}
        topic_of.update(topics or {})

        self._routes = {
            event_type: Route(event_type, domain, topic_of[domain])
            for event_type, domain in domain_of.items()
        }
        self._unknown = Route("*", UNKNOWN_DOMAIN, topic_of[UNKNOWN_DOMAIN])
        self._topic_of = MappingProxyType(topic_of)

    @classmethod
    def from_settings(cls, settings: object, event_types: Iterable[str] | None = None) -> RoutingTable:
        """Build the table from a :class:`consumer.settings.Settings`.

        Args:
            event_types: the EventTypes of the contract (``SchemaSet.event_types``); when
                given, the table must route exactly those.

        Raises:
            ConfigError: an override is wrong, or the table and the contract disagree on
                which EventTypes exist.
        """
        table = cls(
            topic_prefix=settings.topic_prefix,  # type: ignore[attr-defined]
            routes=settings.routes,  # type: ignore[attr-defined]
            topics=settings.topics,  # type: ignore[attr-defined]
        )
        if event_types is not None:
            table.require(event_types)
        return table

    def require(self, event_types: Iterable[str]) -> None:
        """Check that this table routes exactly ``event_types``, the contract's.

        Raises:
            ConfigError: naming the EventTypes only one side knows.
        """
        wanted = set(event_types)
        unrouted = sorted(wanted - set(self._routes))
        unschemaed = sorted(set(self._routes) - wanted)
        if unrouted or unschemaed:
            raise ConfigError(
                "the routing table and the Avro contract disagree: "
                + "; ".join(
                    part
                    for part in (
                        f"without a domain: {', '.join(unrouted)}" if unrouted else "",
                        f"without a schema: {', '.join(unschemaed)}" if unschemaed else "",
                    )
                    if part
                )
            )

    def route(self, event_type: str) -> Route:
        """The route of ``event_type``; unknown EventTypes go to the ``unknown`` domain."""
        return self._routes.get(event_type, self._unknown)

    def is_known(self, event_type: str) -> bool:
        return event_type in self._routes

    @property
    def event_types(self) -> list[str]:
        """Every known EventType, in the order of the default table."""
        return list(self._routes)

    @property
    def domains(self) -> Mapping[str, str]:
        """domain → topic, ``unknown`` included."""
        return self._topic_of

    def topics(self) -> list[str]:
        """Every distinct output topic (domains and ``unknown``), sorted."""
        return sorted(set(self._topic_of.values()))

