"""The quarantine: the writer's caps with a real producer, redrive with a rotated secret on the real broker."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from consumer.envelope import (
    HEADER_APP_ID,
    HEADER_ERROR_MESSAGE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_RECEIVED_AT,
    HEADER_REMOTE,
    HEADER_VERSION,
    SignatureVerifier,
    parse_envelope,
    raw_headers,
)
from consumer.errors import ConfigError, SignatureError
from consumer.kafka.admin import create_topics, topic_specs
from consumer.kafka.config import producer_config
from consumer.quarantine import QuarantineWriter, list_quarantine, redrive
from support import RTCBUS, callback, read_topic

SECRET_A, SECRET_B, SECRET_C = "secret-A-old", "secret-B-new", "secret-C-unknown"
SKEW_S = 300.0
ROOM = {"RoomId": "room-1", "UserId": "u1", "DeviceType": "android", "Timestamp": 1, "ExtraInfo": ""}


# Years before the test runs: only the time a body was received can put it in the skew window.
EVENT_TIME = "2024-05-01T12:00:00+08:00"


def _callback(event_data: dict, secret: str, **fields: str) -> bytes:
    return callback("UserJoinRoom", event_data, secret, event_time=EVENT_TIME, **fields)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _headers(message) -> dict[str, bytes]:
    return dict(message.headers() or ())


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def producer(kafka):
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "enable.idempotence": True})
    yield producer
    producer.flush(10)


# -- the writer ------------------------------------------------------------------------------


@pytest.mark.kafka
def test_writer_keeps_bodies_byte_for_byte_up_to_the_record_cap(kafka, make_topic, producer):
    topic, clock, registry = make_topic(), FakeClock(), CollectorRegistry()
    writer = QuarantineWriter(producer, topic, max_records_per_s=5, max_bytes_per_s=1024 * 1024,
                              registry=registry, clock=clock)
    bodies = [_callback(ROOM, SECRET_B, event_id=f"ev-{i}") for i in range(40)]

    first = [writer.offer(body, "Signature does not match", 1_700_000_000_000, "10.0.0.7") for body in bodies[:20]]
    clock.now += 1.0  # one second later: five more tokens
    second = [writer.offer(body, "Signature does not match", 1_700_000_001_000) for body in bodies[20:]]
    assert producer.flush(30) == 0

    assert first == [True] * 5 + [False] * 15
    assert second == [True] * 5 + [False] * 15
    records = read_topic(kafka.bootstrap_servers, topic)
    assert [r.value() for r in records] == bodies[:5] + bodies[20:25]
    assert [r.key() for r in records] == [f"ev-{i}".encode() for i in [*range(5), *range(20, 25)]]
    headers = _headers(records[0])
    assert headers[HEADER_ERROR_MESSAGE] == b"Signature does not match"
    assert headers[HEADER_RECEIVED_AT] == b"1700000000000"
    assert headers[HEADER_REMOTE] == b"10.0.0.7"
    assert (headers[HEADER_EVENT_ID], headers[HEADER_EVENT_TYPE], headers[HEADER_APP_ID], headers[HEADER_VERSION]) == (
        b"ev-0", b"UserJoinRoom", b"app-test", b"2020-12-01"
    )
    assert HEADER_REMOTE not in _headers(records[5])
    assert _count(registry, "rtcbus_shim_quarantined_total") == 10
    assert _count(registry, "rtcbus_shim_quarantine_dropped_total", reason="rate") == 30
    assert _count(registry, "rtcbus_shim_quarantine_dropped_total", reason="bytes") == 0


@pytest.mark.kafka
def test_writer_caps_bytes_and_never_keeps_a_body_over_a_seconds_worth(kafka, make_topic, producer):
    topic, clock, registry = make_topic(), FakeClock(), CollectorRegistry()
    body = _callback({**ROOM, "ExtraInfo": "x" * 3000}, SECRET_B)
    huge = _callback({**ROOM, "ExtraInfo": "x" * 20_000}, SECRET_B)
    writer = QuarantineWriter(producer, topic, max_records_per_s=1000, max_bytes_per_s=3.5 * len(body),
                              registry=registry, clock=clock)

    kept = [writer.offer(body, "Signature does not match", 1) for _ in range(5)]
    clock.now += 60.0
    assert writer.offer(huge, "Signature does not match", 2) is False
    assert writer.offer(b"\xff not even JSON", "Signature does not match", 3) is True  # nothing to describe
    assert producer.flush(30) == 0

    assert kept == [True, True, True, False, False]  # 3.5 bodies' worth a second
    records = read_topic(kafka.bootstrap_servers, topic)
    assert [r.value() for r in records] == [body] * 3 + [b"\xff not even JSON"]
    assert records[3].key() is None
    assert set(_headers(records[3])) == {HEADER_ERROR_MESSAGE, HEADER_RECEIVED_AT}
    assert _count(registry, "rtcbus_shim_quarantine_dropped_total", reason="bytes") == 3
    assert _count(registry, "rtcbus_shim_quarantined_total") == 4


@pytest.mark.kafka
def test_writer_counts_what_kafka_refuses_and_logs_it_once_a_minute(kafka, make_topic, caplog):
    topic, registry = make_topic(), CollectorRegistry()
    # Nobody polls this producer, so its one-record queue stays full.
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "queue.buffering.max.messages": 1})
    writer = QuarantineWriter(producer, topic, max_records_per_s=100, max_bytes_per_s=1024 * 1024, registry=registry)
    body = _callback(ROOM, SECRET_B)

    with caplog.at_level(logging.WARNING, logger="consumer.quarantine"):
        results = [writer.offer(body, "Signature does not match", 1) for _ in range(5)]
    producer.flush(10)

    assert results == [True, False, False, False, False]
    assert _count(registry, "rtcbus_shim_quarantine_dropped_total", reason="error") == 4
    assert len([r for r in caplog.records if r.name == "consumer.quarantine"]) == 1
    assert "queue is full" in caplog.records[0].getMessage()


def test_the_reason_the_shim_passes_holds_no_secret():
    body = _callback(ROOM, SECRET_B)
    verifier = SignatureVerifier(secrets=[SECRET_A], skew_s=SKEW_S)

    with pytest.raises(SignatureError) as refused:
        verifier.verify(parse_envelope(body), now_ms=parse_envelope(body).event_time_ms)

    assert SECRET_A not in refused.value.message and SECRET_B not in refused.value.message
    assert SECRET_A not in str(refused.value)


# -- redrive ---------------------------------------------------------------------------------


def _settings(kafka, unique_name, **overrides):
    return kafka.settings(
        topic_prefix=unique_name("prefix").replace("test.prefix.", "q"),
        group_id=unique_name("group"),
        signature_skew_s=SKEW_S,
        **overrides,
    )


def _with_secrets(kafka, settings, secrets: str):
    """The same topics and group, other secrets: the shim's settings once the secret is fixed."""
    return kafka.settings(
        topic_prefix=settings.topic_prefix, group_id=settings.group_id, signature_skew_s=SKEW_S, secrets=secrets
    )


