"""Cost of the shim's delivery-report bridge: requests/s, latency and server CPU per request.

Run: .venv/bin/python -m bench.shim_bridge [--seconds 10] [--rounds 3] [--connections 64,256]
         [--bootstrap HOST:PORT]

Three shims, each in a process of its own (uvicorn, uvloop, httptools), loaded by a load
generator in another process (raw HTTP/1.1 keep-alive over asyncio streams, so the client
costs little next to the server):

- ``no-kafka``: the real shim (body limit, envelope parse, signature check, metrics) whose
  bridge answers at once, without Kafka: the ceiling;
- ``bridge``: the real shim: produce with acks=all, idempotent, 200 after the delivery
  report, reports handed to the event loop once per poll() batch;
- ``per-report``: the same with one ``call_soon_threadsafe`` per delivery report (the
  textbook bridge), to show what batching the hand-over buys.

Without ``--bootstrap`` a one-node Kafka is started for the run (consumer.kafka.launcher) in
a temporary directory and stopped afterwards. The server's CPU time (all its threads,
librdkafka's included) is read from /proc around the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.broker import bench_kafka
from bench.workload import SECRET

TOPIC_PREFIX = "bench"


# -- the servers ------------------------------------------------------------------------------


def serve(arm: str, port: int, bootstrap: str, topic_prefix: str = TOPIC_PREFIX) -> None:
    import uvicorn
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.routing import Route

    import tempfile

    from consumer.envelope import SignatureVerifier
    from consumer.ingest import Ingest
    from consumer.settings import load_settings
    from consumer.shim import DeliveryBridge, Shim, ShimMetrics, _settle, create_app, shim_producer_config

    settings = load_settings(
        bootstrap_servers=bootstrap, topic_prefix=topic_prefix, secrets=SECRET, shim_port=port,
        spool_dir=tempfile.mkdtemp(prefix="bench-spool-"),
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

    if arm == "bridge":
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
        app = Starlette(
            routes=[
                Route("/callbacks", shim.receive_callback, methods=["POST"]),
                Route("/healthz", shim.healthz, methods=["GET"]),
            ],
            lifespan=shim.lifespan,
        )
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


# -- the load generator -------------------------------------------------------------------------


def bodies(count: int = 1000) -> list[bytes]:
    from bench.workload import raw_records

    return [record.body for record in raw_records(count, prefix="shim")]


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


async def load(port: int, seconds: float, connections: int, warmup_s: float) -> dict:
    requests = [request_bytes(port, body) for body in bodies()]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def connection(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = index
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                break
            status = await exchange(reader, writer, requests[n % len(requests)])
            n += connections
            done = time.monotonic()
            if sent >= measure_from:
                latencies.append(done - sent)
                statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(connection(i) for i in range(connections)))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": statuses,
    }


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


def run_arm(arm: str, bootstrap: str, seconds: float, connections: int, warmup_s: float) -> dict:
    port = free_port()
    python = sys.executable
    server = subprocess.Popen(
        [python, "-m", "bench.shim_bridge", "serve", arm, str(port), bootstrap]
    )
    try:
        wait_until_healthy(port, server)
        generator = subprocess.Popen(
            [python, "-m", "bench.shim_bridge", "load", str(port), str(seconds),
             str(connections), str(warmup_s)],
            stdout=subprocess.PIPE,
        )
        time.sleep(warmup_s)
        cpu_before = cpu_seconds(server.pid)
        output, _ = generator.communicate(timeout=seconds + warmup_s + 60)
        cpu_after = cpu_seconds(server.pid)
        result = json.loads(output)
        result["server_cpu_us_per_request"] = (
            (cpu_after - cpu_before) / max(result["requests"], 1) * 1e6
        )
        return result
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run(bootstrap: str, seconds: float, rounds: int, connections: Sequence[int],
        warmup_s: float, arms: Sequence[str] = ("no-kafka", "bridge")) -> dict:
    """Each arm at each connection count, interleaved round by round; medians and ratios."""
    from consumer.kafka.admin import ensure_topics
    from consumer.settings import load_settings

    ensure_topics(load_settings(bootstrap_servers=bootstrap, topic_prefix=TOPIC_PREFIX))
    runs: dict[int, dict[str, list[dict]]] = {c: {arm: [] for arm in arms} for c in connections}
    for _ in range(rounds):
        for count in connections:
            for arm in arms:
                runs[count][arm].append(run_arm(arm, bootstrap, seconds, count, warmup_s))
    result: dict = {"seconds": seconds, "rounds": rounds, "warmup_s": warmup_s, "connections": {}}
    for count, by_arm in runs.items():
        rows = {
            arm: {
                "runs": results,
                **{key: median(results, key) for key in
                   ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_request")},
            }
            for arm, results in by_arm.items()
        }
        if "no-kafka" in rows:
            for row in rows.values():
                row["vs_no_kafka"] = row["rps"] / rows["no-kafka"]["rps"]
        result["connections"][str(count)] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--connections", default="32", help="comma-separated counts")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs per arm, interleaved; medians shown")
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--arms", default="no-kafka,bridge,per-report")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} x {args.seconds:.0f} s per arm "
          f"(interleaved, each after {args.warmup:.0f} s warm-up)")
    with bench_kafka(args.bootstrap) as kafka:
        result = run(kafka.bootstrap_servers, args.seconds, args.rounds, connections,
                     args.warmup, args.arms.split(","))
    print(f"{'conns':>5} {'arm':<11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}"
          f"  (medians; req/s of each round)  statuses")
    for count, rows in result["connections"].items():
        for arm, row in rows.items():
            statuses: dict[str, int] = {}
            for r in row["runs"]:
                for status, n in r["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + n
            each = ", ".join(f"{r['rps']:.0f}" for r in row["runs"])
            print(f"{count:>5} {arm:<11} {row['rps']:>8.0f} {row['p50_ms']:>8.2f} "
                  f"{row['p99_ms']:>8.2f} {row['server_cpu_us_per_request']:>11.0f}"
                  f"  ({each})  {statuses}", flush=True)


def median(results: list[dict], key: str) -> float:
    values = sorted(r[key] for r in results)
    return values[len(values) // 2]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), *sys.argv[4:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        import uvloop

        port, seconds, connections, warmup = sys.argv[2:6]
        print(json.dumps(uvloop.run(load(int(port), float(seconds), int(connections),
                                         float(warmup)))))
    else:
        main()
