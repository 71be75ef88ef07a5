"""``python -m examples.presence``: print room membership as it changes, as JSON lines.

Settings are rtcbus's (``RTCBUS_BOOTSTRAP_SERVERS``, ``RTCBUS_TOPIC_PREFIX``...). Each change
prints ``{"room": ..., "visible": [...], "invisible": [...]}``; on exit (Ctrl-C, SIGTERM or
``--max-events``) the whole state prints as ``{"rooms": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import uuid

from consumer.settings import load_settings
from consumer.subscribe import Subscriber
from examples.presence.tracker import ROOM_EVENTS, Presence, track


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.presence", description=__doc__)
    parser.add_argument(
        "--group",
        help="consumer group (default: a fresh one, so the in-memory state is rebuilt from the "
        "beginning of the topic at every start)",
    )
    parser.add_argument("--max-events", type=int, help="stop after this many room events")
    args = parser.parse_args(argv)

    settings = load_settings()
    subscriber = Subscriber(
        settings, args.group or f"presence-{uuid.uuid4().hex[:12]}", event_types=ROOM_EVENTS
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: subscriber.stop())
    presence = Presence()

    def print_room(room_id: str, state: Presence) -> None:
        room = state.rooms.get(room_id)
        members = room.to_dict() if room else {"visible": [], "invisible": []}
        print(json.dumps({"room": room_id, **members}), flush=True)

    track(subscriber, presence, on_change=print_room, max_events=args.max_events)
    print(json.dumps({"rooms": presence.to_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
