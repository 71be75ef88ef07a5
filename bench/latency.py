"""End-to-end latency, POST → readable with read_committed on the domain topic; RSS over time.

Run alone: .venv/bin/python -m bench.latency [--rate 2000] [--seconds 60]
    [--intervals 20,100,500] [--dedupe-window-s S] [--rss-every-s S] [--out FILE]
    [--bootstrap HOST:PORT]

One run: the shim (``bench.shim_bridge serve bridge``: signature checks, 200 after acks=all)
and the exactly-once router (``bench.contender rtcbus``), each in a process of its own, on
fresh topics; an open-loop load generator, in a third process, POSTs the workload's signed
callbacks at a fixed rate over keep-alive connections. Each EventId carries the time its
request was *scheduled*, so a slow answer delays nothing after it and queueing in the
generator counts as latency (no coordinated omission). A read_committed consumer in this
process subscribes to the domain topics and takes the latency of each record when it sees
it. Meanwhile the resident set size of the shim and the router is sampled from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import Consumer

from bench.router import cpu_seconds, terminate
from bench.shim_bridge import exchange, free_port, request_bytes, wait_until_healthy
from bench.workload import SECRET, draws
from consumer.kafka.admin import ensure_topics
from consumer.kafka.config import consumer_config
from consumer.routing import RoutingTable
from consumer.settings import load_settings

RSS_FLAT_TOLERANCE = 0.05  # of the RSS after warm-up; below 5 MB of growth always counts as flat
# Seconds of load at the full rate before the measured run: see `load`.
WARMUP_S = 2.0
PERCENTILES = [i / 100 for i in range(1, 100)] + [0.995, 0.999]


def run(bootstrap: str, rate: float, seconds: float, commit_interval_ms: int = 100,
        connections: int = 64, rss_every_s: float = 1.0,
        dedupe_window_s: float | None = None, warmup_s: float = WARMUP_S) -> dict:
    """One fixed-rate run: latency percentiles and the RSS of shim and router over time.

    ``dedupe_window_s`` (default: the router's, 15 minutes) bounds the EventIds the router
    keeps: its RSS grows until the window is full, so a memory run shorter than the window
    must shorten it to see whether RSS levels off.
    """
    name = uuid.uuid4().hex[:8]
    settings = load_settings(
        bootstrap_servers=bootstrap, topic_prefix=f"e2e{name}", partitions=3,
        group_id=f"bench-e2e-{name}", commit_interval_ms=commit_interval_ms, metrics_port=0,
    )
    ensure_topics(settings)
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "bench.contender", "rtcbus", json.dumps({
        "bootstrap_servers": bootstrap, "topic_prefix": settings.topic_prefix, "partitions": 3,
        "group_id": settings.group_id, "commit_interval_ms": commit_interval_ms,
        "metrics_port": 0, "dedupe_window_s": dedupe_window_s,
        # The settings refuse a skew window more than half the dedupe window.
        "signature_skew_s": None if dedupe_window_s is None else min(300.0, dedupe_window_s / 2),
    })])
    shim = subprocess.Popen([sys.executable, "-m", "bench.shim_bridge", "serve", "bridge",
                             str(port), bootstrap, settings.topic_prefix])
    reader = Reader(settings)
    sampler = RssSampler({"shim": shim.pid, "router": router.pid}, rss_every_s)
    try:
        wait_until_healthy(port, shim)
        reader.start()
        _warm_up(port, reader, router)
        sampler.start()
        cpu_before = {"shim": cpu_seconds(shim.pid), "router": cpu_seconds(router.pid)}
        busy_before, load_started = machine_busy_seconds(), time.monotonic()
        generator = subprocess.run(
            [sys.executable, "-m", "bench.latency", "load", str(port), str(rate), str(seconds),
             str(connections), str(warmup_s)],
            capture_output=True, text=True, timeout=warmup_s + seconds + 120, check=True,
        )
        loaded_s = time.monotonic() - load_started
        # Cores each process kept busy while the load ran, and the whole machine's: on 2 shared
        # cores a tail is mostly queueing for a core, and this says whose work queued it.
        cores = {name: (cpu_seconds(pid) - cpu_before[name]) / loaded_s
                 for name, pid in (("shim", shim.pid), ("router", router.pid))}
        cores["machine"] = (machine_busy_seconds() - busy_before) / loaded_s
        cores["of"] = os.cpu_count()
        sent = json.loads(generator.stdout)
        deadline = time.monotonic() + 15
        while reader.count() < sent["ok"] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sampler.stop()
        reader.stop()
        terminate(shim)
        terminate(router)
    latencies = sorted(reader.latencies_ms)
    return {
        "rate": rate, "seconds": seconds, "warmup_s": warmup_s, "commit_interval_ms": commit_interval_ms,
        "dedupe_window_s": dedupe_window_s, "connections": connections, **sent, "received": len(latencies),
        "achieved_rate": sent["sent"] / sent["elapsed_s"],
        "p50_ms": _pct(latencies, 0.50), "p99_ms": _pct(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else None,
        "cdf_ms": {f"{p:g}": _pct(latencies, p) for p in PERCENTILES},
        "stages_p50_ms": _stages(reader.stages_ms, 0.50),
        "stages_p99_ms": _stages(reader.stages_ms, 0.99),
        "cores_busy": cores,
        "rss_mb": sampler.samples,
        "rss_flat": {proc: flat(samples) for proc, samples in sampler.samples.items()},
    }


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy (not idle or iowait), from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def flat(samples: list[tuple[float, float]]) -> dict:
    """Whether RSS stays flat: the median of the last tenth of the samples against the median
    of the fifth tenth (by then warm-up is over and the router's dedupe window, if shorter
    than 40 % of the run, is full), within ``RSS_FLAT_TOLERANCE`` or 5 MB."""
    if len(samples) < 20:
        return {"judged": False, "why": f"{len(samples)} samples are too few"}
    tenth = len(samples) // 10
    start = statistics.median(mb for _, mb in samples[4 * tenth : 5 * tenth])
    end = statistics.median(mb for _, mb in samples[-tenth:])
    growth = end - start
    return {"judged": True, "start_mb": start, "end_mb": end, "growth_mb": growth,
            "flat": growth <= max(5.0, RSS_FLAT_TOLERANCE * start)}


class Reader:
    """A read_committed consumer of every domain topic that records each latency seen."""

    def __init__(self, settings) -> None:
        self._consumer = Consumer({
            **consumer_config(settings, f"{settings.group_id}-reader"),
            "fetch.wait.max.ms": "5",
        })
        self._topics = RoutingTable.from_settings(settings).topics()
        self.latencies_ms: list[float] = []
        # per record: (scheduled → the router produced it, produced → readable here), in ms
        self.stages_ms: list[tuple[float, float]] = []
        self.warm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        self._consumer.subscribe(self._topics)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

    def count(self) -> int:
        return len(self.latencies_ms)

    def _read(self) -> None:
        while not self._stop.is_set():
            # Not consume(1000, timeout): it returns early only with 1000 records, so at a low
            # rate it would hold each record until the timeout and count that as latency.
            messages = self._consumer.consume(1000, timeout=0)
            if not messages:
                first = self._consumer.poll(0.05)
                messages = [first] if first is not None else []
            for message in messages:
                if message.error() is not None:
                    continue
                now_ns = time.time_ns()
                event_id = dict(message.headers() or [])["rtcbus.event_id"].decode()
                kind, scheduled_ns, _ = event_id.split("-", 2)
                if kind == "e2e":
                    self.latencies_ms.append((now_ns - int(scheduled_ns)) / 1e6)
                    produced_ms = message.timestamp()[1]  # CreateTime: when the router produced it
                    self.stages_ms.append((produced_ms - int(scheduled_ns) / 1e6,
                                           now_ns / 1e6 - produced_ms))
                else:
                    self.warm += 1


class RssSampler:
    """Samples the resident set size of some processes from /proc, in a thread."""

    def __init__(self, pids: dict[str, int], every_s: float) -> None:
        self._pids, self._every_s = pids, every_s
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _sample(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self._every_s):
            for name, pid in self._pids.items():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                kb = next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS:"))
                self.samples[name].append((round(time.monotonic() - started, 2), kb / 1024))


def _warm_up(port: int, reader: Reader, router: subprocess.Popen, count: int = 20) -> None:
    """POST a few callbacks and wait until the router has delivered them: it has joined its
    group and restored its dedupe window, so the measured run starts on a working pipeline."""
    import httpx

    from consumer.sender import build_callback

    with httpx.Client(timeout=10) as client:
        for number, (example, data) in enumerate(draws(count, seed=99)):
            callback = build_callback(example.event_type, data, version=example.version,
                                      secret=SECRET, event_id=f"warm-0-{number}")
            client.post(f"http://127.0.0.1:{port}/callbacks", content=callback.body)
    deadline = time.monotonic() + 120
    while reader.warm < count:
        if router.poll() is not None:
            raise RuntimeError(f"the router exited with {router.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {reader.warm} of {count} warm-up callbacks came through")
        time.sleep(0.05)


def _stages(stages: list[tuple[float, float]], p: float) -> dict:
    """Where the time goes, at percentile ``p`` of each stage on its own: from the scheduled
    POST to the router's produce (load generator, shim, raw topic, router's consume and
    work), and from that produce to the record being readable (the transaction's commit,
    the reader's fetch)."""
    return {
        "to_router_produce": _pct(sorted(s[0] for s in stages), p),
        "produce_to_readable": _pct(sorted(s[1] for s in stages), p),
    }


def _pct(values: list[float], p: float) -> float | None:
    return values[min(len(values) - 1, int(p * len(values)))] if values else None


# -- the load generator (a process of its own) ---------------------------------------------------


async def load(port: int, rate: float, seconds: float, connections: int, warmup_s: float = 0) -> dict:
    """POST the workload at ``rate`` for ``warmup_s`` and then ``seconds``, open loop: request
    n is scheduled at start + n / rate and its EventId says when (``e2e-<scheduled ns>-<n>``,
    or ``warm-…`` during the warm-up, which the reader does not measure).

    Why a warm-up at the full rate: the first second of load on fresh processes and topics
    (connections opened, producer batches and fetch sessions sized, the broker's code paths
    for new partitions compiled) is a start-up cost, not the steady tail the target is about.
    Of a 12 s run it is a twelfth of the records, enough to decide the p99 alone."""
    from consumer.sender import build_callback

    queue: asyncio.Queue = asyncio.Queue()
    statuses: dict[str, int] = {}
    total = int(rate * seconds)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (item := await queue.get()) is not None:
            number, scheduled_ns, (example, data) = item
            kind = "warm" if number < warm else "e2e"
            callback = build_callback(example.event_type, data, version=example.version,
                                      secret=SECRET, event_id=f"{kind}-{scheduled_ns}-{number}")
            status = await exchange(reader, writer, request_bytes(port, callback.body))
            if kind == "e2e":
                statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    warm = int(rate * warmup_s)
    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    start_ns, start = time.time_ns(), time.monotonic()
    for number, draw in enumerate(draws(warm + total, seed=7)):
        delay = start + number / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((number, start_ns + int(number / rate * 1e9), draw))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return {"sent": total, "ok": statuses.get("200", 0), "statuses": statuses, "warmup_sent": warm,
            "elapsed_s": time.monotonic() - start - warmup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--intervals", default="100", help="commit intervals in ms")
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--dedupe-window-s", type=float, help="the router's; default its own")
    parser.add_argument("--rss-every-s", type=float, default=1.0)
    parser.add_argument("--out", help="also write each run's whole result, RSS samples included, "
                                      "to this JSON file (a list, one per interval)")
    args = parser.parse_args()
    from bench.broker import bench_kafka

    results = []
    with bench_kafka(args.bootstrap) as kafka:
        for interval in (int(i) for i in args.intervals.split(",")):
            result = run(kafka.bootstrap_servers, args.rate, args.seconds, interval,
                         rss_every_s=args.rss_every_s, dedupe_window_s=args.dedupe_window_s)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("cdf_ms", "rss_mb")}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        import uvloop

        port, rate, seconds, connections, warmup_s = sys.argv[2:7]
        print(json.dumps(uvloop.run(load(int(port), float(rate), float(seconds),
                                         int(connections), float(warmup_s)))))
    else:
        main()
