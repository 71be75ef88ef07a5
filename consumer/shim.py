"""The ingest shim: signed callbacks in over HTTP, their raw bytes out to Kafka.

``POST /callbacks`` answers 200 only once the callback is durable: acknowledged by the broker
(``acks=all``, idempotent producer), or fsynced to the local spool while Kafka cannot take it in
time (``consumer.ingest``). It answers a 4xx naming the problem for a request that can never
succeed, and 503 only when neither Kafka nor the spool can take the record, so the sender
retries. The body is produced byte for byte as received; only the envelope is parsed, for the
signature and the record key.

Two listeners: the public one serves ``/callbacks`` (and the probes), the admin one, on
loopback by default, ``/metrics``, ``/openapi.json`` and the probes.

librdkafka reports deliveries through ``Producer.poll()``, which blocks. A
:class:`DeliveryBridge` runs that loop on a thread of its own and hands each batch of reports
to the event loop in one ``call_soon_threadsafe``, so no request handler ever waits on the
client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import uvicorn
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from consumer.envelope import SignatureVerifier, raw_headers
from consumer.errors import CallbackError, SignatureError
from consumer.ingest import Ingest, IngestCounters, NotStored, Stored
from consumer.kafka.config import producer_config
from consumer.quarantine import QuarantineWriter
from consumer.records import EnvelopeDecoder
from consumer.settings import Settings
from consumer.spool import Spool, SpoolRecord

log = logging.getLogger(__name__)


# How long /readyz waits for the raw topic's metadata; a probe must answer quickly.
READINESS_TIMEOUT_S = 2.0
# How long shutdown waits for the last deliveries before giving up on them.
SHUTDOWN_FLUSH_S = 10.0
# Seconds the poll thread blocks in one poll(): its only cost is how fast it notices a stop.
POLL_INTERVAL_S = 0.1

_PRODUCE_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0,
)

OPENAPI_BASE = {
    "openapi": "3.0.3",
    "info": {
        "title": "rtcbus ingest shim",
        "version": "1",
        "description": "Receives the RTC service's signed callbacks and writes them to Kafka.",
    },
}


class BodyTooLarge(Exception):
    """The request body exceeds ``max_body_bytes``; it is not read any further."""


class BodyTooSlow(Exception):
    """The request body did not arrive within ``shim_body_timeout_s``."""


class DeliveryBridge:
    """Turns librdkafka delivery reports into asyncio results, off the event loop.

    One thread at a time serves callbacks: the poll thread, then, once it has stopped, the
    final ``flush``. The reports a ``poll`` serves are collected and handed to the event loop together, one
    ``call_soon_threadsafe`` per batch rather than per record: under load a single wake-up
    settles many requests.
    """

    def __init__(self, producer: Producer | Mapping[str, Any]) -> None:
        """
        Args:
            producer: a librdkafka configuration to build the Producer from (the bridge
                adds its ``error_cb``, to notice fatal errors), or a ready Producer.
        """
        self.fatal_error: KafkaError | None = None
        if isinstance(producer, Producer):
            self.producer = producer
        else:
            self.producer = Producer({**producer, "error_cb": self.on_error})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: list[tuple[asyncio.Future[Message], KafkaError | None, Message]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.unflushed = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the poll thread; delivery results are settled on ``loop``."""
        self._loop = loop
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="rtcbus-shim-poll", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout_s: float = SHUTDOWN_FLUSH_S) -> int:
        """Deliver what is queued, settle its requests, stop the thread, close the producer.

        Blocking. Records still undelivered after ``flush_timeout_s`` are purged: each
        request was answered 503 or its record is kept in the spool (nobody got a 200 for a
        record only the queue held), and ``close()`` would otherwise wait for them forever
        (the shim's records never time out).

        Returns:
            How many records were still undelivered when the flush gave up.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.unflushed = self.producer.flush(flush_timeout_s)
        if self.unflushed:
            self.producer.purge()
            self.producer.flush(0)  # serves the purged records' reports
        self._hand_over()
        self.producer.close()
        return self.unflushed

    def produce(
        self, topic: str, value: bytes, key: str, headers: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Message]:
        """Queue one record; the future resolves with its delivered Message.

        Must be called on the event loop the bridge was started with. ``produce`` itself
        only enqueues and never blocks.

        Raises:
            NotStored: the local queue is full (503), the record is larger than the
                producer accepts (413), or the producer is unusable (503).
        """
        assert self._loop is not None, "DeliveryBridge.start() was not called"
        future: asyncio.Future[Message] = self._loop.create_future()
        try:
            self.producer.produce(
                topic,
                value=value,
                key=key,
                headers=list(headers),
                on_delivery=functools.partial(self._on_delivery, future),
            )
        except BufferError:
            raise NotStored(503, "Kafka producer queue is full") from None
        except KafkaException as exc:
            raise _refusal(exc.args[0]) from None
        return future

    def on_error(self, error: KafkaError) -> None:
        """librdkafka's ``error_cb``: remember a fatal error.

        The others are transient (librdkafka retries them, and logs each connection attempt
        itself); only losing every broker is worth a line of our own.
        """
        if error.fatal():
            self.fatal_error = error
            log.error("Kafka producer fatal error: %s", error.str())
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("Kafka producer: %s", error.str())
        else:
            log.debug("Kafka producer: %s", error.str())

    @property
    def healthy(self) -> bool:
        return self.fatal_error is None and self._thread is not None and self._thread.is_alive()

    # -- the poll thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.producer.poll(POLL_INTERVAL_S)
            self._hand_over()

    def _on_delivery(
        self, future: asyncio.Future[Message], error: KafkaError | None, message: Message
    ) -> None:
        # Runs inside poll()/flush() on the thread that serves callbacks.
        self._reports.append((future, error, message))

    def _hand_over(self) -> None:
        if not self._reports:
            return
        reports, self._reports = self._reports, []
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_settle, reports)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(reports: list[tuple[asyncio.Future[Message], KafkaError | None, Message]]) -> None:
    for future, error, message in reports:
        if future.done():  # the request already gave up and answered 503
            continue
        if error is None:
            future.set_result(message)
        else:
            future.set_exception(_refusal(error))


def _refusal(error: KafkaError) -> NotStored:
    # A record over message.max.bytes can never succeed: a 4xx stops the sender retrying it.
    if error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return NotStored(413, "body is larger than the Kafka producer accepts")
    return NotStored(503, f"Kafka did not take the record: {error.name()}")


class ShimMetrics:
    """The shim's Prometheus metrics, on a registry of its own (one per app)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "rtcbus_shim_requests",
            "POST /callbacks requests by HTTP status answered.",
            ["status"],
            registry=registry,
        )
        self.refused = Counter(
            "rtcbus_shim_refused",
            "Callbacks refused for what they are (4xx), by reason; nothing of them was stored.",
            ["reason"],
            registry=registry,
        )
        self.signature_failures = Counter(
            "rtcbus_shim_signature_failures",
            "Callbacks that parsed but failed the signature check (a wrong or rotated secret?).",
            registry=registry,
        )
        self.stored = Counter(
            "rtcbus_shim_stored",
            "Callbacks answered 200, by where they were durable: kafka (acknowledged) or spool.",
            ["via"],
            registry=registry,
        )
        self.produce_seconds = Histogram(
            "rtcbus_shim_produce_seconds",
            "Time from produce to the broker's acknowledgement (acks=all), direct 200s only.",
            buckets=_PRODUCE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "rtcbus_shim_in_flight",
            "POST /callbacks requests being handled now.",
            registry=registry,
        )
        self.spool_forwarded = Counter(
            "rtcbus_shim_spool_forwarded",
            "Spooled callbacks delivered to Kafka and deleted from the spool.",
            registry=registry,
        )
        self.spool_refused = Counter(
            "rtcbus_shim_spool_refused",
            "Callbacks the spool could not take (answered 503), by reason: full or unavailable.",
            ["reason"],
            registry=registry,
        )
        self.spool_depth = Gauge(
            "rtcbus_shim_spool_depth", "Callbacks in the spool.", registry=registry
        )
        self.spool_bytes = Gauge(
            "rtcbus_shim_spool_bytes", "Bytes of callbacks in the spool.", registry=registry
        )
        self.spool_oldest_age = Gauge(
            "rtcbus_shim_spool_oldest_age_seconds",
            "Age of the oldest callback in the spool; 0 when it is empty.",
            registry=registry,
        )
        self.spool_available = Gauge(
            "rtcbus_shim_spool_available",
            "1 when the spool is open and writable, 0 when it is off or could not be opened.",
            registry=registry,
        )
        self.spooling = Gauge(
            "rtcbus_shim_spooling",
            "1 while new callbacks go to the spool (it holds records), 0 while they go to Kafka.",
            registry=registry,
        )

    def watch(self, ingest: Ingest) -> None:
        """Read the spool's gauges from ``ingest`` at each scrape."""

        def spool_value(read: Any) -> float:
            spool = ingest.spool
            return 0.0 if spool is None else float(read(spool))

        def oldest_age(spool: Spool) -> float:
            return 0.0 if spool.oldest_ms is None else max(time.time() - spool.oldest_ms / 1000, 0.0)

        self.spool_depth.set_function(lambda: spool_value(lambda spool: spool.depth))
        self.spool_bytes.set_function(lambda: spool_value(lambda spool: spool.bytes))
        self.spool_oldest_age.set_function(lambda: spool_value(oldest_age))
        self.spool_available.set_function(lambda: float(ingest.spool is not None))
        self.spooling.set_function(lambda: float(ingest.spooling))

    def counters(self) -> IngestCounters:
        stored = _LabelledCounter(self.stored)
        return IngestCounters(
            stored=lambda where: stored.inc(where.value),
            forwarded=self.spool_forwarded.inc,
            spool_refused=lambda reason: self.spool_refused.labels(reason).inc(),
        )


