"""Cost of the shim against its framework: requests/s, latency and server CPU per request.

Run: .venv/bin/python -m bench.shim_bridge [--seconds 10] [--rounds 3] [--connections 64,256]
         [--arms bare,no-kafka,bridge,per-report,workers-2] [--bootstrap HOST:PORT]

The servers, each in a process of its own, all on the shim's own uvicorn configuration
(``consumer.shim.shim_server``: uvloop, httptools, the head timeout, the concurrency bound, no
access log):

- ``bare``: the same framework and server with a ``POST /callbacks`` route that reads the
  body and answers 200 with nothing else: what Starlette and uvicorn cost alone;
- ``bare-asgi``: the same server with a plain ASGI app that reads the body and answers 200,
  no Starlette: the shim sends ``POST /callbacks`` past Starlette's router (``ShimApp``), so
  this is the floor of the server the shim runs on;
- ``no-kafka``: the real shim (body limit, envelope parse, signature check, metrics) whose
  bridge answers at once, without Kafka;
- ``bridge``: the real shim: produce with acks=all, idempotent, 200 after the delivery
  report, reports handed to the event loop once per poll() batch;
- ``per-report``: the same with one ``call_soon_threadsafe`` per delivery report (the
  textbook bridge), to show what batching the hand-over buys;
- ``workers-N``: ``rtcbus shim --workers N``, the real shim in N processes on one port.

The load comes from oha (``sh bench/tools.sh`` builds it into ~/.cache/rtcbus/tools), an
external HTTP/1.1 keep-alive load generator in Rust on one thread of its own, so the client
costs the server's cores little and no Python client sets the ceiling. Without oha the section
reports "not installed". Each request's body is a line drawn at random from a file of signed
callbacks of the workload mix (``oha -Z``), so EventIds repeat within a run: the shim does not
dedupe (each copy is a record in the raw topic, the router's dedupe drops it), so a repeat
costs the shim what a fresh one does.

Without ``--bootstrap`` a one-node Kafka is started for the run (consumer.kafka.launcher) in
a temporary directory and stopped afterwards. The server's CPU time (all its threads and
worker processes, librdkafka's included) is read from /proc around the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.broker import bench_kafka
from bench.workload import SECRET

TOPIC_PREFIX = "bench"
ARMS = ("bare", "bare-asgi", "no-kafka", "bridge", "per-report")
# Distinct signed bodies oha draws from; signed just before each run (the skew window is 5 min).
BODIES = 5000


# -- the servers ------------------------------------------------------------------------------


def serve(arm: str, port: int, bootstrap: str, topic_prefix: str = TOPIC_PREFIX) -> None:
    import logging

    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from consumer.envelope import SignatureVerifier
    from consumer.ingest import Ingest
    from consumer.settings import load_settings
    from consumer.shim import (
        DeliveryBridge, Shim, ShimApp, ShimMetrics, _settle, create_app, shim_producer_config,
        shim_server,
    )

    settings = load_settings(
        bootstrap_servers=bootstrap, topic_prefix=topic_prefix, secrets=SECRET,
        shim_host="127.0.0.1", shim_port=port, spool_dir=tempfile.mkdtemp(prefix="bench-spool-"),
    )

    class NoKafkaBridge(DeliveryBridge):
        """Acknowledges every record at once, without Kafka."""

        def __init__(self) -> None:
            self.fatal_error = None
            self._loop = None

        def start(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

        @property
        def healthy(self) -> bool:
            return True

        def stop(self, flush_timeout_s: float = 0) -> int:
            return 0

        def produce(self, topic, value, key, headers):  # type: ignore[override]
            future = self._loop.create_future()
            future.set_result(None)
            return future

    class PerReportBridge(DeliveryBridge):
        """Hands each delivery report to the event loop on its own."""

        def _on_delivery(self, future, error, message) -> None:  # type: ignore[override]
            self._loop.call_soon_threadsafe(_settle, [(future, error, message)])

    async def read_and_answer(request: Request) -> Response:
        await request.body()
        return Response()

    async def healthy(request: Request) -> Response:
        return Response()

    async def bare_asgi(scope, receive, send) -> None:
        if scope["type"] != "http":
            return  # no lifespan to run
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    if arm == "bare-asgi":
        app = bare_asgi
    elif arm == "bare":
        app = Starlette(routes=[
            Route("/callbacks", read_and_answer, methods=["POST"]),
            Route("/healthz", healthy, methods=["GET"]),
        ])
    elif arm == "bridge":
        app = create_app(settings)
    else:
        bridge = (
            NoKafkaBridge() if arm == "no-kafka" else PerReportBridge(shim_producer_config(settings))
        )
        shim = Shim(
            settings,
            bridge=bridge,
            # No spool: Kafka (or the stand-in) answers well within spool_after_s here.
            ingest=Ingest(bridge, settings.raw_topic, open_spool=None, spool_after_s=settings.spool_after_s),
            metrics=ShimMetrics(CollectorRegistry()),
            verifier=SignatureVerifier.from_settings(settings),
        )
        app = ShimApp(
            shim,
            routes=[
                Route("/callbacks", shim.receive_callback, methods=["POST"]),
                Route("/healthz", shim.healthz, methods=["GET"]),
            ],
            lifespan=shim.lifespan,
        )
    server = shim_server(settings, app)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server.run()


# -- the load generator -------------------------------------------------------------------------


def oha_path() -> str | None:
    """The oha binary: on PATH, or where ``bench/tools.sh`` puts it; None when neither."""
    found = shutil.which("oha")
    if found:
        return found
    cached = Path(os.environ.get("RTCBUS_TOOLS_DIR", Path.home() / ".cache/rtcbus/tools")) / "bin/oha"
    return str(cached) if cached.is_file() and os.access(cached, os.X_OK) else None


def body_file(directory: Path, count: int = BODIES) -> Path:
    """``count`` signed callbacks of the workload mix, one per line, signed now."""
    from bench.workload import raw_records

    path = directory / "bodies.jsonl"
    bodies = [record.body for record in raw_records(count, prefix=f"shim-{time.time_ns()}")]
    assert not any(b"\n" in body for body in bodies), "a body must fit on one line for oha -Z"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path


def oha(binary: str, port: int, bodies: Path, seconds: float, connections: int,
        rate: float = 0) -> dict:
    """Run oha against ``POST /callbacks`` for ``seconds`` (at most ``rate`` requests/s if
    given); its figures."""
    completed = subprocess.run(
        [binary, "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
         "-c", str(connections), "--worker-threads", "1", "-m", "POST",
         *(["-q", str(rate)] if rate else []),
         "-T", "application/json", "-Z", str(bodies), f"http://127.0.0.1:{port}/callbacks"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )
    report = json.loads(completed.stdout)
    latency = report["metrics"]["latency_ms"]
    return {
        "requests": sum(report["statusCodeDistribution"].values()),
        "rps": report["metrics"]["requests_per_sec"],
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "statuses": report["statusCodeDistribution"],
        "errors": report["errorDistribution"],
    }


# The Python client of bench.shim_spool and bench.latency, which check every EventId they sent
# and so need each request's body of their own; this section's load is oha's.


def request_bytes(port: int, body: bytes) -> bytes:
    """A keep-alive ``POST /callbacks`` of ``body``."""
    return (
        f"POST /callbacks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> str:
    """Send one request on a keep-alive connection and read the answer; its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return head[9:12].decode()


