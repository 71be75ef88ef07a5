"""Where an accepted callback becomes durable: Kafka (``acks=all``) or, while Kafka cannot
take it in time, the local spool, and the forwarder that drains the spool to Kafka.

The rules, all decided on the event loop:

- **Direct.** While the spool is empty, a record is produced and its request waits up to
  ``spool_after_s`` for the broker's acknowledgement.
- **Cut-over.** When a record is not acknowledged by then (or Kafka refuses it for a reason
  that may pass, or the producer's queue is full), *every* record still waiting is submitted to
  the spool, in the order the requests arrived, and the shim is spooling. Their requests are
  answered 200 once the spool has fsynced them. Their copies in librdkafka's queue may still be
  delivered too: a duplicate that the router's EventId dedupe absorbs.
- **Spooling.** While the spool holds anything, or has an append on its way in, every new record
  goes to the spool behind it, so a room's callbacks never overtake each other.
- **Forwarding.** The forwarder sends the oldest entries with the same idempotent producer and
  deletes each only after its delivery report. When the spool is empty the shim goes back to
  direct. A crash between delivery and delete sends an entry again on the next start: a
  duplicate again, absorbed again.

The shim's producer never times a record out (``message.timeout.ms=0``): a record in its queue
waits for Kafka as long as the process lives, so a later record of the same room cannot be
delivered ahead of an earlier one that timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from confluent_kafka import Message

from consumer.errors import ConfigError
from consumer.spool import Spool, SpoolError, SpooledEntry, SpoolFull, SpoolRecord, SpoolUnavailable

log = logging.getLogger(__name__)

# Entries the forwarder has in flight at once.
FORWARD_BATCH = 1000
# Pause after a forwarding round in which Kafka refused an entry.
FORWARD_BACKOFF_S = 1.0
# How often to try again to open a spool that could not be opened.
REOPEN_EVERY_S = 10.0


class Stored(enum.Enum):
    """Where a record is durable when its request is answered 200."""

    KAFKA = "kafka"
    SPOOL = "spool"


class NotStored(Exception):
    """Neither Kafka nor the spool took the record; ``status`` is the answer for the sender."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Producing(Protocol):
    """What the ingest needs of the shim's producer (``consumer.shim.DeliveryBridge``)."""

    def produce(
        self, topic: str, value: bytes, key: str, headers: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Message]:
        """Queue a record; raises :class:`NotStored` when it cannot even be queued."""


@dataclass(eq=False)
class _Waiting:
    """A record produced directly whose request waits for its acknowledgement."""

    record: SpoolRecord
    answer: asyncio.Future[Stored]
    timer: asyncio.TimerHandle | None = None


@dataclass
class IngestCounters:
    """Hooks for metrics; the shim passes its Prometheus counters' ``inc``."""

    stored: Callable[[Stored], None] = lambda where: None
    forwarded: Callable[[int], None] = lambda count: None
    spool_refused: Callable[[str], None] = lambda reason: None


