"""Helpers for the pipeline tests: rtcbus processes, signed callbacks, reading topics to their end.

Nothing here mocks Kafka: processes are the real ``rtcbus`` CLI, reads go to the real broker.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import fastavro
import fastavro.schema
import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from consumer.envelope import sign
from kafka_helpers import free_ports

AVRO_DIR = Path(__file__).parents[1] / "avro"
RTCBUS = str(Path(sys.executable).parent / "rtcbus")


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.1):
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


def callback(
    event_type: str,
    event_data: dict | str,
    secret: str,
    *,
    event_id: str | None = None,
    version: str = "2020-12-01",
    event_time: str | None = None,
) -> bytes:
    """A signed callback body, as the vendor would send it: EventTime is now unless given
    (the shim refuses an EventTime further from its clock than ``signature_skew_s``)."""
    fields = {
        "EventType": event_type,
        "EventData": event_data if isinstance(event_data, str) else json.dumps(event_data),
        "EventTime": event_time or datetime.now().astimezone().isoformat(timespec="seconds"),
        "EventId": event_id or uuid.uuid4().hex,
        "AppId": "app-test",
        "Version": version,
        "Nonce": uuid.uuid4().hex[:8],
    }
    fields["Signature"] = sign(fields.values(), secret)
    return json.dumps(fields).encode()


@contextmanager
def running(router, join_timeout_s: float = 60) -> Iterator[list[BaseException]]:
    """``router.run`` in a thread for the ``with`` block; yields the list of what it raised,
    for the caller to check. At the end the router is stopped and its thread joined."""
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            router.run(stop)
        except BaseException as exc:  # the caller's assertions report it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(join_timeout_s)
        assert not thread.is_alive(), "the router did not stop"


class RtcbusProcess:
    """One ``rtcbus <command>`` child process with its own environment and log file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command, self.env, self.log_path = command, env, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> RtcbusProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [RTCBUS, *self.command], env={**os.environ, **self.env}, stdout=log, stderr=log
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye, no commit."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait: the graceful path."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        assert self.process.poll() is None, f"{self.command} exited:\n{self.log()[-3000:]}"


