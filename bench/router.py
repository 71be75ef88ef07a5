"""Router throughput: events/s draining a pre-filled raw topic, against four other contenders.

Run alone: .venv/bin/python -m bench.router [--events 20000] [--rounds 2] [--bootstrap HOST:PORT]

Contenders (``ARMS``), each a process of its own (``bench.contender``) draining a fresh raw
topic of 3 partitions filled with the same records (``bench.workload``), with the same
commit interval and batch size:

- ``rtcbus-eos``: the router, exactly once (transactions, offsets and dedupe markers in them);
- ``rtcbus-alo``: the same router with ``exactly_once=False``;
- ``passthrough``: consume → produce the same bytes, transactional, no parsing (the ceiling);
- ``textbook``: json.loads, pydantic, SerializingProducer + AvroSerializer, commit per batch;
- ``quix``: Quix Streams, exactly once (needs ``.venv-quix``; reported "not installed" if absent).

The arms run interleaved, round by round (ABCDE, ABCDE, ...). The clock of one drain runs
from the first record on an output topic to the group's commit of the last raw offset, so
process start-up and joining the group are not counted. Medians are reported, with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from bench import quix_app
from bench.passthrough import output_topic
from bench.workload import RawRecord, raw_records
from consumer.kafka.admin import TopicSpec, create_topics, ensure_topics
from consumer.routing import RoutingTable
from consumer.settings import Settings, load_settings

PARTITIONS = 3


@dataclass(frozen=True)
class Arm:
    """One contender: which loop, with which settings."""

    name: str
    contender: str  # a key of bench.contender.CONTENDERS
    overrides: dict = field(default_factory=dict)


ARMS = (
    Arm("rtcbus-eos", "rtcbus", {"exactly_once": True}),
    Arm("rtcbus-alo", "rtcbus", {"exactly_once": False}),
    Arm("rtcbus-eos-backoff100", "rtcbus", {"exactly_once": True, "kafka_config": {"retry.backoff.ms": "100"}}),
    # rtcbus router --processes 2: scaling from one process to two on this machine's cores.
    Arm("rtcbus-eos-2p", "members", {"exactly_once": True, "router_processes": 2}),
    Arm("passthrough", "passthrough"),
    Arm("textbook", "textbook"),
    Arm("quix", "quix"),
)
# Run only when named (--arms): librdkafka's linger.ms (default 5) for the router's producer.
# Fewer wake-ups of its threads, but the commit then waits for what lingers.
EXTRA_ARMS = (
    Arm("rtcbus-eos-linger20", "rtcbus", {"exactly_once": True, "kafka_config": {"linger.ms": "20"}}),
    Arm("rtcbus-eos-linger100", "rtcbus", {"exactly_once": True, "kafka_config": {"linger.ms": "100"}}),
)


def fill(settings: Settings, records: Sequence[RawRecord]) -> None:
    """Write ``records`` to the raw topic as the shim would (acks=all, murmur2 keys)."""
    producer = Producer({
        "bootstrap.servers": settings.bootstrap_servers, "linger.ms": 20, "acks": "all",
        "enable.idempotence": True, "partitioner": "murmur2_random",
    })
    for record in records:
        while True:
            try:
                producer.produce(settings.raw_topic, record.body, key=record.key)
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(60) != 0:
        raise RuntimeError("the raw topic was not filled within 60 s")


def fill_through_shim(settings: Settings, records: Sequence[RawRecord], connections: int = 32) -> None:
    """Write ``records`` to the raw topic through the real shim (``bench.shim_bridge serve
    bridge``: signature checks, 200 after acks=all) over HTTP, as production fills it: the
    shim's headers, its batching under load, and the raw topic's LogAppendTime."""
    import asyncio

    from bench.shim_bridge import exchange, free_port, request_bytes, wait_until_healthy

    port = free_port()
    shim = subprocess.Popen([sys.executable, "-m", "bench.shim_bridge", "serve", "bridge", str(port),
                             settings.bootstrap_servers, settings.topic_prefix])
    try:
        wait_until_healthy(port, shim)
        requests = [request_bytes(port, record.body) for record in records]

        async def post_all() -> list[str]:
            async def connection(index: int) -> list[str]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    return [await exchange(reader, writer, r) for r in requests[index::connections]]
                finally:
                    writer.close()

            done = await asyncio.gather(*(connection(i) for i in range(connections)))
            return [status for statuses in done for status in statuses]

        statuses = asyncio.run(asyncio.wait_for(post_all(), 300))
        refused = len(statuses) - statuses.count("200")
        if refused:
            raise RuntimeError(f"the shim answered {refused} of {len(statuses)} fill requests with other than 200")
    finally:
        terminate(shim)


FILLS = {"producer": fill, "shim": fill_through_shim}


def arm_settings(bootstrap: str, arm: Arm, commit_interval_ms: int = 100) -> Settings:
    """Fresh topics and group for one drain of ``arm``."""
    name = uuid.uuid4().hex[:8]
    return load_settings(
        bootstrap_servers=bootstrap, topic_prefix=f"bench{name}", partitions=PARTITIONS,
        group_id=f"bench-{arm.name}-{name}", instance_id=f"{arm.name}-0",
        commit_interval_ms=commit_interval_ms, metrics_port=0, **arm.overrides,
    )


def drain(arm: Arm, settings: Settings, events: int, timeout_s: float) -> dict:
    """One drain of the raw topic by ``arm`` in its own process: events/s and seconds."""
    output_partitions = watched_outputs(arm, settings)
    python = sys.executable
    if arm.contender == "quix":
        python = str(quix_app.interpreter())
    overrides = {
        key: value for key, value in settings.model_dump(mode="json").items()
        if key in ("bootstrap_servers", "topic_prefix", "partitions", "group_id", "instance_id",
                   "commit_interval_ms", "commit_max_records", "metrics_port", "exactly_once",
                   "router_processes")
    }
    if settings.kafka_config:  # secret values: model_dump would mask them
        overrides["kafka_config"] = settings.kafka_client_config()
    process = subprocess.Popen(
        [python, "-m", "bench.contender", arm.contender, json.dumps(overrides)]
    )
    watcher = Consumer({"bootstrap.servers": settings.bootstrap_servers,
                        "group.id": settings.group_id, "log_level": 0})
    raw = [TopicPartition(settings.raw_topic, p) for p in range(PARTITIONS)]
    try:
        deadline = time.monotonic() + timeout_s
        while produced(watcher, output_partitions) == 0:
            _check(process, deadline, arm)
            time.sleep(0.01)
        started, cpu_started, threads_started = time.monotonic(), cpu_seconds(process.pid), thread_cpu(process.pid)
        while (done := committed(watcher, raw)) < events:
            _check(process, deadline, arm, done)
            time.sleep(0.02)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(process.pid) - cpu_started
        threads = thread_cpu(process.pid)
        return {"events": events, "seconds": seconds, "events_per_s": events / seconds,
                "cpu_us_per_event": cpu / events * 1e6,
                "cpu_us_per_event_by_thread": by_thread(threads_started, threads, cpu, events)}
    finally:
        watcher.close()
        terminate(process)


def watched_outputs(arm: Arm, settings: Settings) -> list[TopicPartition]:
    """The output partitions whose first record starts a drain's clock (created here for
    the passthrough, whose topic is its own)."""
    if arm.contender == "passthrough":
        outputs = [output_topic(settings)]
        create_topics(settings, [TopicSpec(outputs[0], PARTITIONS, 1, {})])
    else:
        domains = RoutingTable.from_settings(settings).domains
        outputs = [domains["stream"], domains["room"]]  # the first record lands in one of them
    return [TopicPartition(t, p) for t in outputs for p in range(PARTITIONS)]


def run(bootstrap: str, events: int, rounds: int, arms: Sequence[Arm] = ARMS,
        records: Sequence[RawRecord] | None = None, timeout_s: float = 300, fill_via: str = "producer") -> dict:
    """The comparison: per arm, each round's figures, the median, and the ratios.

    ``fill_via``: ``producer`` (a producer writes raw as the shim would, fast) or ``shim``
    (the real shim over HTTP: :func:`fill_through_shim`)."""
    records = records if records is not None else raw_records(events)
    warm_up(bootstrap, records)
    runs: dict[str, list[dict]] = {arm.name: [] for arm in arms}
    skipped: dict[str, str] = {}
    for arm in arms:
        if arm.contender == "quix" and quix_app.interpreter() is None:
            skipped[arm.name] = "not installed (make bench creates .venv-quix)"
    for _ in range(rounds):
        for arm in arms:
            if arm.name in skipped:
                continue
            settings = arm_settings(bootstrap, arm)
            ensure_topics(settings)
            FILLS[fill_via](settings, records)
            try:
                runs[arm.name].append(drain(arm, settings, len(records), timeout_s))
            except RuntimeError as exc:
                runs[arm.name].append({"error": str(exc)})
    return summarize(runs, skipped, events=len(records), rounds=rounds, fill=fill_via)


def warm_up(bootstrap: str, records: Sequence[RawRecord]) -> None:
    """A short passthrough drain whose figure is dropped: on a fresh broker, the first
    transaction and the first group commit wait for the broker to create its
    transaction-state and offsets topics, which no contender should pay for."""
    arm = Arm("warm-up", "passthrough")
    settings = arm_settings(bootstrap, arm)
    ensure_topics(settings)
    fill(settings, records[:500])
    drain(arm, settings, min(len(records), 500), timeout_s=120)


def by_commit_interval(bootstrap: str, intervals: Sequence[int], rounds: int,
                       records: Sequence[RawRecord], timeout_s: float = 300) -> dict:
    """The exactly-once router's events/s by commit interval, interleaved."""
    arm = ARMS[0]
    runs: dict[str, list[dict]] = {str(i): [] for i in intervals}
    for _ in range(rounds):
        for interval in intervals:
            settings = arm_settings(bootstrap, arm, commit_interval_ms=interval)
            ensure_topics(settings)
            fill(settings, records)
            runs[str(interval)].append(drain(arm, settings, len(records), timeout_s))
    return {interval: {"runs": r, "events_per_s": _median(r)} for interval, r in runs.items()}


