"""The fault suite's harness: a 3-broker cluster to break, toxiproxy, a paced workload with a
ledger, the exactly-once checker, and the per-case report.

Nothing here mocks Kafka or the network: brokers are the launcher's real KRaft nodes, routers
and shims the real ``rtcbus`` CLI (``support.Stack``), partitions are cut by a real toxiproxy.
Every wait is bounded; the only fixed sleeps are the faults themselves and the workload's pacing.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import fastavro
import fastavro.schema
import httpx
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.kafka.launcher import ExtraListener, LocalKafka
from consumer.routing import RoutingTable
from consumer.settings import load_settings
from support import AVRO_DIR, RTCBUS, RtcbusProcess, Stack, callback, wait_for

TRANSACTION_STATE_TOPIC = "__transaction_state"
CONSUMER_OFFSETS_TOPIC = "__consumer_offsets"
TOXIPROXY_VERSION = "v2.12.0"
TOXIPROXY_PACKAGE = f"github.com/Shopify/toxiproxy/v2/cmd/server@{TOXIPROXY_VERSION}"
TOOLS_BIN = Path.home() / ".cache" / "rtcbus" / "bin"


# -- Kafka's own arithmetic --------------------------------------------------------------------


def java_string_hash(text: str) -> int:
    """``String.hashCode()`` in Java: over UTF-16 code units, 32-bit signed overflow."""
    data = text.encode("utf-16-be")
    h = 0
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i : i + 2], "big")) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def kafka_abs(n: int) -> int:
    """Kafka's ``Utils.abs``: ``Integer.MIN_VALUE`` maps to 0, not to itself."""
    return 0 if n == -(1 << 31) else abs(n)


def coordinator_partition(key: str, partitions: int) -> int:
    """The partition of ``__transaction_state`` (or ``__consumer_offsets``) that owns ``key``."""
    return kafka_abs(java_string_hash(key)) % partitions


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (the Java partitioner's hash; librdkafka's ``murmur2_random``)."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & ~3
    rem = length % 4
    if rem == 3:
        h ^= data[tail + 2] << 16
    if rem >= 2:
        h ^= data[tail + 1] << 8
    if rem >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h >= 1 << 31 else h


