"""Where a router arm spends its time: py-spy on one drain, the top frames summed.

Run: .venv/bin/python -m bench.profile [--arm rtcbus-eos] [--events 20000] [--cpu] [--native] [--frame NAME ...] [--bootstrap HOST:PORT]
     .venv/bin/python -m bench.profile --folded bench/results/profile-rtcbus-native.txt [--frame NAME ...]

Fills a fresh raw topic as ``bench.router`` does, then records the arm's process with py-spy
(``pip install py-spy``; sampling at 200 Hz, idle time included unless ``--cpu``) from its first
routed record until the group committed the last, and prints
the functions by own time and by total time (own plus callees), threads summed. The raw folded stacks are
written next to the results, for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.router import (
    ARMS, EXTRA_ARMS, PARTITIONS, arm_settings, by_thread, committed, cpu_seconds, fill, produced, terminate,
    thread_cpu, watched_outputs,
)
from bench.workload import raw_records
from consumer.kafka.admin import ensure_topics


def profile(bootstrap: str, arm_name: str, events: int, out: Path, idle: bool = True,
            native: bool = False, named: Sequence[str] = ()) -> dict:
    """Folded stacks of ``arm_name`` draining ``events`` records, and their top frames
    (``native``: with the C frames under the Python ones, librdkafka's and the codecs')."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    arm = next(a for a in (*ARMS, *EXTRA_ARMS) if a.name == arm_name)
    settings = arm_settings(bootstrap, arm)
    ensure_topics(settings)
    fill(settings, raw_records(events))
    overrides = {
        "bootstrap_servers": bootstrap, "topic_prefix": settings.topic_prefix,
        "partitions": PARTITIONS, "group_id": settings.group_id, "metrics_port": 0,
        **arm.overrides,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs = watched_outputs(arm, settings)
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.contender", arm.contender, json.dumps(overrides)]
    )
    from confluent_kafka import Consumer, TopicPartition

    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": settings.group_id, "log_level": 0})
    raw = [TopicPartition(settings.raw_topic, p) for p in range(PARTITIONS)]
    spy = None
    try:
        deadline = time.monotonic() + 300
        # As bench.router times a drain: from the first routed record, so that the imports,
        # the group join and the first fetch are not in the samples.
        while produced(watcher, outputs) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        events_before, cpu_before, threads_before = (
            committed(watcher, raw), cpu_seconds(process.pid), thread_cpu(process.pid))
        spy = subprocess.Popen([
            py_spy, "record", "--rate", "200", "--format", "raw", "--output", str(out),
            # --native must pause the process for each sample; without it py-spy need not.
            *(["--native"] if native else ["--nonblocking"]), *(["--idle"] if idle else []),
            "--pid", str(process.pid),
        ])
        while (done := committed(watcher, raw)) < events and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu_s, threads_after = cpu_seconds(process.pid) - cpu_before, thread_cpu(process.pid)
    finally:
        watcher.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            spy.wait(timeout=30)
        terminate(process)
    if spy is None or not out.exists():
        raise RuntimeError(f"py-spy wrote no samples (exit {spy and spy.returncode})")
    # py-spy samples the interpreter's threads only: their CPU per event turns its shares into
    # µs per event. The totals count from the first commit seen, a few records late at most.
    events_sampled = max(done - events_before, 1)
    split = by_thread(threads_before, threads_after, cpu_s, events_sampled)
    return {**top_frames(out, named=named), "events": events_sampled, "cpu_us_per_event_by_thread": split}


def top_frames(folded: Path, count: int = 25, named: Sequence[str] = ()) -> dict:
    """Frames by share of the samples: own (the frame on top) and total (anywhere on the
    stack). For each of ``named`` (a function, ``write``, or with its file,
    ``write (libc.so.6)``): its total share, and the share under each of its callers."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    callers: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in named}
    samples = 0
    for line in folded.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        n = int(number)
        samples += n
        functions = [_function(frame) for frame in stack.split(";")]
        own[functions[-1]] += n
        for function in set(functions):
            total[function] += n
        for name, under in callers.items():
            hits = {functions[i - 1] if i else "(top)" for i, f in enumerate(functions)
                    if name in (f, f.partition(" (")[0])}
            for caller in hits:
                under[caller] += n
            if hits:
                under[""] += n  # the frame's own total, each sample once
    pct = lambda n: round(100 * n / samples, 1)
    share = lambda counter: [(f, pct(n)) for f, n in counter.most_common(count)]
    return {
        "samples": samples, "own_pct": share(own), "total_pct": share(total),
        "named": {name: {"total_pct": pct(under.pop("")), "callers_pct": share(under)}
                  for name, under in callers.items() if under},
    }


def _function(frame: str) -> str:
    """``name (file)`` of a py-spy frame ``name (file:line)``, or ``name (library)`` of a
    native one: by function, the line numbers dropped."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.removesuffix(')').partition(':')[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", default="rtcbus-eos")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--out", default="bench/results/profile-rtcbus.txt")
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--cpu", action="store_true", help="on-CPU samples only (no idle time)")
    parser.add_argument("--native", action="store_true", help="C frames too (librdkafka, the codecs)")
    parser.add_argument("--frame", action="append", default=[],
                        help="a function to show with its callers (repeatable): write, or 'write (libc.so.6)'")
    parser.add_argument("--folded", help="read these folded stacks (a previous run's --out) instead of "
                                         "running a drain: shares only, no µs")
    args = parser.parse_args()
    if args.folded:
        result = top_frames(Path(args.folded), named=args.frame)
        python_us = None
        print(f"{result['samples']} samples in {args.folded}")
    else:
        from bench.broker import bench_kafka

        with bench_kafka(args.bootstrap) as kafka:
            result = profile(kafka.bootstrap_servers, args.arm, args.events, Path(args.out),
                             idle=not args.cpu, native=args.native, named=args.frame)
        split = result["cpu_us_per_event_by_thread"]
        python_us = split["Python threads"]
        print(f"{result['samples']} samples over {result['events']} events; CPU µs per event: "
              + ", ".join(f"{kind} {us:.1f}" for kind, us in split.items()))

    def row(pct: float, frame: str) -> str:
        us = "" if python_us is None else f"{pct / 100 * python_us:6.1f} µs  "
        return f"{pct:6.1f}%  {us}{frame}"

    scale = "" if python_us is None else f"; µs/event = share × {python_us:.1f}"
    for title in ("own_pct", "total_pct"):
        print(f"\n{title} (of the Python threads' samples{scale}):")
        for frame, pct in result[title]:
            print(row(pct, frame))
    for name, found in result["named"].items():
        print(f"\n{name}, all its samples, then by caller:\n{row(found['total_pct'], name)}")
        for caller, pct in found["callers_pct"]:
            print(row(pct, f"  under {caller}"))
    for name in set(args.frame) - set(result["named"]):
        print(f"\n{name}: in no sample")


if __name__ == "__main__":
    main()
