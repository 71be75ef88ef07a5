"""Fuzzing the ingest shim over HTTP: schemathesis generates requests from the shim's own
OpenAPI description and sends them to the ASGI app in-process, its lifespan running and its
producer writing to the session's real broker.

The properties:

- no request gets a 5xx (a 503 is the shim's answer to a broker it cannot reach, and the
  broker here is healthy);
- nothing reaches the raw topic without a 200: after the run, every record on the raw topic
  (read_committed) carries the EventId of a callback that got a 200, and every 200 is there.

A schemathesis hook signs most generated envelopes with the configured secret (EventTime set
to now, inside the skew window; EventData sometimes a vendor example), so the fuzzing reaches
past the signature check to the key, the headers and the produce. Negative generation (bodies
the schema forbids) runs beside positive.

``RTCBUS_FUZZ_SHIM_EXAMPLES`` sets the requests generated (default 200: about half a minute
once the broker is up); derandomized unless it is set, as in ``test_fuzz_envelope``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pytest
import schemathesis
from confluent_kafka import Consumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi

from consumer.envelope import sign
from consumer.kafka.admin import TopicSpec, create_topics
from consumer.kafka.config import consumer_config
from consumer.settings import Settings
from consumer.shim import create_app
from test_fuzz_envelope import EXAMPLE_EVENTS, REPORT, fuzz_report  # noqa: F401 (fuzz_report: a fixture)

EXAMPLES_SET = "RTCBUS_FUZZ_SHIM_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("RTCBUS_FUZZ_SHIM_EXAMPLES", "200"))
SECRET = "fuzz-shim-secret"
SIGNED = ("EventType", "EventData", "EventTime", "EventId", "AppId", "Version", "Nonce")


def openapi_document(app: Any) -> dict[str, Any]:
    """The shim's OpenAPI description. The one place that knows where it comes from: the
    admin app serves it at ``/openapi.json``; this asks the generator behind it directly."""
    return app.state.shim.openapi_document()


def shim_schema(app: Any) -> schemathesis.BaseSchema:
    """The schema schemathesis generates from, sending its requests to ``app`` in-process."""
    schema = schemathesis.openapi.from_dict(openapi_document(app))
    schema.app = app  # what from_asgi() sets: cases are sent to the app over ASGI
    schema.hook(flatmap_body)
    return schema


def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """A schemathesis hook: most envelopes for ``POST /callbacks`` signed with ``SECRET``."""
    if context.operation.path != "/callbacks" or not isinstance(body, dict):
        return st.just(body)
    return st.builds(
        _signed_variant, st.just(body), st.sampled_from(["as generated", "signed", "signed now", "signed example"]),
        st.sampled_from(EXAMPLE_EVENTS),
    )


def _signed_variant(body: dict[str, Any], how: str, example: Any) -> dict[str, Any]:
    if how == "as generated":
        return body
    body = dict(body)
    if how in ("signed now", "signed example"):
        # Inside the skew window: the request is sent right after it is generated.
        body["EventTime"] = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    if how == "signed example":
        body.update(EventType=example.event_type, Version=example.version, EventData=json.dumps(example.event_data))
    fields = [
        value if isinstance(value, str) else json.dumps(value)
        for value in (body.get(name, "") for name in SIGNED)
    ]
    body["Signature"] = sign([field.encode("utf-8", "replace").decode() for field in fields], SECRET)
    return body


def read_raw_topic(settings: Settings, topic: str, timeout_s: float = 60) -> list[Any]:
    """Every record on ``topic`` now, read_committed from the start to the high watermarks."""
    consumer = Consumer(consumer_config(settings, f"test-fuzz-reader-{uuid.uuid4()}"))
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records, done = [], {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + timeout_s
        while done != set(partitions):
            assert time.monotonic() < deadline, f"partitions {sorted(set(partitions) - done)} not read to the end"
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            records.append(message)
            if message.offset() + 1 >= ends[message.partition()]:
                done.add(message.partition())
        return records
    finally:
        consumer.close()


@pytest.mark.kafka
def test_no_5xx_and_only_200s_reach_the_raw_topic(kafka, unique_name, tmp_path):
    shim_settings = kafka.settings(
        topic_prefix=unique_name("fuzz-shim"), secrets=SECRET, spool_dir=str(tmp_path / "spool")
    )
    create_topics(shim_settings, [TopicSpec(shim_settings.raw_topic, 3, 1, {})])
    app = create_app(shim_settings)
    schema = shim_schema(app)
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    accepted: set[str] = set()
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=not EXAMPLES_SET,
        suppress_health_check=list(HealthCheck), print_blob=True,
    )
    @given(case=cases)
    @REPORT.counted
    def test_no_5xx_and_only_200s_reach_the_raw_topic(case):  # the test's name: the summary counts under it
        response = case.call()
        statuses[(f"{case.method} {case.path}", response.status_code)] += 1
        if response.status_code >= 500:
            failures.append(f"{response.status_code} {response.text[:200]} for {case.as_curl_command()[:2000]}")
        assert response.status_code < 500, response.text
        if case.path == "/callbacks" and response.status_code == 200:
            accepted.add(response.json()["EventId"])

    try:
        test_no_5xx_and_only_200s_reach_the_raw_topic()
    finally:
        asgi.shutdown_lifespans()  # the shim drains, forwards its spool and flushes

    summary = ", ".join(f"{op} {status}: {n}" for (op, status), n in sorted(statuses.items()))
    print(f"\nshim fuzz: {sum(statuses.values())} requests ({summary}); {len(accepted)} EventIds got a 200")
    assert not failures, failures[0]
    records = read_raw_topic(shim_settings, shim_settings.raw_topic)
    on_topic = {json.loads(record.value())["EventId"] for record in records}
    assert on_topic <= accepted, f"on the raw topic without a 200: {sorted(on_topic - accepted)[:5]}"
    assert accepted <= on_topic, f"answered 200 but not on the raw topic: {sorted(accepted - on_topic)[:5]}"
    assert accepted, f"no generated callback got a 200 ({summary}): the signing hook does not reach the produce"
