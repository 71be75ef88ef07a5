"""examples/presence: the room presence tracker, as a service on the real broker and as state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from consumer.envelope import parse_envelope
from consumer.events import models
from consumer.examples import load_examples
from consumer.routing import RoutingTable
from consumer.subscribe import Delivery
from examples.presence import Presence
from support import callback

ROOT = Path(__file__).parents[1]


def delivery(event_type: str, room: str, user: str | None = None, event_id: str | None = None) -> Delivery:
    data = {"RoomId": room, **({"UserId": user} if user else {})}
    envelope = parse_envelope(callback(event_type, data, "secret", event_id=event_id))
    event = models().validate(envelope)
    return Delivery(event, event_type, envelope.event_id, "t", 0, 0, room, None, ())


def test_presence_is_idempotent_by_event_id():
    presence = Presence()
    join = delivery("UserJoinRoom", "r1", "ann")
    assert presence.apply(join) == "r1"
    assert presence.apply(delivery("UserLeaveRoom", "r1", "ann")) == "r1"
    assert presence.apply(join) is None  # redelivered after the leave: no ghost
    assert presence.to_dict() == {"r1": {"visible": [], "invisible": []}}


def test_presence_forgets_the_oldest_event_ids_past_its_window():
    presence = Presence(remember=2)
    first = delivery("UserJoinRoom", "r1", "ann")
    presence.apply(first)
    presence.apply(delivery("UserJoinRoom", "r1", "bob"))
    presence.apply(delivery("UserJoinRoom", "r1", "cid"))
    assert presence.apply(first) == "r1"  # out of the window: applied again


# (EventType, room, user) in the order sent; what each room holds at the end is below.
SCENARIO = [
    ("UserJoinRoom", "room-a", "alice"),
    ("UserJoinRoom", "room-a", "bob"),
    ("UserLeaveRoom", "room-a", "alice"),
    ("InvisibleUserJoinRoom", "room-a", "carol"),
    ("UserJoinRoom", "room-a", "dave"),
    ("RoleChangeVisible2Invisible", "room-a", "dave"),
    ("RoleChangeInvisible2Visible", "room-a", "carol"),
    ("RoomCreate", "room-b", None),
    ("UserJoinRoom", "room-b", "erin"),
    ("InvisibleUserJoinRoom", "room-b", "frank"),
    ("UserLeaveRoom", "room-b", "erin"),
    ("UserJoinRoom", "room-c", "gina"),
    ("RoomDestroy", "room-c", None),
]
EXPECTED = {
    "room-a": {"visible": ["bob", "carol"], "invisible": ["dave"]},
    "room-b": {"visible": [], "invisible": ["frank"]},
    # The vendor's examples, in the page's order, end with RoomDestroy, and so does room-c:
    # neither room is left.
}


@pytest.mark.kafka
def test_the_service_ends_with_the_right_membership(stack):
    stack.start_shim()
    stack.start_router()
    table = RoutingTable()
    room_examples = [e for e in load_examples() if table.route(e.event_type).domain == "room"]
    assert len(room_examples) == 8
    for example in room_examples:
        body = callback(example.event_type, example.event_data, stack.secret, version=example.version)
        assert stack.post(body) == 200
    rooms = {name: f"{name}-{uuid.uuid4().hex[:6]}" for name in ("room-a", "room-b", "room-c")}
    for event_type, room, user in SCENARIO:
        data = {"RoomId": rooms[room], **({"UserId": user} if user else {})}
        event_id = uuid.uuid4().hex
        assert stack.post(callback(event_type, data, stack.secret, event_id=event_id)) == 200
        if event_type == "UserLeaveRoom":  # the vendor sends it again: the router drops the copy
            assert stack.post(callback(event_type, data, stack.secret, event_id=event_id)) == 200
    # A stream event: another domain, never seen by the tracker.
    stream = {"RoomId": rooms["room-a"], "UserId": "zed"}
    assert stack.post(callback("UserAudioStreamStart", stream, stack.secret)) == 200

    result = subprocess.run(
        [sys.executable, "-m", "examples.presence", "--max-events", str(len(room_examples) + len(SCENARIO))],
        cwd=ROOT, env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    final = lines[-1]["rooms"]
    assert final == {rooms[name]: members for name, members in EXPECTED.items()}
    # One line per event applied (the copy of each leave was dropped by the router).
    changes = Counter(line["room"] for line in lines[:-1])
    assert changes == Counter(
        [room_examples[0].event_data["RoomId"]] * len(room_examples) + [rooms[room] for _, room, _ in SCENARIO]
    )
