"""``rtcbus up``: the whole product on one machine, on the embedded default.

Starts the local Kafka unless ``bootstrap_servers`` is set (and, asked to, the local Schema
Registry, writing the Confluent wire format to it), creates the topics, and runs the
shim and the router as two child processes (``rtcbus shim``, ``rtcbus router``), so that
each has a core and an event loop of its own. Ctrl-C (or SIGTERM) stops the children
gracefully, then the Kafka it started; the data stays for the next ``up``.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr

from consumer.envelope import SignatureVerifier
from consumer.kafka.admin import ensure_topics
from consumer.kafka.launcher import LocalKafka
from consumer.settings import Settings


def up(settings: Settings, echo: Callable[[str], None], *, registry: bool = False) -> int:
    """Bring everything up and block until a signal or a child's death; returns an exit code.

    With ``registry``, the local Schema Registry (:class:`consumer.registry.LocalRegistry`) is
    started too, and the shim and router are given ``wire_format=confluent`` and its URL.

    Without secrets (and without ``unsigned``) it generates one, so the shim it runs always
    checks signatures unless told not to.

    Raises:
        ConfigError: the signature settings contradict each other (checked before anything
            is started).
    """
    settings = with_secret(settings)
    SignatureVerifier.from_settings(settings)  # the shim child would refuse them; fail here
    kafka = None
    if not settings.bootstrap_servers:
        kafka = LocalKafka(settings)
        settings = settings.model_copy(update={"bootstrap_servers": kafka.start()})
    local_registry = None
    if registry:
        from consumer.registry import LocalRegistry

        local_registry = LocalRegistry(settings)
        # One that `rtcbus registry start` left running is used, and left running.
        stop_registry = local_registry.status().pid is None
        try:
            url = local_registry.start()
        except BaseException:
            if kafka is not None:
                kafka.stop()
            raise
        settings = settings.model_copy(update={"wire_format": "confluent", "schema_registry_url": url})
    ensure_topics(settings)

    # Shown once, on the operator's own terminal, because the sender must be configured with it.
    echo(f"Kafka:        {settings.bootstrap_servers}")
    if local_registry is not None:
        echo(f"Registry:     {settings.schema_registry_url} (Confluent wire format)")
    echo(f"Callback URL: http://{settings.shim_host}:{settings.shim_port}/callbacks")
    if settings.unsigned:
        echo("Secret:       none: RTCBUS_UNSIGNED is set, callbacks are NOT authenticated")
    elif settings.secrets:
        echo(f"Secret:       {settings.secrets[0].get_secret_value()}")
    else:
        echo("Secret:       per AppId, from RTCBUS_APP_SECRETS")
    echo(f"Metrics:      shim http://{settings.shim_admin_host}:{settings.shim_admin_port}/metrics, "
         f"router http://{settings.metrics_host}:{settings.metrics_port}/metrics")
    echo("Ctrl-C stops everything.")

    env = {**os.environ, **_child_env(settings)}
    children = [
        subprocess.Popen([sys.executable, "-m", "consumer.cli", command], env=env)
        for command in ("shim", "router")
    ]
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(0.5):
            if any(child.poll() is not None for child in children):
                echo("a child process exited; stopping the rest")
                break
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        codes = [child.wait(60) for child in children]
        # uvicorn re-raises the SIGTERM it handled, after its graceful shutdown.
        clean = (0, -signal.SIGTERM)
        for command, code in zip(("shim", "router"), codes):
            if code not in clean:
                echo(f"rtcbus {command} exited with status {code}")
        if local_registry is not None and stop_registry:
            local_registry.stop()
        if kafka is not None:
            kafka.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stop.is_set() and all(code in clean for code in codes) else 1


def with_secret(settings: Settings) -> Settings:
    """``settings``, with a generated callback secret if none is configured and signatures
    are not explicitly off (``unsigned``)."""
    if settings.unsigned or settings.secrets or settings.app_secrets:
        return settings
    return settings.model_copy(update={"secrets": [SecretStr(secrets.token_urlsafe(24))]})


def _child_env(settings: Settings) -> dict[str, str]:
    """The settings the children need, as the ``RTCBUS_*`` variables they read."""
    values: dict[str, Any] = {
        "BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SECRETS": ",".join(s.get_secret_value() for s in settings.secrets),
        "UNSIGNED": settings.unsigned,
        "SIGNATURE_SKEW_S": settings.signature_skew_s,
        "TOPIC_PREFIX": settings.topic_prefix,
        "SHIM_HOST": settings.shim_host,
        "SHIM_PORT": settings.shim_port,
        "COMMIT_INTERVAL_MS": settings.commit_interval_ms,
        "DEDUPE_WINDOW_S": settings.dedupe_window_s,
        "HOME": settings.home,
        "WIRE_FORMAT": settings.wire_format,
    }
    if settings.schema_registry_url:
        values["SCHEMA_REGISTRY_URL"] = settings.schema_registry_url
    return {f"RTCBUS_{key}": str(value) for key, value in values.items()}