class Stack:
    """A shim and routers on unique topics of a real broker, driven as a user would."""

    def __init__(self, bootstrap: str, workdir: Path, partitions: int = 3, **settings: str) -> None:
        name = uuid.uuid4().hex[:10]
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.secret = f"secret-{name}"
        self.prefix = f"t{name}"
        self.group = f"router-{name}"
        self.shim_port = free_ports(1)
        self.env = {
            "RTCBUS_BOOTSTRAP_SERVERS": bootstrap,
            "RTCBUS_TOPIC_PREFIX": self.prefix,
            "RTCBUS_GROUP_ID": self.group,
            "RTCBUS_SECRETS": self.secret,
            "RTCBUS_PARTITIONS": str(partitions),
            "RTCBUS_SHIM_PORT": str(self.shim_port),
            "RTCBUS_SHIM_ADMIN_PORT": str(free_ports(1)),
            # A spool of the stack's own: entries carry no topic, so a spool another stack
            # left behind would be forwarded to this stack's raw topic.
            "RTCBUS_SPOOL_DIR": str(workdir / "spool"),
            "RTCBUS_COMMIT_INTERVAL_MS": "100",
            **{f"RTCBUS_{key.upper()}": value for key, value in settings.items()},
        }
        self.processes: list[RtcbusProcess] = []
        subprocess.run(
            [RTCBUS, "topics", "create"], env={**os.environ, **self.env}, check=True,
            capture_output=True, timeout=120,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.shim_port}/callbacks"

    @property
    def raw_topic(self) -> str:
        return f"{self.prefix}.callbacks.raw"

    def topic(self, domain: str) -> str:
        return f"{self.prefix}.events.{domain}"

    @property
    def dlq_topic(self) -> str:
        return f"{self.prefix}.callbacks.dlq"

    def start_shim(self, **env: str) -> RtcbusProcess:
        """A shim; ``env`` adds or overrides ``RTCBUS_*`` variables for it (another
        ``RTCBUS_SHIM_PORT``, ``RTCBUS_SPOOL_DIR``...)."""
        shim = self._spawn(["shim"], "shim", **env)
        port = int(env.get("RTCBUS_SHIM_PORT", self.shim_port))

        def healthy() -> bool:
            shim.assert_running()
            return self._healthy(port)

        wait_for(healthy, 60, "the shim to answer /healthz")
        return shim

    def start_router(self, instance: str | None = "0", **env: str) -> RtcbusProcess:
        """A router named ``RTCBUS_INSTANCE_ID=router-<instance>``; with ``instance=None`` the
        variable is left out, so replicas started that way have identical settings.
        ``env`` adds or overrides ``RTCBUS_*`` variables for this router only."""
        name = f"router-{instance}" if instance is not None else "router"
        instance_env = {"RTCBUS_INSTANCE_ID": f"router-{instance}"} if instance is not None else {}
        return self._spawn(
            ["router"], name, **{"RTCBUS_METRICS_PORT": str(free_ports(1)), **instance_env, **env}
        )

    def _spawn(self, command: list[str], name: str, **env: str) -> RtcbusProcess:
        process = RtcbusProcess(
            command, {**self.env, **env}, self.workdir / f"{name}-{len(self.processes)}.log"
        ).start()
        self.processes.append(process)
        return process

    def _healthy(self, port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def post(self, body: bytes, client: httpx.Client | None = None) -> int:
        poster = client or httpx
        return poster.post(self.url, content=body, timeout=10).status_code

    def wait_spool_empty(self, timeout_s: float = 60) -> None:
        """Until the shim's spool holds nothing: what it took has been forwarded to raw."""
        url = f"http://127.0.0.1:{self.env['RTCBUS_SHIM_ADMIN_PORT']}/metrics"

        def empty() -> bool:
            lines = httpx.get(url, timeout=5).text.splitlines()
            [depth] = [line for line in lines if line.startswith("rtcbus_shim_spool_depth ")]
            return float(depth.split()[1]) == 0

        wait_for(empty, timeout_s, "the shim's spool to be forwarded", 0.25)

    def wait_caught_up(self, timeout_s: float = 90) -> None:
        """Until the router group's committed offsets reach the end of the raw topic."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group})
        try:
            partitions = _partitions(consumer, self.raw_topic)

            def caught_up() -> bool:
                try:
                    ends = [consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in partitions]
                except KafkaException as exc:
                    if _not_yet(exc.args[0]):
                        return False  # a restarted broker is still taking leadership back
                    raise
                committed = _committed(consumer, partitions)
                if committed is None:
                    return False
                # A partition that never had a record has nothing committed, and needs nothing.
                return all(
                    c.offset == end or (end == 0 and c.offset < 0) for c, end in zip(committed, ends)
                )

            wait_for(caught_up, timeout_s, "the router to commit the whole raw topic", 0.25)
        finally:
            consumer.close()

    def committed_total(self) -> int:
        """How many raw records the router group has committed so far, over all partitions."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group})
        try:
            committed = _committed(consumer, _partitions(consumer, self.raw_topic))
            return sum(max(tp.offset, 0) for tp in committed or [])
        finally:
            consumer.close()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.process and process.process.poll() is None:
                process.stop()


def _committed(consumer: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition] | None:
    """The group's committed offsets, or None while the coordinator is not ready (retriable)."""
    try:
        return consumer.committed(partitions, timeout=10)
    except KafkaException as exc:
        if _not_yet(exc.args[0]):
            return None
        raise


def _not_yet(error: KafkaError) -> bool:
    """An error a broker that is (re)starting gives before it is ready."""
    return error.retriable() or error.code() in (
        KafkaError.NOT_COORDINATOR,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
    )


def _partitions(consumer: Consumer, topic: str) -> list[TopicPartition]:
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    return [TopicPartition(topic, p) for p in sorted(metadata.partitions)]


def read_topic(bootstrap: str, topic: str) -> list:
    """Every committed record of ``topic``, from the beginning to the end of each partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, tp.partition, OFFSET_BEGINNING) for tp in partitions])
        records, at_end = [], set()
        deadline = time.monotonic() + 60
        while len(at_end) < len(partitions):
            assert time.monotonic() < deadline, f"reading {topic} did not reach its end"
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                at_end.add(message.partition())
            else:
                at_end.discard(message.partition())
                records.append(message)
        return records
    finally:
        consumer.close()


def _normal(value):
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    return value


def assert_carries(decoded, sent, path: str, extras: dict) -> None:
    """``decoded`` holds every value of ``sent`` (numbers sent as strings compare as numbers);
    fields the schema lacks are in ``extras``, as JSON text under their path."""
    if isinstance(sent, dict):
        assert isinstance(decoded, dict), path
        for key, value in sent.items():
            if key in decoded:
                assert_carries(decoded[key], value, f"{path}.{key}", extras)
            else:
                assert json.loads(extras[f"{path}.{key}"]) == value, f"{path}.{key} kept as extra"
    elif isinstance(sent, list):
        assert len(decoded) == len(sent), path
        for index, (d, s) in enumerate(zip(decoded, sent)):
            assert_carries(d, s, f"{path}[{index}]", extras)
    else:
        assert _normal(decoded) == _normal(sent), path


def decode_single_object(data: bytes) -> dict:
    """Decode with plain fastavro from ``avro/``: pick the schema whose fingerprint matches."""
    for path in AVRO_DIR.glob("*.avsc"):
        if "." in path.stem:
            continue
        schema = fastavro.schema.load_schema(path)
        canonical = fastavro.schema.to_parsing_canonical_form(schema)
        if bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")) == data[2:10]:
            return fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)
    raise AssertionError("no schema in avro/ has this fingerprint")
