"""rtcbus audit: the comparison without a broker, then the real command on the session's broker."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.audit import (
    Coordinates,
    DeadLetter,
    Observed,
    OutputRecord,
    RawRecord,
    Unreadable,
    compare,
    parse_time,
    read_expected,
)
from support import RTCBUS, Stack, callback, read_topic, wait_for

RAW = "rtc.callbacks.raw"
ROOM = "rtc.events.room"


def raw(partition: int, offset: int, event_id: str | None) -> RawRecord:
    return RawRecord(Coordinates(RAW, partition, offset), 1_700_000_000_000 + offset, event_id)


def routed(event_id: str, source: tuple[int, int], at: tuple[int, int], key: bytes = b"room-1") -> OutputRecord:
    return OutputRecord(Coordinates(ROOM, *at), key, event_id, Coordinates(RAW, *source))


def dead(source: tuple[int, int], offset: int = 0) -> DeadLetter:
    return DeadLetter(Coordinates("rtc.callbacks.dlq", 0, offset), Coordinates(RAW, *source), "ValidationError")


# -- the comparison ------------------------------------------------------------------------------


def test_every_raw_record_routed_once_is_clean():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, "a"), raw(0, 1, "b"), raw(1, 0, "c")],
        outputs=[routed("a", (0, 0), (0, 0)), routed("b", (0, 1), (0, 1)), routed("c", (1, 0), (1, 0))],
        committed={0: 2, 1: 1},
    )

    report = compare(observed)

    assert report.clean and report.exit_code == 0
    assert (report.raw_records, report.event_ids, report.routed, report.pending) == (3, 3, 3, 0)


def test_a_raw_record_with_no_output_and_no_dead_letter_is_lost():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, "a"), raw(0, 1, "gone")],
        outputs=[routed("a", (0, 0), (0, 0))],
        committed={0: 2},
    )

    report = compare(observed)

    assert [(f.event_id, f.raw_partition, f.raw_offset) for f in report.lost] == [("gone", 0, 1)]
    assert report.to_dict()["lost_ids"] == ["gone"] and report.to_dict()["lost"] == 1
    assert report.exit_code == 1


def test_raw_records_at_or_past_the_committed_offset_are_pending_not_lost():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, "a"), raw(0, 1, "b"), raw(0, 2, "c"), raw(1, 0, "d")],
        outputs=[routed("a", (0, 0), (0, 0))],
        committed={0: 1},  # partition 1: nothing committed yet
    )

    report = compare(observed)

    assert report.pending == 3 and not report.lost and report.exit_code == 0


def test_a_resent_event_is_dropped_as_duplicate_not_lost():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, "a"), raw(0, 1, "a")],
        outputs=[routed("a", (0, 0), (0, 0))],
        committed={0: 2},
    )

    report = compare(observed)

    assert (report.routed, report.duplicates_dropped, report.event_ids) == (1, 1, 1)
    assert report.clean


def test_two_domain_records_of_one_eventid_are_duplicated():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, "a"), raw(0, 1, "a")],
        outputs=[routed("a", (0, 0), (0, 0)), routed("a", (0, 1), (0, 1))],
        committed={0: 2},
    )

    report = compare(observed)

    assert report.to_dict()["duplicated_ids"] == ["a"]
    assert report.duplicated[0].raw_offset == 0 and "2 records" in report.duplicated[0].detail
    assert report.exit_code == 1


def test_only_records_whose_source_is_in_the_range_count_as_duplicates():
    # The first copy came from a raw record before --since: not audited, so not counted.
    observed = Observed(
        RAW,
        raw=[raw(0, 5, "a")],
        outputs=[routed("a", (0, 1), (0, 0)), routed("a", (0, 5), (0, 1))],
        committed={0: 6},
    )

    assert not compare(observed).duplicated


def test_source_offsets_going_back_within_a_key_are_out_of_order():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, "a"), raw(0, 1, "b"), raw(0, 2, "c")],
        outputs=[
            routed("b", (0, 1), (0, 0)),
            routed("a", (0, 0), (0, 1)),  # written after b, read from raw before it
            routed("c", (0, 2), (0, 2)),
            routed("x", (0, 0), (0, 3), key=b"other-room"),  # another key: its own order
        ],
        committed={0: 3},
    )

    report = compare(observed)

    assert report.to_dict()["out_of_order_ids"] == ["a"]
    assert (report.out_of_order[0].raw_partition, report.out_of_order[0].raw_offset) == (0, 0)
    assert report.exit_code == 1


def test_a_dead_letter_is_matched_by_its_source_coordinates_even_without_an_eventid():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, None), raw(0, 1, "broken"), raw(0, 2, None)],
        dead_letters=[dead((0, 0)), dead((0, 1), 1)],
        committed={0: 3},
    )

    report = compare(observed)

    assert report.dead_lettered == 2
    # The third does not parse and has no dead letter: lost, though it has no EventId to name.
    assert [(f.event_id, f.raw_offset) for f in report.lost] == [(None, 2)]
    assert report.to_dict()["lost_ids"] == [] and report.to_dict()["lost"] == 1


def test_a_dead_letter_at_other_coordinates_does_not_save_a_record():
    observed = Observed(RAW, raw=[raw(0, 0, "a")], dead_letters=[dead((1, 0))], committed={0: 1})

    assert [f.event_id for f in compare(observed).lost] == ["a"]


def test_an_expected_eventid_missing_from_raw_is_lost():
    observed = Observed(
        RAW,
        raw=[raw(0, 0, "a"), raw(0, 1, "b")],
        outputs=[routed("a", (0, 0), (0, 0))],
        dead_letters=[dead((0, 1))],
        committed={0: 2},
    )

    report = compare(observed, expected=["a", "b", "never-arrived"])

    assert [(f.event_id, f.detail) for f in report.lost] == [("never-arrived", "answered 200, not in raw")]
    assert report.exit_code == 1


def test_an_expected_eventid_with_two_records_is_duplicated_even_outside_the_range():
    observed = Observed(
        RAW,
        raw=[raw(0, 5, "a")],
        outputs=[routed("a", (0, 1), (0, 0)), routed("a", (0, 5), (0, 1))],
        committed={0: 6},
    )

    assert compare(observed).clean
    assert compare(observed, expected=["a"]).to_dict()["duplicated_ids"] == ["a"]


def test_undecodable_records_and_unsettled_partitions_are_findings():
    undecodable = Observed(RAW, unreadable=[Unreadable(Coordinates(ROOM, 0, 7), "does not decode")])
    unsettled = Observed(RAW, unsettled=["rtc.events.room[0] read to 3, high watermark 5"])

    assert compare(undecodable).to_dict()["undecodable"] == 1 and compare(undecodable).exit_code == 1
    assert compare(unsettled).to_dict()["unsettled"] == 1 and compare(unsettled).exit_code == 1


def test_the_json_has_the_keys_the_fault_suite_reads():
    keys = set(compare(Observed(RAW)).to_dict())

    assert {
        "raw_records", "event_ids", "routed", "dead_lettered", "duplicates_dropped", "pending", "lost",
        "duplicated", "out_of_order", "unsettled", "lost_ids", "duplicated_ids", "out_of_order_ids",
    } <= keys


def test_times_are_epoch_ms_or_rfc3339(tmp_path):
    assert parse_time("1700000000123") == 1700000000123
    assert parse_time("2023-11-14T22:13:20Z") == 1700000000000
    assert parse_time("2023-11-15T06:13:20+08:00") == 1700000000000
    with pytest.raises(ValueError):
        parse_time("2023-11-14T22:13:20")  # no offset: the instant would be a guess
    expect = tmp_path / "expect.txt"
    expect.write_text("a\n\n  b \n")
    assert read_expected(expect) == ["a", "b"]


# -- the command on a real broker ------------------------------------------------------------------


def audit(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    return subprocess.run(
        [RTCBUS, "audit", *args], env={**environment, **stack.env}, capture_output=True, text=True, timeout=180
    )


def audit_json(stack: Stack, *args: str) -> tuple[int, dict]:
    result = audit(stack, "--json", "--settle-timeout", "30", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def join_room(room: str, user: str) -> dict:
    return {"RoomId": room, "UserId": user, "DeviceType": "web", "Timestamp": 1611736812853, "ExtraInfo": ""}


@pytest.fixture
def stack(kafka, tmp_path):
    stack = Stack(kafka.bootstrap_servers, tmp_path)
    yield stack
    stack.stop_all()


@pytest.fixture
def routed_stack(stack):
    """A stack that routed: 6 room events (2 rooms), one sent twice, one unknown type, one dead letter."""
    stack.start_shim()
    stack.start_router()
    sent = []
    for n in range(6):
        body = callback("UserJoinRoom", join_room(f"room-{n % 2}", f"u{n}"), stack.secret, event_id=f"join-{n}")
        assert stack.post(body) == 200
        sent.append(f"join-{n}")
        if n == 0:
            assert stack.post(body) == 200  # the vendor's re-send
    assert stack.post(callback("VendorNewThing", {"RoomId": "room-0"}, stack.secret, event_id="new-1")) == 200
    assert stack.post(callback("UserJoinRoom", "{broken json", stack.secret, event_id="broken-1")) == 200
    stack.wait_spool_empty()
    stack.wait_caught_up()
    stack.sent = [*sent, "new-1", "broken-1"]
    return stack


@pytest.mark.kafka
def test_a_clean_pipeline_audits_clean(routed_stack, tmp_path):
    expect = tmp_path / "expect.txt"
    expect.write_text("\n".join(routed_stack.sent) + "\n")

    code, report = audit_json(routed_stack, "--expect", str(expect))

    # 9 raw records at least: 8 EventIds and the vendor's re-send. A shim that waited longer
    # than spool_after_s for an acknowledgement (a loaded machine) spools the callback and its
    # copy in librdkafka's queue lands as well (consumer/ingest.py, "Cut-over"): one raw record
    # more, which the router drops as a duplicate like the re-send. Counted from raw itself.
    raw_records = len(read_topic(routed_stack.bootstrap, routed_stack.raw_topic))
    assert raw_records >= 9
    assert {key: report[key] for key in (
        "raw_records", "event_ids", "routed", "dead_lettered", "duplicates_dropped", "pending",
        "lost", "duplicated", "out_of_order", "unsettled",
    )} == {
        "raw_records": raw_records, "event_ids": 8, "routed": 7, "dead_lettered": 1,
        "duplicates_dropped": raw_records - 8,
        "pending": 0, "lost": 0, "duplicated": 0, "out_of_order": 0, "unsettled": 0,
    }
    table = audit(routed_stack, "--settle-timeout", "30")
    assert table.returncode == 0, table.stderr
    assert "dropped as duplicate" in table.stdout and "clean" in table.stdout


@pytest.mark.kafka
def test_a_copied_domain_record_is_duplicated_and_out_of_order(routed_stack):
    room = read_topic(routed_stack.bootstrap, routed_stack.topic("room"))
    first = next(m for m in room if dict(m.headers())["rtcbus.event_id"] == b"join-0")
    producer = Producer({"bootstrap.servers": routed_stack.bootstrap})
    producer.produce(first.topic(), first.value(), key=first.key(), partition=first.partition())
    assert producer.flush(30) == 0

    code, report = audit_json(routed_stack)

    assert code == 1
    assert report["duplicated_ids"] == ["join-0"]
    # join-2 and join-4 share its room and came later from raw: the copy goes back in order.
    assert report["out_of_order_ids"] == ["join-0"]
    assert report["lost_ids"] == []
    human = audit(routed_stack, "--settle-timeout", "30")
    assert human.returncode == 1 and "join-0" in human.stdout


@pytest.mark.kafka
def test_an_expected_eventid_never_sent_is_lost(routed_stack, tmp_path):
    expect = tmp_path / "expect.txt"
    expect.write_text("\n".join([*routed_stack.sent, "never-sent-1"]) + "\n")

    code, report = audit_json(routed_stack, "--expect", str(expect))

    assert code == 1 and report["lost_ids"] == ["never-sent-1"] and report["lost"] == 1


@pytest.mark.kafka
def test_a_raw_record_is_pending_until_committed_past_then_lost(stack):
    body = callback("UserJoinRoom", join_room("room-9", "u"), stack.secret, event_id="skipped-1")
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(stack.raw_topic, body, key=b"room-9")
    assert producer.flush(30) == 0

    code, report = audit_json(stack)  # no router ever ran: nothing is processed yet
    assert (code, report["pending"], report["lost"]) == (0, 1, 0)

    # As if a router had committed past it without writing anything.
    [record] = read_topic(stack.bootstrap, stack.raw_topic)
    committer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": stack.group})
    committer.commit(
        offsets=[TopicPartition(stack.raw_topic, record.partition(), record.offset() + 1)], asynchronous=False
    )
    committer.close()

    code, report = audit_json(stack)
    assert (code, report["pending"], report["lost_ids"]) == (1, 0, ["skipped-1"])


@pytest.mark.kafka
def test_an_open_transaction_is_unsettled_until_it_ends(routed_stack):
    producer = Producer({"bootstrap.servers": routed_stack.bootstrap, "transactional.id": f"audit-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    room = read_topic(routed_stack.bootstrap, routed_stack.topic("room"))
    producer.produce(routed_stack.topic("room"), room[0].value(), key=room[0].key(), partition=room[0].partition())
    assert producer.flush(30) == 0

    held = audit(routed_stack, "--json", "--settle-timeout", "2")
    assert held.returncode == 1, held.stderr
    report = json.loads(held.stdout)
    assert report["unsettled"] == 1
    assert report["unsettled_partitions"][0].startswith(f"{routed_stack.topic('room')}[{room[0].partition()}]")
    assert report["duplicated"] == 0  # the open transaction's record is not read

    # Aborted while an audit waits: it settles, and the aborted copy is not a duplicate.
    waiting = subprocess.Popen(
        [RTCBUS, "audit", "--json", "--settle-timeout", "60"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RTCBUS_")}, **routed_stack.env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    producer.abort_transaction(30)
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert json.loads(out)["unsettled"] == 0 and json.loads(out)["duplicated"] == 0


@pytest.mark.kafka
def test_since_audits_only_later_raw_records(routed_stack):
    since = int(time.time() * 1000) + 1  # every raw record so far is older
    wait_for(lambda: time.time() * 1000 >= since, 5, "the clock to reach --since")
    for n in range(2):
        body = callback("UserJoinRoom", join_room("room-late", f"u{n}"), routed_stack.secret, event_id=f"late-{n}")
        assert routed_stack.post(body) == 200
    routed_stack.wait_caught_up()

    code, report = audit_json(routed_stack, "--since", str(since))

    assert code == 0, report
    assert (report["raw_records"], report["routed"]) == (2, 2)


def test_bad_usage_and_unreachable_kafka_exit_2(tmp_path):
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    bad_time = subprocess.run(
        [RTCBUS, "audit", "--since", "yesterday"], env=environment, capture_output=True, text=True, timeout=60
    )
    unreachable = subprocess.run(
        [RTCBUS, "--bootstrap-servers", "127.0.0.1:1", "audit", "--json"],
        env=environment, capture_output=True, text=True, timeout=60,
    )

    assert bad_time.returncode == 2 and "yesterday" in bad_time.stderr
    assert unreachable.returncode == 2 and unreachable.stdout == ""
    assert unreachable.stderr.splitlines()[-1].startswith("rtcbus: error: Kafka at 127.0.0.1:1 did not answer")
