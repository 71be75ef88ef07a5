"""The benchmarks' fixed mixed workload: every EventType, weighted as a real app sees them.

The EventTypes are those of the events page's examples (``consumer.examples``), each mapped to
its domain by the default routing table; the weights are given per domain and split evenly
among the domain's EventTypes, and an EventType with several example variants (e.g.
``RecordStopped`` in four Versions) picks one of them evenly. Why these shares: in an RTC app
every participant starts and stops audio and video streams and joins and leaves rooms many
times per session, recording and the real-time media services (segments, snapshots,
transcoding) fire once per task or per interval, and whiteboard transcoding is rare.

=================  =======  ==========================================================
domain             share %  EventTypes
=================  =======  ==========================================================
stream              40      8 (audio, video, screen audio, screen video: start and stop)
room                30      8 (join, leave, invisible join and leave, role changes, ...)
recording            8      10
segment              5      1
snapshot             5      1
transcode            4      4
relay                2      1
publicstream         2      1
webcast              1.5    1
music                1.5    1
whiteboard           1      2
=================  =======  ==========================================================

Every contender of every comparison is fed from the same generator with the same seed, so
they see the same bytes; each event has its own EventId, and RoomIds vary among ``rooms``
so that keys spread over partitions as they would in production.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from consumer.examples import Example, load_examples
from consumer.envelope import partition_key
from consumer.routing import DEFAULT_DOMAINS
from consumer.sender import DEFAULT_APP_ID, build_callback

SECRET = "bench-secret"  # every body is signed with it; the shims under test check it

DOMAIN_SHARES: Mapping[str, float] = MappingProxyType(
    {
        "stream": 40, "room": 30, "recording": 8, "segment": 5, "snapshot": 5,
        "transcode": 4, "relay": 2, "publicstream": 2, "webcast": 1.5, "music": 1.5,
        "whiteboard": 1,
    }
)


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One signed callback as the shim writes it to the raw topic."""

    event_type: str
    key: bytes
    body: bytes


def weights() -> dict[str, float]:
    """EventType → share of the workload in percent, for every EventType of the examples.

    Raises:
        ValueError: an example's EventType has no domain, or a domain has no share.
    """
    domain_of = {t: d for d, types in DEFAULT_DOMAINS.items() for t in types}
    event_types = sorted({example.event_type for example in load_examples()})
    by_domain: dict[str, list[str]] = defaultdict(list)
    for event_type in event_types:
        if event_type not in domain_of:
            raise ValueError(f"{event_type} has no domain in the routing table")
        by_domain[domain_of[event_type]].append(event_type)
    missing = sorted(set(by_domain) - set(DOMAIN_SHARES))
    if missing:
        raise ValueError(f"no workload share for domain(s): {', '.join(missing)}")
    return {
        event_type: DOMAIN_SHARES[domain] / len(types)
        for domain, types in by_domain.items()
        for event_type in types
    }


def draws(count: int | None, *, seed: int = 1, rooms: int = 200) -> Iterator[tuple[Example, dict]]:
    """``count`` (None: endless) examples drawn by weight, each with its EventData and a
    RoomId among ``rooms``."""
    variants: dict[str, list[Example]] = defaultdict(list)
    for example in load_examples():
        variants[example.event_type].append(example)
    shares = weights()
    event_types = list(shares)
    cumulative = list(_accumulate(shares[t] for t in event_types))
    rng = random.Random(seed)
    drawn = 0
    while count is None or drawn < count:
        event_type = rng.choices(event_types, cum_weights=cumulative)[0]
        example = rng.choice(variants[event_type])
        data = dict(example.event_data)
        if "RoomId" in data:
            data["RoomId"] = f"room-{rng.randrange(rooms)}"
        yield example, data
        drawn += 1


def raw_records(count: int, *, seed: int = 1, prefix: str = "bench") -> list[RawRecord]:
    """``count`` signed callbacks with EventIds ``<prefix>-<n>``, keyed as the shim keys them."""
    records = []
    for number, (example, data) in enumerate(draws(count, seed=seed)):
        event_id = f"{prefix}-{number}"
        callback = build_callback(
            example.event_type, data, version=example.version, secret=SECRET, event_id=event_id
        )
        key = partition_key(data, DEFAULT_APP_ID, event_id).encode()
        records.append(RawRecord(example.event_type, key, callback.body))
    return records


def _accumulate(values: Iterator[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


def domain_record(envelope: dict, event_models: Mapping) -> dict:
    """The Avro record of a JSON-decoded callback, the plain way: validate the whole envelope,
    EventData parsed, into the EventType's pydantic model, then dump it (the textbook and
    Quix arms share it, so they differ from each other only in their framework)."""
    import json

    from consumer.envelope import parse_event_time

    event_type = envelope["EventType"]
    event = event_models[event_type].model_validate(
        {
            "EventId": envelope["EventId"],
            "EventType": event_type,
            "EventTime": parse_event_time(envelope["EventTime"]),
            "AppId": envelope["AppId"],
            "Version": envelope["Version"],
            "EventData": json.loads(envelope["EventData"]),
            "Source": None,
        }
    )
    record = event.model_dump()
    record["ExtraFields"] = {}
    return record
