"""Cost of the shim's delivery-report bridge: requests/s, latency and server CPU per request.

Run: .venv/bin/python -m bench.shim_bridge [--seconds 10] [--rounds 3] [--connections 32]
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
from pathlib import Path

from bench.broker import bench_kafka

SECRET = "bench-secret"
TOPIC_PREFIX = "bench"


# -- the servers ------------------------------------------------------------------------------


def serve(arm: str, port: int, bootstrap: str) -> None:
    import uvicorn
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.routing import Route

    from consumer.envelope import SignatureVerifier
    from consumer.kafka.config import producer_config
    from consumer.settings import load_settings
    from consumer.shim import DeliveryBridge, Shim, ShimMetrics, _settle, create_app

    settings = load_settings(
        bootstrap_servers=bootstrap, topic_prefix=TOPIC_PREFIX, secrets=SECRET, shim_port=port
    )

    class NoKafkaBridge(DeliveryBridge):
        """Acknowledges every record at once, without Kafka."""

        def __init__(self) -> None:
            self.fatal_error = None
            self._loop = None

        def start(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

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
            NoKafkaBridge() if arm == "no-kafka" else PerReportBridge(producer_config(settings))
        )
        shim = Shim(
            settings,
            bridge=bridge,
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
    from consumer.examples import load_examples
    from consumer.sender import load_callbacks

    return [c.body for c in load_callbacks(load_examples(), count, secret=SECRET, seed=1)]


async def load(port: int, seconds: float, connections: int, warmup_s: float) -> dict:
    requests = [
        (
            f"POST /callbacks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies()
    ]
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
            writer.write(requests[n % len(requests)])
            n += connections
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.monotonic()
            if sent >= measure_from:
                latencies.append(done - sent)
                status = head[9:12].decode()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs per arm, interleaved; medians shown")
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--arms", default="no-kafka,bridge,per-report")
    args = parser.parse_args()

    with bench_kafka(args.bootstrap) as bootstrap:
        from consumer.kafka.admin import ensure_topics
        from consumer.settings import load_settings

        ensure_topics(load_settings(bootstrap_servers=bootstrap, topic_prefix=TOPIC_PREFIX))
        arms = args.arms.split(",")
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"{args.connections} connections, {args.rounds} x {args.seconds:.0f} s per arm "
              f"(interleaved, each after {args.warmup:.0f} s warm-up)")
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for _ in range(args.rounds):
            for arm in arms:
                runs[arm].append(run_arm(arm, bootstrap, args.seconds, args.connections, args.warmup))
        print(f"{'arm':<11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}  "
              f"(medians; req/s of each round)  statuses")
        for arm, results in runs.items():
            statuses: dict[str, int] = {}
            for r in results:
                for status, n in r["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + n
            each = ", ".join(f"{r['rps']:.0f}" for r in results)
            print(f"{arm:<11} {median(results, 'rps'):>8.0f} {median(results, 'p50_ms'):>8.2f} "
                  f"{median(results, 'p99_ms'):>8.2f} {median(results, 'server_cpu_us_per_request'):>11.0f}"
                  f"  ({each})  {statuses}", flush=True)


def median(results: list[dict], key: str) -> float:
    values = sorted(r[key] for r in results)
    return values[len(values) // 2]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        import uvloop

        port, seconds, connections, warmup = sys.argv[2:6]
        print(json.dumps(uvloop.run(load(int(port), float(seconds), int(connections),
                                         float(warmup)))))
    else:
        main()
