"""The fault suite of "router in production": the product's promises on a 3-broker cluster
while brokers, routers and the network fail.

Every case runs a paced workload of many rooms through a real shim, breaks something mid-stream,
heals it, and then checks the output topics (read_committed, once no transaction is open): every
EventId the shim answered 200 arrived exactly once, each room in order, nothing else arrived,
and ``rtcbus audit`` agrees. Topics have 6 partitions, RF 3, ``min.insync.replicas=2``.

Figures per case (sent, 200s, delivered once, duplicated, lost, recovery time) go to a JSON
report (``RTCBUS_FAULT_REPORT``, default ``<pytest tmp>/fault-report.json``) and to a table
in the terminal summary. Run alone with ``pytest -m faults``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fault_support import (
    CONSUMER_OFFSETS_TOPIC,
    CaseRecord,
    Cluster,
    FaultReport,
    Outcome,
    Routers,
    Toxiproxy,
    Workload,
    check,
    coordinator_partition,
    java_string_hash,
    kafka_abs,
    output_topics,
    run_audit,
    time_to_progress,
    toxiproxy_binary,
    transactional_id_of,
    wait_caught_up,
    wait_routed,
)
from kafka_helpers import free_ports
from support import Stack, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

PARTITIONS = 6
OUTAGE_S = 5.0  # a killed broker stays down this long: past its 4 s broker session
PAUSE_S = 10.0  # a paused broker: more than the launcher's broker.session.timeout.ms=4000
ZOMBIE_PAUSE_S = 15.0  # a paused router: more than its session.timeout.ms=10000
PARTITION_S = 15.0  # a cut-off router: more than its transaction.timeout.ms=10000 below


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fault_report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FaultReport:
    path = Path(os.environ.get("RTCBUS_FAULT_REPORT") or tmp_path_factory.getbasetemp() / "fault-report.json")
    report = FaultReport(path)
    request.config.pluginmanager.register(report, "rtcbus-fault-report")
    return report


@pytest.fixture(scope="session")
def kafka3(kafka_dist: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 3-broker cluster of the suite's own (free ports, data in tmp), started on first use."""
    yield from _running_cluster(
        Cluster(kafka_dist, tmp_path_factory.mktemp("kafka3")), 180,
        "the 3-broker Kafka cluster for the fault suite",
    )