def summarize(runs: dict[str, list[dict]], skipped: dict[str, str], **about) -> dict:
    arms = {}
    for name, results in runs.items():
        if name in skipped:
            arms[name] = {"status": skipped[name]}
        elif any("error" in r for r in results):
            arms[name] = {"status": "failed", "runs": results}
        else:
            arms[name] = {"status": "ok", "runs": results, "events_per_s": _median(results),
                          "cpu_us_per_event": _median(results, "cpu_us_per_event"),
                          "cpu_us_per_event_by_thread": {
                              kind: statistics.median(r["cpu_us_per_event_by_thread"][kind] for r in results)
                              for kind in results[0]["cpu_us_per_event_by_thread"]
                          }}
    rate = {n: a["events_per_s"] for n, a in arms.items() if a["status"] == "ok"}
    ratios = {}
    for name in rate:
        if "passthrough" in rate:
            arms[name]["vs_passthrough"] = rate[name] / rate["passthrough"]
        if "rtcbus-eos" in rate:
            arms[name]["vs_rtcbus_eos"] = rate[name] / rate["rtcbus-eos"]
    if "rtcbus-eos" in rate:
        for other in ("passthrough", "rtcbus-alo", "textbook", "quix"):
            if other in rate:
                ratios[f"rtcbus-eos / {other}"] = rate["rtcbus-eos"] / rate[other]
        if "rtcbus-eos-2p" in rate:
            ratios["rtcbus-eos-2p / rtcbus-eos"] = rate["rtcbus-eos-2p"] / rate["rtcbus-eos"]
    cpu = {n: a["cpu_us_per_event"] for n, a in arms.items() if a["status"] == "ok"}
    if "rtcbus-eos" in cpu and cpu.get("textbook"):
        # CPU per event, not events/s: the "router µs per event vs the textbook's".
        ratios["cpu per event rtcbus-eos / textbook"] = cpu["rtcbus-eos"] / cpu["textbook"]
    return {**about, "arms": arms, "ratios": ratios}


