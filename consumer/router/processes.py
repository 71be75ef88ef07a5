"""``rtcbus router --processes N``: N members of the router group under one command.

One Python process routes on one core at most (the transform holds the GIL), so a machine
with more cores runs more members. Each member is a whole router in a process of its own,
started with ``spawn`` (librdkafka's threads do not survive a ``fork``): its own consumer,
producer, transactional.id, dedupe window and admin port. The group shares the raw
partitions among them as among routers on different machines; nothing is shared in memory.

The parent only supervises. SIGTERM or SIGINT is passed on to every member, and the parent
waits for each to finish its graceful path. A member that exits on its own (a fatal Kafka
error, a crash) is a failure of the whole command: the others are stopped and the parent
exits non-zero, so that the supervisor above (Kubernetes, systemd) restarts it. Restarting
a member in place would hide a crash loop from that supervisor.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger(__name__)

# How long a member gets for its graceful path (the last commit, leaving the group) once
# the others are being stopped because one failed; then it is killed.
_STOP_TIMEOUT_S = 60.0


def member_settings(settings: Any, index: int) -> Any:
    """The settings of member ``index`` (0-based): its own admin port (``metrics_port`` +
    ``index``, unless 0: none) and, when an instance id is fixed, ``<id>-<index + 1>``, so
    that every member has a transactional.id of its own and none fences another."""
    update: dict[str, Any] = {}
    if settings.metrics_port:
        update["metrics_port"] = settings.metrics_port + index
    if settings.instance_id:
        update["instance_id"] = f"{settings.instance_id}-{index + 1}"
    return settings.model_copy(update=update)


def run_processes(settings: Any, processes: int) -> int:
    """Run ``processes`` router members until SIGTERM or SIGINT; the exit status.

    Returns:
        0 when every member stopped on request and exited 0; else the exit status of the
        first member that failed (1 if it was killed by a signal).
    """
    context = multiprocessing.get_context("spawn")
    members = [
        context.Process(target=_member, args=(member_settings(settings, index),), name=f"router-{index + 1}")
        for index in range(processes)
    ]
    started: list[BaseProcess] = []
    stopping = False

    def stop_all() -> None:
        nonlocal stopping
        stopping = True
        for member in started:
            _signal(member, signal.SIGTERM)

    previous = {signum: signal.signal(signum, lambda *_: stop_all()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for member in members:
            if stopping:
                break
            member.start()
            started.append(member)
            log.info("router member %s: pid %s", member.name, member.pid)
        failed: BaseProcess | None = None
        running = list(started)
        while running:
            for sentinel in wait([member.sentinel for member in running]):
                done = next(member for member in running if member.sentinel == sentinel)
                running.remove(done)
                done.join()
                # A member that fails, or that ends without being asked to, fails the command.
                if failed is None and (done.exitcode != 0 or not stopping):
                    failed = done
                if not stopping:
                    log.error("router member %s exited with %s: stopping the others", done.name, done.exitcode)
                    stop_all()
        if failed is None:
            return 0
        return failed.exitcode if failed.exitcode is not None and failed.exitcode > 0 else 1
    finally:
        for member in started:
            member.join(_STOP_TIMEOUT_S)
            if member.is_alive():
                log.error("router member %s did not stop in %.0f s: killed", member.name, _STOP_TIMEOUT_S)
                member.kill()
                member.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal(member: BaseProcess, signum: int) -> None:
    try:
        if member.pid is not None:
            os.kill(member.pid, signum)
    except ProcessLookupError:
        pass  # it has just exited; its sentinel tells


def _member(settings: Any) -> None:
    """One member, in its own process: the CLI's logging, then the router."""
    from consumer.router import run_router

    logging.basicConfig(level=logging.INFO, format="%(processName)s: %(message)s", stream=sys.stderr)
    run_router(settings)
