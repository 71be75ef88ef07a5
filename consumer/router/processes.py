"""``rtcbus router --processes N``: N members of the router group under one command.

One Python process routes on one core at most (the transform holds the GIL), so a machine
with more cores runs more members. Each member is a whole router in a process of its own,
started with ``spawn`` (librdkafka's threads do not survive a ``fork``): its own consumer,
producer, transactional.id, dedupe window and admin port. The group shares the raw
partitions among them as among routers on different machines; nothing is shared in memory.

The parent only supervises (``consumer.supervisor``). SIGTERM or SIGINT is passed on to
every member, and the parent waits for each to finish its graceful path. A member that exits
on its own (a fatal Kafka error, a crash) is a failure of the whole command: the others are
stopped and the parent exits non-zero, so that the supervisor above (Kubernetes, systemd)
restarts it. Restarting a member in place would hide a crash loop from that supervisor.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from consumer.supervisor import Member, supervise

# How long a member gets for its graceful path (the last commit, leaving the group) once
# the members are being stopped; then it is killed.
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
        first member that failed (``128 + N`` if it was ended by signal N, 1 if it exited 0
        unasked).
    """
    members = [
        Member(f"router-{index + 1}", _member, (member_settings(settings, index),))
        for index in range(processes)
    ]
    return supervise(members, role="router member", stop_timeout_s=_STOP_TIMEOUT_S)


def _member(settings: Any) -> None:
    """One member, in its own process: the CLI's logging, then the router."""
    from consumer.router import run_router

    logging.basicConfig(level=logging.INFO, format="%(processName)s: %(message)s", stream=sys.stderr)
    run_router(settings)