def _running_cluster(cluster: Cluster, timeout_s: float, what: str) -> Iterator[Cluster]:
    try:
        cluster.start(timeout_s=timeout_s)
        cluster.warm_up()
    except Exception as exc:
        cluster.stop()
        pytest.fail(f"{what} did not start: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def toxiproxy(kafka3: Cluster, tmp_path_factory: pytest.TempPathFactory):
    """toxiproxy on 127.0.0.1 with one proxy per broker, in front of its PROXIED listener."""
    try:
        binary = toxiproxy_binary()
    except Exception as exc:
        pytest.fail(f"toxiproxy is missing: {exc}", pytrace=False)
    proxy = Toxiproxy(binary, tmp_path_factory.mktemp("toxiproxy") / "toxiproxy.log")
    try:
        for node_id in kafka3.node_ids:
            proxy.create(f"kafka-{node_id}", kafka3.proxy_ports[node_id], kafka3.listener_ports[node_id])
        yield proxy
    finally:
        proxy.stop()


@dataclass
class Case:
    cluster: Cluster
    stack: Stack
    routers: Routers
    record: CaseRecord
    tmp: Path


@pytest.fixture
def case(kafka3: Cluster, fault_report: FaultReport, request: pytest.FixtureRequest, tmp_path: Path):
    """A healthy cluster, a Stack on fresh topics (6 partitions, RF 3), and the case's record.
    Afterwards every process of the case is stopped, paused brokers resumed."""
    yield from _case_on(kafka3, fault_report, request, tmp_path)


def _case_on(
    cluster: Cluster, fault_report: FaultReport, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Case]:
    record = fault_report.case(request.node.nodeid, request.node.name.removeprefix("test_"))
    cluster.wait_healthy()
    stack = Stack(cluster.bootstrap, tmp_path, partitions=PARTITIONS)
    cluster.wait_healthy([stack.raw_topic, *output_topics(stack)])
    record.phase("set-up")
    yield Case(cluster, stack, Routers(stack), record, tmp_path)
    for node_id in list(cluster._paused):
        cluster.resume(node_id)
    _stop_processes(stack)


def _stop_processes(stack: Stack) -> None:
    running = [p.process for p in stack.processes if p.process and p.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGCONT)  # a paused router cannot handle SIGTERM
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in running:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# -- the verdict ----------------------------------------------------------------------------------


def verify(case: Case, workload: Workload, *, alive=(), expected_dead: Counter | None = None) -> Outcome:
    """Catch up, check the outputs, run the audit; record the figures, then assert.

    ``alive``: routers that must still run at the end. ``expected_dead``: EventId → DLQ
    records expected (none by default).
    """
    stack, record = case.stack, case.record
    record.phase("rest of the workload")
    caught_up_error = None
    try:
        wait_caught_up(stack, case.routers, timeout_s=90)
    except AssertionError as exc:
        caught_up_error = exc
    record.phase("catch-up")
    outcome = check(stack, workload)
    record.take(outcome)
    record.phase("check")
    ledger = workload.write_ledger(case.tmp / "ledger.txt")
    status, audit, audit_output = run_audit(stack, ledger)
    record.phase("audit")
    record.audit = f"exit {status}" + (
        f", lost {audit.get('lost')}, duplicated {audit.get('duplicated')}" if isinstance(audit, dict) else ""
    )
    if outcome.out_of_order:
        record.notes.append(f"rooms out of order: {outcome.out_of_order[:5]}")

    if caught_up_error is not None:
        raise AssertionError(f"{caught_up_error}\n{case.routers.logs()}")
    case.routers.assert_alive(alive)
    assert outcome.answered_200 > 0, "the shim answered no callback with 200"
    assert (outcome.lost[:10], outcome.duplicated[:10]) == ([], []), (
        f"{len(outcome.lost)} lost, {len(outcome.duplicated)} duplicated of {outcome.answered_200} answered 200"
    )
    assert outcome.out_of_order == [], f"rooms out of order: {outcome.out_of_order}"
    assert outcome.unexpected == [], f"records nobody sent (or on the wrong topic): {outcome.unexpected[:10]}"
    assert outcome.misplaced == [], f"records outside their room's partition: {outcome.misplaced[:10]}"
    assert outcome.dead_letters == (expected_dead or Counter()), "dead letters other than expected"
    assert status == 0 and isinstance(audit, dict), f"rtcbus audit exited {status}:\n{audit_output}"
    assert (audit["lost"], audit["duplicated"]) == (0, 0), f"rtcbus audit: {audit}"
    return outcome


def _dead_count(routers: Routers) -> int:
    return sum(1 for r in routers.all if r.process.poll() is not None)


# -- Kafka's arithmetic, checked against Java's own values ---------------------------------------------


def test_java_string_hash_and_kafka_abs_match_java():
    assert java_string_hash("hello") == 99162322
    assert java_string_hash("") == 0
    assert java_string_hash("polygenelubricants") == -(1 << 31)  # Integer.MIN_VALUE
    assert kafka_abs(java_string_hash("polygenelubricants")) == 0
    assert java_string_hash("\U0001F600") == 1772899  # two UTF-16 units: 0xD83D, 0xDE00
    assert coordinator_partition("polygenelubricants", 50) == 0


# -- the cases ------------------------------------------------------------------------------------------


def test_01_raw_partition_leader_killed_and_restarted(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    router = routers.start("0")
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the router to route 200 records")
    case.record.phase("start, until routing")
    leader = cluster.leader(stack.raw_topic, 0)
    kill_restart_and_verify(case, leader, workload, router)


def kill_restart_and_verify(case: Case, node: int, workload: Workload, router) -> None:
    """SIGKILL broker ``node`` mid-stream for ``OUTAGE_S``, restart it, time the recovery,
    let the workload finish, and check everything with read_committed and the audit."""
    case.cluster.kill(node)
    time.sleep(OUTAGE_S)  # the outage
    case.record.phase("outage")
    case.cluster.restart(node)
    case.record.phase("fault")
    case.record.recovered(time_to_progress(case.stack, case.routers, time.monotonic()))
    case.record.phase("recovery")
    assert workload.running, "the fault must land mid-stream"
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[router])


def test_02_transaction_coordinator_killed_and_restarted(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    router = routers.start("0")
    transactional_id = transactional_id_of(router, f"{stack.group}-router-0")
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the router to route 200 records")
    case.record.phase("start, until routing")
    coordinator = cluster.transaction_coordinator(transactional_id)
    case.record.notes.append(f"transactional.id {transactional_id} on node {coordinator}")
    kill_restart_and_verify(case, coordinator, workload, router)


def test_03a_broker_killed_just_after_the_router_starts(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    # The broker that will coordinate the router's group: its loss hurts the start-up most.
    offsets_partitions = cluster.partition_count(CONSUMER_OFFSETS_TOPIC)
    victim = cluster.leader(CONSUMER_OFFSETS_TOPIC, coordinator_partition(stack.group, offsets_partitions))
    workload = Workload(stack).start()
    router = routers.start("0")
    time.sleep(1.5)  # the fault's timing: 1.5 s into the router's start
    cluster.kill(victim)
    time.sleep(OUTAGE_S)
    router.assert_running()
    cluster.restart(victim)
    case.record.phase("fault")
    case.record.recovered(time_to_progress(stack, routers, time.monotonic()))
    case.record.phase("recovery")
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[router])


def test_03b_broker_killed_during_a_rebalance(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    first = routers.start("0")
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the first router to route 200 records")
    case.record.phase("start, until routing")
    coordinator = cluster.group_coordinator(stack.group)
    revoked_before = first.log().count("revoked partitions")
    admin = cluster.admin()

    def rebalancing() -> str | None:
        if first.log().count("revoked partitions") > revoked_before:
            return "the first router gave up partitions"
        try:
            state = admin.describe_consumer_groups([stack.group], request_timeout=2)[stack.group].result(timeout=5).state
        except Exception:
            return None
        return f"group state {state.name}" if state.name != "STABLE" else None

    second = routers.start("1")
    trigger = wait_for(rebalancing, 30, "the second router's join to start a rebalance", 0.05)
    cluster.kill(coordinator)
    case.record.notes.append(f"group coordinator {coordinator} killed at: {trigger}")
    time.sleep(OUTAGE_S)
    cluster.restart(coordinator)
    case.record.phase("fault")
    case.record.recovered(time_to_progress(stack, routers, time.monotonic()))
    case.record.phase("recovery")
    try:
        wait_for(lambda: _two_members_with_partitions(cluster, stack.group), 60, "both routers to hold partitions", 0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: group members hold {cluster.group_members(stack.group)}\n{routers.logs()}") from None
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[first, second])


def _two_members_with_partitions(cluster: Cluster, group: str) -> bool:
    members = cluster.group_members(group)
    return members is not None and len(members) == 2 and all(members)


def test_04_broker_paused_longer_than_its_session(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    router = routers.start("0")
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the router to route 200 records")
    case.record.phase("start, until routing")
    leader = cluster.leader(stack.raw_topic, 0)
    cluster.pause(leader)
    time.sleep(PAUSE_S)  # the fault
    cluster.resume(leader)
    case.record.phase("fault")
    case.record.recovered(time_to_progress(stack, routers, time.monotonic()))
    case.record.phase("recovery")
    cluster.wait_healthy([stack.raw_topic])
    assert workload.running, "the fault must land mid-stream"
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[router])


def test_05_rolling_restart_of_all_brokers(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    router = routers.start("0")
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the router to route 200 records")
    case.record.phase("start, until routing")
    topics = [stack.raw_topic, *output_topics(stack), f"{stack.prefix}.router.dedupe"]
    for node_id in cluster.node_ids:
        cluster.graceful_stop(node_id)
        case.record.phase("graceful stops")
        cluster.start()
        case.record.phase("starts")
        cluster.wait_healthy(topics)  # back in every ISR before the next one goes
        case.record.phase("back in sync")
    case.record.recovered(time_to_progress(stack, routers, time.monotonic()))
    case.record.phase("recovery")
    assert workload.running, "the restarts must land mid-stream"
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[router])


def test_06_router_killed_three_times(case: Case):
    stack, routers = case.stack, case.routers
    stack.start_shim()
    router = routers.start("0")
    workload = Workload(stack).start()
    routed = 0
    for _ in range(3):
        routed += 200
        wait_routed(stack, routers, routed, 60, f"{routed} routed records")
        assert workload.running, "every kill must land mid-stream"
        router.kill()
        router = routers.start("0")
        case.record.phase("fault")
        case.record.recovered(time_to_progress(stack, routers, time.monotonic()))
        case.record.phase("recovery")
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[router])


def test_07_zombie_router_is_fenced(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    zombie = routers.start("0")
    survivor = routers.start("1")
    workload = Workload(stack).start()
    wait_for(lambda: _two_members_with_partitions(cluster, stack.group), 60, "both routers to hold partitions", 0.5)
    wait_routed(stack, routers, 300, 60, "300 routed records")
    case.record.phase("start, until routing")
    paused_at = time.monotonic()
    zombie.process.send_signal(signal.SIGSTOP)
    wait_for(
        lambda: cluster.group_members(stack.group) == [list(range(PARTITIONS))],
        45, "the other router to take every partition", 0.5,
    )
    time.sleep(max(ZOMBIE_PAUSE_S - (time.monotonic() - paused_at), 0))  # the rest of the pause
    zombie.process.send_signal(signal.SIGCONT)
    case.record.phase("fault")
    case.record.recovered(time_to_progress(stack, routers, time.monotonic()))
    case.record.phase("recovery")
    assert workload.running, "the zombie must wake mid-stream"
    workload.finish(min_total_s=40, more_s=8)
    if zombie.process.poll() is not None:
        case.record.notes.append(f"the zombie exited {zombie.process.returncode} after waking")
    verify(case, workload, alive=[survivor])


def test_08_three_identical_routers_one_killed(case: Case):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    replicas = [routers.start(None) for _ in range(3)]
    workload = Workload(stack).start()

    def three_members() -> bool:
        routers.assert_alive(replicas)
        members = cluster.group_members(stack.group)
        return members is not None and len(members) == 3 and all(members)

    wait_for(three_members, 60, "three routers with identical settings to hold partitions", 0.5)
    wait_routed(stack, routers, 300, 60, "300 routed records")
    case.record.phase("start, until routing")
    replicas[1].kill()
    case.record.phase("fault")
    case.record.recovered(time_to_progress(stack, routers, time.monotonic()))
    case.record.phase("recovery")
    assert workload.running, "the kill must land mid-stream"
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[replicas[0], replicas[2]])


def test_09_network_partition_longer_than_the_transaction_timeout(case: Case, toxiproxy: Toxiproxy):
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()  # on the plain listener: it keeps taking callbacks
    router = routers.start(
        "0",
        RTCBUS_BOOTSTRAP_SERVERS=cluster.proxied_bootstrap,
        RTCBUS_KAFKA_CONFIG='{"transaction.timeout.ms": "10000"}',
    )
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the router to route 200 records")
    case.record.phase("start, until routing")
    names = toxiproxy.names()
    try:
        for name in names:
            toxiproxy.set_enabled(name, False)
        time.sleep(PARTITION_S)  # the partition
    finally:
        for name in names:
            toxiproxy.set_enabled(name, True)
    case.record.phase("fault")
    case.record.recovered(time_to_progress(stack, routers, time.monotonic(), timeout_s=120))
    case.record.phase("recovery")
    assert workload.running, "the partition must heal mid-stream"
    workload.finish(min_total_s=30)
    verify(case, workload, alive=[router])


def test_10_poison_records_cost_one_dead_letter_each(case: Case):
    stack, routers = case.stack, case.routers
    stack.start_shim()
    router = routers.start("0")
    poison = {
        0: {10: "surrogate"}, 1: {10: "deep"}, 2: {10: "no-room"},
        3: {20: "surrogate", 21: "deep", 22: "no-room"}, 4: {40: "deep"}, 5: {40: "surrogate"},
    }
    workload = Workload(stack, poison=poison).start()
    workload.finish(min_total_s=30)
    posted = [p for p in workload.posted if p.poison]
    assert len(posted) == sum(len(v) for v in poison.values()), "every poison body was posted"
    refused = [(p.poison, p.status) for p in posted if p.status != 200]
    if refused:
        case.record.notes.append(f"the shim refused: {refused}")
    accepted_poison = Counter({p.event_id: 1 for p in posted if p.status == 200})
    verify(case, workload, alive=[router], expected_dead=accepted_poison)
    # A hostile body is a request that can never succeed: a clear 4xx, never a 5xx or no answer.
    assert all(status is not None and 400 <= status < 500 for _, status in refused), (
        f"the shim answered hostile bodies with other than 200 or a 4xx (kind, status): {refused}"
    )
    # The rooms go on behind their poison: later callbacks of the same room were routed.
    ledger = {(p.room, p.sequence) for p in workload.ledger() if p.poison is None}
    for room_number, points in poison.items():
        room = workload.room_names[room_number]
        assert any(r == room and s > max(points) for r, s in ledger), f"{room} stopped at its poison"


# -- the shim's spool: Kafka away longer than the sender's patience ---------------------------------

SPOOL_OUTAGE_S = 60.0  # Kafka down: 4 times the vendor's 3 tries of 5 s


@pytest.fixture(scope="session")
def kafka1(kafka_dist: Path, tmp_path_factory: pytest.TempPathFactory):
    """A one-broker cluster of the spool cases' own: the whole of Kafka, stopped and started
    in seconds (a 3-broker cluster takes minutes to come back from a full stop)."""
    yield from _running_cluster(
        Cluster(kafka_dist, tmp_path_factory.mktemp("kafka1"), brokers=1), 120,
        "the one-broker Kafka for the spool cases",
    )


@pytest.fixture
def spool_case(kafka1: Cluster, fault_report: FaultReport, request: pytest.FixtureRequest, tmp_path: Path):
    """As ``case``, on the one-broker cluster (topics with RF 1), started again if a case
    left it down."""
    if not kafka1.local.status()[0].pid:
        kafka1.start()
    yield from _case_on(kafka1, fault_report, request, tmp_path)


def _kafka_down(cluster: Cluster) -> None:
    for node_id in cluster.node_ids:
        cluster.kill(node_id)


def _kafka_up(cluster: Cluster) -> None:
    cluster.start()
    cluster.wait_healthy()


def _shim_metrics(stack: Stack, admin_port: str | None = None) -> dict[str, float]:
    port = admin_port or stack.env["RTCBUS_SHIM_ADMIN_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        sample.name + "".join(f"{{{v}}}" for v in sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _spool_drained(stack: Stack, admin_port: str | None = None) -> bool:
    return _shim_metrics(stack, admin_port)["rtcbus_shim_spool_depth"] == 0


def test_11_kafka_down_for_a_minute_every_callback_is_answered_200_and_arrives(spool_case: Case):
    case = spool_case
    cluster, stack, routers = case.cluster, case.stack, case.routers
    stack.start_shim()
    router = routers.start("0")
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the router to route 200 records")
    case.record.phase("start, until routing")
    _kafka_down(cluster)
    outage_started = time.monotonic()
    time.sleep(SPOOL_OUTAGE_S)  # the outage, with the workload running through it
    case.record.phase("outage")
    spooled = _shim_metrics(stack)["rtcbus_shim_stored_total{spool}"]
    _kafka_up(cluster)
    case.record.phase("fault")
    case.record.notes.append(
        f"{spooled:.0f} callbacks answered 200 from the spool in {time.monotonic() - outage_started:.0f} s without Kafka"
    )
    assert workload.running, "Kafka must come back mid-stream"
    workload.finish(min_total_s=30)
    wait_for(lambda: _spool_drained(stack), 120, "the spool to drain")
    case.record.phase("drain")
    assert spooled > 500, f"only {spooled} callbacks went through the spool in a {SPOOL_OUTAGE_S:.0f} s outage"
    # The vendor's view: not one callback failed its 3 tries.
    failed = [(p.event_id, p.status) for p in workload.posted if p.status != 200]
    assert failed == [], f"{len(failed)} callbacks were not answered 200: {failed[:10]}"
    verify(case, workload, alive=[router])


def test_12_shim_sigkilled_mid_outage_forwards_all_it_answered_and_a_replayed_spool_costs_nothing(spool_case: Case):
    case = spool_case
    cluster, stack, routers = case.cluster, case.stack, case.routers
    shim = stack.start_shim()
    router = routers.start("0")
    workload = Workload(stack).start()
    wait_routed(stack, routers, 200, 60, "the router to route 200 records")
    case.record.phase("start, until routing")
    _kafka_down(cluster)
    time.sleep(SPOOL_OUTAGE_S / 3)  # spooling, with the workload running
    shim.kill()  # SIGKILL: nothing is flushed, the spool is all there is
    # The spool as the kill left it: every entry in it is also about to be forwarded by the
    # restarted shim, exactly the state of a crash between a delivery and its delete.
    replay_dir = case.tmp / "spool-replay"
    replay_dir.mkdir()
    copied = _copy_spool(stack, replay_dir)
    stack.start_shim()
    time.sleep(SPOOL_OUTAGE_S / 3)  # more spooling, on the restarted shim
    case.record.phase("outage, shim killed and restarted")
    _kafka_up(cluster)
    case.record.phase("fault")
    assert workload.running, "Kafka must come back mid-stream"
    workload.finish(min_total_s=30)
    wait_for(lambda: _spool_drained(stack), 120, "the spool to drain")
    # A second shim forwards the copy of the killed shim's spool: all duplicates.
    replay_admin = str(free_ports(1))
    stack.start_shim(
        RTCBUS_SPOOL_DIR=str(replay_dir),
        RTCBUS_SHIM_PORT=str(free_ports(1)),
        RTCBUS_SHIM_ADMIN_PORT=replay_admin,
    )
    wait_for(lambda: _spool_drained(stack, replay_admin), 60, "the copied spool to be forwarded")
    forwarded_again = _shim_metrics(stack, replay_admin)["rtcbus_shim_spool_forwarded_total"]
    case.record.phase("replayed spool")
    case.record.notes.append(f"{copied} spooled entries forwarded twice")
    assert copied > 100 and forwarded_again == copied, (copied, forwarded_again)
    verify(case, workload, alive=[router])


def _copy_spool(stack: Stack, target: Path) -> int:
    """Copy the stack's spool with SQLite's backup API (consistent, WAL included); returns its
    entry count."""
    source = sqlite3.connect(Path(stack.env["RTCBUS_SPOOL_DIR"]) / "spool.db")
    copy = sqlite3.connect(target / "spool.db")
    try:
        source.backup(copy)
        (count,) = copy.execute("SELECT count(*) FROM entries").fetchone()
    finally:
        source.close()
        copy.close()
    return count
