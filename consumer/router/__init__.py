"""The router: raw callbacks in, typed Avro records out, exactly once.

- :mod:`~consumer.router.transform`: the pure step, raw record → routed | duplicate | dead letter;
- :mod:`~consumer.router.dedupe`: the EventId window and its changelog;
- :mod:`~consumer.router.output`: transactions, or flush-then-commit, behind one interface;
- :mod:`~consumer.router.loop`: poll, rebalance, commit points;
- :mod:`~consumer.router.metrics`: what it counts.
"""

from consumer.router.loop import Router, run_router, transactional_id
from consumer.router.transform import DeadLetter, Duplicate, Routed, Transform

__all__ = ["DeadLetter", "Duplicate", "Routed", "Router", "Transform", "run_router", "transactional_id"]
