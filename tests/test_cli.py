import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from consumer.kafka.admin import describe_topics, topic_names

RTCBUS = str(Path(sys.executable).parent / "rtcbus")


def rtcbus(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RTCBUS_")}
    return subprocess.run(
        [RTCBUS, *args], env={**environment, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.kafka
def test_topics_create_then_list(kafka):
    prefix = f"test{uuid.uuid4().hex[:8]}"
    flags = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", prefix]

    created = rtcbus(*flags, "topics", "create", "--partitions", "2")
    again = rtcbus(*flags, "topics", "create", "--partitions", "2")
    listed = rtcbus(*flags, "topics", "list")

    settings = kafka.settings(topic_prefix=prefix)
    assert created.returncode == 0, created.stderr
    assert created.stdout.split() == [word for name in topic_names(settings) for word in ("created", name)]
    assert again.stdout.split() == [word for name in topic_names(settings) for word in ("exists", name)]
    partitions = {name: info.partitions for name, info in describe_topics(settings, topic_names(settings)).items()}
    assert partitions.pop(settings.quarantine_topic) == 1
    assert set(partitions.values()) == {2}
    raw_line = next(line for line in listed.stdout.splitlines() if line.startswith(f"{prefix}.callbacks.raw "))
    assert "partitions=2" in raw_line and f"retention.ms={settings.raw_retention_ms}" in raw_line


def test_an_unknown_kafka_property_is_one_line_naming_it():
    result = rtcbus("topics", "list", RTCBUS_KAFKA_CONFIG=json.dumps({"sasl.mechansim": "PLAIN"}))

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("rtcbus: error: invalid settings: kafka_config:") and "sasl.mechansim" in line


def test_an_unreachable_kafka_is_one_line_naming_it():
    result = rtcbus("--bootstrap-servers", "127.0.0.1:1", "topics", "list")

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("rtcbus: error: Kafka at 127.0.0.1:1 did not answer")