def kafka_partition(key: str, partitions: int) -> int:
    """The partition the Java partitioner (and rtcbus's shim) puts ``key`` in."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def room_names(tag: str, rooms: int, partitions: int) -> list[str]:
    """``rooms`` room ids whose keys land round-robin on the ``partitions`` partitions, so
    every partition carries traffic (a fault on any of them is seen)."""
    names: list[str] = []
    candidate = 0
    while len(names) < rooms:
        name = f"room-{tag}-{candidate}"
        candidate += 1
        if kafka_partition(name, partitions) == len(names) % partitions:
            names.append(name)
    return names


# -- the cluster --------------------------------------------------------------------------------


class Cluster:
    """A 3-node local cluster to break: kill, pause, restart nodes, find who leads what.

    Each node has a second listener (``PROXIED``) that advertises a proxy port, so a client
    bootstrapping from :attr:`proxied_bootstrap` connects through toxiproxy only.
    """

    def __init__(self, kafka_home: Path, cluster_dir: Path, brokers: int = 3) -> None:
        first = _free_block(4 * brokers)
        self.listener_ports = {i: first + 2 * brokers + (i - 1) for i in range(1, brokers + 1)}
        self.proxy_ports = {i: first + 3 * brokers + (i - 1) for i in range(1, brokers + 1)}
        self.local = LocalKafka(
            load_settings(kafka_home=kafka_home, brokers=brokers, local_port=first),
            cluster_dir=cluster_dir,
            extra_listeners={
                i: ExtraListener("PROXIED", self.listener_ports[i], self.proxy_ports[i])
                for i in range(1, brokers + 1)
            },
        )
        self.node_ids = list(range(1, brokers + 1))
        self.bootstrap = ""
        self._paused: set[int] = set()
        self._admin: AdminClient | None = None

    @property
    def proxied_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.proxy_ports.values())

    def start(self, timeout_s: float = 120) -> str:
        """Start every node that is not running; returns once all answer (bounded)."""
        self.bootstrap = self.local.start(timeout_s=timeout_s)
        return self.bootstrap

    def warm_up(self, timeout_s: float = 120) -> None:
        """Have Kafka create its internal topics (``__consumer_offsets``, ``__transaction_state``,
        50 partitions each, RF 3) now, so the first case does not pay for them mid-stream."""
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "transactional.id": f"warm-up-{uuid.uuid4().hex}", "log_level": 0})
        producer.init_transactions(timeout_s)
        wait_for(lambda: committed_total(self.bootstrap, f"warm-up-{uuid.uuid4().hex}", TRANSACTION_STATE_TOPIC) is not None,
                 timeout_s, "the group coordinator to answer")
        self.wait_healthy(timeout_s=timeout_s)

    def stop(self) -> None:
        for node_id in list(self._paused):
            self.resume(node_id)
        self.local.stop()

    def pid(self, node_id: int) -> int:
        status = {s.node.node_id: s.pid for s in self.local.status()}
        pid = status.get(node_id)
        assert pid is not None, f"Kafka node {node_id} is not running"
        return pid

    def kill(self, node_id: int) -> None:
        """SIGKILL: no controlled shutdown, leaderships move after the broker session expires."""
        pid = self.pid(node_id)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(self.local, node_id), 10, f"Kafka node {node_id} to die")

    def pause(self, node_id: int) -> None:
        os.kill(self.pid(node_id), signal.SIGSTOP)
        self._paused.add(node_id)

    def resume(self, node_id: int) -> None:
        os.kill(self.pid(node_id), signal.SIGCONT)
        self._paused.discard(node_id)

    def restart(self, node_id: int, timeout_s: float = 90) -> None:
        """Start ``node_id`` again (it must be down) and wait until every node answers."""
        assert not _alive(self.local, node_id), f"Kafka node {node_id} still runs"
        self.start(timeout_s)

    def graceful_stop(self, node_id: int) -> None:
        """SIGTERM: controlled shutdown (leaderships move away first)."""
        stopped = self.local.stop([node_id], timeout_s=60)
        assert [n.node_id for n in stopped] == [node_id]

    def admin(self) -> AdminClient:
        """One admin client for the suite. It must outlive the futures it returns: a future of
        a client that was garbage-collected never completes."""
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        return self._admin

    def leader(self, topic: str, partition: int, timeout_s: float = 30) -> int:
        """The node leading ``topic`` [``partition``], as the metadata says now."""

        def lookup() -> int | None:
            try:
                meta = self.admin().list_topics(topic, timeout=5).topics.get(topic)
            except KafkaException:
                return None
            if meta is None or meta.error is not None or partition not in meta.partitions:
                return None
            leader = meta.partitions[partition].leader
            return leader if leader > 0 else None

        return wait_for(lookup, timeout_s, f"a leader of {topic} [{partition}]", 0.2)

    def partition_count(self, topic: str, timeout_s: float = 30) -> int:
        def lookup() -> int | None:
            try:
                meta = self.admin().list_topics(topic, timeout=5).topics.get(topic)
            except KafkaException:
                return None
            ok = meta is not None and meta.error is None and meta.partitions
            return len(meta.partitions) if ok else None

        return wait_for(lookup, timeout_s, f"the partitions of {topic}", 0.2)

    def transaction_coordinator(self, transactional_id: str) -> int:
        """The node Kafka makes coordinator of ``transactional_id``: the leader of its
        ``__transaction_state`` partition (the topic's real partition count, not assumed 50)."""
        partitions = self.partition_count(TRANSACTION_STATE_TOPIC)
        return self.leader(TRANSACTION_STATE_TOPIC, coordinator_partition(transactional_id, partitions))

    def group_coordinator(self, group: str, timeout_s: float = 30) -> int:
        """The group coordinator, as ``describe_consumer_groups`` reports it."""

        def lookup() -> int | None:
            try:
                description = self.admin().describe_consumer_groups([group], request_timeout=5)[group].result(timeout=10)
            except (KafkaException, TimeoutError):
                return None
            return description.coordinator.id if description.coordinator is not None else None

        return wait_for(lookup, timeout_s, f"the coordinator of group {group}", 0.2)

    def group_members(self, group: str) -> list[list[int]] | None:
        """The partitions each member of ``group`` holds, or None if Kafka did not answer."""
        # A client of its own, alive until its answer is in: the shared one may still be
        # waiting on the group coordinator it knew before a kill.
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        try:
            description = admin.describe_consumer_groups([group], request_timeout=5)[group].result(timeout=10)
        except (KafkaException, TimeoutError):
            return None
        return [
            sorted(tp.partition for tp in member.assignment.topic_partitions)
            for member in description.members
        ]

    def wait_healthy(self, topics: Iterable[str] = (), timeout_s: float = 90) -> None:
        """Every node running, and every partition of ``topics`` and of the internal topics
        with all three replicas in sync."""
        self.start(timeout_s)
        names = [*topics, CONSUMER_OFFSETS_TOPIC, TRANSACTION_STATE_TOPIC]

        def in_sync() -> bool:
            try:
                metadata = self.admin().list_topics(timeout=5)
            except KafkaException:
                return False
            if len(metadata.brokers) != len(self.node_ids):
                return False
            for name in names:
                topic = metadata.topics.get(name)
                if topic is None:
                    continue  # an internal topic nobody needed yet
                for partition in topic.partitions.values():
                    if partition.leader < 0 or len(partition.isrs) != len(self.node_ids):
                        return False
            return True

        wait_for(in_sync, timeout_s, "all replicas of every partition in sync", 0.25)


def _alive(local: LocalKafka, node_id: int) -> bool:
    return any(s.node.node_id == node_id and s.pid is not None for s in local.status())


def _free_block(count: int) -> int:
    from kafka_helpers import free_ports

    return free_ports(count)


# -- toxiproxy ----------------------------------------------------------------------------------


def toxiproxy_binary(build_timeout_s: float = 420) -> Path:
    """The toxiproxy server: ``TOXIPROXY_SERVER``, else the cached build, else built now with
    ``go install`` into the cache (once; later runs reuse it).

    Raises:
        RuntimeError: naming what is missing (go, or the build's error).
    """
    given = os.environ.get("TOXIPROXY_SERVER")
    if given:
        if not Path(given).is_file():
            raise RuntimeError(f"TOXIPROXY_SERVER={given} does not exist")
        return Path(given)
    gobin = Path(os.environ.get("GOBIN") or TOOLS_BIN)
    for candidate in (TOOLS_BIN / "server", gobin / "server"):
        if candidate.is_file():
            return candidate
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            f"toxiproxy server is not built ({TOOLS_BIN / 'server'}) and Go is not on PATH to "
            f"build it: go install {TOXIPROXY_PACKAGE}"
        )
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [go, "install", TOXIPROXY_PACKAGE], env={**os.environ, "GOBIN": str(TOOLS_BIN)},
        capture_output=True, text=True, timeout=build_timeout_s, check=False,
    )
    if result.returncode != 0 or not (TOOLS_BIN / "server").is_file():
        raise RuntimeError(f"go install {TOXIPROXY_PACKAGE} failed: {result.stderr.strip()[-500:]}")
    return TOOLS_BIN / "server"


