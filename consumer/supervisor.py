"""One command, N processes: start them, pass the stop on, fail together.

``rtcbus router --processes N`` and ``rtcbus shim --workers N`` both run whole copies of one
component in processes of their own under one parent. The parent only supervises:

- Members start with ``spawn``, not ``fork``: librdkafka's threads and a parent's client state
  do not survive a ``fork``; a spawned member starts with no threads.
- SIGTERM or SIGINT to the parent is passed to every running member as SIGTERM, and the
  parent waits for each to take its graceful path.
- A member that exits on its own (a fatal Kafka error, a crash, even with status 0) fails the
  command: the others are sent SIGTERM and the parent returns non-zero, so that the
  supervisor above (Kubernetes, systemd) restarts the whole command. Restarting a member in
  place would hide a crash loop from it.
- Once stopping, members get ``stop_timeout_s`` to exit; the ones still running then are
  killed (SIGKILL).

Exit status, as a shell reports it: 0 when every member was asked to stop and exited 0; else
the status of the first member that failed, ``128 + N`` for one ended by signal N (137 for
SIGKILL), and 1 for a member that exited 0 without being asked to.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Member:
    """One process to run: ``target(*args)`` in a spawned process called ``name``. The target
    must be importable at module level, and the args picklable (``spawn`` sends them)."""

    name: str
    target: Callable[..., object]
    args: tuple[Any, ...] = ()


def exit_status(exitcode: int) -> int:
    """A process's status as a shell reports it: ``128 + N`` for one ended by signal N
    (multiprocessing's ``-N``), else its own exit code."""
    return 128 - exitcode if exitcode < 0 else exitcode


def supervise(
    members: Sequence[Member],
    *,
    role: str,
    stop_timeout_s: float,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Run ``members`` until SIGTERM or SIGINT, or until one exits; the command's exit status.

    Must be called from the main thread (it sets the SIGTERM and SIGINT handlers, and
    restores the previous ones before it returns).

    Args:
        members: what to run, one process each, started in order.
        role: how the log names a member: ``"<role> <name>"``.
        stop_timeout_s: how long members get to exit once stopping, before they are killed.
        on_started: called once every member has been started (or the start was cut short
            by a stop), e.g. to close the parent's copies of what the members inherited.

    Returns:
        0 when every member was asked to stop and exited 0; else the status of the first
        member that failed (``128 + N`` for one ended by signal N; 1 for one that exited 0
        on its own).
    """
    context = multiprocessing.get_context("spawn")
    running: list[BaseProcess] = []
    stopping = False
    # The signal handler writes here: it wakes ``wait``, which a signal alone does not
    # interrupt (PEP 475 retries it), so that the stop deadline starts when the stop does.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def stop_all() -> None:
        nonlocal stopping
        stopping = True
        for process in running:
            process.terminate()  # SIGTERM; nothing if it has ended (its sentinel tells)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_all()
        try:
            os.write(wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: ``wait`` wakes anyway

    previous = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
    try:
        for member in members:
            if stopping:
                break
            process = context.Process(target=member.target, args=member.args, name=member.name)
            process.start()
            running.append(process)
            log.info("%s %s: pid %s", role, member.name, process.pid)
            if stopping:
                process.terminate()  # the stop came while it was starting, before the handler saw it
        if on_started is not None:
            on_started()

        failure: int | None = None
        deadline: float | None = None
        killed = False
        while running:
            if stopping and deadline is None:
                deadline = time.monotonic() + stop_timeout_s
            timeout = None if deadline is None or killed else max(deadline - time.monotonic(), 0.0)
            ready = wait([wake_read, *(process.sentinel for process in running)], timeout)
            if wake_read in ready:
                os.read(wake_read, 512)
            if not ready:  # the stop deadline passed: SIGKILL, then wait for them to end
                for process in running:
                    log.error("%s %s did not stop in %.0f s: killed", role, process.name, stop_timeout_s)
                    process.kill()
                killed = True
                continue
            for process in [p for p in running if p.sentinel in ready]:
                running.remove(process)
                process.join()
                code = process.exitcode
                assert code is not None  # its sentinel is ready: it has ended
                if failure is None and (code != 0 or not stopping):
                    failure = exit_status(code) or 1  # exiting 0 unasked is a failure too
                if not stopping:
                    log.error("%s %s exited with %s: stopping the others", role, process.name, code)
                    stop_all()
        return failure or 0
    finally:
        # Only on an error above (a member that could not start, on_started raising): stop
        # what runs, as a stop would.
        if running:
            stop_all()
            deadline = time.monotonic() + stop_timeout_s
            for process in running:
                process.join(max(deadline - time.monotonic(), 0.0))
                if process.is_alive():
                    log.error("%s %s did not stop in %.0f s: killed", role, process.name, stop_timeout_s)
                    process.kill()
                    process.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(wake_read)
        os.close(wake_write)

