import json
import os
from pathlib import Path

import pytest

from consumer.errors import ConfigError
from consumer.settings import load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Only what a test sets: the developer's own RTCBUS_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("RTCBUS_") or name == "KAFKA_HOME":
            monkeypatch.delenv(name)


def test_bootstrap_servers_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RTCBUS_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")

    assert load_settings().bootstrap_servers == "kafka-1:9092,kafka-2:9092"


def test_a_flag_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("RTCBUS_BOOTSTRAP_SERVERS", "from-env:9092")
    monkeypatch.setenv("RTCBUS_PARTITIONS", "12")

    settings = load_settings(bootstrap_servers="from-flag:9092", partitions=None)

    assert settings.bootstrap_servers == "from-flag:9092"
    assert settings.partitions == 12  # a flag not given (None) leaves the environment's value


def test_defaults_without_environment():
    settings = load_settings()

    assert settings.bootstrap_servers is None
    assert settings.partitions == 6
    assert settings.home == Path.home() / ".rtcbus"


def test_kafka_home_is_read_from_the_usual_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("KAFKA_HOME", str(tmp_path))

    assert load_settings().kafka_home == tmp_path


def test_security_settings_pass_through_and_stay_secret(monkeypatch):
    monkeypatch.setenv(
        "RTCBUS_KAFKA_CONFIG",
        json.dumps({"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.password": "hunter2"}),
    )

    settings = load_settings()

    assert settings.kafka_client_config() == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.password": "hunter2",
    }
    assert "hunter2" not in json.dumps(settings.describe())


def test_an_unknown_kafka_property_is_rejected_by_name(monkeypatch):
    monkeypatch.setenv("RTCBUS_KAFKA_CONFIG", json.dumps({"sasl.mechanism": "PLAIN", "sasl.pasword": "x"}))

    with pytest.raises(ConfigError, match=r"unknown Kafka properties: sasl\.pasword"):
        load_settings()


def test_a_kafka_property_rtcbus_owns_is_rejected_by_name(monkeypatch):
    monkeypatch.setenv("RTCBUS_KAFKA_CONFIG", json.dumps({"acks": "1"}))

    with pytest.raises(ConfigError, match="rtcbus sets these Kafka properties itself: acks"):
        load_settings()


def test_an_invalid_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("RTCBUS_PARTITIONS", "0")

    with pytest.raises(ConfigError, match="partitions"):
        load_settings()
