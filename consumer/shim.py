"""The ingest shim: signed callbacks in over HTTP, their raw bytes out to Kafka.

``POST /callbacks`` answers 200 only once the broker has acknowledged the record
(``acks=all``, idempotent producer), a 4xx naming the problem for a request that can never
succeed, and 503 when Kafka cannot take the record within ``ack_timeout_s``, so the sender
retries. The body is produced byte for byte as received; only the envelope is parsed, for
the signature and the record key.

librdkafka reports deliveries through ``Producer.poll()``, which blocks. A
:class:`DeliveryBridge` runs that loop on a thread of its own and hands each batch of reports
to the event loop in one ``call_soon_threadsafe``, so no request handler ever waits on the
client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import uvicorn
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from consumer.envelope import (
    HEADER_APP_ID,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_RECEIVED_AT,
    HEADER_VERSION,
    Envelope,
    SignatureVerifier,
    parse_envelope,
)
from consumer.errors import CallbackError, SignatureError
from consumer.kafka.config import producer_config
from consumer.settings import Settings

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


class ProduceRefused(Exception):
    """Kafka did not take a record; ``status`` is the HTTP answer that tells the sender why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(Exception):
    """The request body exceeds ``max_body_bytes``; it is not read any further."""


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

        Blocking. Records still undelivered after ``flush_timeout_s`` are purged: their
        requests were answered 503 (nobody got a 200 for them), and ``close()`` would
        otherwise wait for each of them up to ``message.timeout.ms`` (5 minutes by default).

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
            ProduceRefused: the local queue is full (503), the record is larger than the
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
            raise ProduceRefused(503, "Kafka producer queue is full, retry later") from None
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


def _refusal(error: KafkaError) -> ProduceRefused:
    # A record over message.max.bytes can never succeed: a 4xx stops the sender retrying it.
    if error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return ProduceRefused(413, "body is larger than the Kafka producer accepts")
    return ProduceRefused(503, f"Kafka did not take the record: {error.name()}, retry later")


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
        self.produce_seconds = Histogram(
            "rtcbus_shim_produce_seconds",
            "Time from produce to the broker's acknowledgement (acks=all), successful only.",
            buckets=_PRODUCE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "rtcbus_shim_in_flight",
            "POST /callbacks requests being handled now.",
            registry=registry,
        )


