"""Who is in each room, kept from room events; idempotent by EventId."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from consumer.subscribe import Delivery, Subscriber

# What the tracker reads of the room domain; the rest of it (nothing else today) is skipped.
ROOM_EVENTS = (
    "UserJoinRoom", "UserLeaveRoom", "InvisibleUserJoinRoom", "InvisibleUserLeaveRoom",
    "RoleChangeInvisible2Visible", "RoleChangeVisible2Invisible", "RoomCreate", "RoomDestroy",
)


@dataclass
class Room:
    visible: set[str] = field(default_factory=set)
    invisible: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, list[str]]:
        return {"visible": sorted(self.visible), "invisible": sorted(self.invisible)}


class Presence:
    """The members of every room, visible and invisible.

    Applying an event twice (same EventId) changes nothing the second time: the subscriber
    delivers at least once, and the vendor may send an event twice outside the router's
    dedupe window. The EventIds remembered are the last ``remember`` ones: redelivery only
    goes back to the group's last commit, so a window suffices.
    """

    def __init__(self, remember: int = 100_000) -> None:
        self.rooms: dict[str, Room] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def apply(self, delivery: Delivery) -> str | None:
        """Apply one room event; returns the RoomId it changed, None for a duplicate."""
        if delivery.event_id in self._seen:
            return None
        self._seen[delivery.event_id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        data = delivery.event.EventData
        kind = delivery.event_type
        if kind == "RoomDestroy":  # every visible user has left it
            self.rooms.pop(data.RoomId, None)
            return data.RoomId
        room = self.rooms.setdefault(data.RoomId, Room())
        if kind == "UserJoinRoom" or kind == "RoleChangeInvisible2Visible":
            room.invisible.discard(data.UserId)
            room.visible.add(data.UserId)
        elif kind == "UserLeaveRoom":
            room.visible.discard(data.UserId)
        elif kind == "InvisibleUserJoinRoom" or kind == "RoleChangeVisible2Invisible":
            room.visible.discard(data.UserId)
            room.invisible.add(data.UserId)
        elif kind == "InvisibleUserLeaveRoom":
            room.invisible.discard(data.UserId)
        return data.RoomId

    def to_dict(self) -> dict[str, dict[str, list[str]]]:
        """RoomId → {"visible": [...], "invisible": [...]}, sorted."""
        return {room_id: self.rooms[room_id].to_dict() for room_id in sorted(self.rooms)}


def track(
    subscriber: Subscriber,
    presence: Presence,
    on_change: Callable[[str, Presence], object] | None = None,
    max_events: int | None = None,
) -> int:
    """Apply every delivery of ``subscriber`` to ``presence`` until it stops (or after
    ``max_events`` deliveries), then close it; returns how many were delivered.

    Raises:
        BadRecord: a record of the room topic that does not decode (not skipped silently).
    """
    count = 0
    with subscriber:
        for delivery in subscriber:
            changed = presence.apply(delivery)
            if changed is not None and on_change is not None:
                on_change(changed, presence)
            count += 1
            if max_events is not None and count >= max_events:
                break
    return count
