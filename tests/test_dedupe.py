from consumer.router.dedupe import DedupeWindow


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
