"""The router's EventId window: which events a partition has already turned into records.

Pure bookkeeping; the router persists it. Every EventId the router writes out is also
written, inside the same Kafka transaction, as a marker to a changelog topic that is
co-partitioned with the raw topic. On assignment the router reads a partition's markers
of the last window back into this structure, so a duplicate is recognised after a restart
or a rebalance too.

EventIds added during the open transaction are *pending*. When that transaction starts to
commit they are *sealed*, and the router goes on adding the next transaction's EventIds as
pending while the commit is under way. A commit keeps the sealed ones; an abort forgets
sealed and pending alike (the router rewinds to the last commit and redoes both, so their
retries must go through).
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
        self._sealed: dict[int, dict[str, int]] = {}
        self._pending: dict[int, dict[str, int]] = {}

    def seen(self, partition: int, event_id: str) -> bool:
        """Whether ``event_id`` was already written from ``partition``."""
        return (
            event_id in self._pending.get(partition, ())
            or event_id in self._sealed.get(partition, ())
            or event_id in self._committed.get(partition, ())
        )

    def add(self, partition: int, event_id: str, timestamp_ms: int) -> None:
        """Remember ``event_id`` as written in the open transaction."""
        self._pending.setdefault(partition, {})[event_id] = timestamp_ms

    def seal(self) -> None:
        """The open transaction starts to commit: what it added waits for the outcome."""
        for partition, added in self._pending.items():
            self._sealed.setdefault(partition, {}).update(added)
        self._pending.clear()

    def commit(self) -> None:
        """The sealed transaction committed: keep its EventIds, forget expired ones."""
        for partition, added in self._sealed.items():
            window = self._committed.setdefault(partition, OrderedDict())
            window.update(added)
            self._expire(window)
        self._sealed.clear()

    def abort(self) -> None:
        """A transaction aborted: forget what was added since the last commit."""
        self._sealed.clear()
        self._pending.clear()

    def restore(self, partition: int, markers: Iterable[tuple[str, int]]) -> None:
        """Load a partition's markers ``(event_id, timestamp_ms)``, oldest first."""
        window = OrderedDict(markers)
        self._expire(window)
        self._committed[partition] = window
        self._sealed.pop(partition, None)
        self._pending.pop(partition, None)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this instance no longer owns."""
        for partition in partitions:
            self._committed.pop(partition, None)
            self._sealed.pop(partition, None)
            self._pending.pop(partition, None)

    def size(self, partition: int) -> int:
        return sum(
            len(layer.get(partition, ()))
            for layer in (self._committed, self._sealed, self._pending)
        )

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
