"""The shim with its spool engaged against the normal path, and how fast the spool drains.

Run: .venv/bin/python -m bench.shim_spool [--seconds 5] [--rounds 1] [--connections 64,256]
         [--drain-records 20000] [--spool-after 0.2] [--bootstrap HOST:PORT] [--out FILE]

Each round and connection count, two arms, each a fresh real shim (``consumer.shim``:
``create_app``, both listeners, a spool in a fresh directory on disk) in a process of its
own, loaded by the load generator of ``bench.shim_bridge`` (raw HTTP/1.1 keep-alive, the
workload's body mix) in another:

- ``normal``: Kafka up, the default ``spool_after_s``; requests are answered 200 after
  ``acks=all``. Callbacks are first sent one at a time until one is stored in Kafka with the
  spool idle (the producer has its connections and its producer id).
- ``spooled``: the shim's bootstrap is a local port where nothing listens, so Kafka is away
  from its start. One callback is sent first: it waits ``spool_after_s`` (low here) and cuts
  over to the spool. Under the load every request is answered 200 once the spool has
  fsynced it. After the measured window the load goes on, unmeasured, until the spool holds
  ``--drain-records``.

Both arms then have ``--warmup`` seconds of load before the measured ``--seconds``. Every
request carries its own EventId (``spool-<arm>-<round>-<tag>-<n>``), so that what was
answered 200 can be looked for in the raw topic.

Then **the drain**: a TCP relay from that port to the broker opens (Kafka is back), and the
clock runs until the shim's ``rtcbus_shim_spool_depth`` is 0; the time to the first
forwarded record (librdkafka's reconnect backoff) is reported apart. Last, the raw topic is
read from where it stood before the round: every EventId answered 200 in either arm must be
in it (duplicates allowed).

Without ``--bootstrap`` a one-node Kafka is started for the run and stopped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench.broker import bench_kafka
from bench.shim_bridge import (
    TOPIC_PREFIX,
    cpu_seconds,
    exchange,
    free_port,
    median,
    request_bytes,
    wait_until_healthy,
)

ARMS = ("normal", "spooled")
# The goal of issue 11: with the spool engaged the shim keeps at least half its rate.
TARGET_RATIO = 0.50
# Bodies a load generator signs beforehand, per second of its run: more than this shim
# answers here. Past the pool it starts again from the first (an EventId seen twice).
POOL_PER_S = 6000
METRICS_EVERY_S = 0.05
# The longest the spooled arm goes on loading, unmeasured, to fill the spool for the drain.
FILL_CAP_S = 60


# -- the server --------------------------------------------------------------------------------


def serve(port: int, admin_port: int, bootstrap: str, spool_dir: str,
          spool_after_s: float | None) -> None:
    """The real shim until SIGINT; then one JSON line on stdout: its spool's group commits.
    ``spool_after_s`` None: the default."""
    import asyncio

    from consumer.settings import load_settings
    from consumer.shim import admin_server, create_app, shim_server
    from consumer.shim import serve as serve_shim
    from bench.workload import SECRET

    settings = load_settings(
        bootstrap_servers=bootstrap, topic_prefix=TOPIC_PREFIX, secrets=SECRET,
        shim_port=port, shim_admin_port=admin_port, spool_dir=Path(spool_dir),
        spool_after_s=spool_after_s,
    )
    app = create_app(settings)
    try:
        asyncio.run(serve_shim(shim_server(settings, app), admin_server(settings, app)))
    except KeyboardInterrupt:  # uvicorn raises the SIGINT again once it has shut down
        pass
    spool = app.state.shim.ingest.spool
    print(json.dumps({"spool_commits": spool.commits if spool is not None else None}), flush=True)


# -- the load generator ------------------------------------------------------------------------


async def load(port: int, seconds: float, connections: int, warmup_s: float, prefix: str,
               pool: int, fill_to: int = 0) -> dict:
    """``bench.shim_bridge.load`` with an EventId of its own for each request: the same
    client, but it also returns the numbers ``n`` of the EventIds ``<prefix>-<n>`` answered
    200, warm-up included. After the measured window it goes on, unmeasured, until
    ``fill_to`` requests were answered 200 (or ``FILL_CAP_S``)."""
    import asyncio

    from bench.workload import raw_records

    requests = [request_bytes(port, record.body) for record in raw_records(pool, prefix=prefix)]
    print("ready", flush=True)  # the bodies are signed; the clock starts now
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    ok: list[int] = []
    issued = 0
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds
    fill_until = stop_at + FILL_CAP_S

    async def connection() -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            sent = time.monotonic()
            if sent >= stop_at and (len(ok) >= fill_to or sent >= fill_until):
                break
            n = issued % pool
            issued += 1
            status = await exchange(reader, writer, requests[n])
            done = time.monotonic()
            if status == "200":
                ok.append(n)
            if measure_from <= sent < stop_at:
                latencies.append(done - sent)
                statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": statuses,
        "issued": issued,
        "pool": pool,
        "ok": ok,
    }


# -- Kafka away and back ---------------------------------------------------------------------


class Relay:
    """A TCP relay from a local port to the broker: until :meth:`open`, nothing listens on the
    port, so a client bootstrapping from it finds Kafka away; once open, Kafka is back.

    Only the bootstrap connection passes through it: the metadata it carries names the
    broker's own address, which the producer then connects to directly.
    """

    def __init__(self, port: int, target: str) -> None:
        host, _, target_port = target.split(",")[0].rpartition(":")
        self.port = port
        self._target = (host, int(target_port))
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._closing = threading.Event()

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        for sock in [self._listener, *self._sockets]:
            if sock is not None:
                sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# -- what the shim says, what the raw topic holds ------------------------------------------------


def scrape(admin_port: int) -> dict[str, float]:
    """The spool's figures from the shim's ``/metrics``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text
    figures = {"stored_kafka": 0.0, "stored_spool": 0.0, "depth": 0.0, "forwarded": 0.0,
               "spooling": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rtcbus_shim_stored_total":
                figures[f"stored_{sample.labels['via']}"] = sample.value
            elif sample.name == "rtcbus_shim_spool_depth":
                figures["depth"] = sample.value
            elif sample.name == "rtcbus_shim_spool_forwarded_total":
                figures["forwarded"] = sample.value
            elif sample.name == "rtcbus_shim_spooling":
                figures["spooling"] = sample.value
    return figures


def raw_offsets(bootstrap: str) -> dict[int, int]:
    """Partition → high watermark of the raw topic."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    topic = _raw_topic(bootstrap)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-spool-{uuid.uuid4()}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for attempt in range(20):  # a topic just created: its leaders may not be known yet
            try:
                return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                        for p in partitions}
            except KafkaException:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")
    finally:
        consumer.close()


def raw_event_ids(bootstrap: str, since: dict[int, int], prefix: str) -> tuple[set[str], int]:
    """EventIds starting with ``prefix`` in the raw topic from ``since`` to its end, and how
    many such records there are (duplicates included)."""
    from confluent_kafka import Consumer, TopicPartition

    from consumer.envelope import HEADER_EVENT_ID

    topic = _raw_topic(bootstrap)
    until = raw_offsets(bootstrap)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-spool-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    wanted = prefix.encode()
    seen: set[str] = set()
    records = 0
    try:
        left = {p: end for p, end in until.items() if end > since.get(p, 0)}
        consumer.assign([TopicPartition(topic, p, since.get(p, 0)) for p in left])
        deadline = time.monotonic() + 120
        while left and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=1):
                if message.error() is not None:
                    continue
                if message.offset() + 1 >= left.get(message.partition(), 0):
                    left.pop(message.partition(), None)
                for name, value in message.headers() or ():
                    if name == HEADER_EVENT_ID and value.startswith(wanted):
                        seen.add(value.decode())
                        records += 1
        return seen, records
    finally:
        consumer.close()


def _raw_topic(bootstrap: str) -> str:
    from consumer.settings import load_settings

    return load_settings(bootstrap_servers=bootstrap, topic_prefix=TOPIC_PREFIX).raw_topic


# -- one round ---------------------------------------------------------------------------------


class ShimProcess:
    """A shim of :func:`serve` in its own process, with a spool in a fresh directory."""

    def __init__(self, bootstrap: str, spool_after_s: float | None = None) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.spool_dir = tempfile.mkdtemp(prefix="rtcbus-bench-spool-")
        # librdkafka logs every refused connection while Kafka is away: to a file, not the
        # console; its tail is shown if the shim fails.
        self.log = Path(self.spool_dir) / "shim.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.shim_spool", "serve", str(self.port),
                 str(self.admin_port), bootstrap, self.spool_dir, str(spool_after_s or "")],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        try:
            wait_until_healthy(self.port, self.process)
        except RuntimeError:
            self.process.kill()
            raise RuntimeError(f"the shim did not start: {self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGINT, as an orchestrator would; the spool's group commits over its life."""
        self.process.send_signal(signal.SIGINT)
        try:
            output, _ = self.process.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            return None
        finally:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
        lines = output.strip().splitlines()
        return json.loads(lines[-1])["spool_commits"] if lines else None


def settle(shim: ShimProcess, arm: str, prefix: str, timeout_s: float = 60) -> list[str]:
    """Send callbacks one at a time until ``shim`` is in the state of ``arm``: answering
    from Kafka with the spool idle (the producer has its connections and producer id), or
    spooling (the first callback waited ``spool_after_s``); the EventIds answered 200."""
    import httpx

    from bench.workload import raw_records

    wanted = "kafka" if arm == "normal" else "spool"
    deadline = time.monotonic() + timeout_s
    answered: list[str] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{shim.port}", timeout=10) as client:
        for record in raw_records(1000, prefix=f"{prefix}-warm"):
            if time.monotonic() > deadline:
                break
            answer = client.post("/callbacks", content=record.body,
                                 headers={"Content-Type": "application/json"})
            stored = None
            if answer.status_code == 200:
                answered.append(answer.json()["EventId"])
                stored = answer.json()["stored"]
            if stored == wanted and (arm != "normal" or not scrape(shim.admin_port)["spooling"]):
                return answered
            time.sleep(0.05)
    raise RuntimeError(f"the {arm} shim did not settle within {timeout_s:g} s")


def run_arm(shim: ShimProcess, arm: str, prefix: str, seconds: float, connections: int,
            warmup_s: float, fill_to: int = 0) -> dict:
    """Settle ``shim`` into ``arm``'s state, load it for ``warmup_s`` + ``seconds`` (then on,
    unmeasured, until ``fill_to`` requests were answered 200 or ``FILL_CAP_S`` passed); the
    figures of the measured window."""
    settled = settle(shim, arm, prefix)
    pool = max(1000, int((seconds + warmup_s) * POOL_PER_S), int(fill_to * 1.1))
    generator = subprocess.Popen(
        [sys.executable, "-m", "bench.shim_spool", "load", str(shim.port), str(seconds),
         str(connections), str(warmup_s), prefix, str(pool), str(fill_to)],
        stdout=subprocess.PIPE, text=True,
    )
    assert generator.stdout is not None
    if generator.stdout.readline().strip() != "ready":
        generator.kill()
        raise RuntimeError("the load generator did not start")
    time.sleep(warmup_s)
    cpu_before = cpu_seconds(shim.process.pid)
    time.sleep(seconds)
    cpu_after = cpu_seconds(shim.process.pid)
    output, _ = generator.communicate(timeout=seconds + warmup_s + FILL_CAP_S + 60)
    result = json.loads(output)
    result["server_cpu_us_per_request"] = (cpu_after - cpu_before) / max(result["requests"], 1) * 1e6
    result["wrapped"] = result["issued"] > pool
    result["settled_with"] = len(settled)
    result["settled_ok"] = settled
    return result


def drain(shim: ShimProcess, relay: Relay, timeout_s: float) -> dict:
    """Open the relay (Kafka is back) and time the spool down to 0."""
    before = scrape(shim.admin_port)
    opened = time.monotonic()
    relay.open()
    first: float | None = None
    figures = before
    while figures["depth"] > 0 and time.monotonic() - opened < timeout_s:
        time.sleep(METRICS_EVERY_S)
        figures = scrape(shim.admin_port)
        if first is None and figures["forwarded"] > before["forwarded"]:
            first = time.monotonic()
    ended = time.monotonic()
    records = int(before["depth"])
    forwarded = int(figures["forwarded"] - before["forwarded"])
    flowing_s = ended - (first if first is not None else opened)
    return {
        "records": records,
        "forwarded": forwarded,
        "left": int(figures["depth"]),
        "drained": figures["depth"] == 0,
        "to_first_forward_s": None if first is None else first - opened,
        "seconds": ended - opened,
        # The first forward is seen only at a scrape: a spool that drained within one scrape
        # interval of it has no measurable rate (it would divide by microseconds).
        "records_per_s": forwarded / flowing_s if flowing_s >= METRICS_EVERY_S else None,
        "records_per_s_from_return": forwarded / (ended - opened),
    }


def run_round(bootstrap: str, number: int, seconds: float, connections: int, warmup_s: float,
              spool_after_s: float, drain_records: int, drain_timeout_s: float) -> dict:
    since = raw_offsets(bootstrap)
    arms: dict[str, dict] = {}
    prefixes = {arm: f"spool-{arm}-{number}-{uuid.uuid4().hex[:6]}" for arm in ARMS}

    shim = ShimProcess(bootstrap)
    try:
        arms["normal"] = run_arm(shim, "normal", prefixes["normal"], seconds, connections, warmup_s)
        arms["normal"]["metrics"] = scrape(shim.admin_port)
    finally:
        arms["normal"]["spool_commits"] = shim.stop()

    relay = Relay(free_port(), bootstrap)
    shim = ShimProcess(f"127.0.0.1:{relay.port}", spool_after_s)
    try:
        arms["spooled"] = run_arm(shim, "spooled", prefixes["spooled"], seconds, connections,
                                  warmup_s, fill_to=drain_records)
        arms["spooled"]["metrics"] = scrape(shim.admin_port)
        drained = drain(shim, relay, drain_timeout_s)
    finally:
        commits = shim.stop()
        relay.close()
    spooled = arms["spooled"]["metrics"]["stored_spool"]
    arms["spooled"]["spool_commits"] = commits
    arms["spooled"]["records_per_fsync"] = spooled / commits if commits else None

    for arm, prefix in prefixes.items():
        result = arms[arm]
        answered = {f"{prefix}-{n}" for n in result.pop("ok")} | set(result.pop("settled_ok"))
        seen, records = raw_event_ids(bootstrap, since, prefix)
        result["verified"] = {
            "answered_200": len(answered),
            "in_raw_topic": len(answered & seen),
            "missing": len(answered - seen),
            "raw_records": records,
            "missing_examples": sorted(answered - seen)[:5],
        }
    return {"arms": arms, "drain": drained,
            "ratio": arms["spooled"]["rps"] / arms["normal"]["rps"] if arms["normal"]["rps"] else None}


def run(bootstrap: str, seconds: float = 5, rounds: int = 1, connections: Sequence[int] = (64,),
        warmup_s: float = 1, spool_after_s: float = 0.2, drain_records: int = 20_000,
        drain_timeout_s: float = 120) -> dict:
    """Both arms and the drain at each connection count, ``rounds`` times, interleaved;
    medians and the spooled/normal ratio.

    Args:
        seconds: measured seconds per arm, after ``warmup_s``.
        spool_after_s: the spooled shim's ``spool_after_s`` (only its first callback, before
            the load, waits it); the normal shim runs the default, as deployed.
        drain_records: the spooled arm goes on loading, unmeasured, until the spool holds
            about this many records (at most ``FILL_CAP_S`` more); 0: only what the
            measured window spooled.
    """
    from consumer.kafka.admin import ensure_topics
    from consumer.settings import load_settings

    ensure_topics(load_settings(bootstrap_servers=bootstrap, topic_prefix=TOPIC_PREFIX))
    load_before = os.getloadavg()
    runs: dict[int, list[dict]] = {count: [] for count in connections}
    for number in range(rounds):
        for count in connections:
            runs[count].append(run_round(bootstrap, number, seconds, count, warmup_s,
                                         spool_after_s, drain_records, drain_timeout_s))
    by_count = {str(count): summarize(results) for count, results in runs.items()}
    ratios = [row["spooled_vs_normal"] for row in by_count.values()]
    everything = [r for results in runs.values() for r in results]
    return {
        "seconds": seconds, "rounds": rounds, "warmup_s": warmup_s,
        "spool_after_s": spool_after_s, "drain_records": drain_records,
        "spool_filesystem": _filesystem(tempfile.gettempdir()),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "connections": by_count,
        # the worst connection count, as for the shim's other target
        "spooled_vs_normal": None if None in ratios else min(ratios),
        "all_drained": all(r["drain"]["drained"] for r in everything),
        "missing_from_raw": sum(a["verified"]["missing"] for r in everything
                                for a in r["arms"].values()),
    }


def summarize(runs: list[dict]) -> dict:
    """Medians over the rounds of one connection count."""
    arms = {
        arm: {key: median([r["arms"][arm] for r in runs], key)
              for key in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_request")}
        for arm in ARMS
    }
    drains = [r["drain"] for r in runs]
    rates = [d for d in drains if d["records_per_s"] is not None]
    firsts = [d for d in drains if d["to_first_forward_s"] is not None]
    return {
        "runs": runs,
        "arms": arms,
        "spooled_vs_normal": median(runs, "ratio") if all(r["ratio"] is not None for r in runs) else None,
        "drain_records_per_s": median(rates, "records_per_s") if rates else None,
        "drain_to_first_forward_s": median(firsts, "to_first_forward_s") if firsts else None,
    }


def targets(result: dict) -> list[dict]:
    """The target of issue 11, in ``bench.report.targets``' form."""
    ratio = result.get("spooled_vs_normal")
    return [{"target": "shim spooled / normal requests/s (worst connection count) >=",
             "value": ratio, "goal": TARGET_RATIO,
             "met": None if ratio is None else ratio >= TARGET_RATIO}]


def table(result: dict) -> str:
    """The figures as Markdown, for bench/README.md and the console."""
    if "connections" not in result:
        return ""
    lines = [
        "| shim arm | connections | req/s | vs normal (median of the rounds' ratios) | p50 ms | p99 ms | server CPU µs/req "
        "| 200s stored via kafka / spool, all rounds | each round req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    drains = []
    for count, row in result["connections"].items():
        for arm in ARMS:
            medians = row["arms"][arm]
            kafka = sum(r["arms"][arm]["metrics"]["stored_kafka"] for r in row["runs"])
            spool = sum(r["arms"][arm]["metrics"]["stored_spool"] for r in row["runs"])
            each = ", ".join(f"{r['arms'][arm]['rps']:,.0f}" for r in row["runs"])
            ratio = 1.0 if arm == "normal" else row["spooled_vs_normal"]
            lines.append(
                f"| {arm} | {count} | {medians['rps']:,.0f} | {'-' if ratio is None else f'{ratio:.2f}'}x "
                f"| {medians['p50_ms']:.1f} "
                f"| {medians['p99_ms']:.1f} | {medians['server_cpu_us_per_request']:.0f} "
                f"| {kafka:,.0f} / {spool:,.0f} | {each} |")
        for number, r in enumerate(row["runs"]):
            d = r["drain"]
            fsync = r["arms"]["spooled"]["records_per_fsync"]
            missing = sum(a["verified"]["missing"] for a in r["arms"].values())
            answered = sum(a["verified"]["answered_200"] for a in r["arms"].values())
            first = "-" if d["to_first_forward_s"] is None else f"{d['to_first_forward_s']:.2f}"
            rate = "-" if d["records_per_s"] is None else f"{d['records_per_s']:,.0f}"
            state = "" if d["drained"] else f" ({d['left']:,} left)"
            drains.append(
                f"| {count} | {number + 1}{state} | {'-' if fsync is None else f'{fsync:.1f}'} "
                f"| {d['records']:,} | {first} | {d['seconds']:.2f} | {rate} "
                f"| {d['records_per_s_from_return']:,.0f} | {missing} of {answered:,} |")
    lines += [
        "",
        "| drain after | round | records per fsync while spooling | records | to first forward s "
        "| Kafka back → depth 0 s | records/s (first forward → 0) | records/s (Kafka back → 0) "
        "| 200s missing from raw |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *drains,
    ]
    return "\n".join(lines)


def _filesystem(path: str) -> str | None:
    """The type of the filesystem ``path`` is on (fsync on tmpfs costs nothing)."""
    best: tuple[int, str] | None = None
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and (path + "/").startswith(fields[1].rstrip("/") + "/"):
            if best is None or len(fields[1]) > best[0]:
                best = (len(fields[1]), fields[2])
    return best[1] if best else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per arm")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (both arms, the drain); medians shown")
    parser.add_argument("--connections", default="64", help="comma-separated counts")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="unmeasured seconds of load per arm before the window")
    parser.add_argument("--spool-after", type=float, default=0.2,
                        help="the spooled shim's spool_after_s (the normal one runs the default)")
    parser.add_argument("--drain-records", type=int, default=20_000,
                        help="fill the spool to about this many records for the drain (unmeasured)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.rounds} round(s) "
          f"of {args.seconds:g} s per arm, {args.connections} connections", flush=True)
    with bench_kafka(args.bootstrap) as kafka:
        result = run(kafka.bootstrap_servers, args.seconds, args.rounds, connections,
                     args.warmup, args.spool_after, args.drain_records, args.drain_timeout)
    print(table(result))
    print(f"load average {result['load_average']['before'][0]:.1f} before, "
          f"{result['load_average']['after'][0]:.1f} after")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
              float(sys.argv[6]) if sys.argv[6] else None)
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        import uvloop

        port, seconds, connections, warmup, prefix, pool, fill_to = sys.argv[2:9]
        print(json.dumps(uvloop.run(load(int(port), float(seconds), int(connections),
                                         float(warmup), prefix, int(pool), int(fill_to)))))
    else:
        main()
