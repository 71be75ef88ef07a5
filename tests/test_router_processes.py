"""``rtcbus router --processes N`` on the real broker: N members of one group under one command,
every callback routed exactly once, SIGTERM handed to each, a member's crash fails the command
and loses or doubles nothing once a fresh router has routed the rest."""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections import Counter, defaultdict

import httpx
import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from consumer.envelope import HEADER_EVENT_ID
from consumer.router.processes import member_settings
from consumer.settings import load_settings
from kafka_helpers import free_ports
from fault_support import output_topics, wait_no_open_transaction
from support import Stack, callback, read_topic, wait_for
from test_pipeline import Sender, assert_exactly_once_in_order

ROOMS = 6


def join(room: str, user: str) -> dict:
    return {"RoomId": room, "UserId": user, "DeviceType": "web", "Timestamp": 1, "ExtraInfo": ""}


def members_of(stack: Stack) -> int:
    """Members of the router group that hold at least one raw partition."""
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    [future] = admin.describe_consumer_groups([stack.group], request_timeout=10).values()
    try:
        group = future.result(timeout=15)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError._TIMED_OUT:
            return 0  # a busy broker; the caller asks again
        raise
    return sum(bool(member.assignment.topic_partitions) for member in group.members)


def member_pids(log: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"router member (router-\d+): pid (\d+)", log)}


def test_each_member_gets_its_own_admin_port_and_transactional_id():
    settings = load_settings(bootstrap_servers="127.0.0.1:1", metrics_port=9200, instance_id="pod-a")
    members = [member_settings(settings, index) for index in range(3)]
    assert [m.metrics_port for m in members] == [9200, 9201, 9202]
    assert [m.instance_id for m in members] == ["pod-a-1", "pod-a-2", "pod-a-3"]
    unset = member_settings(load_settings(bootstrap_servers="127.0.0.1:1", metrics_port=0), 1)
    assert (unset.metrics_port, unset.instance_id) == (0, None)  # no port; a unique id per process


@pytest.mark.kafka
def test_two_members_share_the_partitions_route_each_callback_once_and_stop_on_sigterm(kafka, tmp_path):
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=4)
    try:
        stack.start_shim()
        port = free_ports(2)
        router = stack._spawn(["router", "--processes", "2"], "router", RTCBUS_METRICS_PORT=str(port))
        # Both members answer their probes, each on its own port, and both are in the group.
        wait_for(lambda: router.assert_running() or all(stack._healthy(p) for p in (port, port + 1)), 90, "both members' /healthz")
        wait_for(lambda: members_of(stack) == 2, 90, "two members in the router group, each with partitions")

        sent: dict[str, list[str]] = defaultdict(list)
        with httpx.Client() as client:
            for n in range(120):
                room, event_id = f"room-{n % ROOMS}", f"p-{uuid.uuid4().hex[:8]}-{n}"
                assert stack.post(callback("UserJoinRoom", join(room, f"u{n}"), stack.secret, event_id=event_id), client) == 200
                sent[room].append(event_id)
        stack.wait_caught_up()

        records = read_topic(stack.bootstrap, stack.topic("room"))
        got: dict[str, list[str]] = defaultdict(list)
        for message in records:
            got[message.key().decode()].append(dict(message.headers())[HEADER_EVENT_ID].decode())
        counts = Counter(event_id for ids in got.values() for event_id in ids)
        assert counts == Counter(event_id for ids in sent.values() for event_id in ids)  # each exactly once
        assert dict(got) == dict(sent)  # and in order per room

        pids = member_pids(router.log())
        assert sorted(pids) == ["router-1", "router-2"]
        assert router.stop(timeout_s=90) == 0
        log = router.log()
        assert log.count("router stopped") == 2, log[-3000:]
    finally:
        stack.stop_all()


@pytest.mark.kafka
def test_a_member_killed_mid_stream_fails_the_command_and_a_fresh_router_routes_the_rest_exactly_once(kafka, tmp_path):
    stack = Stack(kafka.bootstrap_servers, tmp_path, partitions=2)
    # The killed member's open transaction holds read_committed readers back until the broker
    # aborts it: 10 s rather than the default 30 s.
    kafka_config = {"RTCBUS_KAFKA_CONFIG": '{"transaction.timeout.ms": "10000"}'}
    try:
        stack.start_shim()
        router = stack._spawn(["router", "--processes", "2"], "router", RTCBUS_METRICS_PORT="0", **kafka_config)
        wait_for(lambda: router.assert_running() or members_of(stack) == 2, 90, "two members in the router group, each with partitions")
        pids = member_pids(router.log())
        assert len(pids) == 2

        # 8 rooms at 10 callbacks/s each for 8 s: the kill lands while callbacks still arrive.
        sender = Sender(stack, rooms=8, per_room=80, interval_s=0.1).start()
        wait_for(lambda: stack.committed_total() >= 100, 90, "the members to route 100 records")
        assert sender.thread.is_alive(), "the kill must land mid-stream"
        os.kill(pids["router-1"], signal.SIGKILL)
        status = router.process.wait(90)
        assert status == 128 + signal.SIGKILL  # the supervisor reports the member's signal
        log = router.log()
        assert "router member router-1 exited with -9: stopping the others" in log, log[-3000:]
        assert "router-2: router stopped" in log, log[-3000:]  # the survivor took its graceful path
        with pytest.raises(ProcessLookupError):
            os.kill(pids["router-2"], 0)

        # A fresh router finishes what the command left: from the group's committed offsets,
        # past the killed member's uncommitted transaction.
        fresh = stack.start_router(**kafka_config)
        sender.join()
        stack.wait_caught_up(timeout_s=180)
        fresh.assert_running()
        wait_no_open_transaction(stack.bootstrap, output_topics(stack))
        assert_exactly_once_in_order(stack, sender)  # read_committed: each accepted EventId once
    finally:
        stack.stop_all()
