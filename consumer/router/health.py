"""The router's admin listener: ``/metrics``, ``/healthz`` and ``/readyz`` on one port.

A router has no public port; this one is for Prometheus and for the kubelet's probes.

- ``/healthz`` (liveness) is 200 while the loop keeps turning: it stamps :meth:`Health.beat`
  on every pass, and a pass that has not come for ``stall_s`` means the process is stuck
  (a librdkafka call that never returns, a deadlock) and is better restarted. The router's
  own slow steps stay well inside the default: a commit gives up after the transaction
  timeout (30 s) and the dedupe window's restore after 60 s.
- ``/readyz`` (readiness) is 200 from the moment the router has subscribed until it begins
  to stop. A router with no partitions assigned (more replicas than partitions) is ready:
  it is a healthy standby, not a fault.

Served by prometheus_client's WSGI app behind a small dispatcher and the stdlib's threading
WSGI server, so that a scrape never waits for the routing loop.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class Health:
    """What the probes answer from: a heartbeat and the router's phase."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self._clock = clock
        self._last_beat = clock()
        self._phase = "starting"

    def beat(self) -> None:
        self._last_beat = self._clock()

    def ready(self) -> None:
        self._phase = "routing"
        self.beat()

    def stopping(self) -> None:
        self._phase = "stopping"

    def live(self) -> tuple[bool, dict[str, Any]]:
        since = self._clock() - self._last_beat
        # Before the first pass the router is still starting (subscribe, producer init):
        # those steps have timeouts of their own, so they count against the same limit.
        alive = since <= self.stall_s
        return alive, {"phase": self._phase, "since_last_pass_s": round(since, 3)}

    def is_ready(self) -> bool:
        return self._phase == "routing"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # probes every few seconds would drown the router's own log


def admin_app(health: Health, registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: the probes by path, and the metrics for every other path."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok, body = health.live()
        elif path == "/readyz":
            ok = health.is_ready()
            body = {"phase": health.live()[1]["phase"]}
        else:
            return metrics(environ, start_response)
        payload = json.dumps({"ok": ok, **body}).encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    return app


def serve_admin(health: Health, registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Start the admin listener in a daemon thread; ``server.server_address`` has its port."""
    server = make_server(host, port, admin_app(health, registry), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="router-admin", daemon=True).start()
    return server