class Toxiproxy:
    """A toxiproxy server on 127.0.0.1, driven through its HTTP API."""

    def __init__(self, binary: Path, log_path: Path) -> None:
        from kafka_helpers import free_ports

        self.port = free_ports(1)
        self.api = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [str(binary), "-host", "127.0.0.1", "-port", str(self.port)],
            stdout=self._log, stderr=self._log,
        )
        self.client = httpx.Client(base_url=self.api, timeout=5)
        wait_for(self._answers, 30, f"toxiproxy to answer on {self.api}", 0.1)

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"toxiproxy exited ({self.process.returncode})"
        try:
            return self.client.get("/version").status_code == 200
        except httpx.HTTPError:
            return False

    def create(self, name: str, listen_port: int, upstream_port: int) -> None:
        response = self.client.post(
            "/proxies",
            json={
                "name": name, "listen": f"127.0.0.1:{listen_port}",
                "upstream": f"127.0.0.1:{upstream_port}", "enabled": True,
            },
        )
        assert response.status_code in (200, 201), response.text

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Disabled, a proxy closes its listener and every connection through it."""
        response = self.client.post(f"/proxies/{name}", json={"enabled": enabled})
        assert response.status_code == 200, response.text

    def names(self) -> list[str]:
        return sorted(self.client.get("/proxies").json())

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


# -- the workload -------------------------------------------------------------------------------


@dataclass
class Posted:
    event_id: str
    room: str
    sequence: int
    poison: str | None = None
    status: int | None = None
    """The last answer (None: no answer at all); 200 puts it in the ledger."""


class Workload:
    """Paced, keyed callbacks for many rooms, posted through the shim by a sender that retries
    like the vendor (3 tries, 5 s timeout each); remembers every EventId answered 200.

    Each room posts its events one after another, ``UserAudioStreamStart`` with the room's
    sequence number in ``EventData.Timestamp``, one every ``interval_s``, until :meth:`finish`
    (or ``max_per_room``). ``poison`` maps a room number to ``{sequence: kind}``: at that point
    the room posts a poison body of that kind (see :func:`poison_body`) instead of a normal one.
    """

    def __init__(
        self, stack: Stack, rooms: int = 20, interval_s: float = 0.4, max_per_room: int = 1000,
        poison: dict[int, dict[int, str]] | None = None,
    ) -> None:
        self.stack, self.rooms, self.interval_s, self.max_per_room = stack, rooms, interval_s, max_per_room
        self.poison = poison or {}
        self.tag = uuid.uuid4().hex[:6]
        self.partitions = int(stack.env["RTCBUS_PARTITIONS"])
        self.room_names = room_names(self.tag, rooms, self.partitions)
        self.posted: list[Posted] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)
        self.started_at = 0.0

    def start(self) -> Workload:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def accepted_count(self) -> int:
        with self._lock:
            return sum(1 for p in self.posted if p.status == 200)

    def finish(self, min_total_s: float = 30.0, more_s: float = 5.0, timeout_s: float = 60) -> None:
        """Let the stream run ``more_s`` longer, and ``min_total_s`` in all, then stop it."""
        remaining = max(self.started_at + min_total_s - time.monotonic(), more_s)
        if remaining > 0:
            time.sleep(remaining)  # the workload's length is part of the case
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the sender did not stop"

    def _run(self) -> None:
        with ThreadPoolExecutor(self.rooms) as pool:
            list(pool.map(self._room, range(self.rooms)))

    def _room(self, number: int) -> None:
        room = self.room_names[number]
        poison = self.poison.get(number, {})
        with httpx.Client(timeout=5) as client:
            for sequence in range(self.max_per_room):
                if self._stop.is_set():
                    return
                time.sleep(self.interval_s)  # pacing
                kind = poison.get(sequence)
                event_id = f"{room}-{sequence}" + (f"-poison-{kind}" if kind else "")
                if kind:
                    body = poison_body(kind, room, event_id, self.stack.secret)
                else:
                    data = {"RoomId": room, "UserId": "u", "DeviceType": "web", "Timestamp": sequence, "ExtraInfo": ""}
                    body = callback("UserAudioStreamStart", data, self.stack.secret, event_id=event_id)
                posted = Posted(event_id, room, sequence, kind)
                for _ in range(3):
                    try:
                        posted.status = client.post(self.stack.url, content=body).status_code
                    except httpx.HTTPError:
                        posted.status = None
                        continue
                    if posted.status == 200 or 400 <= posted.status < 500:
                        break  # a 4xx is final for the vendor too
                with self._lock:
                    self.posted.append(posted)

    def ledger(self) -> list[Posted]:
        with self._lock:
            return [p for p in self.posted if p.status == 200]

    def write_ledger(self, path: Path) -> Path:
        """The ledger file for ``rtcbus audit --expect``: one EventId answered 200 per line,
        in the order the answers came."""
        path.write_text("".join(f"{p.event_id}\n" for p in self.ledger()))
        return path


def poison_body(kind: str, room: str, event_id: str, secret: str) -> bytes:
    """A correctly signed callback the router cannot turn into a domain record.

    ``surrogate``: EventData holds ``"UserId":"u\\ud83d"``, a JSON-escaped lone surrogate (six
    ASCII characters in the EventData string); ``deep``: EventData nested 5000 levels;
    ``no-room``: a UserJoinRoom without RoomId.
    """
    if kind == "surrogate":
        data = '{"RoomId":"%s","UserId":"u\\ud83d","DeviceType":"web","Timestamp":1,"ExtraInfo":""}' % room
        assert "\\ud83d" in data and data.isascii()
        return callback("UserJoinRoom", data, secret, event_id=event_id)
    if kind == "deep":
        data = '{"RoomId":"%s","UserId":"u","Deep":%s%s}' % (room, "[" * 5000, "]" * 5000)
        return callback("UserJoinRoom", data, secret, event_id=event_id)
    if kind == "no-room":
        return callback("UserJoinRoom", {"UserId": "u", "DeviceType": "web", "Timestamp": 1}, secret, event_id=event_id)
    raise ValueError(kind)


# -- routers and progress -----------------------------------------------------------------------


class Routers:
    """The routers of one case: started through the Stack, watched for unexpected exits."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.all: list[RtcbusProcess] = []

    def start(self, instance: str | None = "0", **env: str) -> RtcbusProcess:
        router = self.stack.start_router(instance, **env)
        self.all.append(router)
        return router

    def alive(self) -> list[RtcbusProcess]:
        return [r for r in self.all if r.process.poll() is None]

    def logs(self) -> str:
        return "\n".join(f"--- {r.log_path.name} (exit {r.process.poll()}):\n{r.log()[-2500:]}" for r in self.all)

    def assert_alive(self, routers: Iterable[RtcbusProcess]) -> None:
        dead = [r for r in routers if r.process.poll() is not None]
        assert not dead, "router(s) exited:\n" + "\n".join(
            f"--- {r.log_path.name} (exit {r.process.returncode}):\n{r.log()[-3000:]}" for r in dead
        )