def _create_topics(settings) -> None:
    wanted = {settings.raw_topic, settings.quarantine_topic}
    create_topics(settings, [spec for spec in topic_specs(settings, 1) if spec.name in wanted])


def _quarantine(settings, bodies_and_received: list[tuple[bytes, int]]) -> None:
    """What the shim does with settings whose secret is wrong: verify, and quarantine on a SignatureError."""
    verifier = SignatureVerifier.from_settings(settings)
    producer = Producer(producer_config(settings))  # the shim's
    writer = QuarantineWriter.from_settings(settings, producer, CollectorRegistry())
    for body, received_ms in bodies_and_received:
        try:
            verifier.verify(parse_envelope(body), now_ms=received_ms)
            raise AssertionError("the test's body passed the check it should fail")
        except SignatureError as exc:
            assert writer.offer(body, exc.message, received_ms, "192.0.2.1")
    assert producer.flush(30) == 0


def _received(body: bytes, after_s: float = 2.0) -> int:
    return parse_envelope(body).event_time_ms + int(after_s * 1000)


@pytest.mark.kafka
def test_redrive_after_a_rotation_forwards_what_passes_now_exactly_once(kafka, unique_name):
    old = _settings(kafka, unique_name, secrets=SECRET_A)
    _create_topics(old)
    rotated = [_callback({**ROOM, "RoomId": f"room-{i}"}, SECRET_B, event_id=f"ev-b{i}") for i in range(3)]
    unknown = _callback(ROOM, SECRET_C, event_id="ev-c")
    _quarantine(old, [(body, _received(body)) for body in [*rotated, unknown]])
    fixed = _with_secrets(kafka, old, f"{SECRET_A},{SECRET_B}")
    lines: list[str] = []

    first = redrive(fixed, report=lines.append, batch_size=2)  # two transactions
    second = redrive(fixed, report=lines.append)

    assert (first.forwarded, dict(first.still_failing), first.unparseable) == (3, {"Signature does not match": 1}, 0)
    assert (second.forwarded, second.examined) == (0, 0)
    assert len(lines) == 1 and "EventId=ev-c" in lines[0] and "Signature does not match" in lines[0]
    raw = read_topic(kafka.bootstrap_servers, old.raw_topic)  # read_committed
    assert sorted(r.value() for r in raw) == sorted(rotated)
    for record in raw:
        envelope = parse_envelope(record.value())
        assert record.key() == envelope.key().encode()
        assert record.headers() == raw_headers(envelope, _received(record.value()))
    assert "4 quarantined records examined: forwarded 3 to raw, 1 still failing, 0 unparseable" in first.describe()
    assert "still failing: 1  Signature does not match" in first.describe()


