"""Where a shim request's CPU goes, in one process on one core, without sockets or Kafka.

Run: .venv/bin/python -m bench.shim_steps [--requests 2000] [--rounds 3]

The ASGI apps are called directly with a complete request (scope, one body message), so the
figures are the application's own, without uvicorn's HTTP parsing and socket I/O (which every
arm of ``bench.shim_bridge`` shares):

- ``bare``: a Starlette route that reads the body and answers 200 (``bench.shim_bridge``'s
  bare arm);
- ``shim``: the real shim's route whose bridge acknowledges at once (the no-kafka arm);

then each step of the shim's request on its own. CPU time (``time.process_time``), best of the
rounds, µs per request: steady on a shared machine, where wall-clock rates are not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable

from bench.floor import cpu_us
from bench.workload import SECRET, raw_records


def run(requests: int = 2000, rounds: int = 3) -> dict:
    import uvloop
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from consumer.envelope import SignatureVerifier, parse_envelope, raw_headers
    from consumer.ingest import Ingest, Stored
    from consumer.settings import load_settings
    from consumer.records import EnvelopeDecoder
    from consumer.shim import DeliveryBridge, Shim, ShimApp, ShimMetrics, _stored_body

    bodies = [record.body for record in raw_records(requests, prefix="steps")]
    settings = load_settings(bootstrap_servers="127.0.0.1:9", secrets=SECRET,
                             spool_dir=tempfile.mkdtemp(prefix="bench-steps-"))
    verifier = SignatureVerifier.from_settings(settings)
    envelopes = [parse_envelope(body) for body in bodies]
    received_ms = time.time_ns() // 1_000_000

    class AtOnce(DeliveryBridge):
        """Acknowledges every record at once, without Kafka and without a client."""

        def __init__(self) -> None:
            self.fatal_error = None
            self._loop = None

        def start(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

        def produce(self, topic, value, key, headers):  # type: ignore[override]
            future = self._loop.create_future()
            future.set_result(None)
            return future

    async def read_and_answer(request: Request) -> Response:
        await request.body()
        return Response()

    async def bare_asgi(scope, receive, send) -> None:
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def measure() -> dict[str, float]:
        bridge = AtOnce()
        bridge.start(asyncio.get_running_loop())
        ingest = Ingest(bridge, settings.raw_topic, open_spool=None, spool_after_s=1.0)
        shim = Shim(settings, bridge=bridge, ingest=ingest, metrics=ShimMetrics(CollectorRegistry()),
                    verifier=verifier)
        apps = {
            "bare: Starlette route reading the body, empty 200": Starlette(
                routes=[Route("/callbacks", read_and_answer, methods=["POST"])]),
            "bare ASGI: a plain ASGI app reading the body, empty 200": bare_asgi,
            "shim: the whole request, Kafka acknowledging at once": ShimApp(
                shim, routes=[Route("/callbacks", shim.receive_callback, methods=["POST"])]),
            "shim through its Starlette route (as before issue 14's last cut)": Starlette(
                routes=[Route("/callbacks", shim.receive_callback, methods=["POST"])]),
        }
        figures: dict[str, float] = {}
        for name, app in apps.items():
            best = float("inf")
            for _ in range(rounds):
                started = time.process_time()
                for body in bodies:
                    await _call(app, body)
                best = min(best, time.process_time() - started)
            figures[name] = best / len(bodies) * 1e6

        async def store_all() -> None:
            from consumer.spool import SpoolRecord

            deadline = time.monotonic() + 10
            for envelope, body in zip(envelopes, bodies):
                await ingest.store(SpoolRecord("k", body, ()), deadline)

        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            await store_all()
            best = min(best, time.process_time() - started)
        figures["Ingest.store (produce hand-over, deadline timer, answer)"] = best / len(bodies) * 1e6
        return figures

    figures = uvloop.run(measure())
    decoder = EnvelopeDecoder()
    steps: dict[str, Callable[[], None]] = {
        "parse_envelope (strict JSON, envelope checks)": lambda: [parse_envelope(b) for b in bodies],
        "Envelope.key (EventData parsed again, strict)": lambda: [e.key() for e in envelopes],
        "EnvelopeDecoder.parse (the shim's: envelope and key, msgspec where certain)":
            lambda: [decoder.parse(b) for b in bodies],
        "SignatureVerifier.verify (SHA-256, constant-time compare)":
            lambda: [verifier.verify(e, now_ms=e.event_time_ms) for e in envelopes],
        "raw_headers": lambda: [tuple(raw_headers(e, received_ms)) for e in envelopes],
        "the 200 body": lambda: [_stored_body(e.event_id, Stored.KAFKA) for e in envelopes],
        "json.loads of the body (for scale)": lambda: [json.loads(b) for b in bodies],
    }
    for name, step in steps.items():
        figures[name] = cpu_us(step, len(bodies), rounds)
    return {"requests": requests, "rounds": rounds, "cpu_us_per_request": figures}


async def _call(app, body: bytes) -> None:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "path": "/callbacks", "raw_path": b"/callbacks", "query_string": b"", "root_path": "",
        "scheme": "http", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000),
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"the app answered {sent[0]['status']}: {sent[1:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.requests, args.rounds)
    print(f"{'CPU µs/request, best of ' + str(args.rounds):<62} ")
    for name, us in result["cpu_us_per_request"].items():
        print(f"{name:<62} {us:7.1f}")


if __name__ == "__main__":
    main()
