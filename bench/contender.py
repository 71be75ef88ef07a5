"""One contender of the router comparison, in a process of its own, until SIGTERM or SIGINT.

Run: python -m bench.contender <name> '<settings overrides as JSON>'

Each contender drains ``settings.raw_topic`` as consumer group ``settings.group_id`` and
commits what it processed; the orchestrator (``bench.router``) watches those commits.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import threading

from consumer.settings import Settings, load_settings

# name → module whose ``run(settings, stop)`` is the contender's loop
CONTENDERS = {
    "rtcbus": "bench.contender",
    "members": "bench.members",
    "passthrough": "bench.passthrough",
    "textbook": "bench.textbook",
    "quix": "bench.quix_app",
}


def run(settings: Settings, stop: threading.Event) -> None:
    """The rtcbus router itself; ``settings.exactly_once`` picks transactions or not."""
    from consumer.router import Router

    Router(settings).run(stop)


def main(name: str, overrides: dict) -> None:
    settings = load_settings(**overrides)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    importlib.import_module(CONTENDERS[name]).run(settings, stop)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
