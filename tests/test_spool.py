"""The spool on its own, on real files: order, group commit, durability across a reopen, the
size cap, a full or unwritable disk, and damaged files. No Kafka."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from consumer.errors import ConfigError
from consumer.spool import SPOOL_FILE, Spool, SpoolFull, SpoolRecord, SpoolUnavailable

MiB = 1024 * 1024


def record(n: int, size: int = 100) -> SpoolRecord:
    return SpoolRecord(
        key=f"room-{n % 7}",
        value=(f'{{"n":{n},"pad":"' + "x" * size + '"}').encode(),
        headers=(("rtcbus.event_id", f"e-{n}".encode()), ("rtcbus.received_at", b"1700000000000")),
    )


def run(coroutine):
    return asyncio.run(coroutine)


async def fill(spool: Spool, count: int, size: int = 100) -> list[SpoolRecord]:
    records = [record(n, size) for n in range(count)]
    await asyncio.gather(*(spool.append(r) for r in records))
    return records


async def read_all(spool: Spool) -> list[SpoolRecord]:
    return [entry.record for entry in await spool.oldest(1_000_000)]


def test_entries_come_back_in_submission_order_after_a_reopen(tmp_path: Path):
    async def write() -> list[SpoolRecord]:
        spool = Spool(tmp_path, 64 * MiB)
        try:
            written = await fill(spool, 3000)
            assert (spool.depth, spool.bytes) == (3000, sum(r.size for r in written))
            return written
        finally:
            spool.close()

    written = run(write())

    async def reread() -> tuple[list[SpoolRecord], int, int]:
        spool = Spool(tmp_path, 64 * MiB)
        try:
            return await read_all(spool), spool.depth, spool.bytes
        finally:
            spool.close()

    again, depth, size = run(reread())
    assert again == written
    assert (depth, size) == (3000, sum(r.size for r in written))


def test_concurrent_appends_share_commits(tmp_path: Path):
    # Group commit: 2000 appends submitted at once need far fewer than 2000 transactions.
    async def main() -> int:
        spool = Spool(tmp_path, 64 * MiB)
        try:
            await fill(spool, 2000)
            return spool.commits
        finally:
            spool.close()

    commits = run(main())
    assert 1 <= commits <= 200, commits


def test_removed_entries_are_gone_and_the_rest_keep_their_order(tmp_path: Path):
    async def main() -> tuple[list[SpoolRecord], list[SpoolRecord], int]:
        spool = Spool(tmp_path, 64 * MiB)
        try:
            written = await fill(spool, 50)
            first = await spool.oldest(20)
            await spool.remove(first)
            rest = await read_all(spool)
            return written, rest, spool.depth
        finally:
            spool.close()

    written, rest, depth = run(main())
    assert rest == written[20:] and depth == 30


def test_an_append_past_the_size_cap_is_refused_and_nothing_is_written(tmp_path: Path):
    async def main() -> tuple[int, int]:
        spool = Spool(tmp_path, MiB)
        try:
            taken = 0
            with pytest.raises(SpoolFull, match="the spool is full"):
                while True:
                    await spool.append(record(taken, 10_000))
                    taken += 1
            assert spool.bytes <= MiB
            return taken, len(await read_all(spool))
        finally:
            spool.close()

    taken, stored = run(main())
    assert taken == stored and 90 <= taken <= 104


def test_a_second_spool_on_the_same_directory_is_refused(tmp_path: Path):
    spool = Spool(tmp_path, MiB)
    try:
        with pytest.raises(ConfigError, match="one shim per spool directory"):
            Spool(tmp_path, MiB)
    finally:
        spool.close()
    Spool(tmp_path, MiB).close()  # free again once closed


def test_an_unwritable_directory_is_a_clear_spool_error(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolUnavailable, match="cannot create the spool"):
        Spool(blocker / "spool", MiB)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root (the `mount` tool as root)")
def test_a_full_disk_fails_the_append_and_the_spool_goes_on_after_space_returns(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"`mount -t tmpfs` is refused here (missing privilege): {mounted.stderr.decode().strip()}")
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (5 * MiB))  # the disk is nearly full of something else

        async def main() -> tuple[int, str, list[SpoolRecord], list[SpoolRecord]]:
            spool = Spool(disk, 64 * MiB)
            try:
                taken = 0
                with pytest.raises(SpoolUnavailable) as refused:
                    while taken < 10_000:
                        await spool.append(record(taken, 4000))
                        taken += 1
                stored = await read_all(spool)
                # The failed commit left nothing half-written, and the counters agree.
                assert spool.depth == len(stored) == taken
                filler.unlink()  # space is back
                await spool.append(record(99_999, 100))
                return taken, refused.value.reason, stored, await read_all(spool)
            finally:
                spool.close()

        taken, reason, before, after = run(main())
        assert taken > 10 and reason == "the spool's disk is full"
        assert after == before + [record(99_999, 100)]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_corrupted_file_is_set_aside_and_every_intact_entry_recovered(tmp_path: Path):
    async def write() -> list[SpoolRecord]:
        spool = Spool(tmp_path, 64 * MiB)
        try:
            return await fill(spool, 2000, 200)
        finally:
            spool.close()

    written = run(write())
    checkpoint(tmp_path)
    path = tmp_path / SPOOL_FILE
    page = 4096
    pages = path.stat().st_size // page
    with path.open("r+b") as file:  # garbage over two pages in the middle of the table
        file.seek(page * (pages // 2))
        file.write(os.urandom(2 * page))

    async def reopen() -> tuple[list[SpoolRecord], Path | None]:
        spool = Spool(tmp_path, 64 * MiB)
        try:
            return await read_all(spool), spool.recovered_from
        finally:
            spool.close()

    recovered, damaged = run(reopen())
    assert damaged is not None and damaged.exists() and damaged.parent == tmp_path
    by_value = {r.value: r for r in written}
    assert all(by_value.get(r.value) == r for r in recovered), "a recovered entry differs from what was written"
    assert [written.index(r) for r in recovered] == sorted(written.index(r) for r in recovered), "order lost"
    # Two pages hold some 35 entries of this size; everything else must be back.
    assert len(written) - 80 <= len(recovered) < len(written)


def test_a_file_that_is_not_a_database_is_set_aside_and_the_spool_starts_empty(tmp_path: Path):
    (tmp_path / SPOOL_FILE).write_bytes(os.urandom(20_000))

    async def main() -> tuple[int, Path | None]:
        spool = Spool(tmp_path, MiB)
        try:
            await spool.append(record(1))
            return len(await read_all(spool)), spool.recovered_from
        finally:
            spool.close()

    count, damaged = run(main())
    assert count == 1 and damaged is not None and damaged.read_bytes()[:6] != b"SQLite"


def test_an_entry_whose_bytes_rotted_is_set_aside_not_forwarded(tmp_path: Path):
    async def write() -> list[SpoolRecord]:
        spool = Spool(tmp_path, MiB)
        try:
            return await fill(spool, 10)
        finally:
            spool.close()

    written = run(write())
    db = sqlite3.connect(tmp_path / SPOOL_FILE)  # a flipped bit SQLite's own checks cannot see
    with db:
        db.execute("UPDATE entries SET value = CAST(? AS BLOB) WHERE seq = 4", (b"rotten",))
    db.close()

    async def reread() -> tuple[list[SpoolRecord], int]:
        spool = Spool(tmp_path, MiB)
        try:
            return await read_all(spool), spool.depth
        finally:
            spool.close()

    entries, depth = run(reread())
    assert entries == written[:3] + written[4:] and depth == 9
    db = sqlite3.connect(tmp_path / SPOOL_FILE)
    assert db.execute("SELECT seq, reason FROM set_aside").fetchall() == [(4, "crc mismatch")]
    db.close()


def test_a_process_killed_mid_append_leaves_every_committed_entry(tmp_path: Path):
    # A child appends in a loop, printing each count that has been fsynced, and is SIGKILLed.
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import asyncio, sys
            from pathlib import Path
            from consumer.spool import Spool, SpoolRecord
            async def main():
                spool = Spool(Path({str(tmp_path)!r}), 1 << 30)
                n = 0
                while True:
                    await asyncio.gather(*(spool.append(SpoolRecord("k", b"%d" % (n + i), ())) for i in range(10)))
                    n += 10
                    print(n, flush=True)
            asyncio.run(main())
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    acknowledged = 0
    assert child.stdout is not None
    for line in child.stdout:
        acknowledged = int(line)
        if acknowledged >= 3000:
            break
    child.kill()
    child.wait(10)

    async def reread() -> list[SpoolRecord]:
        spool = Spool(tmp_path, 1 << 30)
        try:
            return await read_all(spool)
        finally:
            spool.close()

    entries = run(reread())
    values = [int(r.value) for r in entries]
    assert values == list(range(len(values))), "entries out of order or with gaps"
    assert len(values) >= acknowledged, f"{acknowledged} were acknowledged, {len(values)} survived"


def checkpoint(directory: Path) -> None:
    """Move the WAL into the main file, so damage to the file hits entries."""
    db = sqlite3.connect(directory / SPOOL_FILE)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
