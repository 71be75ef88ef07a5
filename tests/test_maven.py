"""consumer/maven.py: which pom is used, and what a failed mvn run is reported as (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.errors import KafkaLaunchError, RegistryLaunchError
from consumer.maven import find_pom, run_mvn

ROOT = Path(__file__).resolve().parents[1]


def test_a_source_checkout_uses_the_pom_under_deploy(tmp_path):
    packaged = tmp_path / "pom.xml"
    packaged.write_text("<project/>")
    assert find_pom("kafka", packaged) == ROOT / "deploy" / "kafka" / "pom.xml"
    assert find_pom("registry", packaged) == ROOT / "deploy" / "registry" / "pom.xml"


def test_without_either_pom_the_source_path_is_named_as_missing(tmp_path):
    pom = find_pom("nothing-here", tmp_path / "pom.xml")
    assert pom == ROOT / "deploy" / "nothing-here" / "pom.xml"
    with pytest.raises(KafkaLaunchError, match=rf"^{pom} is missing"):
        run_mvn(pom, ["validate"], "Kafka 0", KafkaLaunchError)


def test_without_mvn_on_path_the_error_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RegistryLaunchError, match=r"Maven \(mvn\) is not on PATH, to fetch Apicurio Registry 9"):
        run_mvn(ROOT / "deploy" / "registry" / "pom.xml", ["validate"], "Apicurio Registry 9", RegistryLaunchError)


def test_a_failed_mvn_run_is_reported_by_its_first_error_line_without_colour_codes(tmp_path):
    pom = tmp_path / "pom.xml"
    pom.write_text("<project><modelVersion>4.0.0</modelVersion>\n")  # cut short: mvn cannot read it
    with pytest.raises(KafkaLaunchError) as raised:
        run_mvn(pom, ["validate"], "Kafka 0", KafkaLaunchError)
    message = str(raised.value)
    assert message.startswith("mvn could not resolve Kafka 0: ")
    assert "\x1b" not in message
    assert "problems were encountered while processing the POMs" in message
