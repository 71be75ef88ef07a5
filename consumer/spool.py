"""The shim's local spool: callbacks Kafka could not take in time, fsynced to disk, in order.

The store is SQLite (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``: a commit
returns only once the WAL is fsynced, and a torn last write is discarded by SQLite's own frame
checksums on the next open. One thread owns the connection. Appends queue up while a commit is
fsyncing and the next commit takes them all (group commit), so the spool costs one fsync per
batch, not per callback.

Every entry also carries a CRC-32 of its key, headers and value: SQLite notices damage to its
own structure (``PRAGMA quick_check``), not a flipped bit inside a value. A spool file SQLite
cannot read is set aside whole, and every entry that can still be read and passes its CRC is
copied into a fresh spool. A single entry whose CRC fails is moved to the ``set_aside`` table.
Either way a log line says how many entries were affected.

One shim per spool directory: two forwarders on one spool would send every entry twice and
break the order per key, so an exclusive ``flock`` on ``spool.lock`` is held while it is open.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer.errors import ConfigError

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.db"
LOCK_FILE = "spool.lock"
# Disk space held back in a file of its own: on a full disk even a DELETE needs room in the
# WAL, so the forwarder frees this to go on deleting what it has delivered.
RESERVE_FILE = "spool.reserve"
RESERVE_BYTES = 1024 * 1024
# Appends committed together at most; more wait for the next commit.
MAX_GROUP = 2048
_FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    spooled_at INTEGER NOT NULL,
    key TEXT NOT NULL,
    headers TEXT NOT NULL,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS set_aside (
    seq INTEGER PRIMARY KEY,
    spooled_at INTEGER NOT NULL,
    key TEXT NOT NULL,
    headers TEXT NOT NULL,
    value BLOB NOT NULL,
    reason TEXT NOT NULL
);
"""


