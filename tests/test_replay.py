"""``rtcbus replay`` on a real broker: a time range of raw re-derived into a new prefix, exactly once.

One stack routes three stretches of raw (before, within and after the range) once for the
module; each test replays the middle one into a prefix of its own and compares with what
the router wrote.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from consumer.envelope import HEADER_EVENT_ID, HEADER_EVENT_TYPE
from consumer.replay import replay
from support import RTCBUS, Stack, callback, decode_single_object, read_topic, wait_for

pytestmark = pytest.mark.kafka

ROOMS = [f"room-{n}" for n in range(6)]


def join(room: str, user: str, sequence: int) -> dict:
    return {"RoomId": room, "UserId": user, "DeviceType": "web", "Timestamp": sequence, "ExtraInfo": ""}


def audio(room: str, user: str, sequence: int) -> dict:
    return {"RoomId": room, "UserId": user, "DeviceType": "web", "Timestamp": sequence}


def produce_raw(stack: Stack, records: list[tuple[str, bytes]]) -> None:
    """Write callbacks straight to the raw topic with the shim's key and headers."""
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    for key, body in records:
        event = json.loads(body)
        headers = [(HEADER_EVENT_TYPE, event["EventType"].encode()), (HEADER_EVENT_ID, event["EventId"].encode())]
        producer.produce(stack.raw_topic, body, key=key.encode(), headers=headers)
    assert producer.flush(30) == 0