def committed_total(bootstrap: str, group: str, topic: str) -> int | None:
    """The router group's committed offsets summed over ``topic``; None if Kafka did not answer."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 0})
    try:
        meta = consumer.list_topics(topic, timeout=5).topics[topic]
        partitions = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        committed = consumer.committed(partitions, timeout=5)
        return sum(max(tp.offset, 0) for tp in committed)
    except KafkaException:
        return None
    finally:
        consumer.close()


def wait_routed(stack: Stack, routers: Routers, at_least: int, timeout_s: float, what: str) -> None:
    """Until the group has committed ``at_least`` raw records; fails early if no router runs."""

    def done() -> bool:
        assert routers.alive(), f"no router is running while waiting for {what}:\n{routers.logs()}"
        total = committed_total(stack.bootstrap, stack.group, stack.raw_topic)
        return total is not None and total >= at_least

    wait_for(done, timeout_s, what, 0.25)


def committed_by_partition(bootstrap: str, group: str, topic: str) -> dict[int, int] | None:
    """The router group's committed offset per partition of ``topic``; None if Kafka did not answer."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 0})
    try:
        meta = consumer.list_topics(topic, timeout=5).topics[topic]
        partitions = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        return {tp.partition: max(tp.offset, 0) for tp in consumer.committed(partitions, timeout=5)}
    except KafkaException:
        return None
    finally:
        consumer.close()


