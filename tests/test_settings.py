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


# -- callback secrets, unsigned mode, the skew window -----------------------------------------------


def test_signatures_are_on_by_default_with_a_five_minute_skew_window():
    settings = load_settings()

    assert settings.unsigned is False
    assert settings.signature_skew_s == 300
    assert settings.secrets == []


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("false", False)])
def test_unsigned_comes_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("RTCBUS_UNSIGNED", value)

    assert load_settings().unsigned is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("one", ["one"]), ("one,two", ["one", "two"]), (" one , two ", ["one", "two"]), ("", [])],
)
def test_secrets_are_comma_separated(monkeypatch, value, expected):
    monkeypatch.setenv("RTCBUS_SECRETS", value)

    assert [s.get_secret_value() for s in load_settings().secrets] == expected


@pytest.mark.parametrize("value", [" , ", ",", "a,,b", "a, ", " ,a", " "])
def test_an_empty_secret_entry_is_an_error_naming_the_setting(monkeypatch, value):
    monkeypatch.setenv("RTCBUS_SECRETS", value.replace("a", "hunter2").replace("b", "tiger3"))

    with pytest.raises(ConfigError, match=r"secrets: .*entry \d+ of \d+ is empty") as raised:
        load_settings()
    assert "hunter2" not in str(raised.value) and "tiger3" not in str(raised.value)


def test_an_empty_secret_given_as_a_flag_is_an_error_too():
    with pytest.raises(ConfigError, match="secrets: .*entry 2 of 2 is empty"):
        load_settings(secrets="hunter2,")


def test_a_secret_that_is_not_utf8_is_an_error(monkeypatch):
    monkeypatch.setenv("RTCBUS_SECRETS", "good,b\udcffd")  # a non-UTF-8 byte, as os.environ holds it

    with pytest.raises(ConfigError, match="secrets: .*entry 2 of 2 is not valid UTF-8") as raised:
        load_settings()
    assert "good" not in str(raised.value)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"app-a": "s1,,s2"}, r"app_secrets: .*AppId 'app-a': entry 2 of 3 is empty"),
        ({"app-a": "s1, "}, r"app_secrets: .*AppId 'app-a': entry 2 of 2 is empty"),
        ({"app-a": ""}, r"app_secrets: .*AppId 'app-a': no secret"),
        ({"app-a": []}, r"app_secrets: .*AppId 'app-a': no secret"),
        ({" ": "s1"}, "app_secrets: .*an AppId is empty"),
    ],
)
def test_an_empty_app_secret_is_an_error_naming_the_app(monkeypatch, value, named):
    monkeypatch.setenv("RTCBUS_APP_SECRETS", json.dumps(value))

    with pytest.raises(ConfigError, match=named) as raised:
        load_settings()
    assert "s1" not in str(raised.value) and "s2" not in str(raised.value)


def test_app_secrets_are_comma_separated(monkeypatch):
    monkeypatch.setenv("RTCBUS_APP_SECRETS", json.dumps({"app-a": "s1, s2", "app-b": "s3"}))

    settings = load_settings()

    assert {app: [s.get_secret_value() for s in v] for app, v in settings.app_secrets.items()} == {
        "app-a": ["s1", "s2"], "app-b": ["s3"],
    }
    assert "s1" not in json.dumps(settings.describe())


@pytest.mark.parametrize("value", ["none", "0", "-5", ""])
def test_the_skew_window_cannot_be_turned_off(monkeypatch, value):
    monkeypatch.setenv("RTCBUS_SIGNATURE_SKEW_S", value)

    with pytest.raises(ConfigError, match="signature_skew_s"):
        load_settings()


def test_the_skew_window_must_fit_twice_in_the_dedupe_window():
    assert load_settings(signature_skew_s=450, dedupe_window_s=900).signature_skew_s == 450
    assert load_settings(signature_skew_s=30, dedupe_window_s=60).dedupe_window_s == 60

    with pytest.raises(ConfigError) as raised:
        load_settings(signature_skew_s=451, dedupe_window_s=900)
    message = str(raised.value)
    assert "signature_skew_s (451)" in message and "dedupe_window_s (900)" in message
    assert "replay" in message and "2 * signature_skew_s" in message


def test_a_short_dedupe_window_needs_a_shorter_skew_window(monkeypatch):
    monkeypatch.setenv("RTCBUS_DEDUPE_WINDOW_S", "60")

    with pytest.raises(ConfigError, match=r"signature_skew_s \(300\) must be at most half of dedupe_window_s \(60\)"):
        load_settings()
    monkeypatch.setenv("RTCBUS_SIGNATURE_SKEW_S", "30")
    assert load_settings().signature_skew_s == 30


def test_unsigned_needs_no_relation_between_the_windows():
    # Anyone can forge a fresh callback then: the bound would protect nothing.
    assert load_settings(unsigned=True, dedupe_window_s=60).signature_skew_s == 300


def test_the_spool_must_come_before_the_answer_deadline():
    with pytest.raises(ConfigError, match="spool_after_s .* must be less than ack_timeout_s"):
        load_settings(spool_after_s=2.0, ack_timeout_s=1.5)
    assert load_settings(spool=False, spool_after_s=2.0, ack_timeout_s=1.5).spool is False
    assert load_settings().spool_after_s < load_settings().ack_timeout_s


def test_an_rtcbus_variable_that_is_no_setting_is_named_in_a_warning_without_its_value(monkeypatch, caplog):
    for name in [key for key in os.environ if key.startswith("RTCBUS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RTCBUS_SPOOL_DRI", "a-value-that-may-be-secret")
    monkeypatch.setenv("RTCBUS_SPOOL_DIR", "/tmp/spool-right")
    with caplog.at_level("WARNING", logger="consumer.settings"):
        settings = load_settings()
    assert str(settings.spool_dir) == "/tmp/spool-right"
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["RTCBUS_SPOOL_DRI is not an rtcbus setting and is ignored; did you mean RTCBUS_SPOOL_DIR?"]
    assert "a-value-that-may-be-secret" not in caplog.text