class _LabelledCounter:
    """A counter with one label whose children are looked up once each: ``labels()`` takes
    a lock and formats its key on every call. A child is made on its first use, so a label
    value nothing has counted yet is not exported as 0."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[object, Any] = {}

    def inc(self, label: object) -> None:
        child = self._children.get(label)
        if child is None:
            child = self._children[label] = self._counter.labels(str(label))
        child.inc()


class Shim:
    """The shim's endpoints and lifecycle; :func:`create_app` wires them into Starlette."""

    def __init__(
        self,
        settings: Settings,
        bridge: DeliveryBridge,
        ingest: Ingest,
        metrics: ShimMetrics,
        verifier: SignatureVerifier,
        quarantine: QuarantineWriter | None = None,
    ) -> None:
        self.topic = settings.raw_topic
        self.max_body_bytes = settings.max_body_bytes
        self.ack_timeout_s = settings.ack_timeout_s
        self.body_timeout_s = settings.shim_body_timeout_s
        self.bodies = BodyDeadlines(settings.shim_body_timeout_s)
        self.bridge = bridge
        self.ingest = ingest
        self.metrics = metrics
        self.verifier = verifier
        self.quarantine = quarantine
        self.envelopes = EnvelopeDecoder()
        self.schemas = SchemaGenerator(OPENAPI_BASE)
        self.public_routes: list[Route] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Read at each scrape rather than moved twice per request.
        metrics.in_flight.set_function(lambda: self._in_flight)
        self._count_request = _LabelledCounter(metrics.requests)
        self._observe_produce = metrics.produce_seconds.observe

    async def receive_callback(self, request: Request) -> Response:
        """
        summary: Receive one signed callback from the RTC service.
        description: >
          The body is the vendor's JSON envelope (EventType, EventData, EventTime, EventId,
          AppId, Version, Nonce, Signature). It is written to the raw Kafka topic byte for
          byte, keyed by RoomId (else PublicStreamId, TaskId, AppId, EventId). 200 means it is
          durable: acknowledged by Kafka (acks=all), or fsynced to the shim's local spool,
          from which it is forwarded to Kafka in order. Any other answer means it was not
          stored (a 503 may leave a copy in the producer's queue: at most a duplicate, which
          the router's EventId dedupe absorbs).
        requestBody:
          required: true
          content:
            application/json:
              schema:
                type: object
                required: [EventType, EventData, EventTime, EventId, AppId, Version]
                properties:
                  EventType: {type: string}
                  EventData: {type: string, description: the event's fields as a JSON document}
                  EventTime: {type: string, format: date-time}
                  EventId: {type: string}
                  AppId: {type: string}
                  Version: {type: string}
                  Nonce: {type: string}
                  Signature: {type: string, description: lowercase hex SHA-256}
        responses:
          200:
            description: Durable, in Kafka (acks=all) or in the local spool.
            content:
              application/json:
                schema:
                  type: object
                  properties:
                    status: {type: string, enum: [ok]}
                    EventId: {type: string}
                    stored: {type: string, enum: [kafka, spool]}
          400: {description: 'Not JSON, or an envelope field missing or malformed. Body: {"error": ...}'}
          401: {description: 'Signature matches no configured secret, or EventTime is outside the
            accepted window. The body is kept in the quarantine topic (within caps), never
            routed; `rtcbus quarantine redrive` forwards it once the secret is fixed. Body:
            {"error": ...}'}
          408: {description: 'The body did not arrive in time. Body: {"error": ...}'}
          413: {description: 'Body larger than the limit. Body: {"error": ...}'}
          503: {description: 'Neither Kafka nor the spool took it in time (or too many requests
            at once); retry. Body: {"error": ...}'}
        """
        status, body = await self.callback(request.scope, request.receive)
        return Response(body, status_code=status, media_type=_JSON)

    async def asgi_callback(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /callbacks`` as a plain ASGI app, the same answers as :meth:`receive_callback`
        (which documents it): :class:`ShimApp` sends every such request here, past Starlette's
        routing, middleware, request and response objects, about 13 µs a request of CPU
        (``bench.shim_steps``: the bare Starlette route against a bare ASGI endpoint)."""
        status, body = await self.callback(scope, receive)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", _JSON_BYTES), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def callback(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        """One callback request: its status and JSON body."""
        started = time.monotonic()
        received_ms = time.time_ns() // 1_000_000
        self._enter()
        try:
            status, body = await self._handle_callback(
                scope, receive, deadline=started + self.ack_timeout_s, received_ms=received_ms
            )
        finally:
            self._leave()
        self._count_request.inc(status)
        return status, body

    async def _handle_callback(
        self, scope: Scope, receive: Receive, deadline: float, received_ms: int
    ) -> tuple[int, bytes]:
        try:
            body = await self.bodies.read(scope, receive, self.max_body_bytes)
        except BodyTooLarge:
            return self._refuse(413, "too_large", f"body is larger than {self.max_body_bytes} bytes")
        except BodyTooSlow:
            return self._refuse(408, "body_timeout", f"body did not arrive within {self.body_timeout_s:g} s")
        except ClientDisconnect:
            return self._refuse(400, "disconnected", "the client disconnected before sending its body")
        try:
            envelope, key = self.envelopes.parse(body)
            self.verifier.verify(envelope, now_ms=received_ms)
        except SignatureError as exc:
            self.metrics.signature_failures.inc()
            if self.quarantine is not None:
                # Kept (within caps), never routed: a wrong secret in our config must not
                # cost the events the vendor drops after its 3 tries.
                client = scope.get("client")
                self.quarantine.offer(body, exc.message, received_ms, client[0] if client else None)
            return self._refuse(401, "signature", str(exc), exc.field)
        except CallbackError as exc:
            return self._refuse(400, "invalid", str(exc), exc.field)

        produced_at = time.monotonic()
        record = SpoolRecord(key, body, tuple(raw_headers(envelope, received_ms)))
        try:
            stored = await self.ingest.store(record, deadline)
        except NotStored as exc:
            if exc.status == 413:
                return self._refuse(413, "too_large", exc.message)
            log.debug("answered %d: %s", exc.status, exc.message)
            return exc.status, _error_body(exc.message)
        if stored is Stored.KAFKA:
            self._observe_produce(time.monotonic() - produced_at)
        return 200, _stored_body(envelope.event_id, stored)

    async def healthz(self, request: Request) -> Response:
        """
        summary: Liveness. 503 when the producer hit a fatal error or a worker thread died, so
          that an orchestrator restarts the process (the spool, on disk, survives it).
        responses:
          200: {description: Alive.}
          503: {description: 'Broken for good. Body: {"error": ...}'}
        """
        if self.bridge.fatal_error is not None:
            return _error(503, f"Kafka producer failed for good: {self.bridge.fatal_error.name()}")
        if not self.bridge.healthy:
            return _error(503, "the Kafka producer's poll thread is not running")
        if self.ingest.failure is not None:
            return _error(503, f"the spool forwarder failed: {type(self.ingest.failure).__name__}")
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """
        summary: Readiness. 200 while a callback can be made durable (Kafka reachable with the
          raw topic, or the spool taking records); 503 when neither.
        responses:
          200: {description: 'Ready. Body: {"status": "ready", "kafka": ..., "spool": ...}'}
          503: {description: 'Not ready. Body: {"error": ..., "kafka": ..., "spool": ...}'}
        """
        kafka, partitions = await self._kafka_state()
        spool = self.ingest.state()
        body: dict[str, Any] = {"topic": self.topic, "kafka": kafka, "spool": spool}
        if partitions is not None:
            body["partitions"] = partitions
        if self.bridge.fatal_error is not None or not self.bridge.healthy:
            reason = "the Kafka producer is not running"
        elif kafka == "ok" or self.ingest.accepting:
            return JSONResponse({"status": "ready", **body})
        else:
            reason = f"Kafka: {kafka}; spool: {spool.get('reason') or spool['state']}"
        return JSONResponse({"error": f"not ready: {reason}", **body}, status_code=503)

    async def _kafka_state(self) -> tuple[str, int | None]:
        if self.bridge.fatal_error is not None:
            return f"producer failed: {self.bridge.fatal_error.name()}", None
        try:
            metadata = await asyncio.to_thread(
                self.bridge.producer.list_topics, self.topic, timeout=READINESS_TIMEOUT_S
            )
        except KafkaException as exc:
            return f"not reachable: {exc.args[0].name()}", None
        topic = metadata.topics.get(self.topic)
        if topic is None:
            return f"raw topic {self.topic} is not in the cluster's metadata", None
        if topic.error is not None:
            return f"raw topic {self.topic} is not available: {topic.error.name()}", None
        if not topic.partitions:
            return f"raw topic {self.topic} has no partitions", None
        return "ok", len(topic.partitions)

    async def metrics_endpoint(self, request: Request) -> Response:
        """
        summary: Prometheus metrics.
        responses:
          200: {description: Prometheus text exposition format.}
        """
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi_document(self) -> dict[str, Any]:
        """The OpenAPI description of the public listener."""
        return self.schemas.get_schema(routes=self.public_routes)

    async def openapi(self, request: Request) -> Response:
        """
        summary: The OpenAPI description of the public listener.
        responses:
          200: {description: OpenAPI 3 document.}
        """
        return JSONResponse(self.openapi_document())

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start the poll thread and the spool; on shutdown wait for in-flight requests,
        forward what the spool holds for a while, flush, stop."""
        self.bridge.start(asyncio.get_running_loop())
        try:
            await self.ingest.start()
        except BaseException:
            await asyncio.to_thread(self.bridge.stop, 0)
            raise
        try:
            yield
        finally:
            # The server has stopped accepting; what is in flight settles within its deadline.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=self.ack_timeout_s + 1)
            await self.ingest.stop(drain_s=SHUTDOWN_FLUSH_S)
            unflushed = await asyncio.to_thread(self.bridge.stop)
            if unflushed:
                log.warning(
                    "Kafka did not take %d queued records before shutdown; each was answered "
                    "503 or is kept in the spool", unflushed,
                )

    def _refuse(self, status: int, reason: str, message: str, field: str | None = None) -> tuple[int, bytes]:
        self.metrics.refused.labels(reason).inc()
        log.debug("answered %d: %s", status, message)
        return status, _error_body(message, field)

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()


def create_app(
    settings: Settings,
    producer: Producer | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """Build the shim's public ASGI app; ``app.state.admin`` is its admin app.

    Args:
        settings: the one Settings object.
        producer: a Producer to use instead of one built from ``settings`` (its own
            ``error_cb`` then decides what counts as fatal).
        registry: where the metrics go; a fresh registry by default, so two apps in one
            process do not collide.

    Raises:
        KafkaException: the producer configuration is invalid.
        ConfigError: the signature settings are invalid.
    """
    verifier = SignatureVerifier.from_settings(settings)
    bridge = DeliveryBridge(producer if producer is not None else shim_producer_config(settings))
    metrics = ShimMetrics(registry or CollectorRegistry())
    ingest = Ingest(
        bridge,
        settings.raw_topic,
        open_spool=_spool_opener(settings) if settings.spool else None,
        spool_after_s=settings.spool_after_s,
        counters=metrics.counters(),
    )
    metrics.watch(ingest)
    quarantine = (
        QuarantineWriter.from_settings(settings, bridge.producer, metrics.registry)
        if settings.quarantine and verifier.enabled
        else None
    )
    shim = Shim(
        settings, bridge=bridge, ingest=ingest, metrics=metrics, verifier=verifier,
        quarantine=quarantine,
    )
    shim.public_routes = [
        Route("/callbacks", shim.receive_callback, methods=["POST"]),
        Route("/healthz", shim.healthz, methods=["GET"]),
        Route("/readyz", shim.readyz, methods=["GET"]),
    ]
    admin_routes = [
        Route("/metrics", shim.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", shim.openapi, methods=["GET"]),
        Route("/healthz", shim.healthz, methods=["GET"]),
        Route("/readyz", shim.readyz, methods=["GET"]),
    ]
    app = ShimApp(shim, routes=shim.public_routes, lifespan=shim.lifespan)
    app.state.shim = shim
    app.state.admin = Starlette(routes=admin_routes)
    return app


class ShimApp(Starlette):
    """The public listener's app: ``POST /callbacks`` goes straight to
    :meth:`Shim.asgi_callback`; every other request (the probes, a wrong method or path) to
    Starlette, whose ``/callbacks`` route answers the same and documents it in the OpenAPI."""

    def __init__(self, shim: Shim, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._callback = shim.asgi_callback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/callbacks" and scope["method"] == "POST":
            await self._callback(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def shim_producer_config(settings: Settings) -> dict[str, str]:
    """The shim's producer: ``producer_config`` with records that never time out.

    A record waits in the queue for Kafka as long as the process lives, so a room's later
    record cannot be delivered ahead of an earlier one that timed out (see ``consumer.ingest``).
    """
    return {**producer_config(settings), "message.timeout.ms": "0"}


def _spool_opener(settings: Settings) -> Any:
    return functools.partial(Spool, settings.spool_path, settings.spool_max_bytes)


def shim_server(settings: Settings, app: Starlette | None = None) -> uvicorn.Server:
    """A uvicorn server for the shim's public listener on ``shim_host:shim_port``; not started."""
    config = uvicorn.Config(
        app or create_app(settings),
        host=settings.shim_host,
        port=settings.shim_port,
        lifespan="on",
        http=_with_head_timeout(settings.shim_header_timeout_s),
        # Connections and requests at once; past it uvicorn answers a fast 503 by itself.
        limit_concurrency=settings.shim_max_concurrency,
        # Every request is counted in /metrics; a log line per callback would cost more
        # than the callback.
        access_log=False,
        # In-flight requests end within ack_timeout_s; then the lifespan drains and flushes.
        timeout_graceful_shutdown=int(settings.ack_timeout_s) + 2,
    )
    return uvicorn.Server(config)


class AdminServer(uvicorn.Server):
    """The admin listener: started beside the public server, which alone handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def admin_server(settings: Settings, app: Starlette) -> AdminServer:
    """A uvicorn server for ``app.state.admin`` on ``shim_admin_host:shim_admin_port``."""
    config = uvicorn.Config(
        app.state.admin,
        host=settings.shim_admin_host,
        port=settings.shim_admin_port,
        lifespan="off",
        access_log=False,
        limit_concurrency=64,
    )
    return AdminServer(config)


async def serve(
    public: uvicorn.Server, admin: uvicorn.Server, sockets: list[socket.socket] | None = None
) -> None:
    """Serve both listeners until the public one stops (SIGTERM, SIGINT).

    Args:
        sockets: listening sockets for the public listener, instead of binding its
            host and port (``consumer.shim_workers``).
    """
    admin_task = asyncio.create_task(admin.serve(), name="rtcbus-shim-admin")
    try:
        await public.serve(sockets=sockets)
    finally:
        admin.should_exit = True
        await admin_task


def run_served(
    public: uvicorn.Server, admin: uvicorn.Server, sockets: list[socket.socket] | None = None
) -> None:
    """:func:`serve` on the event loop uvicorn picks for ``public`` (uvloop where it is
    installed, as ``uvicorn.run`` would), until the public listener stops.

    Not ``asyncio.run``, which always takes the standard library's loop: the shim ran on it
    while every benchmark of it ran on uvloop."""
    with asyncio.Runner(loop_factory=public.config.get_loop_factory()) as runner:
        runner.run(serve(public, admin, sockets))


def run_shim(settings: Settings) -> None:
    """Serve the shim until SIGINT/SIGTERM, then shut down gracefully."""
    app = create_app(settings)
    run_served(shim_server(settings, app), admin_server(settings, app))


def _with_head_timeout(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that sends no complete request head in
    ``timeout_s``. uvicorn bounds idle keep-alive connections but not a slow first request
    head (slowloris), and no option of its own does; this is the smallest addition that does."""

    class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol


class BodyDeadlines:
    """Reads request bodies, ending with :class:`BodyTooSlow` a read still waiting
    ``timeout_s`` after it began (late by at most an eighth of it).

    Written by hand because ``asyncio.timeout`` arms and cancels a timer (and looks up the
    current task twice) on every request, while nearly every callback's body arrives with
    its head and the read never waits. Here a read costs a dict entry, and one timer,
    running only while reads are open, cancels the tasks past their deadline.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._tick_s = timeout_s / 8
        self._reads: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._ticking = False

    async def read(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        """The request's body, at most ``limit`` bytes.

        Raises:
            BodyTooLarge: the declared or the received length is over ``limit``.
            BodyTooSlow: the body did not arrive within ``timeout_s``.
            ClientDisconnect: the client went away first.
        """
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    raise BodyTooLarge
                break
        task = asyncio.current_task()
        assert task is not None  # an ASGI app runs in a task
        self._reads[task] = time.monotonic() + self.timeout_s
        if not self._ticking:
            self._ticking = True
            asyncio.get_running_loop().call_later(self._tick_s, self._tick)
        try:
            return await _read_body(receive, limit)
        except asyncio.CancelledError:
            # Ours alone becomes the 408; any other (the server stopping) goes on, as
            # asyncio.timeout decides it.
            if task not in self._expired or task.uncancel() > 0:
                raise
            raise BodyTooSlow from None
        finally:
            del self._reads[task]
            self._expired.discard(task)

    def _tick(self) -> None:
        now = time.monotonic()
        for task, deadline in self._reads.items():
            # Only a task still in the read is in ``_reads``: the cancellation lands there.
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        if self._reads:
            asyncio.get_running_loop().call_later(self._tick_s, self._tick)
        else:
            self._ticking = False


async def _read_body(receive: Receive, limit: int) -> bytes:
    # The ASGI messages themselves rather than ``request.stream()``: a callback's body is
    # one message, and the async generator costs more than the rest of the read.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# The 200's body, as ``JSONResponse`` would render it, without building its encoder and
# header list per request.
_encode_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


_JSON = "application/json"
_JSON_BYTES = _JSON.encode()


def _stored_body(event_id: str, stored: Stored) -> bytes:
    return f'{{"status":"ok","EventId":{_encode_json(event_id)},"stored":"{stored.value}"}}'.encode()


def _error_body(message: str, field: str | None = None) -> bytes:
    """``{"error": message, "field": field}`` as ``JSONResponse`` renders it."""
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return _encode_json(body).encode("utf-8")


def _error(status: int, message: str, field: str | None = None) -> Response:
    # Counted by status in /metrics; a line per refusal would flood the log in an outage.
    log.debug("answered %d: %s", status, message)
    return Response(_error_body(message, field), status_code=status, media_type=_JSON)
