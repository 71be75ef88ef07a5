"""The router in production, on a real broker: poison, replicas, skewed clocks, lost answers.

The fault suite (test_faults.py) breaks brokers and routers on a 3-broker cluster; these
cases need only the session's broker.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter

import pytest
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, KafkaError, KafkaException, Producer

from consumer.envelope import HEADER_ERROR_CLASS, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_SOURCE_OFFSET
from consumer.router import Router
from support import Stack, callback, decode_single_object, read_topic, running, wait_for

pytestmark = pytest.mark.kafka


def join(room: str, user: str, sequence: int) -> dict:
    return {"RoomId": room, "UserId": user, "DeviceType": "web", "Timestamp": sequence, "ExtraInfo": ""}


def produce_raw(stack: Stack, records: list[tuple[str, bytes]], **kwargs) -> None:
    """Write callbacks straight to the raw topic, as the shim would: ``(key, body)``."""
    producer = Producer({"bootstrap.servers": stack.bootstrap, "message.max.bytes": str(2 * 1024 * 1024)})
    for key, body in records:
        event = json.loads(body)
        headers = [(HEADER_EVENT_TYPE, event["EventType"].encode()), (HEADER_EVENT_ID, event["EventId"].encode())]
        producer.produce(stack.raw_topic, body, key=key.encode(), headers=headers, **kwargs)
    assert producer.flush(30) == 0


def event_ids(stack: Stack, domain: str) -> list[str]:
    return [decode_single_object(m.value())["EventId"] for m in read_topic(stack.bootstrap, stack.topic(domain))]


def test_poison_records_cost_one_dead_letter_each_and_the_room_flows_on(stack):
    router = stack.start_router()
    room, secret = "room-poison", stack.secret
    surrogate = json.dumps(join(room, "u1", 0)).replace('"u1"', '"u\\ud83d"')
    deep = json.dumps(join(room, "u1", 0))[:-1] + ', "Deep": ' + "[" * 50_000 + "]" * 50_000 + "}"
    leave = {"RoomId": room, "UserId": "u1", "Timestamp": 6}  # no DeviceType, no Reason
    join_without_extra = {"RoomId": room, "UserId": "u2", "DeviceType": "web", "Timestamp": 7}
    records = [
        ("ok-1", callback("UserJoinRoom", join(room, "u1", 1), secret, event_id="ok-1")),
        ("bad-surrogate", callback("UserJoinRoom", surrogate, secret, event_id="bad-surrogate")),
        ("ok-2", callback("UserJoinRoom", join(room, "u1", 2), secret, event_id="ok-2")),
        ("bad-huge", callback("UserJoinRoom", {"UserId": "no-room"}, secret, event_id="h" * 300_000)),
        ("ok-3", callback("UserJoinRoom", join(room, "u1", 3), secret, event_id="ok-3")),
        ("bad-deep", callback("UserJoinRoom", deep, secret, event_id="bad-deep")),
        ("ok-4", callback("UserJoinRoom", join(room, "u1", 4), secret, event_id="ok-4")),
        ("ok-leave", callback("UserLeaveRoom", leave, secret, event_id="ok-leave")),
        ("ok-join", callback("UserJoinRoom", join_without_extra, secret, event_id="ok-join")),
    ]
    produce_raw(stack, [(room, body) for _, body in records])
    stack.wait_caught_up()
    router.assert_running()

    assert event_ids(stack, "room") == ["ok-1", "ok-2", "ok-3", "ok-4", "ok-leave", "ok-join"]
    dead = read_topic(stack.bootstrap, stack.dlq_topic)
    assert len(dead) == 3
    classes = sorted(dict(m.headers())[HEADER_ERROR_CLASS].decode() for m in dead)
    assert classes == ["EncodingError", "ValidationError", "ValidationError"]
    # Each dead letter points back at its raw record, and carries its bytes.
    raw = {m.offset(): m.value() for m in read_topic(stack.bootstrap, stack.raw_topic)}
    for message in dead:
        assert message.value() == raw[int(dict(message.headers())[HEADER_SOURCE_OFFSET])]


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_with_identical_settings_all_run_and_share_the_partitions(kafka, tmp_path, replicas):
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=replicas)
    try:
        stack.start_shim()
        routers = [stack.start_router(instance=None) for _ in range(replicas)]
        for router in routers:
            wait_for(lambda r=router: re.search(r"assigned partitions \[\d", r.log()), 90, "every replica to get a partition")
        sent = []
        for n in range(60):
            event_id = f"e-{n}"
            assert stack.post(callback("UserJoinRoom", join(f"room-{n % 12}", "u", n), stack.secret, event_id=event_id)) == 200
            sent.append(event_id)
        stack.wait_caught_up()
        for router in routers:
            router.assert_running()
        ids = [line for router in routers for line in router.log().splitlines() if "transactional.id" in line]
        assert len({line.split("transactional.id ")[1].split(":")[0] for line in ids}) == replicas
    finally:
        stack.stop_all()
    counts = Counter(event_ids(stack, "room"))
    assert counts == Counter(sent)


def test_the_dedupe_window_runs_on_the_brokers_clock_not_the_shims(kafka, tmp_path):
    # A window of a minute: far longer than this test takes, far shorter than the skew.
    stack = Stack(kafka.bootstrap_servers, tmp_path, dedupe_window_s="60", signature_skew_s="30")
    try:
        stack.start_router()
        secret, room = stack.secret, "room-skew"
        first = callback("UserJoinRoom", join(room, "u1", 1), secret, event_id="orig-1")
        produce_raw(stack, [(room, first)])
        stack.wait_caught_up()
        # A shim whose clock is an hour fast, then the vendor's duplicate of the first event:
        # on producer timestamps the window's horizon would jump an hour and forget orig-1.
        fast = int(time.time() * 1000) + 3600 * 1000
        produce_raw(stack, [(room, callback("UserJoinRoom", join(room, "u2", 2), secret, event_id="fast-1"))], timestamp=fast)
        stack.wait_caught_up()  # committed: the window has moved to fast-1's time
        produce_raw(stack, [(room, first)])
        stack.wait_caught_up()
    finally:
        stack.stop_all()
    assert Counter(event_ids(stack, "room")) == Counter({"orig-1": 1, "fast-1": 1})
    raw = read_topic(stack.bootstrap, stack.raw_topic)
    assert {m.timestamp()[0] for m in raw} == {TIMESTAMP_LOG_APPEND_TIME}
    assert all(m.timestamp()[1] < fast - 3000 * 1000 for m in raw)


def _fails_its_first_commit(error: KafkaError) -> tuple[type[Producer], threading.Event]:
    """A real producer class whose first commit with records fails with ``error`` (the
    transaction is left open, as librdkafka leaves it after a fatal error), and the event
    set when it did."""
    failed = threading.Event()

    class FailsItsFirstCommit(Producer):
        def commit_transaction(self, *args):
            if not failed.is_set():
                failed.set()
                raise KafkaException(error)
            super().commit_transaction(*args)

    return FailsItsFirstCommit, failed


def test_a_fatal_producer_error_that_is_no_fence_replaces_the_producer_with_a_fixed_id(kafka, tmp_path):
    """What the rolling restart of every broker once caused in the fault suite: librdkafka
    declares the transactional producer fatally broken ("sequence desynchronization"). With
    a transactional.id set by hand the router used to exit, as if fenced by another
    instance; nobody else holds the id, so a successor producer is the cure. The open
    transaction is aborted by the successor and redone: every EventId once."""
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=2)
    settings = kafka.settings(
        topic_prefix=stack.prefix, group_id=stack.group, partitions=2, metrics_port=0,
        instance_id="fixed-0",
    )
    sent = [f"desync-{n}" for n in range(40)]
    produce_raw(
        stack,
        [(f"room-{n % 4}", callback("UserJoinRoom", join(f"room-{n % 4}", "u", n), "s", event_id=e)) for n, e in enumerate(sent)],
    )
    desync = KafkaError(
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        "ProduceRequest failed due to sequence desynchronization with broker 2 (test)", fatal=True,
    )
    factory, failed = _fails_its_first_commit(desync)
    router = Router(settings, producer_factory=factory)

    with running(router) as errors:
        wait_for(lambda: errors or failed.is_set(), 60, "the fatal error")
        stack.wait_caught_up()
    assert errors == []
    assert router.registry.get_sample_value("rtcbus_router_producer_replacements_total") == 1
    assert Counter(event_ids(stack, "room")) == Counter(sent)


def test_a_fence_with_a_fixed_id_still_stops_the_router(kafka, tmp_path):
    """The other side of the case above: with an id set by hand, a fence means another live
    instance holds it, and this one must stop rather than fence it back."""
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=2)
    settings = kafka.settings(
        topic_prefix=stack.prefix, group_id=stack.group, partitions=2, metrics_port=0,
        instance_id="fixed-0",
    )
    produce_raw(stack, [("room-0", callback("UserJoinRoom", join("room-0", "u", 0), "s", event_id="fenced-0"))])
    factory, failed = _fails_its_first_commit(
        KafkaError(KafkaError.PRODUCER_FENCED, "fenced by another instance (test)", fatal=True)
    )
    router = Router(settings, producer_factory=factory)

    with running(router) as errors:
        wait_for(lambda: errors, 60, "the router to stop on the fence")
    assert failed.is_set()
    assert [exc.args[0].code() for exc in errors] == [KafkaError.PRODUCER_FENCED]
    assert router.registry.get_sample_value("rtcbus_router_producer_replacements_total") == 0
    assert event_ids(stack, "room") == []


def test_a_commit_whose_answer_is_lost_is_not_redone_twice(kafka, tmp_path):
    """The commit reaches the coordinator and commits; its answer never comes back (every
    later call of that producer times out). The router must find out from Kafka what was
    committed before redoing anything."""
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=2)
    settings = kafka.settings(
        topic_prefix=stack.prefix, group_id=stack.group, partitions=2, metrics_port=0,
        kafka_config={"transaction.timeout.ms": "8000"},
    )
    sent = [f"lost-{n}" for n in range(40)]
    produce_raw(
        stack,
        [(f"room-{n % 4}", callback("UserJoinRoom", join(f"room-{n % 4}", "u", n), "s", event_id=e)) for n, e in enumerate(sent)],
    )

    answers_lost = threading.Event()

    class LosesItsFirstCommitAnswer(Producer):
        """A real producer whose connection dies right after its first commit with records."""

        def __init__(self, config):
            super().__init__(config)
            self.gone = False

        def commit_transaction(self, *args):
            if self.gone:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "no answer (test)", retriable=True))
            super().commit_transaction(*args)
            if not answers_lost.is_set():
                answers_lost.set()
                self.gone = True
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "no answer (test)", retriable=True))

    router = Router(settings, producer_factory=LosesItsFirstCommitAnswer)

    def sample(name: str) -> float:
        return router.registry.get_sample_value(name) or 0.0

    with running(router) as errors:
        wait_for(lambda: errors or sample("rtcbus_router_resyncs_total") >= 1, 90, "a resync after the lost answer")
        stack.wait_caught_up()
    assert errors == []
    assert answers_lost.is_set()
    assert sample("rtcbus_router_producer_replacements_total") == 1
    assert Counter(event_ids(stack, "room")) == Counter(sent)


def _with_repeats(prefix: str, count: int) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """``count`` callbacks over 4 rooms, every 7th repeating the EventId its room had last
    (a resend, to be dropped); and each room's EventIds as they must arrive, once each."""
    records, expected = [], {f"room-{r}": [] for r in range(4)}
    for n in range(count):
        room = f"room-{n % 4}"
        repeat = n % 7 == 6 and expected[room]
        event_id = expected[room][-1] if repeat else f"{prefix}-{n}"
        if not repeat:
            expected[room].append(event_id)
        records.append((room, callback("UserJoinRoom", join(room, "u", n), "s", event_id=event_id)))
    return records, expected