@pytest.mark.kafka
def test_redrive_checks_eventtime_against_when_the_body_was_received_not_now(kafka, unique_name):
    old = _settings(kafka, unique_name, secrets=SECRET_A)
    _create_topics(old)
    # EventTime 2024: "now" is years past any skew window, the time received is not.
    on_time = _callback(ROOM, SECRET_B, event_id="ev-on-time")
    late = _callback(ROOM, SECRET_B, event_id="ev-late")
    _quarantine(old, [(on_time, _received(on_time, 10)), (late, _received(late, 2 * SKEW_S))])

    summary = redrive(_with_secrets(kafka, old, SECRET_B))

    assert summary.forwarded == 1
    [(reason, count)] = summary.still_failing.items()
    assert reason.startswith("EventTime") and "skew window" in reason and count == 1
    assert [r.value() for r in read_topic(kafka.bootstrap_servers, old.raw_topic)] == [on_time]


@pytest.mark.kafka
def test_a_dry_run_writes_and_commits_nothing(kafka, unique_name):
    old = _settings(kafka, unique_name, secrets=SECRET_A)
    _create_topics(old)
    body = _callback(ROOM, SECRET_B)
    _quarantine(old, [(body, _received(body))])
    fixed = _with_secrets(kafka, old, SECRET_B)

    dry = redrive(fixed, dry_run=True)
    assert (dry.forwarded, dry.dry_run) == (1, True)
    assert "would forward 1" in dry.describe()
    assert read_topic(kafka.bootstrap_servers, old.raw_topic) == []
    assert list_quarantine(fixed).pending == 1

    assert redrive(fixed).forwarded == 1
    assert list_quarantine(fixed).pending == 0


@pytest.mark.kafka
def test_unparseable_records_are_counted_and_passed_over(kafka, unique_name, producer):
    settings = _settings(kafka, unique_name, secrets=SECRET_B)
    _create_topics(settings)
    producer.produce(settings.quarantine_topic, b"{not json", headers=[(HEADER_EVENT_ID, b"ev-x")])
    producer.flush(10)

    lines: list[str] = []
    summary = redrive(settings, report=lines.append)

    assert (summary.forwarded, summary.unparseable, summary.examined) == (0, 1, 1)
    assert lines[0].startswith("unparseable: EventId=ev-x")
    assert redrive(settings).examined == 0


@pytest.mark.kafka
def test_redrive_without_secrets_refuses(kafka, unique_name):
    settings = _settings(kafka, unique_name, unsigned=True)

    with pytest.raises(ConfigError, match="secrets"):
        redrive(settings)


@pytest.mark.kafka
def test_list_counts_by_reason_and_app(kafka, unique_name):
    old = _settings(kafka, unique_name, secrets=SECRET_A)
    _create_topics(old)
    bodies = [_callback(ROOM, SECRET_B) for _ in range(3)]
    _quarantine(old, [(b, _received(b)) for b in bodies[:2]] + [(bodies[2], _received(bodies[2], 2 * SKEW_S))])

    listing = list_quarantine(old)

    assert listing.total == listing.pending == 3
    assert dict(listing.by_reason_and_app) == {("Signature does not match", "app-test"): 3}
    assert listing.first_received_ms == _received(bodies[0])
    assert listing.last_received_ms == _received(bodies[2], 2 * SKEW_S)


@pytest.mark.kafka
def test_cli_quarantine_list_and_redrive(kafka, unique_name):
    old = _settings(kafka, unique_name, secrets=SECRET_A)
    _create_topics(old)
    good = _callback(ROOM, SECRET_B, event_id="ev-good")
    bad = _callback(ROOM, SECRET_C, event_id="ev-bad")
    _quarantine(old, [(good, _received(good)), (bad, _received(bad))])
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RTCBUS_")},
        "RTCBUS_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "RTCBUS_TOPIC_PREFIX": old.topic_prefix,
        "RTCBUS_GROUP_ID": old.group_id,
        "RTCBUS_SIGNATURE_SKEW_S": str(SKEW_S),
    }

    def rtcbus(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([RTCBUS, *args], env=env, capture_output=True, text=True, timeout=120)

    listed = rtcbus("quarantine", "list")
    redriven = rtcbus("quarantine", "redrive", "--secrets", SECRET_B)

    assert listed.returncode == 0, listed.stderr
    assert "2 quarantined records, 2 not redriven yet" in listed.stdout
    assert "app-test" in listed.stdout and "Signature does not match" in listed.stdout
    assert redriven.returncode == 0, redriven.stderr
    assert "forwarded 1 to raw, 1 still failing" in redriven.stdout
    assert "EventId=ev-bad" in redriven.stdout
    assert SECRET_B not in redriven.stdout + redriven.stderr
    assert [json.loads(r.value())["EventId"] for r in read_topic(kafka.bootstrap_servers, old.raw_topic)] == ["ev-good"]
