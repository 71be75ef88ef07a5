"""The monitoring in deploy/: the alert rules and scrape configuration of deploy/prometheus/ and
the Grafana dashboard deploy/grafana/rtcbus.json, checked with the real tools and against a
real shim and router.

- promtool (Prometheus's own, built by deploy/monitoring-tools.sh) checks rules.yaml and
  prometheus.yml, runs the unit tests rules.test.yaml (each alert fires on its synthetic
  series, none on a healthy system), and parses every dashboard expression, given to it as
  recording rules;
- every metric a rule or a panel reads is one that a shim or a router running on the session's
  Kafka exposes on /metrics, and every label they group by, match on or print is one those
  metrics carry there. The shims and the router are driven so that each labelled series exists:
  a 200, a 400, a 401, a dead letter, and a shim without Kafka whose spool fills (200s from
  the spool, then 503).

A missing tool fails these tests, naming it: CI installs them (deploy/monitoring-tools.sh).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kafka_helpers import free_ports
from support import Stack, callback, wait_for

REPO = Path(__file__).parents[1]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules.test.yaml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "rtcbus.json"
TOOLS_SCRIPT = DEPLOY / "monitoring-tools.sh"

# The first build of promtool compiles Prometheus (about 7 minutes on 2 cores); CI builds it
# before the tests, and a warm run of the script takes well under a second.
pytestmark = pytest.mark.timeout(1200)


# -- the tools ----------------------------------------------------------------------------------------


@functools.cache
def _installed_tools() -> dict[str, str]:
    try:
        run = subprocess.run(
            ["sh", str(TOOLS_SCRIPT)], capture_output=True, text=True, timeout=1100, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{TOOLS_SCRIPT.name}: {exc}") from exc
    if run.returncode != 0:
        raise RuntimeError(f"{TOOLS_SCRIPT.name} exited {run.returncode}:\n{run.stderr[-3000:]}")
    return dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)


def monitoring_tool(name: str) -> str:
    """The path of a tool deploy/monitoring-tools.sh provides (``PROMTOOL``,
    ``COMPOSE_SPEC_SCHEMA``): the environment variable of that name if set, else the script's
    answer (it installs what is missing). A tool that cannot be had fails the test, naming it."""
    path = os.environ.get(name)
    if not path:
        try:
            path = _installed_tools()[name]
        except (RuntimeError, KeyError) as exc:
            pytest.fail(f"{name.lower()} is not available (deploy/monitoring-tools.sh): {exc}", pytrace=False)
    if not Path(path).is_file():
        pytest.fail(f"{name.lower()}: {path} does not exist", pytrace=False)
    return path


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [monitoring_tool("PROMTOOL"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


# -- the expressions ----------------------------------------------------------------------------------

# What PromQL spells in lower case that is not a metric name.
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "start", "end",
}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
_AGGREGATION = re.compile(
    r"\b(?:sum|min|max|avg|count|stddev|stdvar|topk|bottomk|quantile|group|count_values|limitk)\s*"
    r"(?:(?:by|without)\s*\([^)]*\)\s*)?\("
)
# Grafana's macros, as a Prometheus data source substitutes them (any valid duration will do).
_GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "3h"}
# Labels Prometheus attaches to every scraped series, and the bucket label of histograms.
_TARGET_LABELS = {"instance", "job"}
# Prometheus's own series the rules and panels may read.
_PROMETHEUS_SERIES = {"up"}


@dataclass(frozen=True)
class Expression:
    where: str
    expr: str
    printed_labels: frozenset[str] = frozenset()
    """Labels the result is expected to carry: legend templates, alert annotations."""


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects: identifiers that are not functions, aggregations,
    keywords or label names (string literals, matchers, ranges and grouping clauses removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'", '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(_GROUPING, " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if match.start() and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the unit of a duration or the exponent of a number
        if text[match.end():].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """Labels ``expr`` groups by, joins on or matches."""
    names: set[str] = set()
    for clause in re.findall(_GROUPING, expr):
        names |= {name.strip() for name in clause.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return names


def result_labels(expr: str, metrics: dict[str, set[str]]) -> set[str]:
    """The labels the result of ``expr`` can carry: an aggregation keeps its grouping labels
    only; a bare selector keeps its metric's and the target's."""
    if _AGGREGATION.search(expr):
        return {
            name.strip()
            for clause in re.findall(r"\b(?:by)\s*\(([^)]*)\)", expr)
            for name in clause.split(",")
        }
    found = set(_TARGET_LABELS)
    for name in metric_names(expr):
        found |= metrics.get(name, set())
    return found


def rule_expressions() -> list[Expression]:
    rules = yaml.safe_load(RULES.read_text())
    found = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            templates = " ".join(rule.get("annotations", {}).values())
            found.append(
                Expression(f"rules.yaml {name}", rule["expr"], frozenset(re.findall(r"\$labels\.(\w+)", templates)))
            )
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    return [p for panel in panels for p in [panel, *all_panels(panel.get("panels", []))]]


def dashboard_expressions() -> list[Expression]:
    found = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            legend = target.get("legendFormat", "")
            found.append(
                Expression(
                    f"panel {panel['id']} {panel['title']!r} {target['refId']}",
                    target["expr"],
                    frozenset(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)),
                )
            )
    return found


def as_promql(expr: str) -> str:
    for macro, value in _GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


# -- promtool ------------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules_and_the_scrape_configuration():
    checked = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    # check config reads rule_files too: prometheus.yml loads this rules.yaml.
    config = promtool("check", "config", SCRAPE_CONFIG.name, cwd=SCRAPE_CONFIG.parent)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout, config.stdout


def test_each_alert_fires_on_its_case_and_none_on_a_healthy_system():
    tested = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = yaml.safe_load(RULES_TEST.read_text())
    assert cases["rule_files"] == [RULES.name]
    fired = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == alerts, f"alerts without a case that fires them: {sorted(alerts - fired)}"
    quiet = [
        case for case in cases["tests"]
        if {t["alertname"] for t in case["alert_rule_test"]} == alerts
        and not any(t["exp_alerts"] for t in case["alert_rule_test"])
    ]
    assert quiet, "no case in which every alert is checked and none fires"


def test_every_dashboard_expression_parses():
    # promtool parses expressions in rule files only: each target becomes a recording rule.
    expressions = dashboard_expressions()
    rules = {
        "groups": [{
            "name": "dashboard",
            "rules": [
                {"record": f"rtcbus_dashboard:expression_{n}", "expr": as_promql(e.expr)}
                for n, e in enumerate(expressions)
            ],
        }]
    }
    with_names = {f"rtcbus_dashboard:expression_{n}": e.where for n, e in enumerate(expressions)}
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    path = scratch / f"rtcbus-dashboard-rules-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    try:
        checked = promtool("check", "rules", path.name, cwd=path.parent)
    finally:
        path.unlink()
    assert checked.returncode == 0, f"{checked.stdout}{checked.stderr}\n(rules: {with_names})"
    assert f"SUCCESS: {len(expressions)} rules found" in checked.stdout, checked.stdout


# -- the rules file as the chart and the on-call engineer read it ---------------------------------------


def test_every_alert_says_how_bad_it_is_and_what_to_do():
    rules = yaml.safe_load(RULES.read_text())
    assert set(rules) == {"groups"}, "a plain rule file: the chart wraps its groups in a PrometheusRule"
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            names.append(name)
            assert re.fullmatch(r"Rtcbus[A-Z][A-Za-z]+", name), name
            assert rule.get("for"), f"{name}: no for:"
            assert rule["labels"]["severity"] in {"critical", "warning"}, name
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
    assert len(names) == len(set(names)), "an alert name is used twice"
    # Only Prometheus's templates: the chart inserts the file with .Files.Get, which does not
    # render it, and anything else between {{ }} would be a Helm template by mistake.
    values = [v for g in rules["groups"] for r in g["rules"] for v in [*r["labels"].values(), *r["annotations"].values()]]
    for template in re.findall(r"\{\{(.*?)\}\}", " ".join(values)):
        assert re.fullmatch(r"\s*\$(labels\.\w+|value)(\s*\|\s*\w+)?\s*", template), template
    chart_copy = DEPLOY / "helm" / "rtcbus" / "files" / "rules.yaml"
    if chart_copy.exists() or chart_copy.is_symlink():
        assert chart_copy.resolve() == RULES.resolve(), "the chart must read this very file"


def test_the_alerts_named_in_the_docs_and_the_dashboard_exist():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    texts = {"deploy/grafana/rtcbus.json": DASHBOARD.read_text()}
    readme = DEPLOY / "README.md"
    if readme.exists():
        texts["deploy/README.md"] = readme.read_text()
    for where, text in texts.items():
        named = set(re.findall(r"\bRtcbus[A-Z][A-Za-z]+\b", text))
        assert named <= alerts, f"{where} names alerts that rules.yaml does not have: {sorted(named - alerts)}"


# -- the dashboard --------------------------------------------------------------------------------------


def test_the_dashboard_is_a_well_formed_grafana_dashboard():
    board = dashboard()
    assert board["uid"] == "rtcbus" and board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = all_panels(board["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat", "state-timeline", "gauge", "bargauge", "table"}, panel
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["id"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["id"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap at {x},{y}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["id"]
        assert panel["targets"], f"panel {panel['id']} queries nothing"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["id"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["id"]
    # What the on-call engineer asks first, each answered by a panel.
    queried = " ".join(e.expr for e in dashboard_expressions())
    for needed in [
        "sum by (status) (rate(rtcbus_shim_requests_total",
        "sum by (via) (rate(rtcbus_shim_stored_total",
        "sum by (reason) (rate(rtcbus_shim_refused_total",
        "rtcbus_shim_signature_failures_total",
        "rtcbus_shim_spool_depth",
        "rtcbus_shim_spool_oldest_age_seconds",
        "rtcbus_shim_spooling",
        "sum by (domain) (rate(rtcbus_router_records_out_total",
        "sum by (error) (rate(rtcbus_router_dead_letters_total",
        "sum by (partition) (rtcbus_router_consumer_lag)",
        "rtcbus_router_transactions_committed_total",
        "rtcbus_router_transactions_aborted_total",
        "rtcbus_router_producer_replacements_total",
        "rtcbus_router_duplicates_dropped_total",
        "rtcbus_shim_quarantined_total",
        "rtcbus_shim_quarantine_dropped_total",
    ]:
        assert needed in queried, f"no panel queries {needed}"


# -- against a real shim and router ---------------------------------------------------------------------


@dataclass
class Exposed:
    """What running rtcbus processes expose: every name a query can select, with its labels."""

    types: dict[str, str] = field(default_factory=dict)
    """Selectable name (``rtcbus_shim_requests_total``, ``..._bucket``) -> metric type."""
    labels: dict[str, set[str]] = field(default_factory=dict)
    """Selectable name -> the labels its samples carry."""
    sampled: set[str] = field(default_factory=set)
    """Names with at least one sample (a labelled metric has none until its first use)."""

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            suffixes = {
                "counter": ["_total", "_created"],
                "histogram": ["_bucket", "_count", "_sum", "_created"],
                "summary": ["", "_count", "_sum", "_created"],
            }.get(family.type, [""])
            base = family.name.removesuffix("_total") if family.type == "counter" else family.name
            for suffix in suffixes:
                self.types[base + suffix] = family.type
                self.labels.setdefault(base + suffix, set())
            for sample in family.samples:
                self.types.setdefault(sample.name, family.type)
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                self.sampled.add(sample.name)


def _scrape(url: str) -> str:
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    return response.text


@pytest.fixture(scope="module")
def exposed(kafka, tmp_path_factory) -> Exposed:
    """The /metrics of two shims and a router on the session's Kafka, after traffic that gives
    every labelled series a sample."""
    workdir = tmp_path_factory.mktemp("monitoring")
    stack = Stack(kafka.bootstrap_servers, workdir, partitions=2)
    try:
        shim = stack.start_shim()
        router = stack.start_router()
        shim_metrics = f"http://127.0.0.1:{stack.env['RTCBUS_SHIM_ADMIN_PORT']}/metrics"
        router_metrics = f"http://127.0.0.1:{router.env['RTCBUS_METRICS_PORT']}/metrics"
        join = {"RoomId": "room-m", "UserId": "u1", "DeviceType": "web", "Timestamp": 1, "ExtraInfo": ""}
        assert stack.post(callback("UserJoinRoom", join, stack.secret)) == 200
        assert stack.post(b"not json") == 400
        assert stack.post(callback("UserJoinRoom", join, "not-the-secret")) == 401
        # Signed and a valid envelope, so the shim stores it; no RoomId, so the router dead-letters it.
        assert stack.post(callback("UserJoinRoom", {"UserId": "no-room"}, stack.secret)) == 200
        stack.wait_caught_up()

        # A shim with no Kafka to reach and a 1 MiB spool: it spools, then the spool is full (503).
        broken_port = free_ports(2)
        broken_admin = broken_port + 1
        broken = stack.start_shim(
            RTCBUS_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_ports(1)}",
            RTCBUS_SHIM_PORT=str(broken_port),
            RTCBUS_SHIM_ADMIN_PORT=str(broken_admin),
            RTCBUS_SPOOL_DIR=str(workdir / "full-spool"),
            RTCBUS_SPOOL_MAX_BYTES=str(1024 * 1024),
            RTCBUS_SPOOL_AFTER_S="0.3",
        )
        statuses = []
        with httpx.Client(timeout=10) as client:
            for n in range(20):  # ~100 kB each
                body = callback("UserJoinRoom", {**join, "Pad": "p" * 100_000, "N": n}, stack.secret)
                statuses.append(client.post(f"http://127.0.0.1:{broken_port}/callbacks", content=body).status_code)
                if statuses[-1] == 503:
                    break
        assert statuses[0] == 200 and statuses[-1] == 503, statuses

        found = Exposed()

        def router_counted() -> str | None:
            text = _scrape(router_metrics)
            needed = ["rtcbus_router_records_out_total{", "rtcbus_router_dead_letters_total{", "rtcbus_router_consumer_lag{"]
            return text if all(n in text for n in needed) else None

        found.add(wait_for(router_counted, 30, "the router to count its batch"))
        found.add(_scrape(shim_metrics))
        found.add(_scrape(f"http://127.0.0.1:{broken_admin}/metrics"))
        broken.kill()  # its graceful stop would wait 20 s for a Kafka that is not there
        shim.assert_running()
        return found
    finally:
        stack.stop_all()


@pytest.mark.kafka
@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_and_label_queried_is_one_rtcbus_exposes(exposed, source):
    expressions = rule_expressions() if source == "rules" else dashboard_expressions()
    problems = []
    for e in expressions:
        names = metric_names(e.expr)
        if not names:
            problems.append(f"{e.where}: selects no metric: {e.expr}")
        available = set(_TARGET_LABELS)
        for name in names:
            if name in _PROMETHEUS_SERIES:
                continue
            if name not in exposed.types:
                problems.append(f"{e.where}: {name} is not exposed by a shim or a router")
                continue
            if exposed.types[name] == "counter" and not name.endswith("_total"):
                problems.append(f"{e.where}: {name} is a counter's created time, not its value")
            if name not in exposed.sampled:
                problems.append(f"{e.where}: {name} had no sample to check its labels on (drive it in the fixture)")
            available |= exposed.labels[name]
        for label in label_names(e.expr) - available:
            problems.append(f"{e.where}: label {label!r} is on none of {sorted(names)}")
        output = result_labels(e.expr, exposed.labels)
        for label in e.printed_labels - output:
            problems.append(f"{e.where}: prints label {label!r}, which its result does not carry")
    assert not problems, "\n".join(problems)


def test_the_expression_reader_finds_what_it_should():
    # The helpers above decide what the real-metrics test checks: pin them on known cases.
    assert metric_names('sum by (status) (rate(rtcbus_shim_requests_total{status="503"}[5m])) > 1/60') == {
        "rtcbus_shim_requests_total"
    }
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))") == {"a_bucket"}
    assert metric_names("sum(x offset 5m) / on (instance) group_left (job) up and absent(y) or 1e3") == {"x", "up", "y"}
    assert label_names('sum by (a, b) (m{c="1", d=~"x"}) / ignoring (e) n') == {"a", "b", "c", "d", "e"}
    assert result_labels("max by (instance) (m) > 0", {}) == {"instance"}
    assert result_labels('up{job="j"} == 0', {}) == {"instance", "job"}