def _arrived(stack: Stack) -> dict[str, list[str]]:
    """Each room's EventIds in the room topic, read_committed, in offset order."""
    rooms: dict[str, list[str]] = {}
    for message in read_topic(stack.bootstrap, stack.topic("room")):
        rooms.setdefault(message.key().decode(), []).append(decode_single_object(message.value())["EventId"])
    return rooms


def test_a_commit_that_must_abort_is_redone_once_in_order(kafka, tmp_path):
    """The second of many commits fails with an error that requires an abort: the records of
    that transaction are redone from the offsets last committed, resends within and across
    transactions still dropped. Every EventId arrives once, in order per room."""
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=2)
    settings = kafka.settings(
        topic_prefix=stack.prefix, group_id=stack.group, partitions=2, metrics_port=0, commit_max_records=10,
    )
    records, expected = _with_repeats("abort", 120)
    produce_raw(stack, records)
    commits = []

    class AbortsItsSecondCommit(Producer):
        def commit_transaction(self, *args):
            commits.append(len(commits))
            if len(commits) == 2:
                raise KafkaException(KafkaError(KafkaError._STATE, "must abort (test)", txn_requires_abort=True))
            super().commit_transaction(*args)

    router = Router(settings, producer_factory=AbortsItsSecondCommit)
    with running(router) as errors:
        stack.wait_caught_up()
    assert errors == []
    assert router.registry.get_sample_value("rtcbus_router_transactions_aborted_total") == 1
    assert router.registry.get_sample_value("rtcbus_router_producer_replacements_total") == 0
    assert _arrived(stack) == expected


