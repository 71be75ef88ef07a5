"""The Quix Streams contender: the same parse → validate → route → Avro → produce, the Quix way.

An ``Application`` with ``processing_guarantee="exactly-once"`` (or at-least-once when the
settings say so), the router's commit interval and record count (``commit_interval``,
``commit_every``); the raw topic with Quix's JSON deserializer; ``sdf.apply`` validates the
envelope into the project's pydantic model and encodes it with fastavro (single-object
encoding, schemas parsed once); ``set_headers`` adds the EventType and EventId;
``to_topic`` with a callable picks the domain topic.

Quix Streams pins confluent-kafka and pydantic below the versions rtcbus uses, so it lives in
a virtualenv of its own (``.venv-quix``, made by ``make bench``); :func:`interpreter` finds it.
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
from pathlib import Path

from consumer.settings import Settings

VENV = Path(__file__).resolve().parents[1] / ".venv-quix"


def interpreter() -> Path | None:
    """The Python of the Quix virtualenv, None if Quix Streams is not installed there."""
    python = VENV / "bin" / "python"
    installed = list((VENV / "lib").glob("python*/site-packages/quixstreams"))
    return python if python.exists() and installed else None


def run(settings: Settings, stop: threading.Event) -> None:
    """Run the app until SIGTERM (Quix installs its own handlers; ``stop`` is not used)."""
    import fastavro
    from quixstreams import Application

    from bench.workload import domain_record
    from consumer.codec import SINGLE_OBJECT_MAGIC
    from consumer.events import models
    from consumer.routing import RoutingTable
    from consumer.schemas import contract

    schemas, event_models = contract(), models()
    routing = RoutingTable.from_settings(settings)
    app = Application(
        broker_address=settings.bootstrap_servers,
        consumer_group=settings.group_id,
        auto_offset_reset="earliest",
        commit_interval=settings.commit_interval_ms / 1000,
        commit_every=settings.commit_max_records,
        processing_guarantee="exactly-once" if settings.exactly_once else "at-least-once",
        state_dir=tempfile.mkdtemp(prefix="rtcbus-bench-quix-"),
        use_changelog_topics=False,
        loglevel="WARNING",
    )
    raw = app.topic(settings.raw_topic, value_deserializer="json")
    outputs = {
        topic: app.topic(topic, key_serializer="bytes", value_serializer="bytes")
        for topic in routing.topics()
    }

    def to_domain_record(envelope: dict) -> dict:
        return domain_record(envelope, event_models)

    def to_avro(record: dict) -> bytes:
        schema = schemas[record["EventType"]]
        buffer = io.BytesIO()
        buffer.write(SINGLE_OBJECT_MAGIC + schema.fingerprint)
        fastavro.schemaless_writer(buffer, schema.parsed, record)
        return buffer.getvalue()

    def headers_of(record: dict, key, timestamp, headers) -> list[tuple[str, bytes]]:
        return [
            ("rtcbus.event_type", record["EventType"].encode()),
            ("rtcbus.event_id", record["EventId"].encode()),
        ]

    def domain_topic(value, key, timestamp, headers):
        return outputs[routing.route(dict(headers)["rtcbus.event_type"].decode()).topic]

    sdf = app.dataframe(raw)
    sdf = sdf.apply(to_domain_record)
    sdf = sdf.set_headers(headers_of)
    sdf = sdf.apply(to_avro)
    sdf.to_topic(domain_topic)
    app.run()

