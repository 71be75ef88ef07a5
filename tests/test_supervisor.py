"""``consumer.supervisor`` with tiny real child processes (no network): a member's exit stops
the others, a stop to the parent reaches every member, a member deaf to SIGTERM is killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from consumer.supervisor import Member, exit_status, supervise

# Each child waits at most this long for what the test does to it, then exits with
# GAVE_UP: a supervisor that never stops a member fails the test instead of hanging it.
CHILD_WAIT_S = 30.0
GAVE_UP = 99

spawn = multiprocessing.get_context("spawn")


# Targets: module level, so that a spawned child imports them.

def wait_for_sigterm(ready, marker: str) -> None:
    """Tell ``ready`` once SIGTERM is caught, wait for it, write ``marker``, exit 0."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ready.set()
    if signal.sigtimedwait({signal.SIGTERM}, CHILD_WAIT_S) is None:
        sys.exit(GAVE_UP)
    Path(marker).write_text("SIGTERM")


def exit_when_set(ready, code: int) -> None:
    """Exit with ``code`` once ``ready`` is set (the other members are listening)."""
    sys.exit(code if ready.wait(CHILD_WAIT_S) else GAVE_UP)


def kill_self_when_set(ready) -> None:
    ready.wait(CHILD_WAIT_S)
    os.kill(os.getpid(), signal.SIGKILL)


def ignore_sigterm(ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(CHILD_WAIT_S)  # until the supervisor kills it
    sys.exit(GAVE_UP)


def sigterm_self_when_all_set(events: list) -> threading.Thread:
    """A thread that sends SIGTERM to this process once every child said it is ready."""

    def send() -> None:
        if all(event.wait(CHILD_WAIT_S) for event in events):
            os.kill(os.getpid(), signal.SIGTERM)

    return threading.Thread(target=send, daemon=True)


def timed(members: list[Member], **kwargs) -> tuple[int, float]:
    started = time.monotonic()
    code = supervise(members, role="test member", **kwargs)
    return code, time.monotonic() - started


@pytest.mark.timeout(60)
def test_a_member_that_fails_stops_the_others_and_its_code_is_returned(tmp_path):
    ready = spawn.Event()
    marker = tmp_path / "waiter"
    code, elapsed = timed(
        [Member("waiter", wait_for_sigterm, (ready, str(marker))), Member("failer", exit_when_set, (ready, 3))],
        stop_timeout_s=20,
    )
    assert code == 3
    assert marker.read_text() == "SIGTERM"  # the waiter was stopped, not left to give up
    assert elapsed < CHILD_WAIT_S


@pytest.mark.timeout(60)
def test_a_member_killed_by_a_signal_gives_128_plus_the_signal(tmp_path):
    ready = spawn.Event()
    marker = tmp_path / "waiter"
    code, _ = timed(
        [Member("waiter", wait_for_sigterm, (ready, str(marker))), Member("victim", kill_self_when_set, (ready,))],
        stop_timeout_s=20,
    )
    assert code == 128 + signal.SIGKILL == 137
    assert marker.read_text() == "SIGTERM"


@pytest.mark.timeout(60)
def test_a_member_that_exits_0_unasked_fails_the_command(tmp_path):
    ready = spawn.Event()
    marker = tmp_path / "waiter"
    code, _ = timed(
        [Member("waiter", wait_for_sigterm, (ready, str(marker))), Member("quitter", exit_when_set, (ready, 0))],
        stop_timeout_s=20,
    )
    assert code == 1
    assert marker.read_text() == "SIGTERM"


@pytest.mark.timeout(60)
def test_sigterm_to_the_parent_stops_every_member_and_gives_0(tmp_path):
    events = [spawn.Event(), spawn.Event()]
    markers = [tmp_path / "a", tmp_path / "b"]
    before = signal.getsignal(signal.SIGTERM)
    sender = sigterm_self_when_all_set(events)
    code, elapsed = timed(
        [Member(f"waiter-{i}", wait_for_sigterm, (event, str(marker)))
         for i, (event, marker) in enumerate(zip(events, markers))],
        stop_timeout_s=20, on_started=sender.start,
    )
    assert code == 0
    assert [marker.read_text() for marker in markers] == ["SIGTERM", "SIGTERM"]
    assert elapsed < CHILD_WAIT_S
    assert signal.getsignal(signal.SIGTERM) is before  # the parent's handler is back


@pytest.mark.timeout(60)
def test_a_member_ignoring_sigterm_is_killed_after_the_stop_timeout():
    # The only member: nothing but the stop itself may start the clock.
    ready = spawn.Event()
    sender = sigterm_self_when_all_set([ready])
    code, elapsed = timed([Member("deaf", ignore_sigterm, (ready,))], stop_timeout_s=1.0, on_started=sender.start)
    assert code == 128 + signal.SIGKILL  # it did not stop when asked: a failure
    assert 1.0 <= elapsed < CHILD_WAIT_S / 2


def test_exit_status_is_what_a_shell_reports():
    assert [exit_status(code) for code in (0, 1, 3, -signal.SIGTERM, -signal.SIGKILL)] == [0, 1, 3, 143, 137]
