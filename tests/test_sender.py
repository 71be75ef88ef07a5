"""``rtcbus send``: callbacks signed as the vendor signs them, retried as the vendor retries,
and delivered to a running shim on a real broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import datetime

import httpx
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from consumer.cli import app as cli
from consumer.envelope import SignatureVerifier, parse_envelope
from consumer.errors import SignatureError
from consumer.examples import load_examples
from consumer.sender import (
    build_callback,
    example_callbacks,
    load_callbacks,
    send_callbacks,
    signing_secret,
)
from consumer.settings import load_settings
from test_shim import SECRET, raw_topic_settings, records_before_sentinels, running_shim

EXAMPLES = load_examples()


# -- building callbacks ---------------------------------------------------------------------------


def test_callbacks_are_signed_as_the_vendor_signs():
    callback = build_callback("UserJoinRoom", {"RoomId": "r1", "UserId": "\u5f20"}, secret="k1")
    envelope = parse_envelope(callback.body)
    SignatureVerifier(["k1"]).verify(envelope)
    with pytest.raises(SignatureError):
        SignatureVerifier(["k2"]).verify(envelope)
    document = json.loads(callback.body)
    assert isinstance(document["EventData"], str)  # a JSON document inside a string
    assert json.loads(document["EventData"]) == {"RoomId": "r1", "UserId": "\u5f20"}
    assert callback.event_id == document["EventId"]
    assert abs(envelope.event_time_ms / 1000 - time.time()) < 5
    assert datetime.fromisoformat(document["EventTime"]).utcoffset() is not None


def test_without_a_secret_callbacks_are_unsigned():
    document = json.loads(build_callback("RoomCreate", {"RoomId": "r"}).body)
    assert "Signature" not in document


def test_event_data_as_an_object_is_signed_as_written():
    data = {"RoomId": "r1", "UserId": "\u5f20", "Timestamp": 3}
    callback = build_callback("UserJoinRoom", data, secret="k1", event_data_as_object=True)
    document = json.loads(callback.body)
    assert document["EventData"] == data
    envelope = parse_envelope(callback.body)
    SignatureVerifier(["k1"]).verify(envelope, now_ms=time.time_ns() // 1_000_000)
    assert envelope.key() == "r1"


def test_callbacks_carry_the_time_they_are_built_so_a_shim_with_the_default_window_takes_them():
    # The page's examples have no EventTime of their own (the relay envelope's 2021 one is
    # dropped): each callback is stamped when it is built, as the vendor stamps the event.
    verifier = SignatureVerifier(["k"])
    now_ms = time.time_ns() // 1_000_000
    for callback in [*example_callbacks(EXAMPLES, secret="k"), *load_callbacks(EXAMPLES, 20, secret="k")]:
        verifier.verify(parse_envelope(callback.body), now_ms=now_ms)
    fixed = build_callback("RoomCreate", {"RoomId": "r"}, secret="k", event_time=datetime.fromisoformat("2021-01-27T16:40:12+08:00"))
    with pytest.raises(SignatureError, match="skew window"):
        verifier.verify(parse_envelope(fixed.body), now_ms=now_ms)


def test_signing_secret_prefers_the_apps_own():
    settings = load_settings(secrets="shared1,shared2", app_secrets={"app-a": "own1,own2"})
    assert signing_secret(settings, "app-a") == "own1"
    assert signing_secret(settings, "app-b") == "shared1"
    assert signing_secret(load_settings(), "app-b") is None
    assert isinstance(settings.secrets[0], SecretStr)


def test_example_callbacks_are_the_45_page_examples_with_fresh_ids():
    callbacks = example_callbacks(EXAMPLES, secret="k")
    assert len(callbacks) == len(EXAMPLES) == 45
    assert len({c.event_id for c in callbacks}) == 45
    for callback, example in zip(callbacks, EXAMPLES):
        envelope = parse_envelope(callback.body)
        assert envelope.event_type == example.event_type
        assert envelope.version == example.version
        assert envelope.event_data() == example.event_data
    # Fresh ids each time.
    again = example_callbacks(EXAMPLES, secret="k")
    assert not {c.event_id for c in callbacks} & {c.event_id for c in again}


def test_load_callbacks_mix_examples_with_unique_ids_and_varied_rooms():
    callbacks = list(load_callbacks(EXAMPLES, 600, rooms=7, secret="k", seed=3))
    assert len(callbacks) == 600
    assert len({c.event_id for c in callbacks}) == 600
    envelopes = [parse_envelope(c.body) for c in callbacks]
    assert len({e.event_type for e in envelopes}) > 20
    rooms = Counter(e.event_data()["RoomId"] for e in envelopes if "RoomId" in e.event_data())
    assert set(rooms) == {f"room-{n}" for n in range(7)}
    for envelope in envelopes:
        SignatureVerifier(["k"]).verify(envelope)


# -- delivery, against an HTTP stand-in -------------------------------------------------------------


def _send(handler, callbacks, **kwargs):
    return asyncio.run(
        send_callbacks("http://shim/callbacks", callbacks, transport=httpx.MockTransport(handler),
                       retry_delay_s=0, **kwargs)
    )


def test_a_failure_is_retried_up_to_three_attempts():
    seen = Counter()

    def flaky(request: httpx.Request) -> httpx.Response:
        event_id = json.loads(request.content)["EventId"]
        seen[event_id] += 1
        return httpx.Response(200 if seen[event_id] == 3 else 503)

    callbacks = example_callbacks(EXAMPLES[:5])
    report = _send(flaky, callbacks)
    assert report.statuses == {"200": 5}
    assert report.attempts == 15
    assert sorted(report.delivered) == sorted(c.event_id for c in callbacks)


def test_after_three_failures_the_callback_is_given_up():
    def broken(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["EventType"] == "UserJoinRoom":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(500)

    callbacks = [build_callback("UserJoinRoom", {}), build_callback("RoomCreate", {})]
    report = _send(broken, callbacks, attempts=3)
    assert report.statuses == {"error:ConnectError": 1, "500": 1}
    assert report.attempts == 6 and report.ok == 0 and report.failed == 2
    assert report.delivered == []


def test_concurrency_is_bounded_and_used():
    in_flight = 0
    most = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200)

    report = _send(slow, example_callbacks(EXAMPLES), concurrency=4)
    assert report.ok == 45
    assert most == 4


def test_rate_paces_the_starts():
    starts: list[float] = []

    def record(request: httpx.Request) -> httpx.Response:
        starts.append(time.monotonic())
        return httpx.Response(200)

    report = _send(record, load_callbacks(EXAMPLES, 30, seed=1), rate=100)
    assert report.ok == 30
    assert starts[-1] - starts[0] >= 0.28  # 29 intervals of 10 ms
    assert report.elapsed_s < 2


# -- delivery to a running shim ----------------------------------------------------------------------


@pytest.mark.kafka
def test_examples_reach_the_raw_topic_through_a_running_shim(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    callbacks = example_callbacks(EXAMPLES, secret=signing_secret(settings, "rtcbus-demo"))
    with running_shim(settings) as shim:
        report = asyncio.run(send_callbacks(f"{shim.url}/callbacks", callbacks, concurrency=8))
        records = records_before_sentinels(settings, settings.raw_topic)
    assert report.statuses == {"200": 45} and report.attempts == 45
    assert sorted(r.value() for r in records) == sorted(c.body for c in callbacks)
    verifier = SignatureVerifier.from_settings(settings)
    for record in records:
        verifier.verify(parse_envelope(record.value()))


@pytest.mark.kafka
def test_generated_load_reaches_the_raw_topic_keyed_by_room(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    total = 300
    generated = load_callbacks(EXAMPLES, total, rooms=10, secret=SECRET, seed=7)
    with running_shim(settings) as shim:
        report = asyncio.run(send_callbacks(f"{shim.url}/callbacks", generated, rate=300, concurrency=16))
        records = records_before_sentinels(settings, settings.raw_topic)
    assert report.statuses == {"200": total}
    ids = [parse_envelope(r.value()).event_id for r in records]
    assert len(ids) == len(set(ids)) == total
    assert set(ids) == set(report.delivered)
    room_keys = {r.key() for r in records if r.key().startswith(b"room-")}
    assert room_keys == {f"room-{n}".encode() for n in range(10)}


@pytest.mark.kafka
def test_wrong_secret_is_tried_three_times_then_reported(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    callbacks = example_callbacks(EXAMPLES[:4], secret="not-the-secret")
    with running_shim(settings) as shim:
        report = asyncio.run(send_callbacks(f"{shim.url}/callbacks", callbacks, retry_delay_s=0))
    assert report.statuses == {"401": 4}
    assert report.attempts == 12


@pytest.mark.kafka
def test_rtcbus_send_examples_command(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    with running_shim(settings) as shim:
        result = CliRunner().invoke(
            cli, ["send", "--examples", "--url", f"{shim.url}/callbacks", "--secrets", SECRET]
        )
        assert result.exit_code == 0, result.output
        assert "45 delivered, 0 failed" in result.output
        assert SECRET not in result.output
        failing = CliRunner().invoke(
            cli, ["send", "--rate", "20", "--duration", "0.5", "--url", f"{shim.url}/callbacks",
                  "--secrets", "wrong"]
        )
        assert failing.exit_code == 1
        assert "0 delivered, 10 failed" in failing.output
        assert len(records_before_sentinels(settings, settings.raw_topic)) == 45


def test_rtcbus_send_needs_examples_or_rate():
    result = CliRunner().invoke(cli, ["send"])
    assert result.exit_code == 2
    assert "--examples" in result.output