# -- the orchestration ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_healthy(port: int, server: subprocess.Popen, timeout_s: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not come up")


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its child processes (``rtcbus shim --workers N``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_seconds(pid) + sum(cpu_seconds(int(child)) for child in children)


def server_command(arm: str, port: int, bootstrap: str, spool_dir: str) -> list[str]:
    if arm.startswith("workers-"):
        return [sys.executable, "-m", "consumer.cli", "--bootstrap-servers", bootstrap,
                "--topic-prefix", TOPIC_PREFIX, "shim", "--port", str(port), "--admin-port", "0",
                "--secrets", SECRET, "--spool-dir", spool_dir, "--workers", arm.split("-", 1)[1]]
    return [sys.executable, "-m", "bench.shim_bridge", "serve", arm, str(port), bootstrap]


def run_arm(arm: str, bootstrap: str, seconds: float, connections: int, warmup_s: float,
            binary: str, rate: float = 0) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-shim-") as scratch:
        server = subprocess.Popen(
            server_command(arm, port, bootstrap, str(Path(scratch) / "spool")),
            stderr=subprocess.PIPE, text=True,
        )
        try:
            wait_until_healthy(port, server)
            bodies = body_file(Path(scratch))
            if warmup_s:
                oha(binary, port, bodies, warmup_s, connections, rate)
            cpu_before = process_tree_cpu_seconds(server.pid)
            result = oha(binary, port, bodies, seconds, connections, rate)
            cpu_after = process_tree_cpu_seconds(server.pid)
            result["server_cpu_us_per_request"] = (
                (cpu_after - cpu_before) / max(result["requests"], 1) * 1e6
            )
            return result
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                _, errors = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                _, errors = server.communicate()
            if server.returncode not in (0, -signal.SIGTERM):
                print(f"{arm} server exited with {server.returncode}: {errors[-2000:]}",
                      file=sys.stderr)


def run(bootstrap: str, seconds: float, rounds: int, connections: Sequence[int],
        warmup_s: float, arms: Sequence[str] = ARMS, rate: float = 0) -> dict:
    """Each arm at each connection count, interleaved round by round; medians and ratios.

    Every arm's req/s is also given against ``bare`` (the framework alone) and ``no-kafka``
    (the shim without Kafka), when those ran. With ``rate``, oha sends at most that many
    requests/s: every arm then serves the same rate, and its server CPU µs/request is
    comparable on a machine too busy for its req/s to be."""
    from consumer.kafka.admin import ensure_topics
    from consumer.settings import load_settings

    binary = oha_path()
    if binary is None:
        return {"status": "not installed: oha (sh bench/tools.sh builds it)"}
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    ensure_topics(load_settings(bootstrap_servers=bootstrap, topic_prefix=TOPIC_PREFIX))
    runs: dict[int, dict[str, list[dict]]] = {c: {arm: [] for arm in arms} for c in connections}
    for _ in range(rounds):
        for count in connections:
            for arm in arms:
                runs[count][arm].append(
                    run_arm(arm, bootstrap, seconds, count, warmup_s, binary, rate))
    result: dict = {"status": "ok", "load_generator": version, "rate": rate, "seconds": seconds,
                    "rounds": rounds, "warmup_s": warmup_s, "connections": {}}
    for count, by_arm in runs.items():
        rows = {
            arm: {
                "runs": results,
                **{key: median(results, key) for key in
                   ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_request")},
            }
            for arm, results in by_arm.items()
        }
        for baseline in ("bare", "bare-asgi", "no-kafka"):
            if baseline in rows:
                for row in rows.values():
                    row[f"vs_{baseline.replace('-', '_')}"] = row["rps"] / rows[baseline]["rps"]
        result["connections"][str(count)] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--connections", default="64", help="comma-separated counts")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs per arm, interleaved; medians shown")
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated, of {', '.join(ARMS)}, workers-N")
    parser.add_argument("--rate", type=float, default=0,
                        help="requests/s oha sends at most (0: as fast as the server answers)")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} x {args.seconds:.0f} s per arm "
          f"(interleaved, each after {args.warmup:.0f} s warm-up)")
    with bench_kafka(args.bootstrap) as kafka:
        result = run(kafka.bootstrap_servers, args.seconds, args.rounds, connections,
                     args.warmup, args.arms.split(","), args.rate)
    if result["status"] != "ok":
        print(result["status"])
        return
    print(f"load: {result['load_generator']}")
    print(f"{'conns':>5} {'arm':<11} {'req/s':>8} {'vs bare':>8} {'vs no-K':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'CPU us/req':>11}  (medians; req/s of each round)  statuses")
    for count, rows in result["connections"].items():
        for arm, row in rows.items():
            statuses: dict[str, int] = {}
            for r in row["runs"]:
                for status, n in r["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + n
            each = ", ".join(f"{r['rps']:.0f}" for r in row["runs"])
            print(f"{count:>5} {arm:<11} {row['rps']:>8.0f} {row.get('vs_bare', 0):>7.2f}x "
                  f"{row.get('vs_no_kafka', 0):>7.2f}x {row['p50_ms']:>8.2f} "
                  f"{row['p99_ms']:>8.2f} {row['server_cpu_us_per_request']:>11.0f}"
                  f"  ({each})  {statuses}", flush=True)


def median(results: list[dict], key: str) -> float:
    values = sorted(r[key] for r in results)
    return values[len(values) // 2]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), *sys.argv[4:6])
    else:
        main()
