"""``rtcbus shim --workers N``: N shim processes on one port, one core each.

A shim process is one event loop, so one core; N processes share the public port through
``SO_REUSEPORT``: each worker listens on a socket of its own bound to the same address, and
the kernel spreads new connections over them by a hash of the connection. Each worker is a
whole shim (``consumer.shim``): its own producer, its own delivery bridge, its own spool.

- **Spools.** With the spool on, worker ``i`` keeps its spool in ``<spool_dir>/worker-<i>``:
  a spool is one SQLite file and one forwarder, never shared (``consumer.spool`` locks it).
  Before the workers start, a spool no worker of this run owns (``<spool_dir>`` itself, left by
  a one-process shim, or ``worker-<j>`` with ``j >= N``, left by a run with more workers) is
  *adopted*: its entries are appended, in order, to the spool of worker ``j mod N`` and only
  then deleted from the orphan. A crash in between leaves a copy in both: a duplicate the
  router's EventId dedupe absorbs. The adopting worker starts with a non-empty spool, so it
  forwards those entries before it sends anything new, as a restarted shim does.
- **Admin listeners.** Worker ``i`` serves ``/metrics``, ``/healthz`` and ``/readyz`` on
  ``shim_admin_port + i`` (each with a port of its own when it is 0): one scrape target per
  worker, as Prometheus expects of processes. Aggregating in one endpoint would need
  prometheus_client's multiprocess mode, which cannot serve the spool gauges (callback
  gauges) and changes every metric's storage.
- **Signals.** The parent only supervises (``consumer.supervisor``). SIGTERM or SIGINT to the
  parent is passed to every worker as SIGTERM; each shuts down as one shim does (stop
  accepting, settle in-flight requests, drain the spool for a while, flush) and the parent
  exits 0 when all of them did; a worker still running 60 s later is killed. A worker that
  exits on its own stops the others, and the parent exits non-zero (its code, ``128 + N`` if
  signal N ended it): the orchestrator restarts the whole shim and the spools, on disk, are
  forwarded by the next run.
- **Order.** Callbacks of one room that arrive on different connections may reach different
  workers, as with N shims behind a load balancer: each worker keeps the order of what it
  receives, and a sender that waits for a 200 before the next callback of a room keeps its
  order across workers too, except while one worker spools and another does not.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

from consumer.errors import ConfigError
from consumer.settings import Settings
from consumer.spool import SPOOL_FILE, Spool, SpoolError, SpoolRecord
from consumer.supervisor import Member, supervise

log = logging.getLogger(__name__)

WORKER_DIR = "worker-{}"
# Entries moved per round when adopting an orphaned spool.
ADOPT_BATCH = 1000
# How long a worker gets for its graceful path once the workers are being stopped; then it
# is killed. That path has deadlines of its own, about 35 s at most: in-flight requests
# (ack_timeout_s, under 5 s, for uvicorn and again for the lifespan), the spool drain and
# the last flush (SHUTDOWN_FLUSH_S, 10 s, each).
_STOP_TIMEOUT_S = 60.0


def worker_settings(settings: Settings, index: int, port: int) -> Settings:
    """The settings of worker ``index``: the shared public ``port``, its own admin port and
    spool directory."""
    admin_port = settings.shim_admin_port + index if settings.shim_admin_port else 0
    return settings.model_copy(update={
        "shim_port": port,
        "shim_admin_port": admin_port,
        "spool_dir": settings.spool_path / WORKER_DIR.format(index),
    })


def listening_sockets(host: str, port: int, count: int, backlog: int = 2048) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` with ``SO_REUSEPORT``; port 0 picks one
    free port for all of them.

    Raises:
        ConfigError: the address cannot be bound (in use, not local, no SO_REUSEPORT).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("shim workers: this platform has no SO_REUSEPORT; run --workers 1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # the rest bind the port the first one got
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"shim workers: cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sockets


def adopt_orphaned_spools(settings: Settings, workers: int) -> int:
    """Move the entries of spools no worker of this run owns into the workers' spools.

    With ``workers == 1`` the one spool is ``spool_dir`` itself and every ``worker-<j>`` is
    an orphan; with more, ``spool_dir`` itself and ``worker-<j>``, ``j >= workers``, are.

    Returns:
        How many entries were moved.

    Raises:
        ConfigError: a spool is held by a running process.
    """
    if not settings.spool:
        return 0
    root = settings.spool_path
    owners = [root] if workers == 1 else [root / WORKER_DIR.format(i) for i in range(workers)]
    worker_spools = [path.parent for path in root.glob(f"{WORKER_DIR.format('*')}/{SPOOL_FILE}")]
    orphans = sorted(worker_spools, key=_worker_index)
    if (root / SPOOL_FILE).exists():
        orphans.insert(0, root)
    orphans = [path for path in orphans if path not in owners]
    if not orphans:
        return 0
    return asyncio.run(_adopt(orphans, owners, settings.spool_max_bytes))


def _worker_index(directory: Path) -> int:
    number = directory.name.rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else -1


async def _adopt(orphans: list[Path], owners: list[Path], max_bytes: int) -> int:
    moved = 0
    for number, orphan in enumerate(orphans):
        owner = owners[number % len(owners)]
        source = Spool(orphan, max_bytes)
        target = Spool(owner, max_bytes)
        before = moved
        try:
            while source.depth:
                entries = await source.oldest(ADOPT_BATCH)
                if not entries:
                    break
                # Stored in the adopting spool (fsynced) before they leave the orphan.
                await asyncio.gather(*(target.submit(SpoolRecord(
                    e.record.key, e.record.value, e.record.headers)) for e in entries))
                await source.remove(entries)
                moved += len(entries)
        except SpoolError as exc:
            log.error("spool: could not adopt all of %s (%s); the rest stays there for the next start",
                      orphan, exc.reason)
        finally:
            source.close()
            target.close()
        if moved > before:
            log.warning("spool: %d callbacks of %s adopted by %s", moved - before, orphan, owner)
    return moved


def run_workers(settings: Settings, workers: int) -> int:
    """Serve the shim in ``workers`` processes until SIGTERM/SIGINT; the exit code.

    Returns:
        0 when every worker stopped on request and exited 0; else the exit status of the
        first worker that failed (``128 + N`` if it was ended by signal N, 1 if it exited 0
        unasked).

    Raises:
        ConfigError: the port cannot be bound, the admin ports would overlap the public
            one, or a spool is held by another process.
    """
    if workers < 1:
        raise ConfigError("shim workers: --workers must be at least 1")
    admin = settings.shim_admin_port
    if admin and admin <= settings.shim_port < admin + workers:
        raise ConfigError(
            f"shim workers: admin ports {admin}..{admin + workers - 1} (one per worker) "
            f"include the public port {settings.shim_port}"
        )
    adopt_orphaned_spools(settings, workers)
    sockets = listening_sockets(settings.shim_host, settings.shim_port, workers)
    port = sockets[0].getsockname()[1]
    members = [
        Member(f"rtcbus-shim-{i}", _serve_worker, (worker_settings(settings, i, port), sock))
        for i, sock in enumerate(sockets)
    ]

    def close_sockets() -> None:
        # The workers hold their own copies: a socket left open here would take connections
        # nobody accepts once its worker is gone.
        for sock in sockets:
            sock.close()
        log.info("shim: %d workers on %s:%d", workers, settings.shim_host, port)

    try:
        return supervise(
            members, role="shim worker", stop_timeout_s=_STOP_TIMEOUT_S, on_started=close_sockets
        )
    finally:
        for sock in sockets:
            sock.close()  # if the start failed before close_sockets


def _serve_worker(settings: Settings, sock: socket.socket) -> None:
    from consumer.shim import admin_server, create_app, run_served, shim_server

    # A spawned process starts with logging unconfigured; the same as the CLI's.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    app = create_app(settings)
    public = shim_server(settings, app)

    def stop(signum: int, frame: FrameType | None) -> None:
        public.should_exit = True

    # Outside uvicorn's own handlers (before it serves, after it has): a signal that comes
    # while the app is built still stops the worker, and the one uvicorn raises again once it
    # has shut down for it ends nothing, so a worker stopped gracefully exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    run_served(public, admin_server(settings, app), sockets=[sock])
