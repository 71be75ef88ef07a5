"""The router's admin listener: /metrics, /healthz (the loop turns) and /readyz (subscribed)."""

from __future__ import annotations

import threading

import httpx
import pytest
from confluent_kafka import Producer

from consumer.router import Router
from consumer.router.health import Health, serve_admin
from kafka_helpers import free_ports
from support import Stack, callback, running, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_liveness_fails_only_after_the_loop_has_not_turned_for_stall_s():
    clock = Clock()
    health = Health(stall_s=10, clock=clock)
    clock.now += 9
    assert health.live() == (True, {"phase": "starting", "since_last_pass_s": 9.0})
    assert not health.is_ready()
    health.ready()
    clock.now += 10
    assert health.live()[0] and health.is_ready()
    clock.now += 0.5
    assert health.live() == (False, {"phase": "routing", "since_last_pass_s": 10.5})
    health.beat()
    assert health.live()[0]
    health.stopping()
    assert health.live()[0] and not health.is_ready()


def test_the_admin_app_answers_probes_by_path_and_metrics_otherwise():
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("rtcbus_probe_test", "a counter", registry=registry).inc()
    clock = Clock()
    health = Health(stall_s=5, clock=clock)
    server = serve_admin(health, registry, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert httpx.get(f"{base}/readyz").status_code == 503
        health.ready()
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200 and ready.json() == {"ok": True, "phase": "routing"}
        clock.now += 6
        stalled = httpx.get(f"{base}/healthz")
        assert stalled.status_code == 503 and stalled.json()["since_last_pass_s"] == 6.0
        assert "rtcbus_probe_test_total 1.0" in httpx.get(f"{base}/metrics").text
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.kafka
def test_a_real_router_process_is_ready_once_subscribed_and_serves_its_metrics(kafka, tmp_path):
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=1)
    port = free_ports(1)
    router = stack.start_router(RTCBUS_METRICS_PORT=str(port))
    base = f"http://127.0.0.1:{port}"

    def answers(path: str) -> int | None:
        router.assert_running()
        try:
            return httpx.get(f"{base}{path}", timeout=2).status_code
        except httpx.HTTPError:
            return None

    try:
        wait_for(lambda: answers("/readyz") == 200, 60, "the router's /readyz")
        assert answers("/healthz") == 200
        assert "rtcbus_router_transactions_committed_total" in httpx.get(f"{base}/metrics").text
    finally:
        stack.stop_all()
    assert "router stopped" in router.log()


@pytest.mark.kafka
def test_liveness_fails_while_a_commit_is_stuck_and_recovers_after(kafka, tmp_path):
    """A real router whose transactional producer's commit hangs (as librdkafka's can, when
    a broker restart strands its coordinator): /healthz turns 503 while the loop is held, and
    200 once the call gives up and the loop turns again."""
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=1)
    settings = kafka.settings(
        topic_prefix=stack.prefix, group_id=stack.group, partitions=1, metrics_port=0,
        router_stall_s=2.0, kafka_config={"transaction.timeout.ms": "3000"},
    )
    held = threading.Event()
    release = threading.Event()

    class HangsInItsFirstCommit(Producer):
        def commit_transaction(self, *args):
            if not held.is_set():
                held.set()
                release.wait(30)  # longer than the call's bound: the router gives up on it
            return super().commit_transaction(*args)

    router = Router(settings, producer_factory=HangsInItsFirstCommit)
    server = serve_admin(router.health, router.registry, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with running(router) as errors:
        try:
            wait_for(lambda: errors or httpx.get(f"{base}/readyz").status_code == 200, 60, "ready")
            assert httpx.get(f"{base}/healthz").status_code == 200
            producer = Producer({"bootstrap.servers": stack.bootstrap})
            body = callback("RoomCreate", {"RoomId": "r-stuck", "Timestamp": 1}, stack.secret, event_id="stuck-1")
            producer.produce(stack.raw_topic, body, key=b"r-stuck")
            assert producer.flush(30) == 0
            wait_for(lambda: errors or held.is_set(), 60, "the commit to hang")
            wait_for(lambda: errors or httpx.get(f"{base}/healthz").status_code == 503, 30, "/healthz to fail")
            release.set()
            wait_for(lambda: errors or httpx.get(f"{base}/healthz").status_code == 200, 60, "/healthz to recover")
            assert not errors
        finally:
            release.set()
            server.shutdown()
            server.server_close()
            stack.stop_all()
    assert not errors
