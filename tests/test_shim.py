"""The ingest shim against a real broker: what gets a 200 is on the raw topic byte for byte,
what gets a 4xx is nowhere, and a broker that is gone or frozen costs no callback: with the
spool (the default) it is spooled, without it the answer is 503.

The shim runs in-process on uvicorn (a thread, a real socket); Kafka is never mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from consumer.envelope import sign
from consumer.errors import ConfigError
from consumer.kafka.admin import TopicSpec, create_topics
from consumer.kafka.config import consumer_config, producer_config
from consumer.kafka.launcher import LocalKafka
from consumer.settings import Settings, load_settings
from consumer.shim import BodyDeadlines, BodyTooSlow, Shim, admin_server, create_app, serve, shim_server
from consumer.spool import Spool, SpoolRecord
from kafka_helpers import free_ports
from support import wait_for

SECRET = "s3cret-for-tests"
OLD_SECRET = "rotated-out-soon"
SIGNED = ("EventType", "EventData", "EventTime", "EventId", "AppId", "Version", "Nonce")


# -- helpers ------------------------------------------------------------------------------------


def envelope(event_type: str = "UserJoinRoom", event_data: dict | str | None = None, **changes) -> dict:
    data = {"RoomId": "room1", "UserId": "u1", "Timestamp": 1611736812853} if event_data is None else event_data
    document = {
        "EventType": event_type,
        "EventData": data if isinstance(data, str) else json.dumps(data),
        # Now, as the vendor stamps it: the shim refuses an EventTime outside its skew window.
        "EventTime": datetime.now(timezone(timedelta(hours=8))).isoformat(timespec="seconds"),
        "EventId": str(uuid.uuid4()),
        "AppId": "app-test",
        "Version": "2020-12-01",
        "Nonce": "4821",
    }
    document.update(changes)
    return document


def signed(document: dict, secret: str = SECRET) -> dict:
    fields = [
        # An object EventData is signed as its text in the body, which body_of writes so.
        document[name] if isinstance(document[name], str) else json.dumps(document[name], ensure_ascii=False)
        for name in SIGNED if name in document
    ]
    return {**document, "Signature": sign(fields, secret)}


def body_of(document: dict) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (the Java client's default partitioner hash)."""
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    whole = len(data) // 4
    for i in range(whole):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[4 * whole :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def java_partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass
class RunningShim:
    url: str
    admin_url: str
    shim: Shim
    server: object
    thread: threading.Thread

    def post(self, body: bytes, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}/callbacks", content=body, timeout=10, **kwargs)


@contextlib.contextmanager
def running_shim(settings: Settings) -> Iterator[RunningShim]:
    """The shim's two listeners on uvicorn in a thread, on ports the OS picks; stopped
    gracefully after."""
    app = create_app(settings)
    server = shim_server(settings.model_copy(update={"shim_port": 0}), app)
    admin = admin_server(settings.model_copy(update={"shim_admin_port": 0}), app)
    thread = threading.Thread(target=lambda: asyncio.run(serve(server, admin)), name="test-shim", daemon=True)
    thread.start()
    wait_for(lambda: (server.started and admin.started) or not thread.is_alive(), 15, "the shim to start")
    assert server.started and admin.started, "the shim did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    admin_port = admin.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningShim(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", app.state.shim, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the shim did not stop"


def raw_topic_settings(settings_of: Callable[..., Settings], unique_name: Callable[[str], str],
                       partitions: int = 3, **overrides) -> Settings:
    """Settings with a topic prefix of their own, and that prefix's raw topic created."""
    overrides.setdefault("spool_dir", tempfile.mkdtemp(prefix="rtcbus-spool-"))
    settings = settings_of(topic_prefix=unique_name("shim"), secrets=f"{SECRET},{OLD_SECRET}", **overrides)
    # The quarantine too: a body refused for its signature is kept there.
    create_topics(settings, [TopicSpec(settings.raw_topic, partitions, 1, {}), TopicSpec(settings.quarantine_topic, 1, 1, {})])
    return settings


def records_before_sentinels(settings: Settings, topic: str, timeout_s: float = 30) -> list[Message]:
    """Everything on ``topic`` up to now: a sentinel is produced to every partition, then each
    partition is read from the beginning up to its sentinel. Sentinels are not returned."""
    metadata = Producer(producer_config(settings)).list_topics(topic, timeout=10)
    partitions = sorted(metadata.topics[topic].partitions)
    sentinel = f"sentinel-{uuid.uuid4()}".encode()
    producer = Producer(producer_config(settings))
    for partition in partitions:  # one at a time: the settings may allow a tiny queue
        producer.produce(topic, sentinel, key=b"sentinel", partition=partition)
        assert producer.flush(timeout_s) == 0, "a sentinel was not acknowledged"

    consumer = Consumer(consumer_config(settings, f"test-reader-{uuid.uuid4()}"))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    records: list[Message] = []
    reached: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while reached != set(partitions):
            assert time.monotonic() < deadline, f"sentinels of {sorted(set(partitions) - reached)} not read"
            message = consumer.poll(0.5)
            if message is None or message.partition() in reached:
                continue
            assert message.error() is None, message.error()
            if message.value() == sentinel:
                reached.add(message.partition())
            else:
                records.append(message)
    finally:
        consumer.close()
    return records


def quiesced(shim: Shim) -> None:
    """Wait until the shim's producer holds nothing: whatever it produced is in the log."""
    wait_for(lambda: len(shim.bridge.producer) == 0, 30, "the shim's producer queue to drain")


def in_flight(shim: RunningShim) -> float:
    return metric_samples(httpx.get(f"{shim.admin_url}/metrics").text)[("rtcbus_shim_in_flight", ())]


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- the partitioner check itself ------------------------------------------------------------------


def test_murmur2_matches_kafkas_own_vectors():
    # From Kafka's UtilsTest.testMurmur2 (Java ints).
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, java_int in vectors.items():
        assert murmur2(data) == java_int & 0xFFFFFFFF, data


# -- accepted callbacks -------------------------------------------------------------------------


@pytest.mark.kafka
def test_accepted_callbacks_are_on_the_raw_topic_byte_for_byte_keyed_and_headed(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name, partitions=6)
    cases = {
        # Valid JSON no serializer of ours would write: tabs, reversed field order, raw non-ASCII.
        "RoomId": json.dumps(
            dict(reversed(signed(envelope(event_data={"RoomId": "r\u00e4um-1", "UserId": "\u5f20"})).items())),
            indent="\t", ensure_ascii=False,
        ).encode(),
        "PublicStreamId": body_of(signed(envelope("PushPublicStream", {"PublicStreamId": "ps-9", "Status": 1}))),
        "TaskId": body_of(signed(envelope("TranscodeStarted", {"TaskId": "task-7", "Code": 0}))),
        "AppId": body_of(signed(envelope("WbTranscodeFinished", {"Progress": 100}))),
        # A sender quirk: EventData as an object; signed over its text exactly as in the body.
        "object EventData": body_of(signed(envelope(event_data={"RoomId": "room-obj"}) | {"EventData": {"RoomId": "room-obj"}})),
        # Signed with the secret being rotated out: still accepted.
        "old secret": body_of(signed(envelope(event_data={"RoomId": "room-old"}), OLD_SECRET)),
    }
    expected_keys = {
        "RoomId": "r\u00e4um-1", "PublicStreamId": "ps-9", "TaskId": "task-7", "AppId": "app-test",
        "object EventData": "room-obj", "old secret": "room-old",
    }
    answers = {}
    with running_shim(settings) as shim:
        for name, body in cases.items():
            before = time.time_ns() // 1_000_000
            response = shim.post(body, headers={"Content-Type": "application/json"})
            after = time.time_ns() // 1_000_000
            assert response.status_code == 200, (name, response.text)
            answers[name] = (response.json(), before, after)
        records = records_before_sentinels(settings, settings.raw_topic)

    assert len(records) == len(cases)
    by_value = {record.value(): record for record in records}
    for name, body in cases.items():
        record = by_value.get(body)
        assert record is not None, f"{name}: the exact bytes are not on the raw topic"
        document = json.loads(body)
        answer, before, after = answers[name]
        assert answer == {"status": "ok", "EventId": document["EventId"], "stored": "kafka"}
        key = expected_keys[name].encode()
        assert record.key() == key, name
        assert record.partition() == java_partition(key, 6), f"{name}: not where a Java client puts {key!r}"
        headers = dict(record.headers())
        assert set(headers) == {
            "rtcbus.event_type", "rtcbus.event_id", "rtcbus.app_id", "rtcbus.version", "rtcbus.received_at",
        }
        assert headers["rtcbus.event_type"] == document["EventType"].encode()
        assert headers["rtcbus.event_id"] == document["EventId"].encode()
        assert headers["rtcbus.app_id"] == b"app-test"
        assert headers["rtcbus.version"] == b"2020-12-01"
        assert before <= int(headers["rtcbus.received_at"]) <= after


@pytest.mark.kafka
def test_unsigned_mode_accepts_unsigned_callbacks(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name).model_copy(update={"secrets": [], "unsigned": True})
    body = body_of(envelope())
    with running_shim(settings) as shim:
        response = shim.post(body)
        assert response.status_code == 200, response.text
        assert [r.value() for r in records_before_sentinels(settings, settings.raw_topic)] == [body]


# -- refused callbacks ----------------------------------------------------------------------------

MAX_BODY = 64 * 1024


def _oversized() -> bytes:
    # A valid, signed callback: only the size limit stands between it and the topic.
    document = signed(envelope(event_data={"RoomId": "room1", "ExtraInfo": "x" * MAX_BODY}))
    return body_of(document)


REFUSED = {
    "bad signature": (lambda: body_of(signed(envelope(), "not-the-secret")), 401, "Signature", "Signature"),
    "signature of other fields": (
        lambda: body_of({**signed(envelope()), "AppId": "someone-else"}), 401, "Signature", "Signature",
    ),
    "not JSON": (lambda: b"EventType=UserJoinRoom&EventId=1", 400, "not JSON", None),
    "not an object": (lambda: b'["EventType", "UserJoinRoom"]', 400, "not a JSON object", None),
    "missing EventType": (
        lambda: body_of(signed({k: v for k, v in envelope().items() if k != "EventType"})),
        400, "EventType", "EventType",
    ),
    "EventTime without offset": (
        lambda: body_of(signed(envelope(EventTime=datetime.now().isoformat(timespec="seconds")))), 400, "EventTime", "EventTime",
    ),
    "oversized": (_oversized, 413, "larger than", None),
}


@pytest.mark.kafka
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_callbacks_get_their_4xx_and_write_nothing(kafka, unique_name, case):
    make_body, status, named, field = REFUSED[case]
    settings = raw_topic_settings(kafka.settings, unique_name, max_body_bytes=MAX_BODY)
    with running_shim(settings) as shim:
        response = shim.post(make_body())
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()
        assert named in error["error"]
        assert error.get("field") == field
        assert SECRET not in response.text and OLD_SECRET not in response.text
        quiesced(shim.shim)
        assert records_before_sentinels(settings, settings.raw_topic) == []


@pytest.mark.kafka
def test_oversized_body_without_content_length_is_counted_and_refused(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name, max_body_bytes=MAX_BODY)
    body = _oversized()

    def chunks():  # a generator: httpx sends it chunked, with no Content-Length
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    with running_shim(settings) as shim:
        response = shim.post(chunks())
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
        assert response.status_code == 413, response.text
        assert f"larger than {MAX_BODY} bytes" in response.json()["error"]
        # Under the limit, chunked is fine.
        small = body_of(signed(envelope()))
        assert shim.post(iter([small[:10], small[10:]])).status_code == 200
        quiesced(shim.shim)
        assert [r.value() for r in records_before_sentinels(settings, settings.raw_topic)] == [small]


@pytest.mark.kafka
def test_record_larger_than_kafka_takes_is_413_not_a_retry(kafka, unique_name):
    # Within the body limit but over the producer's message.max.bytes: retrying cannot help.
    settings = raw_topic_settings(
        kafka.settings, unique_name, kafka_config={"message.max.bytes": "2000"}
    )
    body = body_of(signed(envelope(event_data={"RoomId": "room1", "ExtraInfo": "y" * 4000})))
    with running_shim(settings) as shim:
        response = shim.post(body)
        assert response.status_code == 413, response.text
        assert "larger than the Kafka producer accepts" in response.json()["error"]
        quiesced(shim.shim)
        assert records_before_sentinels(settings, settings.raw_topic) == []


# -- health, metrics, description ----------------------------------------------------------------


@pytest.mark.kafka
def test_healthz_readyz_metrics(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name, partitions=3, max_body_bytes=MAX_BODY)
    with running_shim(settings) as shim:
        for url in (shim.url, shim.admin_url):
            assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
            ready = httpx.get(f"{url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            body = ready.json()
            assert (body["status"], body["topic"], body["partitions"], body["kafka"]) == (
                "ready", settings.raw_topic, 3, "ok",
            )
            assert body["spool"]["state"] == "idle" and body["spool"]["depth"] == 0

        assert shim.post(body_of(signed(envelope()))).status_code == 200
        assert shim.post(body_of(signed(envelope()))).json()["stored"] == "kafka"
        assert shim.post(body_of(signed(envelope(), "wrong"))).status_code == 401
        assert shim.post(b"{").status_code == 400
        assert shim.post(_oversized()).status_code == 413
        # The public listener has no metrics and no description: those are the admin's.
        assert httpx.get(f"{shim.url}/metrics").status_code == 404
        assert httpx.get(f"{shim.url}/openapi.json").status_code == 404
        response = httpx.get(f"{shim.admin_url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = metric_samples(response.text)
    for status, count in {"200": 2, "401": 1, "400": 1, "413": 1}.items():
        assert samples[("rtcbus_shim_requests_total", (("status", status),))] == count
    for reason, count in {"signature": 1, "invalid": 1, "too_large": 1}.items():
        assert samples[("rtcbus_shim_refused_total", (("reason", reason),))] == count
    assert samples[("rtcbus_shim_signature_failures_total", ())] == 1
    assert samples[("rtcbus_shim_stored_total", (("via", "kafka"),))] == 2
    assert samples[("rtcbus_shim_produce_seconds_count", ())] == 2
    assert 0 < samples[("rtcbus_shim_produce_seconds_sum", ())] < 2 * settings.ack_timeout_s
    assert samples[("rtcbus_shim_in_flight", ())] == 0
    assert samples[("rtcbus_shim_spool_depth", ())] == 0
    assert samples[("rtcbus_shim_spool_available", ())] == 1
    assert samples[("rtcbus_shim_spooling", ())] == 0
    assert SECRET not in response.text


@pytest.mark.kafka
def test_readyz_is_503_without_the_raw_topic_and_without_a_spool(kafka, unique_name):
    settings = kafka.settings(topic_prefix=unique_name("shim-no-topic"), secrets=SECRET, spool=False)
    with running_shim(settings) as shim:
        response = httpx.get(f"{shim.url}/readyz", timeout=10)
        assert response.status_code == 503
        assert settings.raw_topic in response.json()["error"]
        assert response.json()["spool"] == {"state": "unavailable", "reason": "the spool is off"}
        assert httpx.get(f"{shim.url}/healthz").status_code == 200


@pytest.mark.kafka
def test_two_apps_in_one_process_keep_their_own_metrics(kafka, unique_name):
    first = raw_topic_settings(kafka.settings, unique_name)
    second = first.model_copy(update={"spool_dir": Path(tempfile.mkdtemp(prefix="rtcbus-spool-"))})
    with running_shim(first) as one, running_shim(second) as two:
        assert one.post(body_of(signed(envelope()))).status_code == 200
        text = httpx.get(f"{two.admin_url}/metrics").text
    assert metric_samples(text).get(("rtcbus_shim_requests_total", (("status", "200"),))) is None


@pytest.mark.kafka
def test_two_shims_cannot_share_a_spool_directory(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    with running_shim(settings):
        app = create_app(settings)

        async def start_second() -> None:
            async with app.router.lifespan_context(app):
                pass

        with pytest.raises(ConfigError, match="one shim per spool directory"):
            asyncio.run(start_second())


@pytest.mark.kafka
def test_openapi_describes_the_callback_endpoint(kafka):
    app = create_app(kafka.settings(secrets=SECRET))

    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app.state.admin)  # no lifespan needed: nothing is produced
        async with httpx.AsyncClient(transport=transport, base_url="http://shim") as client:
            return await client.get("/openapi.json")

    response = asyncio.run(fetch())
    assert response.status_code == 200
    schema = response.json()
    assert schema == json.loads(json.dumps(app.state.shim.openapi_document()))
    assert schema["openapi"].startswith("3.")
    post = schema["paths"]["/callbacks"]["post"]
    assert set(post["responses"]) == {"200", "400", "401", "408", "413", "503"}
    body_schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert set(body_schema["required"]) == {"EventType", "EventData", "EventTime", "EventId", "AppId", "Version"}
    assert {"get"} == set(schema["paths"]["/readyz"]) == set(schema["paths"]["/healthz"])
    assert "/metrics" not in schema["paths"], "the public listener serves no metrics"


# -- a broker of its own: stopped, restarted, frozen -------------------------------------------------


@dataclass
class OwnKafka:
    local: LocalKafka
    bootstrap_servers: str

    def settings(self, **overrides) -> Settings:
        return load_settings(bootstrap_servers=self.bootstrap_servers, **overrides)

    def pid(self) -> int:
        (status,) = self.local.status()
        assert status.pid is not None, "the broker is not running"
        return status.pid


@pytest.fixture(scope="module")
def own_kafka(kafka_dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnKafka]:
    """A one-node Kafka for this module alone, on free ports, data in a temporary directory."""
    local = LocalKafka(
        load_settings(kafka_home=kafka_dist, local_port=free_ports(2), brokers=1),
        cluster_dir=tmp_path_factory.mktemp("shim-kafka"),
    )
    try:
        bootstrap = local.start()
        yield OwnKafka(local, bootstrap)
    finally:
        local.stop()


@contextlib.contextmanager
def broker_restarted_after(own_kafka: OwnKafka) -> Iterator[None]:
    """Whatever happens inside, the module's broker runs again afterwards."""
    try:
        yield
    finally:
        if not any(status.pid for status in own_kafka.local.status()):
            own_kafka.local.start()


@pytest.mark.kafka
def test_without_a_spool_kafka_down_gets_503_in_time_and_every_200_survives_the_restart(own_kafka, unique_name):
    ack_timeout = 1.5
    settings = raw_topic_settings(
        own_kafka.settings, unique_name,
        ack_timeout_s=ack_timeout,
        spool=False,
        # A tiny local queue, so that a full queue (the fast 503) is reached in a few requests.
        kafka_config={"queue.buffering.max.messages": "2"},
    )
    delivered: list[bytes] = []
    with running_shim(settings) as shim, broker_restarted_after(own_kafka):
        body = body_of(signed(envelope()))
        assert shim.post(body).status_code == 200
        delivered.append(body)

        own_kafka.local.stop()
        for _ in range(2):  # these wait for the broker until the deadline, and stay queued
            started = time.monotonic()
            response = shim.post(body_of(signed(envelope())))
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert "in time" in response.json()["error"]
            assert ack_timeout - 0.1 <= elapsed <= ack_timeout + 0.75, elapsed
        started = time.monotonic()
        response = shim.post(body_of(signed(envelope())))
        assert response.status_code == 503, response.text
        assert "queue is full" in response.json()["error"]
        assert time.monotonic() - started < 0.5, "a full queue must be a fast 503"
        assert httpx.get(f"{shim.url}/readyz", timeout=10).status_code == 503

        own_kafka.local.start()

        def accepted() -> bool:
            body = body_of(signed(envelope()))
            if shim.post(body).status_code == 200:
                delivered.append(body)
            return len(delivered) >= 6

        wait_for(accepted, 90, "the shim to answer 200 again after the broker restarted", every_s=0.2)
        assert httpx.get(f"{shim.url}/readyz", timeout=10).status_code == 200
        records = records_before_sentinels(settings, settings.raw_topic)
    on_topic = [record.value() for record in records]
    missing = [body for body in delivered if body not in on_topic]
    assert not missing, f"{len(missing)} callbacks answered 200 are not on the raw topic"


@pytest.mark.kafka
def test_shutdown_stops_accepting_waits_for_in_flight_and_flushes(own_kafka, unique_name):
    # Spooling only just before the deadline: the requests are still in flight at shutdown.
    settings = raw_topic_settings(own_kafka.settings, unique_name, ack_timeout_s=4.5, spool_after_s=4.0)
    bodies = [body_of(signed(envelope(event_data={"RoomId": f"room-{n}"}))) for n in range(5)]
    frozen = False
    with running_shim(settings) as shim, ThreadPoolExecutor(len(bodies)) as pool:
        assert shim.post(body_of(signed(envelope()))).status_code == 200  # connected, PID acquired
        pid = own_kafka.pid()
        os.kill(pid, signal.SIGSTOP)  # the broker stops answering: deliveries hang in flight
        frozen = True
        try:
            answers = [pool.submit(shim.post, body) for body in bodies]
            wait_for(lambda: in_flight(shim) == len(bodies), 10, "all requests to be in flight")
            shim.server.should_exit = True

            def refused() -> bool:
                try:
                    httpx.get(f"{shim.url}/healthz", timeout=1)
                except httpx.ConnectError:
                    return True
                return False

            wait_for(refused, 5, "the shim to stop accepting connections")
            assert not any(answer.done() for answer in answers), "in-flight requests were cut short"
        finally:
            os.kill(pid, signal.SIGCONT)
            frozen = False
        statuses = [answer.result(timeout=15).status_code for answer in answers]
        shim.thread.join(timeout=30)
        assert not shim.thread.is_alive()
        assert shim.shim.bridge.unflushed == 0
    assert not frozen
    assert statuses == [200] * len(bodies)
    on_topic = {record.value() for record in records_before_sentinels(settings, settings.raw_topic)}
    assert set(bodies) <= on_topic


@pytest.mark.kafka
def test_shutdown_flushes_records_still_queued(own_kafka, unique_name):
    # Without a spool, a callback answered 503 stays queued in the producer; shutdown must
    # deliver it, not drop it.
    settings = raw_topic_settings(own_kafka.settings, unique_name, ack_timeout_s=1.0, spool=False)
    late = body_of(signed(envelope()))
    with running_shim(settings) as shim:
        assert shim.post(body_of(signed(envelope()))).status_code == 200
        pid = own_kafka.pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            assert shim.post(late).status_code == 503
            shim.server.should_exit = True
            # The poll thread ends when shutdown reaches the flush, which cannot finish while
            # the broker is frozen: from here on only the flush can deliver the record.
            wait_for(lambda: not poll_threads(), 15, "the shim's shutdown to reach its flush")
            assert shim.thread.is_alive()
        finally:
            os.kill(pid, signal.SIGCONT)
        shim.thread.join(timeout=30)
        assert shim.shim.bridge.unflushed == 0
    assert late in {record.value() for record in records_before_sentinels(settings, settings.raw_topic)}


def poll_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "rtcbus-shim-poll"]


@pytest.mark.kafka
def test_declared_oversized_body_is_refused_before_reading_it(kafka):
    app = create_app(kafka.settings(max_body_bytes=MAX_BODY, secrets=SECRET))
    reads = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 4096, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/callbacks", "raw_path": b"/callbacks", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"content-length", str(MAX_BODY + 1).encode()), (b"content-type", b"application/json")],
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"error": f"body is larger than {MAX_BODY} bytes"}
    assert reads == 0, "the body was read although Content-Length already exceeded the limit"


# -- the spool: Kafka away, the spool full, unwritable or damaged ------------------------------------


def shim_metric(shim: RunningShim, name: str, **labels: str) -> float:
    return metric_samples(httpx.get(f"{shim.admin_url}/metrics").text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.kafka
def test_kafka_down_callbacks_are_spooled_in_time_and_forwarded_in_order_when_it_returns(own_kafka, unique_name):
    settings = raw_topic_settings(own_kafka.settings, unique_name, partitions=3, spool_after_s=0.5)
    rooms = [f"room-{n}" for n in range(4)]
    sent: list[bytes] = []
    with running_shim(settings) as shim, broker_restarted_after(own_kafka):
        # Until one is acknowledged by Kafka within spool_after_s: on a loaded machine the
        # producer's first connection can take longer, and that callback is spooled.
        def stored_in_kafka() -> bool:
            body = body_of(signed(envelope(event_data={"RoomId": rooms[0], "Seq": -1 - len(sent)})))
            sent.append(body)
            return shim.post(body).json()["stored"] == "kafka"

        wait_for(stored_in_kafka, 30, "a callback stored in Kafka before the outage", 0.2)
        own_kafka.local.stop()
        slowest = 0.0
        for seq in range(40):  # one room after another, so each room's order is the send order
            body = body_of(signed(envelope(event_data={"RoomId": rooms[seq % 4], "Seq": seq})))
            started = time.monotonic()
            response = shim.post(body)
            slowest = max(slowest, time.monotonic() - started)
            assert response.status_code == 200, response.text
            assert response.json()["stored"] == "spool"
            sent.append(body)
        # A 200 from the spool proves the cut-over came before the deadline (at it, the
        # answer is a 503); what the sender needs is that answer within its 5 s.
        assert slowest < settings.ack_timeout_s, f"a spooled answer took {slowest:.2f} s"
        ready = httpx.get(f"{shim.url}/readyz", timeout=10)
        assert ready.status_code == 200, "a shim whose spool takes callbacks is ready"
        assert ready.json()["kafka"].startswith("not reachable") and ready.json()["spool"]["state"] == "spooling"
        assert ready.json()["spool"]["depth"] == 40
        assert shim_metric(shim, "rtcbus_shim_spool_oldest_age_seconds") > 0

        own_kafka.local.start()
        wait_for(lambda: shim_metric(shim, "rtcbus_shim_spool_depth") == 0, 90, "the spool to drain")
        assert shim_metric(shim, "rtcbus_shim_spool_forwarded_total") == 40
        assert shim_metric(shim, "rtcbus_shim_stored_total", via="spool") == 40
        after = body_of(signed(envelope(event_data={"RoomId": rooms[1], "Seq": 99})))
        assert shim.post(after).json()["stored"] == "kafka", "drained: straight to Kafka again"
        sent.append(after)
        records = records_before_sentinels(settings, settings.raw_topic)
    values = [record.value() for record in records]
    assert set(sent) <= set(values), "a callback answered 200 is not on the raw topic"
    assert set(values) <= set(sent), "something nobody sent is on the raw topic"
    for room in rooms:  # first copies, per room, in the order they were answered
        expected = [body for body in sent if json.loads(json.loads(body)["EventData"])["RoomId"] == room]
        seen = list(dict.fromkeys(v for v in values if v in expected))
        assert seen == expected, f"{room} out of order"


@pytest.mark.kafka
def test_a_full_spool_answers_503_never_200(own_kafka, unique_name):
    settings = raw_topic_settings(
        own_kafka.settings, unique_name, spool_after_s=0.3, spool_max_bytes=1024 * 1024,
    )
    with running_shim(settings) as shim, broker_restarted_after(own_kafka):
        assert shim.post(body_of(signed(envelope()))).status_code == 200
        own_kafka.local.stop()
        answers = []
        for n in range(20):  # ~100 kB each: the 1 MiB spool is full after 10
            body = body_of(signed(envelope(event_data={"RoomId": "room-full", "Pad": "p" * 100_000, "N": n})))
            answers.append(shim.post(body))
        statuses = [answer.status_code for answer in answers]
        first_refusal = statuses.index(503)
        assert 5 <= first_refusal <= 11 and set(statuses[first_refusal:]) == {503}, statuses
        assert "full" in answers[first_refusal].json()["error"]
        assert shim_metric(shim, "rtcbus_shim_spool_refused_total", reason="full") == 20 - first_refusal
        assert httpx.get(f"{shim.url}/healthz").status_code == 200, "a full spool is no reason to restart"
        own_kafka.local.start()
        wait_for(lambda: shim_metric(shim, "rtcbus_shim_spool_depth") == 0, 90, "the spool to drain")
        values = {record.value() for record in records_before_sentinels(settings, settings.raw_topic)}
    accepted = [answer.request.content for answer in answers if answer.status_code == 200]
    refused = [answer.request.content for answer in answers if answer.status_code == 503]
    assert set(accepted) <= values
    assert not set(refused) & values, "a callback answered 503 from a full spool was stored anyway"


@pytest.mark.kafka
def test_an_unwritable_spool_answers_503_and_the_shim_keeps_serving(own_kafka, unique_name, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    settings = raw_topic_settings(own_kafka.settings, unique_name, spool_after_s=0.3, spool_dir=blocker / "spool")
    with running_shim(settings) as shim, broker_restarted_after(own_kafka):
        assert shim.post(body_of(signed(envelope()))).json()["stored"] == "kafka"
        assert httpx.get(f"{shim.url}/healthz").status_code == 200, "no crash loop over a spool"
        assert "cannot create the spool" in httpx.get(f"{shim.url}/readyz").json()["spool"]["reason"]
        own_kafka.local.stop()
        response = shim.post(body_of(signed(envelope())))
        assert response.status_code == 503, response.text
        assert "cannot create the spool" in response.json()["error"]
        assert httpx.get(f"{shim.url}/readyz", timeout=10).status_code == 503
        assert shim_metric(shim, "rtcbus_shim_spool_available") == 0
        refused = shim_metric(shim, "rtcbus_shim_spool_refused_total", reason="unavailable")
        assert refused == 1, "the 503 the missing spool caused is counted"
    assert any("spool: unavailable" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


@pytest.mark.kafka
def test_a_damaged_spool_is_set_aside_at_start_and_its_intact_entries_forwarded(kafka, unique_name, tmp_path):
    settings = raw_topic_settings(kafka.settings, unique_name, spool_dir=tmp_path / "spool")
    bodies = [body_of(signed(envelope(event_data={"RoomId": f"room-{n % 5}", "Pad": "q" * 300}))) for n in range(1500)]

    async def fill() -> None:  # what a shim killed mid-outage leaves
        spool = Spool(settings.spool_path, settings.spool_max_bytes)
        try:
            await asyncio.gather(*(
                spool.append(SpoolRecord(f"k{n}", body, (("rtcbus.event_id", b"x"),))) for n, body in enumerate(bodies)
            ))
        finally:
            spool.close()

    asyncio.run(fill())
    db_path = settings.spool_path / "spool.db"
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    with db_path.open("r+b") as file:
        file.seek(db_path.stat().st_size // 2 // 4096 * 4096)
        file.write(os.urandom(4096))
    with running_shim(settings) as shim:
        wait_for(lambda: shim_metric(shim, "rtcbus_shim_spool_depth") == 0, 60, "the recovered spool to drain")
        forwarded = shim_metric(shim, "rtcbus_shim_spool_forwarded_total")
        values = {record.value() for record in records_before_sentinels(settings, settings.raw_topic)}
        assert shim.post(body_of(signed(envelope()))).status_code == 200, "serving, damaged spool or not"
    assert list(settings.spool_path.glob("spool.db.damaged-*")), "the damaged file was not kept"
    on_topic = [body for body in bodies if body in values]
    assert len(bodies) - 40 <= forwarded == len(on_topic) < len(bodies)


@pytest.mark.kafka
def test_a_body_that_fails_its_signature_is_quarantined_not_routed(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    wrong = body_of(signed(envelope(), "a-secret-we-do-not-have"))
    with running_shim(settings) as shim:
        assert shim.post(wrong).status_code == 401
        assert shim.post(b"{").status_code == 400  # not an envelope: nothing to keep
        wait_for(lambda: shim_metric(shim, "rtcbus_shim_quarantined_total") == 1, 30, "the quarantine's ack")
        quarantined = records_before_sentinels(settings, settings.quarantine_topic)
        raw = records_before_sentinels(settings, settings.raw_topic)
    assert [record.value() for record in quarantined] == [wrong]
    assert raw == [], "a body that failed its signature reached the raw topic"
    headers = dict(quarantined[0].headers())
    assert b"Signature" in headers["rtcbus.error.message"]
    assert SECRET.encode() not in b"".join(headers.values())


# -- slow and greedy clients --------------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def _read_response(connection: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.kafka
def test_a_request_head_that_never_completes_is_cut_off(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name, shim_header_timeout_s=1.0)
    with running_shim(settings) as shim:
        connection = _connect(shim.url)
        started = time.monotonic()
        connection.sendall(b"POST /callbacks HTTP/1.1\r\nHost: shim\r\nContent-Type: application/json\r\n")
        assert _read_until_closed(connection) == b"", "the server answered a request it never got"
        elapsed = time.monotonic() - started
        connection.close()
        assert 0.9 <= elapsed < 3.0, f"closed after {elapsed:.2f} s"
        assert shim.post(body_of(signed(envelope()))).status_code == 200


@pytest.mark.kafka
def test_a_body_that_trickles_in_too_slowly_gets_408_and_writes_nothing(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name, shim_body_timeout_s=1.0)
    body = body_of(signed(envelope()))
    with running_shim(settings) as shim:
        connection = _connect(shim.url)
        started = time.monotonic()
        connection.sendall(
            b"POST /callbacks HTTP/1.1\r\nHost: shim\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:20]
        )
        answer = _read_response(connection)
        elapsed = time.monotonic() - started
        connection.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"did not arrive within 1 s" in answer
        assert 0.9 <= elapsed < 3.0, f"answered after {elapsed:.2f} s"
        quiesced(shim.shim)
        assert records_before_sentinels(settings, settings.raw_topic) == []


@pytest.mark.kafka
def test_past_the_concurrency_bound_the_answer_is_a_fast_503(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name, shim_max_concurrency=4)
    with running_shim(settings) as shim:
        idle = [_connect(shim.url) for _ in range(4)]
        try:
            wait_for(lambda: len(shim.server.server_state.connections) >= 4, 5, "the idle connections to be accepted")
            started = time.monotonic()
            response = shim.post(body_of(signed(envelope())))
            assert response.status_code == 503, response.text
            assert time.monotonic() - started < 1.0, "past the bound, the 503 must be fast"
        finally:
            for connection in idle:
                connection.close()
        wait_for(lambda: len(shim.server.server_state.connections) == 0, 5, "the idle connections to close")
        assert shim.post(body_of(signed(envelope()))).status_code == 200


@pytest.mark.kafka
def test_a_fatal_producer_error_fails_liveness_so_the_shim_is_restarted(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    with running_shim(settings) as shim:
        assert httpx.get(f"{shim.url}/healthz").status_code == 200
        # What librdkafka's error_cb reports for a fatal error (e.g. an idempotence epoch
        # that cannot be recovered): the producer is unusable for good.
        shim.shim.bridge.on_error(KafkaError(KafkaError._FATAL, "test: producer fenced", fatal=True))
        health = httpx.get(f"{shim.url}/healthz")
        assert health.status_code == 503 and "_FATAL" in health.json()["error"]
        assert httpx.get(f"{shim.admin_url}/healthz").status_code == 503
        assert httpx.get(f"{shim.url}/readyz", timeout=10).status_code == 503


@pytest.mark.kafka
def test_graceful_shutdown_keeps_the_spool_and_the_next_start_forwards_it(own_kafka, unique_name, tmp_path):
    settings = raw_topic_settings(own_kafka.settings, unique_name, spool_after_s=0.3, spool_dir=tmp_path / "spool")
    bodies = [body_of(signed(envelope(event_data={"RoomId": "room-kept", "N": n}))) for n in range(10)]
    with broker_restarted_after(own_kafka):
        with running_shim(settings) as shim:
            assert shim.post(body_of(signed(envelope()))).status_code == 200
            # (A producer still fetching its id may have spooled that one: let it drain.)
            wait_for(lambda: shim_metric(shim, "rtcbus_shim_spool_depth") == 0, 30, "an empty spool")
            own_kafka.local.stop()
            assert [shim.post(body).json()["stored"] for body in bodies] == ["spool"] * 10
            shim.server.should_exit = True
            shim.thread.join(timeout=60)
        # Stopped with Kafka still away: everything it answered 200 for is on disk.
        db = sqlite3.connect(settings.spool_path / "spool.db")
        assert db.execute("SELECT value FROM entries ORDER BY seq").fetchall() == [(b,) for b in bodies]
        db.close()
        own_kafka.local.start()
        with running_shim(settings) as shim:
            wait_for(lambda: shim_metric(shim, "rtcbus_shim_spool_depth") == 0, 60, "the kept spool to drain")
            values = [record.value() for record in records_before_sentinels(settings, settings.raw_topic)]
    assert [v for v in values if v in bodies] == bodies


# -- body deadlines -------------------------------------------------------------------------------


def _body_read(deadlines, messages: list[dict]):
    """A read by ``deadlines`` of a request whose receive() gives ``messages``, then waits."""

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a body that never comes

    return deadlines.read({"headers": []}, receive, 1024)


def test_a_body_read_gives_the_body_and_leaves_nothing_behind():
    deadlines = BodyDeadlines(0.2)

    async def main() -> bytes:
        return await _body_read(deadlines, [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"c", "more_body": False},
        ])

    assert asyncio.run(main()) == b"abc"
    assert not deadlines._reads and not deadlines._expired


def test_a_body_read_past_its_deadline_is_too_slow_and_another_cancellation_is_not():
    deadlines = BodyDeadlines(0.2)

    async def slow() -> float:
        started = time.monotonic()
        with pytest.raises(BodyTooSlow):
            await _body_read(deadlines, [{"type": "http.request", "body": b"a", "more_body": True}])
        return time.monotonic() - started

    elapsed = asyncio.run(slow())
    assert 0.2 <= elapsed < 2.0  # late by a tick (25 ms) and whatever a loaded machine adds

    async def stopped() -> None:
        read = asyncio.ensure_future(_body_read(deadlines, []))
        await asyncio.sleep(0.05)
        read.cancel()  # the server stopping, not the deadline
        with pytest.raises(asyncio.CancelledError):
            await read

    asyncio.run(stopped())
    assert not deadlines._reads and not deadlines._expired
