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


# -- rtcbus shim: its options, and the signature settings it refuses ------------------------------


@pytest.fixture()
def shim_settings(monkeypatch):
    """Runs ``rtcbus shim`` in-process up to the point it would serve; returns its Settings."""
    from typer.testing import CliRunner

    import consumer.shim
    from consumer.cli import app

    for name in list(os.environ):
        if name.startswith("RTCBUS_"):
            monkeypatch.delenv(name)
    given = []
    monkeypatch.setattr(consumer.shim, "run_shim", given.append)

    def invoke(*args: str, **env: str):
        result = CliRunner().invoke(app, ["shim", *args], env=env)
        assert result.exit_code == 0, result.output
        [settings] = given
        given.clear()
        return settings

    return invoke


def test_shim_listens_where_host_and_port_say_as_uvicorn_spells_them(shim_settings):
    settings = shim_settings("--host", "0.0.0.0", "--port", "9000", "--secrets", "s")
    assert (settings.shim_host, settings.shim_port) == ("0.0.0.0", 9000)


def test_shim_host_and_port_keep_their_old_names_and_variables(shim_settings):
    settings = shim_settings("--shim-host", "10.0.0.1", "--shim-port", "9001", "--secrets", "s")
    assert (settings.shim_host, settings.shim_port) == ("10.0.0.1", 9001)
    settings = shim_settings(RTCBUS_SHIM_HOST="10.0.0.2", RTCBUS_SHIM_PORT="9002", RTCBUS_SECRETS="s")
    assert (settings.shim_host, settings.shim_port) == ("10.0.0.2", 9002)
    settings = shim_settings("--port", "9003", RTCBUS_SHIM_PORT="9002", RTCBUS_SECRETS="s")
    assert settings.shim_port == 9003  # a flag overrides the environment


def test_shim_admin_port_spool_and_unsigned_flags(shim_settings, tmp_path):
    settings = shim_settings("--admin-port", "9200", "--spool-dir", str(tmp_path), "--no-spool", "--unsigned")
    assert settings.shim_admin_port == 9200
    assert settings.spool_dir == tmp_path and settings.spool is False
    assert settings.unsigned is True and settings.secrets == []
    settings = shim_settings("--spool", RTCBUS_SPOOL="false", RTCBUS_SECRETS="s")
    assert settings.spool is True


def test_shim_flags_not_given_leave_the_environment(shim_settings):
    settings = shim_settings(RTCBUS_UNSIGNED="true", RTCBUS_SPOOL="false", RTCBUS_SHIM_ADMIN_PORT="9300")
    assert settings.unsigned is True and settings.spool is False and settings.shim_admin_port == 9300
    settings = shim_settings(RTCBUS_SECRETS="s")
    assert settings.unsigned is False and settings.spool is True


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        ([], {}, "no callback secrets"),
        (["--unsigned", "--secrets", "hunter2"], {}, "unsigned is set together with callback secrets"),
        (["--unsigned"], {"RTCBUS_SECRETS": "hunter2"}, "unsigned is set together with callback secrets"),
        (["--secrets", "hunter2,,tiger3"], {}, "secrets: Value error, entry 2 of 3 is empty"),
        ([], {"RTCBUS_SECRETS": " , "}, "secrets: Value error, entry 1 of 2 is empty"),
    ],
    ids=["no-secrets", "unsigned-and-secrets", "unsigned-and-secrets-env", "empty-entry", "blank-entries"],
)
def test_shim_refuses_unclear_signature_settings_in_one_line(args, env, says):
    result = rtcbus("--bootstrap-servers", "127.0.0.1:1", "shim", *args, **env)

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("rtcbus: error: ") and says in line
    assert "hunter2" not in result.stderr and "tiger3" not in result.stderr


def test_shim_help_says_secrets_are_required():
    result = rtcbus("shim", "--help")

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--unsigned" in text and "--shim-host" in text and "--no-spool" in text
    assert "not checked" not in text