class SpoolError(Exception):
    """The spool cannot take a record; ``reason`` is short and safe to show a sender."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SpoolFull(SpoolError):
    """The spool holds ``max_bytes`` already."""


class SpoolUnavailable(SpoolError):
    """The spool cannot be written: disk full, unwritable, I/O error."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """A raw record as the shim would produce it."""

    key: str
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    @property
    def size(self) -> int:
        return len(self.value) + len(self.key) + sum(len(k) + len(v) for k, v in self.headers)


@dataclass(frozen=True, slots=True)
class SpooledEntry:
    seq: int
    spooled_at_ms: int
    record: SpoolRecord


class Spool:
    """A durable FIFO of :class:`SpoolRecord`; its async calls run on one thread of its own.

    The counters (``depth``, ``bytes``, ``oldest_ms``) are kept on the event loop: ``depth``
    counts an append from the moment it is submitted, so ``depth == 0`` on the loop means
    nothing is stored and nothing is on its way in.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        """Open (creating, recovering) the spool in ``directory``.

        Raises:
            ConfigError: another process holds the spool directory.
            SpoolUnavailable: the directory or its file cannot be created or written.
        """
        self.directory = directory
        self.max_bytes = max_bytes
        self.recovered_from: Path | None = None
        self.commits = 0  # group commits so far (each one fsync)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock = open(directory / LOCK_FILE, "a+b")  # noqa: SIM115 - held while open
        except OSError as exc:
            raise SpoolUnavailable(f"cannot create the spool in {directory}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ConfigError(
                f"another process holds the spool in {directory}: one shim per spool directory"
            ) from None
        try:
            self._db = self._open_checked()
            self.depth, self.bytes, self.oldest_ms = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), min(spooled_at) FROM entries"
            ).fetchone()
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            raise SpoolUnavailable(f"cannot open the spool in {directory}: {exc}") from exc
        self._reserve()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="rtcbus-spool", daemon=True)
        self._thread.start()

    # -- the event loop's side ---------------------------------------------------------------

    def submit(self, record: SpoolRecord) -> asyncio.Future[None]:
        """Queue ``record`` for the next commit; the future resolves once it is fsynced.

        Submissions are stored in the order of the calls, which is what keeps a room's
        callbacks in order across the spool.

        Raises:
            SpoolFull: storing it would pass ``max_bytes`` (raised at once, nothing queued).

        The future fails with :class:`SpoolUnavailable` if the write fails (disk full, I/O).
        """
        size = record.size
        if self.bytes + size > self.max_bytes:
            raise SpoolFull(f"the spool is full ({self.bytes} of {self.max_bytes} bytes)")
        self.depth += 1
        self.bytes += size
        if self.oldest_ms is None:
            self.oldest_ms = time.time_ns() // 1_000_000
        future = self._enqueue("append", record)

        def on_done(done: asyncio.Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                self._forget([size])

        future.add_done_callback(on_done)
        return future

    async def append(self, record: SpoolRecord) -> None:
        """Store ``record``; returns once it is fsynced. Raises as :meth:`submit` does."""
        await self.submit(record)

    async def oldest(self, limit: int) -> list[SpooledEntry]:
        """Up to ``limit`` entries, oldest first, each with a valid CRC.

        An entry whose CRC fails is moved to ``set_aside`` (logged, not returned).
        """
        entries, damaged = await self._submit("read", limit)
        if damaged:
            self._forget(damaged)
        if entries:
            self.oldest_ms = entries[0].spooled_at_ms
        return entries

    async def remove(self, entries: Sequence[SpooledEntry]) -> None:
        """Delete entries, once their records are in Kafka."""
        if not entries:
            return
        await self._submit("delete", [entry.seq for entry in entries])
        self._forget([entry.record.size for entry in entries])

    async def set_aside(self, entries: Sequence[SpooledEntry], reason: str) -> None:
        """Move entries Kafka refused for good (e.g. too large) out of the queue, kept."""
        if not entries:
            return
        await self._submit("set_aside", ([entry.seq for entry in entries], reason))
        self._forget([entry.record.size for entry in entries])

    async def compact(self) -> None:
        """Give the WAL's disk space back; called when the spool has drained."""
        await self._submit("compact", None)

    def close(self) -> None:
        """Stop the thread and close the file; what is stored stays for the next open."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._unlock()

    def _forget(self, sizes: Iterable[int]) -> None:
        for size in sizes:
            self.depth -= 1
            self.bytes -= size
        if self.depth <= 0:
            self.depth, self.bytes, self.oldest_ms = 0, 0, None

    async def _submit(self, kind: str, argument: Any) -> Any:
        return await self._enqueue(kind, argument)

    def _enqueue(self, kind: str, argument: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put(_Job(kind, argument, loop, future))
        return future

    # -- the spool thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backlog: list[_Job | None] = []
        while True:
            job = backlog.pop(0) if backlog else self._jobs.get()
            if job is None:
                break
            if job.kind != "append":
                job.run(self._handlers[job.kind], self)
                continue
            # Group commit: every append already waiting joins this transaction.
            group = [job]
            while len(group) < MAX_GROUP:
                try:
                    following = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if following is None or following.kind != "append":
                    backlog.append(following)
                    break
                group.append(following)
            self._commit_group(group)
        self._db.close()

    def _commit_group(self, group: list[_Job]) -> None:
        now_ms = time.time_ns() // 1_000_000
        try:
            with self._db:  # one transaction, one fsync for the whole group
                self._db.executemany(
                    "INSERT INTO entries (spooled_at, key, headers, value, size, crc) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [_row(job.argument, now_ms) for job in group],
                )
        except sqlite3.Error as exc:
            error = SpoolUnavailable(_describe(exc))
            for job in group:
                job.fail(error)
            return
        self.commits += 1
        for job in group:
            job.succeed(None)

    def _read(self, limit: int) -> tuple[list[SpooledEntry], list[int]]:
        rows = self._db.execute(
            "SELECT seq, spooled_at, key, headers, value, crc, size FROM entries ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        entries: list[SpooledEntry] = []
        damaged: list[tuple[int, int]] = []
        for seq, spooled_at, key, headers_text, value, crc, size in rows:
            record = _record(key, headers_text, value, crc)
            if record is None:
                damaged.append((seq, size))
            else:
                entries.append(SpooledEntry(seq, spooled_at, record))
        if damaged:
            self._move_aside(([seq for seq, _ in damaged], "crc mismatch"))
            log.error(
                "spool: %d entries failed their CRC and were moved to the set_aside table of %s",
                len(damaged), self.directory / SPOOL_FILE,
            )
        return entries, [size for _, size in damaged]

    def _move_aside(self, argument: tuple[list[int], str]) -> None:
        seqs, reason = argument
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO set_aside (seq, spooled_at, key, headers, value, reason) "
                "SELECT seq, spooled_at, key, headers, value, ? FROM entries WHERE seq = ?",
                [(reason, seq) for seq in seqs],
            )
            self._db.executemany("DELETE FROM entries WHERE seq = ?", [(seq,) for seq in seqs])

    def _delete(self, seqs: list[int]) -> None:
        try:
            self._delete_now(seqs)
        except sqlite3.OperationalError as exc:
            reserve = self.directory / RESERVE_FILE
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL or not reserve.exists():
                raise
            log.error("spool: the disk is full; freeing the reserve to go on deleting delivered entries")
            reserve.unlink()
            self._delete_now(seqs)

    def _delete_now(self, seqs: list[int]) -> None:
        with self._db:
            self._db.executemany("DELETE FROM entries WHERE seq = ?", [(seq,) for seq in seqs])

    def _compact(self, _: None) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:  # best effort: the space comes back later
            log.warning("spool: could not shrink the WAL now: %s", _describe(exc))
            return
        self._reserve()

    def _reserve(self) -> None:
        reserve = self.directory / RESERVE_FILE
        if reserve.exists():
            return
        try:
            with reserve.open("wb") as file:
                file.truncate(0)
                file.write(b"\0" * RESERVE_BYTES)  # written, not sparse: the blocks are taken
                file.flush()
                os.fsync(file.fileno())
        except OSError:
            reserve.unlink(missing_ok=True)  # no room for it now; taken again after a drain

    _handlers: dict[str, Callable[[Spool, Any], Any]] = {
        "read": _read, "delete": _delete, "set_aside": _move_aside, "compact": _compact,
    }

    # -- opening and recovery ------------------------------------------------------------------

    def _open_checked(self) -> sqlite3.Connection:
        path = self.directory / SPOOL_FILE
        try:
            return _connect(path, check=True)
        except sqlite3.DatabaseError as exc:
            if not path.exists() or isinstance(exc, sqlite3.OperationalError) and not _is_corrupt(exc):
                raise
            damaged = self._set_aside(path)
            db = _connect(path, check=False)
            recovered, lost = _salvage(damaged, db)
            log.error(
                "spool: %s was damaged (%s); set it aside as %s, recovered %d entries, "
                "could not read %s", path, exc, damaged.name, recovered,
                f"{lost} entries" if lost is not None else "an unknown number of entries",
            )
            self.recovered_from = damaged
            return db

    def _set_aside(self, path: Path) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = path.with_name(f"{path.name}.damaged-{stamp}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
        return target

    def _unlock(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


@dataclass(slots=True)
class _Job:
    kind: str
    argument: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def run(self, handler: Callable[[Spool, Any], Any], spool: Spool) -> None:
        try:
            result = handler(spool, self.argument)
        except sqlite3.Error as exc:
            self.fail(SpoolUnavailable(_describe(exc)))
        else:
            self.succeed(result)

    def succeed(self, result: Any) -> None:
        self._settle(lambda: self.future.set_result(result))

    def fail(self, error: BaseException) -> None:
        self._settle(lambda: self.future.set_exception(error))

    def _settle(self, action: Callable[[], None]) -> None:
        def settle() -> None:
            if not self.future.done():  # the caller may have stopped waiting
                action()

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _connect(path: Path, check: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if check:
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {verdict}")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={_FORMAT_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def _salvage(damaged: Path, into: sqlite3.Connection) -> tuple[int, int | None]:
    """Copy every readable entry with a valid CRC from ``damaged`` into ``into``.

    SQLite cannot step through a damaged b-tree page, so a scan that fails restarts past the
    last good entry, skipping further each time, until it reads again or passes the highest
    sequence number the file claims.

    Returns:
        (entries recovered, entries lost: None when the file no longer says how many it had)
    """
    try:
        source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, None
    recovered = 0
    try:
        try:
            (highest,) = source.execute("SELECT max(seq) FROM entries").fetchone()
        except sqlite3.Error:
            highest = None
        try:
            (total,) = source.execute("SELECT count(*) FROM entries").fetchone()
        except sqlite3.Error:
            total = None
        after, skip = 0, 1
        limit = highest if highest is not None else 1 << 40
        while after <= limit:
            try:
                cursor = source.execute(
                    "SELECT seq, spooled_at, key, headers, value, crc FROM entries "
                    "WHERE seq > ? ORDER BY seq", (after,),
                )
                for seq, spooled_at, key, headers, value, crc in cursor:
                    after, skip = seq, 1
                    record = _record(key, headers, value, crc)
                    if record is None:
                        continue
                    with into:
                        into.execute(
                            "INSERT INTO entries (seq, spooled_at, key, headers, value, size, crc) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (seq, spooled_at, key, headers, value, record.size, crc),
                        )
                    recovered += 1
                break
            except sqlite3.DatabaseError:
                after += skip
                skip *= 2
                if highest is None and skip > 1 << 20:
                    break
    finally:
        source.close()
    lost = None if total is None else max(total - recovered, 0)
    return recovered, lost


def _row(record: SpoolRecord, now_ms: int) -> tuple[int, str, str, bytes, int, int]:
    headers = _headers_text(record.headers)
    return (now_ms, record.key, headers, record.value, record.size, _crc(record.key, headers, record.value))


def _record(key: object, headers_text: object, value: object, crc: object) -> SpoolRecord | None:
    if not (isinstance(key, str) and isinstance(headers_text, str) and isinstance(value, bytes)):
        return None
    if _crc(key, headers_text, value) != crc:
        return None
    try:
        headers = tuple((name, bytes.fromhex(hex_value)) for name, hex_value in json.loads(headers_text))
    except (ValueError, TypeError):
        return None
    return SpoolRecord(key, value, headers)


def _headers_text(headers: Iterable[tuple[str, bytes]]) -> str:
    return json.dumps([[name, value.hex()] for name, value in headers], separators=(",", ":"))


def _crc(key: str, headers_text: str, value: bytes) -> int:
    return zlib.crc32(value, zlib.crc32(headers_text.encode(), zlib.crc32(key.encode())))


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in str(exc)


def _describe(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return "the spool's disk is full"
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return "the spool is not writable"
    return f"the spool could not be written: {getattr(exc, 'sqlite_errorname', type(exc).__name__)}"
