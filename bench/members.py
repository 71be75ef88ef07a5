"""The router as ``rtcbus router --processes N`` runs it: N members of the group, one process each.

A contender of the router comparison (``bench.contender``), for scaling from one process to N.
"""

from __future__ import annotations

import threading

from consumer.settings import Settings


def run(settings: Settings, stop: threading.Event) -> None:
    """``rtcbus router --processes settings.router_processes``; SIGTERM stops every member
    (the supervisor installs its own handlers, so ``stop`` is not needed)."""
    from consumer.router.processes import run_processes

    status = run_processes(settings, settings.router_processes)
    if status:
        raise SystemExit(status)