def test_a_record_the_producer_refuses_aborts_the_transaction_not_the_router(kafka, tmp_path):
    """What a rebalance once caused in the bench: the transaction entered an abortable error,
    and the next produce() was refused with _STATE ("Erroneous state"), an error with no
    abort flag. The router took it for a fatal one and exited. It must abort the
    transaction and redo it: every EventId once, in order per room, no producer replaced."""
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=2)
    settings = kafka.settings(
        topic_prefix=stack.prefix, group_id=stack.group, partitions=2, metrics_port=0, commit_max_records=10,
    )
    records, expected = _with_repeats("refused", 60)
    produce_raw(stack, records)
    refused = threading.Event()

    class RefusesOneMarker(Producer):
        def produce(self, topic, *args, **kwargs):
            if topic == settings.dedupe_topic and not refused.is_set():
                refused.set()
                raise KafkaException(KafkaError(KafkaError._STATE, "Unable to produce message: Local: Erroneous state"))
            super().produce(topic, *args, **kwargs)

    router = Router(settings, producer_factory=RefusesOneMarker)
    with running(router) as errors:
        stack.wait_caught_up()
    assert errors == []
    assert refused.is_set()
    assert router.registry.get_sample_value("rtcbus_router_transactions_aborted_total") == 1
    assert router.registry.get_sample_value("rtcbus_router_producer_replacements_total") == 0
    assert _arrived(stack) == expected
