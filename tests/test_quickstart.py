"""The README's quick start, as a user runs it: ``rtcbus up``, ``send --examples``, ``tail --all``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pytest

from consumer.errors import ConfigError
from consumer.settings import load_settings
from consumer.stack import up, with_secret
from kafka_helpers import free_ports
from support import RTCBUS, RtcbusProcess, wait_for


def test_up_generates_a_secret_only_when_none_is_configured_and_signatures_are_on():
    generated = with_secret(load_settings())
    assert len(generated.secrets) == 1 and len(generated.secrets[0].get_secret_value()) >= 32
    assert with_secret(load_settings()).secrets[0] != generated.secrets[0]
    configured = load_settings(secrets="mine")
    assert with_secret(configured) is configured
    per_app = load_settings(app_secrets={"app-a": "theirs"})
    assert with_secret(per_app).secrets == []  # no shared secret the operator did not ask for
    unsigned = load_settings(unsigned=True)
    assert with_secret(unsigned).secrets == []


def test_up_refuses_contradicting_signature_settings_before_starting_anything(tmp_path):
    lines = []
    with pytest.raises(ConfigError, match="unsigned is set together with callback secrets"):
        up(load_settings(unsigned=True, secrets="mine", home=tmp_path), lines.append)
    assert lines == [] and list(tmp_path.iterdir()) == []


@pytest.mark.kafka
def test_up_send_examples_then_tail_shows_the_45_decoded_records(kafka, tmp_path):
    port = free_ports(1)
    env = {
        "RTCBUS_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "RTCBUS_SECRETS": "quickstart-secret",
        "RTCBUS_TOPIC_PREFIX": f"q{uuid.uuid4().hex[:8]}",
        "RTCBUS_GROUP_ID": f"router-{uuid.uuid4().hex[:8]}",
        "RTCBUS_SHIM_PORT": str(port),
        "RTCBUS_METRICS_PORT": str(free_ports(1)),
        "RTCBUS_PARTITIONS": "2",
    }
    up = RtcbusProcess(["up"], env, tmp_path / "up.log").start()
    try:
        wait_for(
            lambda: up.assert_running() or f"http://127.0.0.1:{port}/callbacks" in up.log(),
            120, "rtcbus up to print the callback URL",
        )
        assert "quickstart-secret" in up.log()
        full_env = {**os.environ, **env}
        wait_for(
            lambda: subprocess.run([RTCBUS, "send", "--examples"], env=full_env,
                                   capture_output=True, timeout=120).returncode == 0,
            60, "rtcbus send --examples to succeed",
        )
        tail = subprocess.run(
            [RTCBUS, "tail", "--all", "--limit", "45", "--idle-timeout", "60"],
            env=full_env, capture_output=True, text=True, timeout=180,
        )
        assert tail.returncode == 0, tail.stderr
        lines = [json.loads(line) for line in tail.stdout.splitlines()]
        assert len(lines) == 45
        assert len({line["record"]["EventId"] for line in lines}) == 45
        assert len({line["record"]["EventType"] for line in lines}) == 38
    finally:
        up.process.send_signal(signal.SIGINT)
        up.process.wait(60)
    assert up.process.returncode == 0, up.log()[-3000:]
