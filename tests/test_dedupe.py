import json

import pytest

import consumer.router.dedupe as dedupe
from consumer.router.dedupe import GENERATIONS, DedupeWindow, event_digest, marker_records, parse_marker_record


def test_pending_ids_are_seen_and_forgotten_on_abort():
    window = DedupeWindow(window_ms=1000)
    window.add(0, "e1", 100)
    assert window.seen(0, "e1")
    assert not window.seen(1, "e1")
    window.abort()
    assert not window.seen(0, "e1")


def test_committed_ids_survive_until_older_than_the_window():
    window = DedupeWindow(window_ms=1000)
    window.add(0, "old", 100)
    window.commit()
    window.add(0, "mid", 900)
    window.commit()
    assert window.seen(0, "old") and window.seen(0, "mid")
    window.add(0, "new", 1500)
    window.commit()
    assert not window.seen(0, "old")
    assert window.seen(0, "mid") and window.seen(0, "new")


def test_restore_replaces_a_partition_and_expires_old_markers():
    window = DedupeWindow(window_ms=1000)
    window.add(3, "pending", 1)
    window.restore(3, [("a", 0), ("b", 2000), ("c", 2500)])
    assert [window.seen(3, e) for e in ("a", "b", "c", "pending")] == [False, True, True, False]
    assert window.size(3) == 2


def test_drop_forgets_revoked_partitions_only():
    window = DedupeWindow(window_ms=1000)
    window.restore(1, [("a", 10)])
    window.restore(2, [("b", 10)])
    window.drop([1])
    assert not window.seen(1, "a")
    assert window.seen(2, "b")


# -- the compact window (issue 14) -------------------------------------------------------------

def _uuid_like(number: int) -> str:
    return f"{number:08x}-7d2c-4f1e-9a3b-{number * 2654435761 % (1 << 48):012x}"


def _feed(window, partition, numbers, commit_every=100):
    """Route EventIds ``numbers`` as the router does (seen, then add), 1 ms of raw time apart."""
    for count, number in enumerate(numbers, 1):
        event_id = _uuid_like(number)
        assert not window.seen(partition, event_id)
        window.add(partition, event_id, number)
        if count % commit_every == 0:
            window.commit()
    window.commit()


def test_nothing_younger_than_the_window_is_forgotten_and_the_rest_goes_within_two_spans():
    window_ms = 4000
    window = DedupeWindow(window_ms)
    _feed(window, 0, range(20_000))
    newest = 19_999
    remembered = [n for n in range(20_000) if window.seen(0, _uuid_like(n))]
    # Everything at or after the horizon is remembered...
    assert set(range(newest - window_ms, 20_000)) <= set(remembered)
    # ...and nothing older than the window plus two tables' spans is.
    assert min(remembered) >= newest - window_ms - 2 * (window_ms // GENERATIONS)
    assert window.size(0) == len(remembered)


def test_abort_forgets_the_open_transaction_only_even_after_seen_made_its_digest():
    window = DedupeWindow(window_ms=60_000)
    window.add(0, "kept", 1)
    window.commit()
    assert not window.seen(0, "aborted")  # the digest `add` reuses is made here
    window.add(0, "aborted", 2)
    assert window.seen(0, "aborted")
    window.abort()
    assert not window.seen(0, "aborted") and window.seen(0, "kept")
    window.commit()  # nothing pending: the aborted EventId must not come back
    assert not window.seen(0, "aborted") and window.size(0) == 1


def test_add_without_a_seen_before_it_is_remembered_under_its_own_digest():
    window = DedupeWindow(window_ms=60_000)
    window.restore(0, [])
    assert not window.seen(0, "first")
    window.add(0, "second", 1)  # `seen` last hashed "first"
    window.commit()
    assert window.seen(0, "second") and not window.seen(0, "first")


def test_restore_reads_the_json_markers_and_the_one_eventid_per_record_form():
    pairs = [(_uuid_like(n), 1_700_000_000_000 + n) for n in range(2500)]
    records = list(marker_records({5: pairs}))
    assert [partition for partition, _, _ in records] == [5, 5, 5]
    assert json.loads(records[0][1])[0] == list(pairs[0])  # the format earlier routers read
    markers = [pair for _, value, timestamp in records for pair in parse_marker_record(value, None, timestamp)]
    markers += parse_marker_record(None, b"legacy-1", 1_700_000_002_500)
    window = DedupeWindow(window_ms=60_000)
    window.restore(5, markers)
    assert all(window.seen(5, event_id) for event_id, _ in pairs)
    assert window.seen(5, "legacy-1")
    assert not window.seen(5, _uuid_like(2500)) and not window.seen(4, pairs[0][0])
    assert window.size(5) == 2501


def test_drop_forgets_the_committed_and_the_pending_ids_of_a_partition():
    window = DedupeWindow(window_ms=1000)
    _feed(window, 1, range(500))
    window.add(1, "pending", 600)
    window.add(2, "other", 600)
    window.drop([1])
    assert window.size(1) == 0 and not window.seen(1, "pending") and not window.seen(1, _uuid_like(499))
    assert window.seen(2, "other")


def test_many_ids_have_distinct_digests_and_none_is_falsely_seen():
    count = 300_000
    digests = {event_digest(_uuid_like(n)) for n in range(count)}
    assert len(digests) == count
    window = DedupeWindow(window_ms=10 * count)
    window.restore(0, ((_uuid_like(n), n) for n in range(count)))
    assert window.size(0) == count
    assert not any(window.seen(0, _uuid_like(n)) for n in range(count, count + 30_000))
    assert all(window.seen(0, _uuid_like(n)) for n in range(0, count, 97))


def test_eventids_whose_high_halves_collide_are_both_remembered(monkeypatch):
    real = dedupe.event_digest
    colliding = {"a": (7, 1), "b": (7, 2)}
    monkeypatch.setattr(dedupe, "event_digest", lambda event_id: colliding.get(event_id) or real(event_id))
    window = DedupeWindow(window_ms=60_000)
    window.restore(0, [("a", 1)])
    assert not window.seen(0, "b")
    window.add(0, "b", 2)
    window.commit()
    assert window.seen(0, "a") and window.seen(0, "b")
    assert window.size(0) == 2


@pytest.mark.parametrize("partitions", [1, 24])
def test_a_full_window_holds_at_most_40_bytes_of_table_per_remembered_eventid(partitions):
    # The cells preshed allocates, 16 bytes each, counted by the window itself (the bench
    # measures the process's RSS on top of this).
    ids = 60_000
    window = DedupeWindow(window_ms=ids)
    for start in range(0, 2 * ids, 1000):
        for number in range(start, start + 1000):
            window.add(number % partitions, _uuid_like(number), number)
        window.commit()
    remembered = sum(window.size(p) for p in range(partitions))
    assert ids <= remembered <= ids * (1 + 2 / GENERATIONS)
    assert window.nbytes() / remembered <= 40, window.nbytes() / remembered