class Shim:
    """The shim's endpoints and lifecycle; :func:`create_app` wires them into Starlette."""

    def __init__(
        self,
        settings: Settings,
        bridge: DeliveryBridge,
        metrics: ShimMetrics,
        verifier: SignatureVerifier,
    ) -> None:
        self.topic = settings.raw_topic
        self.max_body_bytes = settings.max_body_bytes
        self.ack_timeout_s = settings.ack_timeout_s
        self.bridge = bridge
        self.metrics = metrics
        self.verifier = verifier
        self.schemas = SchemaGenerator(OPENAPI_BASE)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def receive_callback(self, request: Request) -> Response:
        """
        summary: Receive one signed callback from the RTC service.
        description: >
          The body is the vendor's JSON envelope (EventType, EventData, EventTime, EventId,
          AppId, Version, Nonce, Signature). It is written to the raw Kafka topic byte for
          byte, keyed by RoomId (else PublicStreamId, TaskId, AppId, EventId). 200 means the
          broker has acknowledged it; any other answer means it was not stored.
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
            description: Stored in Kafka (acks=all).
            content:
              application/json:
                schema:
                  type: object
                  properties:
                    status: {type: string, enum: [ok]}
                    EventId: {type: string}
          400: {description: 'Not JSON, or an envelope field missing or malformed. Body: {"error": ...}'}
          401: {description: 'Signature matches no configured secret (or EventTime is outside the
            configured skew window). Body: {"error": ...}'}
          413: {description: 'Body larger than the limit. Body: {"error": ...}'}
          503: {description: 'Kafka did not acknowledge in time; retry. Body: {"error": ...}'}
        """
        started = time.monotonic()
        received_ms = time.time_ns() // 1_000_000
        self._enter()
        try:
            response = await self._handle_callback(
                request, deadline=started + self.ack_timeout_s, received_ms=received_ms
            )
        finally:
            self._leave()
        self.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def _handle_callback(
        self, request: Request, deadline: float, received_ms: int
    ) -> Response:
        try:
            body = await _read_limited(request, self.max_body_bytes)
        except BodyTooLarge:
            return _error(413, f"body is larger than {self.max_body_bytes} bytes")
        try:
            envelope = parse_envelope(body)
            self.verifier.verify(envelope, now_ms=received_ms)
        except CallbackError as exc:
            status = 401 if isinstance(exc, SignatureError) else 400
            return _error(status, str(exc), exc.field)

        produced_at = time.monotonic()
        try:
            delivery = self.bridge.produce(
                self.topic, body, envelope.key(), _headers(envelope, received_ms)
            )
        except ProduceRefused as exc:
            return _error(exc.status, exc.message)
        try:
            await asyncio.wait_for(delivery, timeout=max(deadline - time.monotonic(), 0))
        except TimeoutError:
            return _error(503, "Kafka did not acknowledge the record in time, retry later")
        except ProduceRefused as exc:
            return _error(exc.status, exc.message)
        self.metrics.produce_seconds.observe(time.monotonic() - produced_at)
        return JSONResponse({"status": "ok", "EventId": envelope.event_id})

    async def healthz(self, request: Request) -> Response:
        """
        summary: The process is up.
        responses:
          200: {description: Alive.}
        """
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """
        summary: Kafka is reachable, the raw topic exists and the producer is healthy.
        responses:
          200: {description: Ready to accept callbacks.}
          503: {description: 'Not ready. Body: {"error": ...}'}
        """
        if self.bridge.fatal_error is not None:
            return _error(503, f"Kafka producer failed: {self.bridge.fatal_error.name()}")
        if not self.bridge.healthy:
            return _error(503, "Kafka producer is not running")
        try:
            metadata = await asyncio.to_thread(
                self.bridge.producer.list_topics, self.topic, timeout=READINESS_TIMEOUT_S
            )
        except KafkaException as exc:
            return _error(503, f"Kafka is not reachable: {exc.args[0].name()}")
        topic = metadata.topics.get(self.topic)
        if topic is None:
            reason = "not in the cluster's metadata"
        elif topic.error is not None:
            reason = topic.error.name()
        elif not topic.partitions:
            reason = "no partitions"
        else:
            reason = None
        if reason is not None:
            return _error(503, f"raw topic {self.topic} is not available: {reason}")
        return JSONResponse(
            {"status": "ready", "topic": self.topic, "partitions": len(topic.partitions)}
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        """
        summary: Prometheus metrics.
        responses:
          200: {description: Prometheus text exposition format.}
        """
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        """
        summary: This OpenAPI description.
        responses:
          200: {description: OpenAPI 3 document.}
        """
        return JSONResponse(self.schemas.get_schema(routes=request.app.routes))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start the poll thread; on shutdown wait for in-flight requests, flush, stop it."""
        self.bridge.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            # The server has stopped accepting; what is in flight settles within its deadline.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=self.ack_timeout_s + 1)
            unflushed = await asyncio.to_thread(self.bridge.stop)
            if unflushed:
                log.warning(
                    "Kafka did not take %d queued records before shutdown; dropped them "
                    "(their requests were answered 503, so the sender retries them)", unflushed
                )

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.dec()
        if self._in_flight == 0:
            self._idle.set()


def create_app(
    settings: Settings,
    producer: Producer | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """Build the shim's ASGI app.

    Args:
        settings: the one Settings object.
        producer: a Producer to use instead of one built from ``settings`` (its own
            ``error_cb`` then decides what counts as fatal).
        registry: where the metrics go; a fresh registry by default, so two apps in one
            process do not collide.

    Raises:
        KafkaException: the producer configuration is invalid.
    """
    bridge = DeliveryBridge(producer if producer is not None else producer_config(settings))
    shim = Shim(
        settings,
        bridge=bridge,
        metrics=ShimMetrics(registry or CollectorRegistry()),
        verifier=SignatureVerifier.from_settings(settings),
    )
    routes = [
        Route("/callbacks", shim.receive_callback, methods=["POST"]),
        Route("/healthz", shim.healthz, methods=["GET"]),
        Route("/readyz", shim.readyz, methods=["GET"]),
        Route("/metrics", shim.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", shim.openapi, methods=["GET"], include_in_schema=False),
    ]
    app = Starlette(routes=routes, lifespan=shim.lifespan)
    app.state.shim = shim
    return app


def shim_server(settings: Settings, app: Starlette | None = None) -> uvicorn.Server:
    """A uvicorn server for the shim on ``settings.shim_host:shim_port``; not started."""
    config = uvicorn.Config(
        app or create_app(settings),
        host=settings.shim_host,
        port=settings.shim_port,
        lifespan="on",
        # Every request is counted in /metrics; a log line per callback would cost more
        # than the callback.
        access_log=False,
        # In-flight requests end within ack_timeout_s; then the lifespan flushes.
        timeout_graceful_shutdown=int(settings.ack_timeout_s) + 2,
    )
    return uvicorn.Server(config)


def run_shim(settings: Settings) -> None:
    """Serve the shim until SIGINT/SIGTERM, then shut down gracefully."""
    shim_server(settings).run()


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _headers(envelope: Envelope, received_ms: int) -> list[tuple[str, bytes]]:
    return [
        (HEADER_EVENT_TYPE, envelope.event_type.encode()),
        (HEADER_EVENT_ID, envelope.event_id.encode()),
        (HEADER_APP_ID, envelope.app_id.encode()),
        (HEADER_VERSION, envelope.version.encode()),
        (HEADER_RECEIVED_AT, str(received_ms).encode()),
    ]


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    # Counted by status in /metrics; a line per refusal would flood the log in an outage.
    log.debug("answered %d: %s", status, message)
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)