class Ingest:
    """Makes records durable, in order per key; see the module docstring for the rules."""

    def __init__(
        self,
        bridge: Producing,
        topic: str,
        open_spool: Callable[[], Spool] | None,
        spool_after_s: float,
        counters: IngestCounters | None = None,
    ) -> None:
        """
        Args:
            bridge: produces a record and gives a future of its delivery report.
            topic: the raw topic.
            open_spool: opens the spool; None means no spool (a slow Kafka is a 503).
            spool_after_s: how long a request waits for Kafka before its record is spooled.
        """
        self.bridge = bridge
        self.topic = topic
        self.spool_after_s = spool_after_s
        self.counters = counters or IngestCounters()
        self.spool: Spool | None = None
        self.spool_problem: str | None = None if open_spool else "the spool is off"
        self.spooling = False
        self._open_spool = open_spool
        self._last_open_attempt = 0.0
        self._waiting: dict[_Waiting, None] = {}  # insertion-ordered: arrival order
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self.failure: BaseException | None = None
        self._forwarder: asyncio.Task[None] | None = None
        self._stopping = False
        self._full_logged = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (a spool that cannot be opened is retried later) and start forwarding.

        Raises:
            ConfigError: another process holds the spool directory.
        """
        self._try_open_spool()
        if self.spool is not None and self.spool.depth:
            log.warning(
                "spool: %d callbacks (%d bytes) from before the restart; forwarding them first",
                self.spool.depth, self.spool.bytes,
            )
            self._start_spooling()
        self._forwarder = asyncio.create_task(self._forward(), name="rtcbus-spool-forwarder")

    async def stop(self, drain_s: float) -> int:
        """Forward what the spool holds for up to ``drain_s``, then stop; the rest stays on disk.

        Returns:
            Entries left in the spool for the next start.
        """
        if self.spool is not None and self.spool.depth and self.failure is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain_s)
        self._stopping = True
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forwarder
        left = 0
        if self.spool is not None:
            left = self.spool.depth
            await asyncio.to_thread(self.spool.close)
            if left:
                log.warning(
                    "spool: %d callbacks stay in %s; the next start forwards them",
                    left, self.spool.directory,
                )
        return left

    # -- one record --------------------------------------------------------------------------------

    async def store(self, record: SpoolRecord, deadline: float) -> Stored:
        """Make ``record`` durable by the monotonic ``deadline``.

        Raises:
            NotStored: 503 when neither Kafka nor the spool took it in time; 413 when Kafka
                refuses a record of its size (it never can take it).
        """
        loop = asyncio.get_running_loop()
        waiting: _Waiting | None = None
        if self.spooling:
            answer = self._to_spool(record)
        else:
            answer = loop.create_future()
            waiting = _Waiting(record, answer)
            self._waiting[waiting] = None
            try:
                delivery = self.bridge.produce(self.topic, record.value, record.key, record.headers)
            except NotStored as exc:
                self._on_refusal(waiting, exc)
            else:
                delivery.add_done_callback(lambda done: self._on_delivery(waiting, done))
                if self._open_spool is not None:
                    waiting.timer = loop.call_later(self.spool_after_s, self._cut_over)
        # The deadline is a timer that answers the future itself: ``wait_for(shield(...))``
        # costs a waiter future, an outer future and their callbacks on every request.
        expiry = loop.call_later(max(deadline - time.monotonic(), 0), self._expire, answer)
        try:
            stored = await answer
        finally:
            expiry.cancel()
            if waiting is not None:  # answered, or given up on: it must not be spooled later
                self._release(waiting)
        self.counters.stored(stored)
        return stored

    def state(self) -> dict[str, object]:
        """The spool's state for /readyz."""
        spool = self.spool
        if spool is None:
            return {"state": "unavailable", "reason": self.spool_problem}
        oldest = spool.oldest_ms
        return {
            "state": "spooling" if self.spooling else "idle",
            "depth": spool.depth,
            "bytes": spool.bytes,
            "max_bytes": spool.max_bytes,
            "oldest_age_s": None if oldest is None else round(time.time() - oldest / 1000, 3),
        }

    @property
    def accepting(self) -> bool:
        """The spool could take a record now."""
        return self.spool is not None and self.spool.bytes < self.spool.max_bytes

    # -- direct, cut-over, spooling ------------------------------------------------------------------

    def _on_delivery(self, waiting: _Waiting, delivery: asyncio.Future[Message]) -> None:
        # Read first, even for a copy nobody waits for: asyncio logs an exception never read.
        error = delivery.exception()
        if waiting not in self._waiting:
            return  # cut over to the spool already; this copy is a duplicate the router drops
        if error is None:
            self._release(waiting)
            waiting.answer.set_result(Stored.KAFKA)
        else:
            self._on_refusal(waiting, error)

    def _expire(self, answer: asyncio.Future[Stored]) -> None:
        if not answer.done():
            answer.set_exception(self._not_stored("Kafka did not acknowledge the record in time"))

    def _on_refusal(self, waiting: _Waiting, error: BaseException) -> None:
        if not (isinstance(error, NotStored) and error.status != 503):
            self._cut_over()  # Kafka may take it later: the spool takes it now
        if waiting in self._waiting:  # it can never succeed, or there is no spool
            self._release(waiting)
            if not waiting.answer.done():
                if isinstance(error, NotStored) and error.status != 503:
                    waiting.answer.set_exception(error)
                else:
                    reason = error.message if isinstance(error, NotStored) else str(error)
                    waiting.answer.set_exception(self._not_stored(reason))

    def _not_stored(self, kafka_reason: str) -> NotStored:
        if self.spool is not None:
            return NotStored(503, f"{kafka_reason}, and the spool did not take it in time; retry later")
        if self._open_spool is None:
            return NotStored(503, f"{kafka_reason}; retry later")
        self.counters.spool_refused("unavailable")  # on, but it could not be opened
        return NotStored(503, f"{kafka_reason}, and {self.spool_problem}; retry later")

    def _cut_over(self) -> None:
        """Spool every record still waiting for Kafka, in arrival order."""
        if not self._waiting:
            return
        self._try_open_spool()
        if self.spool is None:
            return  # no spool: each request waits for Kafka until its deadline
        self._start_spooling()
        for waiting in list(self._waiting):
            self._release(waiting)
            if waiting.answer.done():
                continue
            spooled = self._to_spool(waiting.record)
            _chain(spooled, waiting.answer)

    def _to_spool(self, record: SpoolRecord) -> asyncio.Future[Stored]:
        answer: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        spool = self.spool
        if spool is None:
            self.counters.spool_refused("unavailable")
            answer.set_exception(NotStored(503, f"Kafka is unavailable and {self.spool_problem}"))
            return answer
        try:
            written = spool.submit(record)
        except SpoolFull as exc:
            self._refused("full", exc)
            answer.set_exception(NotStored(503, f"Kafka is unavailable and {exc.reason}, retry later"))
            return answer
        self._wake.set()
        self._drained.clear()

        def on_written(done: asyncio.Future[None]) -> None:
            if answer.done():
                return
            error = None if done.cancelled() else done.exception()
            if done.cancelled() or error is not None:
                reason = error.reason if isinstance(error, SpoolError) else "the spool write failed"
                self._refused("unavailable", error)
                answer.set_exception(NotStored(503, f"Kafka is unavailable and {reason}, retry later"))
            else:
                self._full_logged = False
                answer.set_result(Stored.SPOOL)

        written.add_done_callback(on_written)
        return answer

    def _start_spooling(self) -> None:
        assert self.spool is not None, "spooling needs an open spool"
        if not self.spooling:
            self.spooling = True
            log.warning(
                "spool: Kafka did not acknowledge in time; spooling callbacks to %s",
                self.spool.directory,
            )

    def _refused(self, reason: str, error: BaseException | None) -> None:
        self.counters.spool_refused(reason)
        if not self._full_logged:  # once per episode: an outage would flood the log
            self._full_logged = True
            log.error("spool: refusing callbacks (answering 503): %s", error)

    def _release(self, waiting: _Waiting) -> None:
        self._waiting.pop(waiting, None)
        if waiting.timer is not None:
            waiting.timer.cancel()

    def _try_open_spool(self) -> None:
        if self.spool is not None or self._open_spool is None:
            return
        now = time.monotonic()
        if self._last_open_attempt and now - self._last_open_attempt < REOPEN_EVERY_S:
            return
        self._last_open_attempt = now
        try:
            self.spool = self._open_spool()
        except SpoolUnavailable as exc:
            self.spool_problem = exc.reason
            log.error("spool: unavailable, so a slow Kafka means 503 answers: %s", exc.reason)
        except ConfigError:
            raise
        else:
            self.spool_problem = None
            if self.spool.recovered_from is not None:
                log.error("spool: recovered; the damaged file is kept as %s", self.spool.recovered_from)

    # -- the forwarder ---------------------------------------------------------------------------

    async def _forward(self) -> None:
        try:
            while not self._stopping:
                try:
                    await self._forward_once()
                except SpoolError as exc:
                    log.error("spool: cannot read entries to forward: %s", exc.reason)
                    await asyncio.sleep(FORWARD_BACKOFF_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Never swallowed: /healthz fails on it, so the orchestrator restarts the shim and
            # the spool, on disk, is forwarded by the next process.
            self.failure = exc
            log.exception("spool: the forwarder failed")

    async def _forward_once(self) -> None:
        spool = self.spool
        if spool is None:
            await asyncio.sleep(REOPEN_EVERY_S)
            self._try_open_spool()
            return
        if spool.depth == 0:
            if self.spooling:
                self.spooling = False
                log.warning("spool: drained; callbacks go straight to Kafka again")
                await spool.compact()
            self._drained.set()
            self._wake.clear()
            await self._wake.wait()
            return
        entries = await spool.oldest(FORWARD_BATCH)
        if entries and not await self._forward_batch(spool, entries):
            await asyncio.sleep(FORWARD_BACKOFF_S)

    async def _forward_batch(self, spool: Spool, entries: list[SpooledEntry]) -> bool:
        deliveries: list[asyncio.Future[Message]] = []
        for entry in entries:
            record = entry.record
            try:
                deliveries.append(
                    self.bridge.produce(self.topic, record.value, record.key, record.headers)
                )
            except NotStored:
                break  # the producer's queue is full: send the rest in the next round
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        delivered = [entry for entry, result in zip(entries, results) if isinstance(result, Message)]
        refused = [
            entry for entry, result in zip(entries, results)
            if isinstance(result, NotStored) and result.status != 503
        ]
        await spool.remove(delivered)
        self.counters.forwarded(len(delivered))
        if refused:
            # Kafka will never take these (e.g. larger than the topic allows): keep them
            # aside rather than block every callback behind them.
            await spool.set_aside(refused, "refused by Kafka")
            log.error("spool: Kafka refused %d entries for good; kept in the set_aside table", len(refused))
        return len(delivered) + len(refused) == len(entries)


def _chain(source: asyncio.Future[Stored], target: asyncio.Future[Stored]) -> None:
    def copy(done: asyncio.Future[Stored]) -> None:
        error = done.exception()  # read even when the target is answered: see _on_delivery
        if target.done():
            return
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
