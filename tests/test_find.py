"""rtcbus find: the lineage without a broker, then the real command on the session's broker."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from consumer.audit import Coordinates, DeadLetter, Observed, OutputRecord, RawRecord, TimeRange
from consumer.find import Quarantined, Query, trace, window
from support import RTCBUS, Stack, callback

RAW = "rtc.callbacks.raw"
ROOM = "rtc.events.room"
QUARANTINE = "rtc.callbacks.quarantine"


def raw(partition: int, offset: int, event_id: str | None, key: bytes | None = b"room-1") -> RawRecord:
    return RawRecord(Coordinates(RAW, partition, offset), 1_700_000_000_000 + offset, event_id, key)


def routed(event_id: str, source: tuple[int, int], at: tuple[int, int]) -> OutputRecord:
    return OutputRecord(Coordinates(ROOM, *at), b"room-1", event_id, Coordinates(RAW, *source))


def quarantined(offset: int, event_id: str, room: str | None = "room-1") -> Quarantined:
    return Quarantined(Coordinates(QUARANTINE, 0, offset), 1_700_000_000_500, event_id, room, "bad signature")


# -- the lineage ---------------------------------------------------------------------------------


OBSERVED = Observed(
    RAW,
    raw=[
        raw(0, 0, "a"),
        raw(0, 1, "a"),  # the vendor's re-send
        raw(0, 2, "poison"),
        raw(0, 3, None),  # a body that does not parse, dead-lettered too
        raw(1, 0, "b", key=b"room-2"),
        raw(0, 4, "late"),  # past the committed offset
    ],
    outputs=[routed("a", (0, 0), (0, 7)), OutputRecord(Coordinates(ROOM, 1, 0), b"room-2", "b", Coordinates(RAW, 1, 0))],
    dead_letters=[
        DeadLetter(Coordinates("rtc.callbacks.dlq", 0, 0), Coordinates(RAW, 0, 2), "ValidationError", "UserId is missing", "UserId"),
        DeadLetter(Coordinates("rtc.callbacks.dlq", 0, 1), Coordinates(RAW, 0, 3), "ValidationError", "body is not JSON"),
    ],
    committed={0: 4, 1: 1},
)


def test_each_raw_copy_gets_its_fate_and_a_resend_names_the_copy_it_duplicates():
    [lineage] = trace(OBSERVED, [], Query(event_id="a")).lineages

    first, second = (copy.to_dict() for copy in lineage.raw)
    assert (first["offset"], first["fate"], first["routed_to"]) == (0, "routed", {"topic": ROOM, "partition": 0, "offset": 7})
    assert second["fate"] == "duplicate" and second["routed_to"] is None
    assert second["duplicate_of"] == {"topic": RAW, "partition": 0, "offset": 0, "routed_to": first["routed_to"]}
    assert "dropped as a duplicate of rtc.callbacks.raw[0]@0" in second["verdict"]


def test_a_dead_letter_comes_with_its_reason_and_a_late_record_is_pending():
    [poison] = trace(OBSERVED, [], Query(event_id="poison")).lineages
    [late] = trace(OBSERVED, [], Query(event_id="late")).lineages

    letter = poison.raw[0].to_dict()["dead_letter"]
    assert (letter["offset"], letter["error_class"], letter["reason"], letter["field"]) == (
        0, "ValidationError", "UserId is missing", "UserId",
    )
    assert late.raw[0].fate.kind == "pending"


def test_a_quarantined_event_is_found_without_raw_and_nothing_found_exits_1():
    report = trace(OBSERVED, [quarantined(3, "forged")], Query(event_id="forged"))
    nothing = trace(OBSERVED, [quarantined(3, "forged")], Query(event_id="never"))

    assert report.to_dict()["events"] == [
        {"event_id": "forged", "raw": [], "quarantine": [{
            "topic": QUARANTINE, "partition": 0, "offset": 3, "received_ms": 1_700_000_000_500,
            "time": "2023-11-14T22:13:20.500Z", "reason": "bad signature",
        }]}
    ]
    assert (report.exit_code, nothing.exit_code, nothing.to_dict()["events"]) == (0, 1, [])


def test_a_room_lists_one_lineage_per_event_oldest_first_up_to_the_limit():
    held = [quarantined(0, "forged"), quarantined(1, "elsewhere", room="room-2")]

    report = trace(OBSERVED, held, Query(room="room-1"))
    limited = trace(OBSERVED, held, Query(room="room-1"), limit=2)

    assert [lineage.event_id for lineage in report.lineages] == ["a", "poison", None, "late", "forged"]
    assert [len(lineage.raw) for lineage in report.lineages] == [2, 1, 1, 1, 0]
    assert [lineage.event_id for lineage in limited.lineages] == ["a", "poison"] and limited.more == 3


def test_the_window_defaults_to_the_raw_retention_and_one_query_is_needed():
    class Settings:
        raw_retention_ms = 1000

    assert window(Settings(), None, None, now_ms=5000) == TimeRange(4000, None)
    assert window(Settings(), 10, 20, now_ms=5000) == TimeRange(10, 20)
    with pytest.raises(ValueError):
        Query()
    with pytest.raises(ValueError):
        Query(event_id="a", room="r")


# -- the command on a real broker ------------------------------------------------------------------


def join_room(room: str, user: str) -> dict:
    return {"RoomId": room, "UserId": user, "DeviceType": "web", "Timestamp": 1611736812853, "ExtraInfo": ""}


def find_all(stack: Stack, *queries: list[str]) -> list[tuple[int, str, str]]:
    """Runs each ``rtcbus find`` at once, in parallel; (exit status, stdout, stderr) of each."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    processes = [
        subprocess.Popen(
            [RTCBUS, "find", *query], env={**environment, **stack.env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for query in queries
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        results.append((process.returncode, out, err))
    return results


@pytest.mark.kafka
def test_find_traces_events_to_their_domain_record_dead_letter_duplicate_or_quarantine(stack):
    stack.start_shim()
    stack.start_router()
    room = "room-find"
    forged = callback("UserJoinRoom", join_room(room, "u9"), "not-the-secret", event_id="f-forged")
    assert stack.post(forged) == 401  # refused, kept in the quarantine
    assert stack.post(callback("UserJoinRoom", join_room(room, "u1"), stack.secret, event_id="f-normal")) == 200
    twice = callback("UserJoinRoom", join_room(room, "u2"), stack.secret, event_id="f-twice")
    assert stack.post(twice) == 200
    assert stack.post(twice) == 200  # the vendor's re-send
    poison = callback("UserJoinRoom", {"RoomId": room, "DeviceType": "web"}, stack.secret, event_id="f-poison")
    assert stack.post(poison) == 200  # the shim takes it; the router cannot validate it
    stack.wait_caught_up()

    results = find_all(
        stack,
        ["--event-id", "f-normal", "--json"],
        ["--event-id", "f-twice", "--json"],
        ["--event-id", "f-poison", "--json"],
        ["--event-id", "f-forged", "--json"],
        ["--event-id", "f-never", "--json"],
        ["--room", room, "--json"],
        ["--room", room, "--limit", "2", "--json"],
        ["--event-id", "f-twice"],
        ["--event-id", "f-never"],
    )
    for code, _out, err in results:
        assert code in (0, 1), err
    normal, resent, dead, held, never, listing, limited = (json.loads(out) for _code, out, _err in results[:7])

    [event] = normal["events"]
    [copy] = event["raw"]
    assert (copy["topic"], copy["key"], copy["fate"], event["quarantine"]) == (stack.raw_topic, room, "routed", [])
    assert copy["routed_to"]["topic"] == stack.topic("room") and copy["routed_to"]["offset"] >= 0
    assert copy["time"].endswith("Z") and copy["timestamp_ms"] > 0

    first, second = resent["events"][0]["raw"]
    assert (first["fate"], second["fate"]) == ("routed", "duplicate")
    assert second["partition"] == first["partition"] and second["offset"] > first["offset"]
    assert second["duplicate_of"] == {
        "topic": stack.raw_topic, "partition": first["partition"], "offset": first["offset"],
        "routed_to": first["routed_to"],
    }

    [letter] = [copy["dead_letter"] for copy in dead["events"][0]["raw"]]
    assert dead["events"][0]["raw"][0]["fate"] == "dead_lettered"
    assert letter["topic"] == stack.dlq_topic and letter["error_class"] == "ValidationError" and letter["reason"]

    [kept] = held["events"]
    assert kept["raw"] == [] and kept["quarantine"][0]["topic"] == f"{stack.prefix}.callbacks.quarantine"
    assert kept["quarantine"][0]["reason"]

    assert results[4][0] == 1 and never["found"] is False and never["events"] == []
    assert results[8][0] == 1 and "not found" in results[8][1]

    assert [e["event_id"] for e in listing["events"]] == ["f-forged", "f-normal", "f-twice", "f-poison"]
    assert listing["more"] == 0 and listing["query"]["room"] == room and listing["query"]["since"]
    assert [e["event_id"] for e in limited["events"]] == ["f-forged", "f-normal"] and limited["more"] == 2

    text = results[7][1]
    assert "routed to" in text and "dropped as a duplicate of" in text, text