def time_to_progress(stack: Stack, routers: Routers, since: float, timeout_s: float = 90) -> float:
    """Seconds from ``since`` (the fault's end) until the group has committed a record more
    on every raw partition than it had then: routing resumed everywhere. The workload's rooms
    cover every partition (:func:`room_names`), so each one has records waiting."""
    before = None
    while before is None:
        assert time.monotonic() - since < timeout_s, "Kafka did not answer after the fault"
        before = committed_by_partition(stack.bootstrap, stack.group, stack.raw_topic)
    behind: list[int] = []

    def everywhere() -> bool:
        assert routers.alive(), f"no router is running after the fault:\n{routers.logs()}"
        now = committed_by_partition(stack.bootstrap, stack.group, stack.raw_topic)
        if now is None:
            return False
        behind[:] = [p for p, offset in before.items() if now.get(p, 0) <= offset]
        return not behind

    try:
        wait_for(everywhere, timeout_s - (time.monotonic() - since), "routing on every partition after the fault", 0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: no progress on raw partitions {behind}\n{routers.logs()}") from None
    return time.monotonic() - since


def wait_caught_up(stack: Stack, routers: Routers, timeout_s: float) -> None:
    """Until the group's committed offsets reach the end of every raw partition."""
    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": stack.group, "log_level": 0})
    try:
        def caught_up() -> bool:
            assert routers.alive(), f"no router is running to catch up:\n{routers.logs()}"
            try:
                meta = consumer.list_topics(stack.raw_topic, timeout=5).topics[stack.raw_topic]
                partitions = [TopicPartition(stack.raw_topic, p) for p in sorted(meta.partitions)]
                ends = [consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in partitions]
                committed = consumer.committed(partitions, timeout=5)
            except KafkaException:
                return False
            return all(c.offset == end or (end == 0 and c.offset < 0) for c, end in zip(committed, ends))

        wait_for(caught_up, timeout_s, "the router group to commit the whole raw topic", 0.25)
    finally:
        consumer.close()


def transactional_id_of(router: RtcbusProcess, fallback: str, timeout_s: float = 30) -> str:
    """The transactional.id the router logs at start (a line with ``transactional.id``), else
    ``fallback`` (``<group>-<RTCBUS_INSTANCE_ID>``, today's fixed id) once it has partitions."""
    pattern = re.compile(r"transactional[._]id\W{0,5}([A-Za-z0-9][A-Za-z0-9._-]*)")

    def logged() -> str | None:
        router.assert_running()
        text = router.log()
        match = pattern.search(text)
        if match:
            return match.group(1).rstrip(".")
        return fallback if "assigned partitions" in text else None

    return wait_for(logged, timeout_s, "the router to log its transactional.id or get partitions", 0.2)


# -- the checker --------------------------------------------------------------------------------


def output_topics(stack: Stack) -> list[str]:
    return [*RoutingTable(topic_prefix=stack.prefix).topics(), stack.dlq_topic]


def wait_no_open_transaction(bootstrap: str, topics: list[str], timeout_s: float = 90) -> None:
    """Until no transaction is open on any partition of ``topics``: for each, the end a
    read_committed reader sees (the last stable offset) is the high watermark."""
    committed = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lso-{uuid.uuid4().hex}",
                          "isolation.level": "read_committed", "log_level": 0})
    uncommitted = Consumer({"bootstrap.servers": bootstrap, "group.id": f"hw-{uuid.uuid4().hex}",
                            "isolation.level": "read_uncommitted", "log_level": 0})
    open_partitions: list[str] = []
    try:
        partitions = _all_partitions(committed, topics)

        def settled() -> bool:
            open_partitions.clear()
            try:
                for tp in partitions:
                    stable = committed.get_watermark_offsets(tp, timeout=5)[1]
                    high = uncommitted.get_watermark_offsets(tp, timeout=5)[1]
                    if stable != high:
                        open_partitions.append(f"{tp.topic}[{tp.partition}] {stable}<{high}")
            except KafkaException:
                return False
            return not open_partitions

        try:
            wait_for(settled, timeout_s, "no open transaction on the output topics", 0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: still open: {open_partitions[:6]}") from None
    finally:
        committed.close()
        uncommitted.close()


def _all_partitions(consumer: Consumer, topics: list[str]) -> list[TopicPartition]:
    metadata = consumer.list_topics(timeout=10).topics
    missing = [t for t in topics if t not in metadata]
    assert not missing, f"topics missing: {missing}"
    return [TopicPartition(t, p) for t in topics for p in sorted(metadata[t].partitions)]


def read_committed(bootstrap: str, topics: list[str], timeout_s: float = 60) -> list:
    """Every committed record of ``topics``, each partition read to its end, with one reader."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
        "isolation.level": "read_committed", "enable.partition.eof": True,
        "enable.auto.commit": False, "log_level": 0,
    })
    try:
        partitions = _all_partitions(consumer, topics)
        consumer.assign([TopicPartition(tp.topic, tp.partition, 0) for tp in partitions])
        # OFFSET_BEGINNING would also do; offset 0 is the start of these fresh topics.
        records, at_end = [], set()
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(partitions):
            assert time.monotonic() < deadline, f"reading the output topics did not reach their end: {len(at_end)}/{len(partitions)}"
            for message in consumer.consume(1000, timeout=0.5):
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    at_end.add((message.topic(), message.partition()))
                else:
                    at_end.discard((message.topic(), message.partition()))
                    records.append(message)
        return records
    finally:
        consumer.close()


@cache
def _schemas_by_fingerprint() -> dict[bytes, dict]:
    schemas = {}
    for path in AVRO_DIR.glob("*.avsc"):
        if "." in path.stem:
            continue  # a named type, loaded by the records that use it
        schema = fastavro.schema.load_schema(path)
        canonical = fastavro.schema.to_parsing_canonical_form(schema)
        schemas[bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))] = schema
    return schemas


def decode(data: bytes) -> dict:
    """An Avro single-object record, decoded with plain fastavro and the schema in ``avro/``
    whose fingerprint it names (``support.decode_single_object``, with the schemas parsed once)."""
    schema = _schemas_by_fingerprint().get(data[2:10])
    assert data[:2] == b"\xc3\x01" and schema is not None, "no schema in avro/ has this fingerprint"
    return fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)


@dataclass
class Outcome:
    """What the checker found."""

    sent: int
    answered_200: int
    delivered_once: int
    duplicated: list[str]
    lost: list[str]
    out_of_order: list[str]
    unexpected: list[str]
    dead_letters: Counter
    misplaced: list[str] = field(default_factory=list)
    """Records not in their room's partition (raw and domain topic: the key policy)."""


def check(stack: Stack, workload: Workload) -> Outcome:
    """Read every output topic (read_committed, once no transaction is open) and compare with
    the workload: every EventId answered 200 exactly once; per-room order; nothing else."""
    topics = output_topics(stack)
    wait_no_open_transaction(stack.bootstrap, topics)
    records = read_committed(stack.bootstrap, topics)
    domain = [m for m in records if m.topic() != stack.dlq_topic]
    dead = [m for m in records if m.topic() == stack.dlq_topic]

    ledger = workload.ledger()
    attempted = {p.event_id for p in workload.posted}
    counts: Counter = Counter()
    by_room: dict[str, list[int]] = defaultdict(list)
    unexpected, misplaced = [], []
    for message in domain:
        record = decode(message.value())
        event_id = record["EventId"]
        counts[event_id] += 1
        if event_id not in attempted or message.topic() != stack.topic("stream"):
            unexpected.append(f"{message.topic()}: {event_id}")
            continue
        room = record["EventData"]["RoomId"]
        if record["Source"]["Partition"] != kafka_partition(room, workload.partitions) or message.partition() != record["Source"]["Partition"]:
            misplaced.append(f"{event_id}: raw [{record['Source']['Partition']}], {message.topic()} [{message.partition()}]")
        if counts[event_id] == 1:
            by_room[room].append(int(record["EventData"]["Timestamp"]))
    ledger_ids = [p.event_id for p in ledger if p.poison is None]
    lost = [e for e in ledger_ids if counts[e] == 0]
    duplicated = sorted(e for e, n in counts.items() if n > 1)
    out_of_order = [room for room, seq in by_room.items() if seq != sorted(seq)]
    dead_ids = Counter(dict(m.headers() or []).get("rtcbus.event_id", b"?").decode() for m in dead)
    return Outcome(
        sent=len(workload.posted), answered_200=len(ledger),
        delivered_once=sum(1 for e in ledger_ids if counts[e] == 1),
        duplicated=duplicated, lost=lost, out_of_order=out_of_order,
        unexpected=unexpected, dead_letters=dead_ids, misplaced=misplaced,
    )


def run_audit(stack: Stack, ledger: Path, timeout_s: float = 120) -> tuple[int, dict | None, str]:
    """``rtcbus audit --expect <ledger> --json --settle-timeout 60`` with the Stack's environment.

    Returns:
        The exit status, the parsed JSON (None if stdout was not JSON), and stdout+stderr.
    """
    result = subprocess.run(
        [RTCBUS, "audit", "--expect", str(ledger), "--json", "--settle-timeout", "60"],
        env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=timeout_s,
    )
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = None
    return result.returncode, report, (result.stdout + result.stderr)[-2000:]


# -- the report ---------------------------------------------------------------------------------


@dataclass
class CaseRecord:
    """One case's figures for the report."""

    case: str
    sent: int | None = None
    answered_200: int | None = None
    delivered_once: int | None = None
    duplicated: int | None = None
    lost: int | None = None
    out_of_order: int | None = None
    dead_letters: int | None = None
    recovery_s: float | None = None
    """From the fault's end to the first record routed after it (the worst, if several)."""
    audit: str | None = None
    outcome: str = "not run"
    failure: str = ""
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    phases: dict[str, float] = field(default_factory=dict)
    """Seconds each phase of the case took (set-up, workload, catch-up, check, audit)."""
    _mark: float = field(default_factory=time.monotonic, repr=False)

    def phase(self, name: str) -> None:
        """Close the phase running since the last call, naming it."""
        now = time.monotonic()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self._mark, 1)
        self._mark = now

    def take(self, outcome: Outcome) -> None:
        self.sent, self.answered_200 = outcome.sent, outcome.answered_200
        self.delivered_once = outcome.delivered_once
        self.duplicated, self.lost = len(outcome.duplicated), len(outcome.lost)
        self.out_of_order = len(outcome.out_of_order)
        self.dead_letters = sum(outcome.dead_letters.values())

    def recovered(self, seconds: float) -> None:
        self.recovery_s = round(max(seconds, self.recovery_s or 0.0), 2)


