"""The router's EventId window: which events a partition has already turned into records.

Pure bookkeeping; the router persists it. Every EventId the router writes out is also
written, inside the same Kafka transaction, as a marker to a changelog topic that is
co-partitioned with the raw topic. On assignment the router reads a partition's markers
of the last window back into this structure, so a duplicate is recognised after a restart
or a rebalance too.

EventIds added during the open transaction are *pending*: an abort forgets them (their
records were never committed, so their retries must go through); a commit keeps them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class DedupeWindow:
    """EventIds seen per partition, forgotten once older than the window.

    Args:
        window_ms: how long an EventId is remembered, measured on the raw records'
            timestamps (so a router replaying a backlog keeps the right window).
    """

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._committed: dict[int, OrderedDict[str, int]] = {}
        self._pending: dict[int, dict[str, int]] = {}

    def seen(self, partition: int, event_id: str) -> bool:
        """Whether ``event_id`` was already written from ``partition``."""
        return event_id in self._pending.get(partition, ()) or event_id in self._committed.get(
            partition, ()
        )

    def add(self, partition: int, event_id: str, timestamp_ms: int) -> None:
        """Remember ``event_id`` as written in the open transaction."""
        self._pending.setdefault(partition, {})[event_id] = timestamp_ms

    def commit(self) -> None:
        """The open transaction committed: keep its EventIds, forget expired ones."""
        for partition, added in self._pending.items():
            window = self._committed.setdefault(partition, OrderedDict())
            window.update(added)
            self._expire(window)
        self._pending.clear()

    def abort(self) -> None:
        """The open transaction aborted: forget what it added."""
        self._pending.clear()

    def restore(self, partition: int, markers: Iterable[tuple[str, int]]) -> None:
        """Load a partition's markers ``(event_id, timestamp_ms)``, oldest first."""
        window = OrderedDict(markers)
        self._expire(window)
        self._committed[partition] = window
        self._pending.pop(partition, None)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this instance no longer owns."""
        for partition in partitions:
            self._committed.pop(partition, None)
            self._pending.pop(partition, None)

    def size(self, partition: int) -> int:
        return len(self._committed.get(partition, ())) + len(self._pending.get(partition, ()))

    def _expire(self, window: OrderedDict[str, int]) -> None:
        if not window:
            return
        # Raw timestamps arrive nearly in order, so the newest entry is the last one.
        horizon = next(reversed(window.values())) - self._window_ms
        while window:
            event_id, timestamp_ms = next(iter(window.items()))
            if timestamp_ms >= horizon:
                break
            del window[event_id]