def stretch(name: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` joins and audio starts over the rooms, in order per room."""
    records = []
    for n in range(count):
        room = ROOMS[n % len(ROOMS)]
        if n % 3 == 2:
            body = callback("UserAudioStreamStart", audio(room, f"u{n}", n), "s", event_id=f"{name}-{n}")
        else:
            body = callback("UserJoinRoom", join(room, f"u{n}", n), "s", event_id=f"{name}-{n}")
        records.append((room, body))
    return records


def now_ms_after_a_pause() -> int:
    # Raw carries LogAppendTime from this machine's clock: a pause puts the stretches in
    # distinct milliseconds on either side of the mark.
    time.sleep(0.05)
    mark = int(time.time() * 1000)
    time.sleep(0.05)
    return mark


@pytest.fixture(scope="module")
def routed(kafka, tmp_path_factory):
    """Raw of 3 stretches routed once: ``before``, ``within`` (with re-sends and a poison
    record) and ``after``; the range's marks and the router's records by domain."""
    stack = Stack(kafka.bootstrap_servers, tmp_path_factory.mktemp("replay"))
    try:
        stack.start_router()
        produce_raw(stack, stretch("before", 12))
        since = now_ms_after_a_pause()
        within = stretch("within", 60)
        # The vendor re-sends the first few (the router drops them) and one body is poison.
        resent = within[:4]
        poison = (ROOMS[0], callback("UserJoinRoom", "{broken json", "s", event_id="within-poison"))
        produce_raw(stack, [*within[:30], poison, *within[30:], *resent])
        until = now_ms_after_a_pause()
        produce_raw(stack, stretch("after", 12))
        stack.wait_caught_up()
    finally:
        stack.stop_all()
    return SimpleNamespace(stack=stack, since=since, until=until, settings=kafka.settings(
        topic_prefix=stack.prefix, group_id=stack.group, partitions=3, metrics_port=0,
    ))


def by_room(bootstrap: str, topic: str) -> dict[str, list[str]]:
    """The EventIds of a domain topic per room (key), in order; each record's Source checked."""
    rooms: dict[str, list[str]] = defaultdict(list)
    for message in read_topic(bootstrap, topic):
        record = decode_single_object(message.value())
        rooms[message.key().decode()].append(record["EventId"])
    return dict(rooms)


def originals(routed, domain: str) -> dict[str, list[str]]:
    rooms = by_room(routed.stack.bootstrap, routed.stack.topic(domain))
    kept = {room: [e for e in ids if e.startswith("within-")] for room, ids in rooms.items()}
    return {room: ids for room, ids in kept.items() if ids}


def run_replay(routed, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    return subprocess.run(
        [RTCBUS, "replay", "--from", str(routed.since), "--until", str(routed.until), "--to-prefix", prefix, *args],
        env={**environment, **routed.stack.env}, capture_output=True, text=True, timeout=120,
    )


def test_a_replay_reproduces_the_domain_records_of_the_range(routed):
    prefix = f"r{uuid.uuid4().hex[:10]}"
    result = run_replay(routed, prefix)
    assert result.returncode == 0, result.stderr

    bootstrap = routed.stack.bootstrap
    for domain in ("room", "stream"):
        expected = originals(routed, domain)
        assert sum(map(len, expected.values())) == {"room": 40, "stream": 20}[domain]
        assert by_room(bootstrap, f"{prefix}.events.{domain}") == expected, domain
    # Records name the raw record they come from: the source's, as the originals do.
    first = decode_single_object(read_topic(bootstrap, f"{prefix}.events.room")[0].value())
    assert first["Source"]["Topic"] == routed.stack.raw_topic
    assert len(read_topic(bootstrap, f"{prefix}.callbacks.dlq")) == 1
    assert "65 raw records read, 60 routed, 4 duplicates dropped, 1 dead letters" in result.stdout
    assert "40  room" in result.stdout and "20  stream" in result.stdout

    again = run_replay(routed, prefix)  # done already: nothing more is written
    assert again.returncode == 0, again.stderr
    assert "0 raw records read" in again.stdout
    assert sum(map(len, by_room(bootstrap, f"{prefix}.events.room").values())) == 40


def test_types_restricts_the_replay_and_the_offsets_move_past_the_rest(routed):
    prefix = f"r{uuid.uuid4().hex[:10]}"
    result = run_replay(routed, prefix, "--types", "UserAudioStreamStart")
    assert result.returncode == 0, result.stderr

    bootstrap = routed.stack.bootstrap
    assert by_room(bootstrap, f"{prefix}.events.stream") == originals(routed, "stream")
    assert read_topic(bootstrap, f"{prefix}.events.room") == []
    assert read_topic(bootstrap, f"{prefix}.callbacks.dlq") == []
    assert "20 routed" in result.stdout and "44 skipped by --types" in result.stdout
    assert "0 raw records read" in run_replay(routed, prefix, "--types", "UserAudioStreamStart").stdout


class Interrupted(Exception):
    """Ctrl-C, as far as the replay can tell: it aborts what is open and gives up."""


def test_an_interrupted_replay_resumes_exactly_once(routed):
    prefix = f"r{uuid.uuid4().hex[:10]}"

    def interrupt(done: int, total: int) -> None:
        if done >= 23:  # mid-way through a transaction of at most 5 records
            raise Interrupted

    with pytest.raises(Interrupted):
        replay(routed.settings, routed.since, routed.until, to_prefix=prefix, on_progress=interrupt, batch_size=5)

    result = run_replay(routed, prefix)
    assert result.returncode == 0, result.stderr
    resumed = int(re.search(r"resumed: (\d+) raw offsets", result.stdout).group(1))
    assert 0 < resumed < 23  # the committed transactions, not the one interrupted

    bootstrap = routed.stack.bootstrap
    for domain in ("room", "stream"):
        replayed = by_room(bootstrap, f"{prefix}.events.{domain}")
        assert replayed == originals(routed, domain), domain
        assert all(count == 1 for count in Counter(e for ids in replayed.values() for e in ids).values())
    assert len(read_topic(bootstrap, f"{prefix}.callbacks.dlq")) == 1


def replay_committed(routed, prefix: str, timeout_s: float = 10) -> int:
    """Raw offsets of the range the replay group into ``prefix`` has committed.

    Raises:
        KafkaException: the group's offsets are unstable (sent in a transaction still
            open) for longer than ``timeout_s``.
    """
    consumer = Consumer({"bootstrap.servers": routed.stack.bootstrap, "group.id": f"{routed.stack.group}-replay-{prefix}"})
    try:
        partitions = [TopicPartition(routed.stack.raw_topic, p, routed.since) for p in range(3)]
        starts = {tp.partition: tp.offset for tp in consumer.offsets_for_times(partitions, timeout=10)}
        committed = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in partitions], timeout=timeout_s)
        return sum(tp.offset - starts[tp.partition] for tp in committed if tp.offset >= 0)
    finally:
        consumer.close()


def committed_so_far(routed, prefix: str) -> int:
    """``replay_committed`` while the replay runs: 0 while its open transaction holds the
    offsets unstable, which is most of the time."""
    try:
        return replay_committed(routed, prefix, timeout_s=1)
    except KafkaException:
        return 0


def abort_what_the_killed_replay_left_open(routed, prefix: str) -> None:
    """What the next run's producer does first: ``init_transactions`` on the replay's
    transactional.id aborts the transaction a killed run left open, so its offsets are
    stable to read (else ``committed`` waits for the transaction timeout)."""
    producer = Producer({"bootstrap.servers": routed.stack.bootstrap,
                         "transactional.id": f"{routed.stack.group}-replay-{prefix}"})
    producer.init_transactions(60)


def test_a_replay_sigkilled_mid_range_resumes_exactly_once(routed):
    """The process is killed between two of its transactions, with one perhaps open: the broker
    aborts that one when the next run's producer (the same transactional.id) starts."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    for _attempt in range(3):  # bounded: a run that ends before the kill proves nothing, try again
        prefix = f"r{uuid.uuid4().hex[:10]}"
        process = subprocess.Popen(
            [RTCBUS, "replay", "--from", str(routed.since), "--until", str(routed.until), "--to-prefix", prefix,
             "--batch-size", "1"],
            env={**environment, **routed.stack.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda: process.poll() is not None or committed_so_far(routed, prefix) > 0, 90,
                     "the replay's first committed transaction", every_s=0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        abort_what_the_killed_replay_left_open(routed, prefix)
        killed_at = replay_committed(routed, prefix)
        if killed_at < 65:  # 65 raw offsets in the range: killed mid-way
            break
    else:
        pytest.fail("three replays finished before they could be killed")
    assert killed_at > 0, process.stderr.read().decode(errors="replace")[-2000:]

    result = run_replay(routed, prefix)
    assert result.returncode == 0, result.stderr
    resumed = int(re.search(r"resumed: (\d+) raw offsets", result.stdout).group(1))
    assert resumed == killed_at  # exactly what had been committed before the kill
    bootstrap = routed.stack.bootstrap
    for domain in ("room", "stream"):
        replayed = by_room(bootstrap, f"{prefix}.events.{domain}")
        assert replayed == originals(routed, domain), domain  # each once, in order per room
    assert len(read_topic(bootstrap, f"{prefix}.callbacks.dlq")) == 1