def _median(results: list[dict], key: str = "events_per_s") -> float:
    return statistics.median(r[key] for r in results)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a process and its live descendants so far,
    from /proc: steadier than events/s on a shared machine, since time the process waits for
    a core is not in it. Descendants: ``--processes`` runs its members as children."""
    try:
        own = _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0  # it has just exited
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return own + sum(cpu_seconds(child) for child in children)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of a process and of its live descendants: its name and its CPU time
    so far (user + system). librdkafka names its threads ``rdk:main``, ``rdk:broker-1``, ...;
    every other thread of a contender is the interpreter's (the loop's, and any Python
    thread's, which keep the process's name)."""
    threads: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            seconds = _stat_cpu_seconds(task / "stat")
            children = (task / "children").read_text().split()
        except OSError:
            continue  # the thread has just exited
        threads[int(task.name)] = (name, seconds)
        for child in children:
            threads.update(thread_cpu(int(child)))
    return threads


def _stat_cpu_seconds(stat: Path) -> float:
    """utime + stime of a process's or a thread's ``/proc/…/stat``, in seconds."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def by_thread(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              cpu_s: float, events: int) -> dict[str, float]:
    """A drain's CPU µs per event, split: librdkafka's own threads, the interpreter's threads,
    and what threads that exited during the drain took (the process total less the others)."""
    split = {"librdkafka threads": 0.0, "Python threads": 0.0}
    for tid, (name, seconds) in after.items():
        kind = "librdkafka threads" if name.startswith("rdk:") else "Python threads"
        split[kind] += seconds - before.get(tid, (name, 0.0))[1]
    split["threads that exited"] = max(cpu_s - sum(split.values()), 0.0)
    return {kind: seconds / events * 1e6 for kind, seconds in split.items()}


def produced(consumer: Consumer, partitions: list[TopicPartition]) -> int:
    """Records on the output partitions, committed or not (the high watermarks)."""
    total = 0
    for tp in partitions:
        try:
            total += max(consumer.get_watermark_offsets(tp, timeout=5)[1], 0)
        except KafkaException:
            pass  # the topic's metadata is not there yet
    return total


def committed(consumer: Consumer, partitions: list[TopicPartition]) -> int:
    """Offsets the group committed, summed; 0 while its coordinator is still loading."""
    try:
        return sum(max(tp.offset, 0) for tp in consumer.committed(partitions, timeout=10))
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.NOT_COORDINATOR or exc.args[0].retriable():
            return 0
        raise


def _check(process: subprocess.Popen, deadline: float, arm: Arm, done: int = 0) -> None:
    if process.poll() is not None:
        raise RuntimeError(f"{arm.name} exited with {process.returncode} after {done} events")
    if time.monotonic() > deadline:
        raise RuntimeError(f"{arm.name} timed out after {done} events")


def terminate(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arms", default=",".join(a.name for a in ARMS),
                        help=f"default: all but {', '.join(a.name for a in EXTRA_ARMS)}")
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--fill", choices=sorted(FILLS), default="producer",
                        help="how raw is filled before each drain: a producer, or the real shim over HTTP")
    args = parser.parse_args()
    from bench.broker import bench_kafka

    wanted = args.arms.split(",")
    unknown = set(wanted) - {a.name for a in (*ARMS, *EXTRA_ARMS)}
    if unknown:
        parser.error(f"no such arm: {', '.join(sorted(unknown))}")
    with bench_kafka(args.bootstrap) as kafka:
        result = run(kafka.bootstrap_servers, args.events, args.rounds,
                     [a for a in (*ARMS, *EXTRA_ARMS) if a.name in wanted], fill_via=args.fill)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