class FaultReport:
    """A pytest plugin (registered at run time by the suite): collects the cases, writes them
    as JSON after each one, prints a table in the terminal summary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cases: dict[str, CaseRecord] = {}
        self.started = time.monotonic()

    def case(self, nodeid: str, name: str) -> CaseRecord:
        record = self.cases[nodeid] = CaseRecord(name)
        return record

    def pytest_runtest_logreport(self, report) -> None:
        record = self.cases.get(report.nodeid)
        if record is None:
            return
        if report.when == "call" or (report.when == "setup" and report.failed):
            record.outcome = report.outcome
            record.duration_s = round(report.duration, 1)
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                record.failure = (crash.message if crash else str(report.longrepr))[:600]
            self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "suite_s": round(time.monotonic() - self.started, 1),
            "cases": [{k: v for k, v in asdict(c).items() if not k.startswith("_")} for c in self.cases.values()],
        }
        self.path.write_text(json.dumps(payload, indent=2) + "\n")

    def summary(self) -> tuple[str, list[str]] | None:
        """The suite's table, for the session's summary (tests/conftest.py prints it)."""
        if not self.cases:
            return None
        lines = [
            f"{'case':<34} {'sent':>6} {'200':>6} {'once':>6} {'dup':>4} {'lost':>5} {'dlq':>4} {'recov s':>8} {'time s':>7}  result"
        ]
        for c in self.cases.values():
            def cell(v, width):
                return f"{'-' if v is None else v:>{width}}"
            lines.append(
                f"{c.case[:34]:<34} {cell(c.sent, 6)} {cell(c.answered_200, 6)} {cell(c.delivered_once, 6)} "
                f"{cell(c.duplicated, 4)} {cell(c.lost, 5)} {cell(c.dead_letters, 4)} "
                f"{cell(c.recovery_s, 8)} {c.duration_s:>7.1f}  {c.outcome}"
                + (f": {c.failure.splitlines()[0][:140]}" if c.failure else "")
            )
        ran = sum(c.duration_s or 0 for c in self.cases.values())
        lines.append(
            f"fault suite: {len(self.cases)} cases, {ran:.0f} s in the cases, "
            f"{time.monotonic() - self.started:.0f} s from the first case to the end of the session"
        )
        return f"fault suite ({self.path})", lines
