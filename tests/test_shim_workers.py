"""``rtcbus shim --workers N``: N shim processes on one port, against a real broker; and the
adoption of spools no worker of a run owns (no network)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from consumer.sender import build_callback
from consumer.settings import load_settings
from consumer.shim_workers import adopt_orphaned_spools
from consumer.spool import Spool, SpoolRecord
from kafka_helpers import free_ports
from support import wait_for
from test_shim import SECRET, metric_samples, raw_topic_settings, records_before_sentinels


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_workers(kafka, settings, *flags: str) -> tuple[subprocess.Popen, int, tuple[int, int], list[int]]:
    """``rtcbus shim --workers 2`` on free ports, once both workers are ready: the command,
    its public port, the workers' admin ports and the workers' pids."""
    first = free_ports(3)  # the public port, then one admin port per worker
    port, admin_ports = first, (first + 1, first + 2)
    shim = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "--bootstrap-servers", kafka.bootstrap_servers,
         "--topic-prefix", settings.topic_prefix, "shim", "--port", str(port),
         "--admin-port", str(admin_ports[0]), "--secrets", SECRET,
         "--spool-dir", str(settings.spool_path), "--workers", "2", *flags],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: all(answers(f"http://127.0.0.1:{a}/readyz") for a in admin_ports)
                 or shim.poll() is not None, 120, "both workers to be ready")
        assert shim.poll() is None, shim.communicate()[1][-3000:]
        workers = [pid for pid in children_of(shim.pid)
                   if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
    except BaseException:
        shim.kill()
        shim.wait()
        raise
    return shim, port, admin_ports, workers


def stored_via_kafka(admin_port: int) -> float:
    return metric_samples(httpx.get(f"http://127.0.0.1:{admin_port}/metrics").text).get(
        ("rtcbus_shim_stored_total", (("via", "kafka"),)), 0)


def raw_event_ids(settings) -> set[str]:
    return {json.loads(record.value())["EventId"]
            for record in records_before_sentinels(settings, settings.raw_topic)}


@pytest.mark.kafka
def test_two_workers_store_every_200_and_stop_with_exit_0_on_sigterm(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    shim, port, admin_ports, workers = start_workers(kafka, settings)
    try:
        accepted = []
        for number in range(40):  # a connection each: the kernel spreads them over both
            callback = build_callback("UserJoinRoom", {"RoomId": f"room-{number % 5}", "UserId": "u"},
                                      secret=SECRET)
            answer = httpx.post(f"http://127.0.0.1:{port}/callbacks", content=callback.body, timeout=10)
            assert answer.status_code == 200, answer.text
            accepted.append(answer.json()["EventId"])

        stored = [stored_via_kafka(a) for a in admin_ports]
        assert sum(stored) == len(accepted) and min(stored) > 0, stored  # both workers served
        assert set(accepted) <= raw_event_ids(settings)

        shim.send_signal(signal.SIGTERM)
        assert shim.wait(timeout=90) == 0, shim.communicate()[1][-3000:]
        assert not any(is_running(pid) for pid in workers)
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


@pytest.mark.kafka
def test_a_worker_killed_mid_stream_loses_no_200_and_fails_the_command(kafka, unique_name):
    settings = raw_topic_settings(kafka.settings, unique_name)
    # No spool: a 200 then means Kafka acknowledged the record (a spooled one would wait on
    # the killed worker's disk for the next run).
    shim, port, admin_ports, workers = start_workers(kafka, settings, "--no-spool")
    accepted: list[str] = []
    stop = threading.Event()

    def send() -> None:  # a connection each: the kernel spreads them over both workers
        for number in range(2000):
            if stop.is_set():
                return
            callback = build_callback("UserJoinRoom", {"RoomId": f"room-{number % 5}", "UserId": "u"},
                                      secret=SECRET)
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/callbacks", content=callback.body, timeout=10)
            except httpx.HTTPError:
                continue  # the killed worker's connections; not answered, so not promised
            if answer.status_code == 200:
                accepted.append(answer.json()["EventId"])

    client = threading.Thread(target=send)
    try:
        client.start()
        wait_for(lambda: all(stored_via_kafka(a) > 0 for a in admin_ports) and len(accepted) >= 40,
                 120, "both workers to store callbacks")
        assert client.is_alive(), "the kill must land mid-stream"
        os.kill(workers[0], signal.SIGKILL)
        assert shim.wait(timeout=90) == 128 + signal.SIGKILL, shim.communicate()[1][-3000:]
        assert not is_running(workers[1])  # the supervisor stopped the survivor
    finally:
        stop.set()
        client.join(60)
        if shim.poll() is None:
            shim.kill()
            shim.wait()
    assert not client.is_alive()
    assert len(accepted) >= 40
    assert set(accepted) <= raw_event_ids(settings)


def spool_settings(root: Path):
    return load_settings(bootstrap_servers="127.0.0.1:9", secrets=SECRET, spool_dir=root)


def fill(directory: Path, keys: list[str]) -> None:
    async def write() -> None:
        spool = Spool(directory, 10**8)
        try:
            for key in keys:
                await spool.append(SpoolRecord(key, f"body-{key}".encode(), (("h", key.encode()),)))
        finally:
            spool.close()

    asyncio.run(write())


def contents(directory: Path) -> list[str]:
    async def read() -> list[str]:
        spool = Spool(directory, 10**8)
        try:
            return [entry.record.key for entry in await spool.oldest(10_000)]
        finally:
            spool.close()

    return asyncio.run(read())


def test_fewer_workers_adopt_the_spools_of_the_absent_ones_in_order():
    root = Path(tempfile.mkdtemp(prefix="rtcbus-spool-"))
    fill(root / "worker-0", ["a0", "a1"])
    fill(root / "worker-2", ["c0", "c1", "c2"])
    fill(root / "worker-3", ["d0"])
    fill(root, ["r0", "r1"])  # left by a one-process shim

    moved = adopt_orphaned_spools(spool_settings(root), 2)

    assert moved == 6
    # Orphans in order: the root, worker-2, worker-3, going to worker-0, worker-1, worker-0.
    assert contents(root / "worker-0") == ["a0", "a1", "r0", "r1", "d0"]
    assert contents(root / "worker-1") == ["c0", "c1", "c2"]
    assert contents(root) == contents(root / "worker-2") == contents(root / "worker-3") == []


def test_one_process_adopts_every_worker_spool():
    root = Path(tempfile.mkdtemp(prefix="rtcbus-spool-"))
    fill(root / "worker-1", ["b0", "b1"])

    assert adopt_orphaned_spools(spool_settings(root), 1) == 2
    assert contents(root) == ["b0", "b1"]
    assert contents(root / "worker-1") == []
    assert adopt_orphaned_spools(spool_settings(root), 1) == 0  # nothing left to adopt
