"""``rtcbus send``: sign callbacks the way the RTC service does and POST them to a shim.

Two sources: the events page's examples, each once with a fresh EventId, or generated load,
a mix of the examples at a steady rate with unique EventIds and varied RoomIds. Delivery
mimics the vendor (``shared/spec/callback-protocol.md``): a callback counts as delivered
only on HTTP 200 within 5 seconds, and is tried at most 3 times.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets as random_secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from consumer.envelope import sign
from consumer.settings import Settings

DEFAULT_APP_ID = "rtcbus-demo"
DEFAULT_VERSION = "2020-12-01"
VENDOR_ATTEMPTS = 3
VENDOR_TIMEOUT_S = 5.0


class ExampleLike(Protocol):
    """What the sender needs of an events-page example (``consumer.examples.Example``)."""

    event_type: str
    version: str
    event_data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Callback:
    """One signed callback, ready to POST: the body is sent exactly as built."""

    event_id: str
    event_type: str
    body: bytes


@dataclass
class SendReport:
    """What became of the callbacks.

    Attributes:
        statuses: final outcome per callback: the last HTTP status as text ("200", "503"),
            or "error:<exception class>" when no answer came.
        attempts: POSTs made, retries included.
        delivered: EventIds answered 200, in the order their 200 arrived.
        elapsed_s: wall time from the first POST to the last answer.
    """

    statuses: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    delivered: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses["200"]

    @property
    def failed(self) -> int:
        return self.sent - self.ok


def signing_secret(settings: Settings, app_id: str) -> str | None:
    """The secret a sender for ``app_id`` signs with: the app's own first secret, else the
    first shared one, else None (unsigned)."""
    candidates = settings.app_secrets.get(app_id) or settings.secrets
    return candidates[0].get_secret_value() if candidates else None


def build_callback(
    event_type: str,
    event_data: Mapping[str, Any],
    *,
    version: str = DEFAULT_VERSION,
    app_id: str = DEFAULT_APP_ID,
    secret: str | None = None,
    event_id: str | None = None,
    event_time: datetime | None = None,
    event_data_as_object: bool = False,
) -> Callback:
    """Build one callback envelope as the vendor does, EventData as a JSON string.

    EventTime is now unless given: the shim refuses an EventTime further from its clock than
    its skew window. Unsigned (no ``Signature``) when no secret is given: only a shim run
    ``--unsigned`` accepts it.

    Args:
        event_data_as_object: send EventData as a JSON object instead, as some senders do;
            the signature then covers the object's JSON text exactly as written in the body.
    """
    data_text = json.dumps(event_data, separators=(",", ":"), ensure_ascii=False)
    envelope = {
        "EventType": event_type,
        "EventData": data_text,
        "EventTime": (event_time or datetime.now().astimezone()).isoformat(timespec="seconds"),
        "EventId": event_id or str(uuid.uuid4()),
        "AppId": app_id,
        "Version": version or DEFAULT_VERSION,
        "Nonce": str(random_secrets.randbelow(10**8)),
    }
    if secret is not None:
        envelope["Signature"] = sign(envelope.values(), secret)
    # Each member's JSON text written out, so an object-form EventData is in the body
    # exactly as it was signed.
    members = {name: json.dumps(value, ensure_ascii=False) for name, value in envelope.items()}
    if event_data_as_object:
        members["EventData"] = data_text
    body = "{" + ", ".join(f'"{name}": {text}' for name, text in members.items()) + "}"
    return Callback(envelope["EventId"], event_type, body.encode())


def example_callbacks(
    examples: Iterable[ExampleLike], *, app_id: str = DEFAULT_APP_ID, secret: str | None = None
) -> list[Callback]:
    """Each example once, with a fresh EventId, EventTime now and the example's Version."""
    return [
        build_callback(
            example.event_type, example.event_data,
            version=example.version, app_id=app_id, secret=secret,
        )
        for example in examples
    ]


def load_callbacks(
    examples: Sequence[ExampleLike],
    count: int,
    *,
    rooms: int = 50,
    app_id: str = DEFAULT_APP_ID,
    secret: str | None = None,
    seed: int | None = None,
) -> Iterator[Callback]:
    """``count`` callbacks drawn from the examples, unique EventIds, RoomIds among ``rooms``.

    Built lazily, so EventTime is the time each one is sent.
    """
    rng = random.Random(seed)
    for _ in range(count):
        example = rng.choice(examples)
        data = dict(example.event_data)
        if "RoomId" in data:
            data["RoomId"] = f"room-{rng.randrange(rooms)}"
        yield build_callback(
            example.event_type, data, version=example.version, app_id=app_id, secret=secret
        )


async def send_callbacks(
    url: str,
    callbacks: Iterable[Callback],
    *,
    concurrency: int = 16,
    rate: float | None = None,
    attempts: int = VENDOR_ATTEMPTS,
    timeout_s: float = VENDOR_TIMEOUT_S,
    retry_delay_s: float = 0.5,
    on_result: Callable[[Callback, str], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SendReport:
    """POST every callback, at most ``concurrency`` at a time, retrying like the vendor.

    Args:
        url: the shim's ``/callbacks`` URL.
        rate: callbacks started per second; None sends as fast as concurrency allows.
        attempts: tries per callback; anything but a 200 within ``timeout_s`` is a failure.
        on_result: called with each callback and its final status (for a progress bar).
        transport: an httpx transport to use instead of the network (tests).
    """
    report = SendReport()
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": "application/json"}

    async def deliver(client: httpx.AsyncClient, callback: Callback) -> None:
        try:
            status = ""
            for attempt in range(attempts):
                if attempt:
                    await asyncio.sleep(retry_delay_s)
                report.attempts += 1
                try:
                    response = await client.post(url, content=callback.body, headers=headers)
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = f"error:{type(exc).__name__}"
                if status == "200":
                    report.delivered.append(callback.event_id)
                    break
            report.statuses[status] += 1
            if on_result is not None:
                on_result(callback, status)
        finally:
            slots.release()

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, transport=transport) as client:
        async with asyncio.TaskGroup() as tasks:
            for index, callback in enumerate(callbacks):
                if rate is not None:
                    # A steady schedule from the start: a slow answer delays nothing after it.
                    await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
                await slots.acquire()
                tasks.create_task(deliver(client, callback))
    report.elapsed_s = time.monotonic() - started
    return report


def send_with_progress(
    url: str,
    callbacks: Iterable[Callback],
    total: int,
    *,
    concurrency: int = 16,
    rate: float | None = None,
    description: str = "callbacks",
) -> SendReport:
    """:func:`send_callbacks` with a rich progress bar showing how many got their 200."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, ok=0, failed=0)
        counts = Counter[str]()

        def on_result(callback: Callback, status: str) -> None:
            counts["ok" if status == "200" else "failed"] += 1
            progress.update(task, advance=1, ok=counts["ok"], failed=counts["failed"])

        return asyncio.run(
            send_callbacks(url, callbacks, concurrency=concurrency, rate=rate, on_result=on_result)
        )


def describe_report(report: SendReport) -> str:
    """A one-line summary: totals, statuses and the achieved rate."""
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(report.statuses.items()))
    rate = report.sent / report.elapsed_s if report.elapsed_s else 0.0
    return (
        f"sent {report.sent} callbacks in {report.elapsed_s:.2f} s ({rate:.0f}/s), "
        f"{report.ok} delivered, {report.failed} failed, {report.attempts} attempts "
        f"[{statuses}]"
    )
