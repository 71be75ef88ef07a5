"""The ``rtcbus-eos-serial`` arm: the router with its commit points serial, as before the
fourth round of issue 14. The next batch is transformed only after the commit has answered,
so the arm beside ``rtcbus-eos`` measures what the overlap gives. A bench seam on a private
method, not a setting: serial commits are not an option a user should pick.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from consumer.settings import Settings


def run(settings: Settings, stop: threading.Event) -> None:
    from confluent_kafka import Message

    from consumer.router import Router

    class SerialRouter(Router):
        def _commit(self, overlap: Sequence[Message] = ()) -> list:
            return super()._commit(())  # the records fetched are handled after, one by one

    SerialRouter(settings).run(stop)
