"""A room presence tracker: who is in each room, from the room domain topic.

See ``examples/presence/README.md``. :class:`Presence` is the state (no Kafka);
:func:`track` feeds it from a :class:`consumer.subscribe.Subscriber`.
"""

from examples.presence.tracker import ROOM_EVENTS, Presence, track

__all__ = ["ROOM_EVENTS", "Presence", "track"]
