"""What the router's dedupe window costs as the work grows: memory per EventId, the CPU of
``seen`` and of ``add`` + ``commit``, and the restore from the changelog.

Run alone: .venv/bin/python -m bench.dedupe [--ids 10000,100000,1000000] [--partitions 1,24]
[--rooms 10000] [--restore 1000000] [--out DIR]

Two windows side by side in one run, on the same EventIds:

- ``before``: the window as it was until issue 14 (a dict of EventId strings to raw
  timestamps per partition), kept here verbatim as :class:`StringWindow`.
- ``rtcbus``: :class:`consumer.router.dedupe.DedupeWindow`, 128-bit digests in C hash tables.

Each figure of memory is measured in a fresh process (``spawn``): the RSS it gains while the
window fills, so that nothing measured before it is in the way. The window is fed twice its
size, so that expiry has run, then divided by the EventIds it must remember (the last
window of raw time). EventIds are UUID-shaped strings (36 characters); RoomIds spread them over
the partitions as the shim's key does (by a hash of the room). CPU is ``time.process_time``.

Beside them, the cost of one ``seen`` (a miss: the path of every new event) in the
structures considered for the window, on one table of ``ids`` digests: a dict of strings,
preshed's ``PreshMap`` (chosen), cykhash's ``Int64toInt64Map``, and open addressing over a
numpy array probed from Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import struct
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from consumer.router.dedupe import DedupeWindow, collector_paused, event_digest, marker_records, parse_marker_record

_COMMIT_EVERY = 1000  # adds per transaction, as the router's commit_max_records
_PROBES = 50_000
_split = struct.Struct("<QQ").unpack


class StringWindow:
    """The dedupe window before issue 14 (consumer/router/dedupe.py at 401ee4e), the baseline."""

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._committed: dict[int, OrderedDict[str, int]] = {}
        self._pending: dict[int, dict[str, int]] = {}

    def seen(self, partition: int, event_id: str) -> bool:
        return event_id in self._pending.get(partition, ()) or event_id in self._committed.get(
            partition, ()
        )

    def add(self, partition: int, event_id: str, timestamp_ms: int) -> None:
        self._pending.setdefault(partition, {})[event_id] = timestamp_ms

    def commit(self) -> None:
        for partition, added in self._pending.items():
            window = self._committed.setdefault(partition, OrderedDict())
            window.update(added)
            self._expire(window)
        self._pending.clear()

    def restore(self, partition: int, markers: Iterable[tuple[str, int]]) -> None:
        window = OrderedDict(markers)
        self._expire(window)
        self._committed[partition] = window
        self._pending.pop(partition, None)

    def size(self, partition: int) -> int:
        return len(self._committed.get(partition, ())) + len(self._pending.get(partition, ()))

    def _expire(self, window: OrderedDict[str, int]) -> None:
        if not window:
            return
        horizon = next(reversed(window.values())) - self._window_ms
        while window:
            event_id, timestamp_ms = next(iter(window.items()))
            if timestamp_ms >= horizon:
                break
            del window[event_id]


WINDOWS: dict[str, Callable[[int], StringWindow | DedupeWindow]] = {
    "before": StringWindow,
    "rtcbus": DedupeWindow,
}


def event_id(number: int) -> str:
    """A UUID-shaped EventId, the same for the same number in every process."""
    return str(uuid.UUID(int=(number * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << 128)))


def room_partitions(rooms: int, partitions: int) -> list[int]:
    """The partition of each room: a hash of its key, like the producer's partitioner."""
    return [zlib.crc32(f"room-{room}".encode()) % partitions for room in range(rooms)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _fill(kind: str, ids: int, partitions: int, rooms: int) -> dict:
    """One measurement, in a fresh process: feed ``2 * ids`` EventIds, 1 ms of raw time
    apart, to a window of ``ids`` ms; then the cost of ``seen`` hits and misses."""
    by_room = room_partitions(rooms, partitions)
    window = WINDOWS[kind](ids)
    make_id = event_id
    started_rss = _rss_bytes()
    started = time.process_time()
    for number in range(2 * ids):
        identity = make_id(number)
        partition = by_room[number % rooms]
        if not window.seen(partition, identity):
            window.add(partition, identity, number)
        if number % _COMMIT_EVERY == _COMMIT_EVERY - 1:
            window.commit()
    window.commit()
    feed_s = time.process_time() - started
    grown = _rss_bytes() - started_rss

    # The cost of making the EventIds, which the feed includes, taken out.
    probes = min(_PROBES, ids)
    started = time.process_time()
    for number in range(2 * ids, 2 * ids + probes):
        make_id(number)
    make_s = (time.process_time() - started) / probes
    seen = window.seen
    hits = [(by_room[n % rooms], make_id(n)) for n in range(2 * ids - probes, 2 * ids)]
    misses = [(by_room[n % rooms], make_id(n)) for n in range(3 * ids, 3 * ids + probes)]
    started = time.process_time()
    found = sum(seen(partition, identity) for partition, identity in hits)
    hit_s = (time.process_time() - started) / probes
    started = time.process_time()
    found_absent = sum(seen(partition, identity) for partition, identity in misses)
    miss_s = (time.process_time() - started) / probes
    if found != probes or found_absent:
        raise AssertionError(f"{kind}: {probes - found} remembered EventIds not seen, {found_absent} new ones seen")
    remembered = sum(window.size(p) for p in range(partitions))
    return {
        "window_ids": ids,
        "remembered": remembered,
        "rss_bytes": grown,
        "bytes_per_id": grown / ids,
        "feed_us_per_id": (feed_s / (2 * ids) - make_s) * 1e6,
        "seen_hit_ns": hit_s * 1e9,
        "seen_miss_ns": miss_s * 1e9,
    }


def _in_fresh_process(work: Callable, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(work, args)


def restore(ids: int, kinds: Iterable[str] = WINDOWS) -> dict:
    """Restore ``ids`` markers, as the changelog holds them, into each window: seconds to
    parse the marker records (``parse_marker_record``) and to load them (``restore``)."""
    markers = {0: [(event_id(n), 1_700_000_000_000 + n) for n in range(ids)]}
    records = [value for _, value, _ in marker_records(markers)]
    del markers
    results = {}
    for kind in kinds:
        started = time.process_time()
        pairs: list[tuple[str, int]] = []
        with collector_paused():  # as DedupeLog.markers parses them
            for value in records:
                pairs.extend(parse_marker_record(value, None, 0))
        parsed = time.process_time()
        window = WINDOWS[kind](ids)
        window.restore(0, pairs)
        loaded = time.process_time()
        if window.size(0) != ids or not window.seen(0, event_id(ids - 1)):
            raise AssertionError(f"{kind}: the restore lost markers")
        results[kind] = {"parse_s": parsed - started, "load_s": loaded - parsed, "total_s": loaded - started}
        del pairs, window
    return results


def probe_costs(ids: int) -> dict:
    """ns per ``seen`` miss, digest included, in each structure considered, holding ``ids``.
    numpy and cykhash come with matplotlib and the bench extra; without them (CI's dev
    extra) their rows say "not installed"."""
    from preshed.maps import PreshMap

    present = [event_id(n) for n in range(ids)]
    absent = [event_id(n) for n in range(ids, ids + _PROBES)]
    costs: dict[str, float | str] = {}

    def timed(name: str, seen: Callable[[str], bool]) -> None:
        started = time.process_time()
        for identity in absent:
            seen(identity)
        costs[name] = (time.process_time() - started) / len(absent) * 1e9
        if any(not seen(identity) for identity in present[:1000]):
            raise AssertionError(f"{name}: a remembered EventId is not seen")

    strings = dict.fromkeys(present, 0)
    timed("dict of strings (before)", strings.__contains__)
    digests = [event_digest(identity) for identity in present]
    for name, digest in (("XXH3, rtcbus", event_digest), ("BLAKE2b", _blake2b_digest)):
        started = time.process_time()
        for identity in absent:
            digest(identity)
        costs[f"the 128-bit digest alone ({name})"] = (time.process_time() - started) / len(absent) * 1e9

    table = PreshMap()
    for high, low in digests:
        table[high] = low
    for tables in (1, 10):
        maps = [table] * tables

        def in_preshed(identity: str, maps: list = maps) -> bool:
            high, low = event_digest(identity)
            for each in maps:
                if each[high] == low:
                    return True
            return False

        timed(f"preshed PreshMap, {tables} table(s) (rtcbus)", in_preshed)

    try:
        import cykhash
    except ImportError:
        costs["cykhash Int64toInt64Map"] = "not installed"
    else:
        signed = cykhash.Int64toInt64Map()
        for high, low in digests:
            signed[high - (1 << 63)] = low - (1 << 63)

        def in_cykhash(identity: str) -> bool:
            high, low = event_digest(identity)
            return signed.get(high - (1 << 63), None) == low - (1 << 63)

        timed("cykhash Int64toInt64Map, 1 table", in_cykhash)

    try:
        import numpy as np
    except ImportError:
        costs["numpy open addressing, Python probe"] = "not installed"
        return {"ids": ids, "seen_miss_ns": costs}
    # Open addressing over numpy (linear probing, half full), probed from Python: what a
    # hand-rolled compact table costs per call.
    slots = 1 << max(4, (2 * ids - 1).bit_length())
    keys = np.zeros((slots, 2), dtype=np.uint64)
    for high, low in digests:
        slot = high & (slots - 1)
        while keys[slot, 0] or keys[slot, 1]:
            slot = (slot + 1) & (slots - 1)
        keys[slot] = (high, low)

    def in_numpy(identity: str) -> bool:
        high, low = event_digest(identity)
        slot = high & (slots - 1)
        while True:
            stored_high, stored_low = keys[slot]
            if stored_high == high and stored_low == low:
                return True
            if not stored_high and not stored_low:
                return False
            slot = (slot + 1) & (slots - 1)

    timed("numpy open addressing, Python probe", in_numpy)
    return {"ids": ids, "seen_miss_ns": costs}


def _blake2b_digest(event_id: str) -> tuple[int, int]:
    return _split(hashlib.blake2b(event_id.encode(), digest_size=16).digest())


def run(ids: Iterable[int] = (10_000, 100_000, 1_000_000), partitions: Iterable[int] = (1, 24),
        rooms: int = 10_000, restore_ids: Iterable[int] = (1_000_000,), probe_ids: int = 1_000_000) -> dict:
    """The section of ``python -m bench``: growth by window size and by partitions, the
    restore, and the probe cost of each structure considered."""
    grid = {}
    for count in partitions:
        for size in ids:
            for kind in WINDOWS:
                grid.setdefault(f"{count}", {}).setdefault(kind, {})[str(size)] = _in_fresh_process(
                    _fill, kind, size, count, rooms)
    return {
        "rooms": rooms,
        "by_partitions": grid,
        # CPU time only: in this process.
        "restore": {str(count): restore(count) for count in restore_ids},
        "probe": probe_costs(probe_ids) if probe_ids else {},
    }


def targets(results: dict) -> list[dict]:
    """Issue 14's memory target, at the largest window measured (all partition counts)."""
    rows = [by_size[max(by_size, key=int)] for grid in results.get("by_partitions", {}).values()
            for kind, by_size in grid.items() if kind == "rtcbus"]
    worst = max((row["bytes_per_id"] for row in rows), default=None)
    return [{"target": "dedupe window bytes per remembered EventId, largest window <=",
             "value": worst, "goal": 40, "met": None if worst is None else worst <= 40}]


def table(results: dict) -> str:
    if "by_partitions" not in results:
        return f"dedupe: {results.get('error', 'not run')}"
    lines = ["| window | partitions | EventIds in window | bytes/EventId | feed µs/EventId "
             "| seen miss ns | seen hit ns | remembered |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for count, grid in results["by_partitions"].items():
        for kind, by_size in grid.items():
            for size, row in by_size.items():
                lines.append(f"| {kind} | {count} | {int(size):,} | {row['bytes_per_id']:.0f} "
                             f"| {row['feed_us_per_id']:.2f} | {row['seen_miss_ns']:.0f} "
                             f"| {row['seen_hit_ns']:.0f} | {row['remembered']:,} |")
    lines += ["", "| restore, markers | window | parse s | load s | total s |", "|---:|---|---:|---:|---:|"]
    for count, kinds in results["restore"].items():
        for kind, row in kinds.items():
            lines.append(f"| {int(count):,} | {kind} | {row['parse_s']:.2f} | {row['load_s']:.2f} "
                         f"| {row['total_s']:.2f} |")
    probe = results.get("probe") or {}
    if probe:
        lines += ["", f"| structure, {probe['ids']:,} digests | seen miss ns |", "|---|---:|"]
        for name, ns in probe["seen_miss_ns"].items():
            lines.append(f"| {name} | {ns if isinstance(ns, str) else f'{ns:.0f}'} |")
    return "\n".join(lines)


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Bytes per EventId and ``seen`` cost against the window size, per partition count."""
    if "by_partitions" not in results:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figure, (memory, cpu) = plt.subplots(1, 2, figsize=(10, 3.5))
    for count, grid in results["by_partitions"].items():
        for kind, by_size in grid.items():
            sizes = sorted(by_size, key=int)
            style = "-" if kind == "rtcbus" else "--"
            label = f"{kind}, {count} partition{'s' if count != '1' else ''}"
            memory.plot([int(s) for s in sizes], [by_size[s]["bytes_per_id"] for s in sizes], style,
                        marker="o", label=label)
            cpu.plot([int(s) for s in sizes], [by_size[s]["seen_miss_ns"] for s in sizes], style,
                     marker="o", label=label)
    memory.axhline(40, color="grey", linewidth=0.8, linestyle=":")
    for axes, label in ((memory, "RSS bytes per EventId in the window"), (cpu, "ns per seen (miss)")):
        axes.set_xscale("log")
        axes.set_xlabel("EventIds in the window")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
    memory.set_title("Dedupe window memory")
    cpu.set_title("Dedupe window seen()")
    memory.legend(fontsize=7)
    figure.tight_layout()
    path = out_dir / "dedupe-window.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", default="10000,100000,1000000", help="window sizes, in EventIds")
    parser.add_argument("--partitions", default="1,24")
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--restore", default="1000000", help="marker counts to restore")
    parser.add_argument("--probe", type=int, default=1_000_000, help="digests in the probe table (0: skip)")
    parser.add_argument("--out", help="write the JSON and the plot here")
    args = parser.parse_args()
    results = run(
        ids=[int(n) for n in args.ids.split(",")],
        partitions=[int(n) for n in args.partitions.split(",")],
        rooms=args.rooms,
        restore_ids=[int(n) for n in args.restore.split(",") if n],
        probe_ids=args.probe,
    )
    print(table(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dedupe.json").write_text(json.dumps(results, indent=2) + "\n")
        print("written:", *plot(results, out))


if __name__ == "__main__":
    main()
