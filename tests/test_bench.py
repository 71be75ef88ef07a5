"""The benchmarks still start and produce figures (CI runs these smoke tests, not the benchmarks)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def test_codec_bench_runs_and_reports_every_contender():
    result = subprocess.run(
        [sys.executable, "-m", "bench.codec", "--seconds", "0.3", "--rounds", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(.+?)\s+([\d,]+)\s+([\d.]+)x$", result.stdout, re.MULTILINE)
    assert len(rows) == 8, result.stdout
    assert all(int(rate.replace(",", "")) > 0 for _, rate, _ in rows)


def test_a_drains_cpu_is_split_by_thread_name_and_what_exited_is_the_rest():
    from bench.router import by_thread

    before = {1: ("python", 1.0), 2: ("rdk:main", 0.5), 3: ("rdk:broker-1", 0.25), 4: ("python", 2.0)}
    # Thread 4 exited during the drain; thread 5 (a librdkafka thread) was born in it.
    after = {1: ("python", 1.75), 2: ("rdk:main", 0.625), 3: ("rdk:broker-1", 0.5), 5: ("rdk:broker-2", 0.125)}

    split = by_thread(before, after, cpu_s=1.5, events=1000)

    assert split == {"Python threads": 750.0, "librdkafka threads": 500.0, "threads that exited": 250.0}


@pytest.mark.kafka
def test_bench_smoke_run_writes_a_result_file_with_every_section(kafka, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--bootstrap", kafka.bootstrap_servers,
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())

    assert results["mode"] == "smoke"
    assert results["machine"]["versions"]["librdkafka"]
    assert len(results["workload"]["weights_pct"]) == 38
    for section in ("codec", "floor", "client_path", "router", "shim", "shim_steps", "shim_spool", "latency", "dedupe"):
        assert "error" not in results[section], results[section].get("traceback")
    steps = results["shim_steps"]["cpu_us_per_request"]
    assert len(steps) == 12 and all(us > 0 for us in steps.values())
    assert all(row["events_per_s"] > 0 for row in results["codec"]["rows"].values())
    assert len(results["floor"]["cpu_us_per_event"]) == 8
    assert all(us > 0 for us in results["floor"]["cpu_us_per_event"].values())
    assert set(results["floor"]["gc_collections"]) == {"0", "1", "2"}
    client = results["client_path"]
    assert client["routed"] > 0 and client["transaction_wall_us_per_event"] > 0
    assert all(us > 0 for us in client["caller_thread_us_per_event"].values())
    # /proc counts CPU in 10 ms ticks: a smoke-sized drain may take less than one.
    assert all(arm["cpu_us_per_event"] >= 0 for arm in results["router"]["arms"].values()
               if arm["status"] == "ok")
    arms = results["router"]["arms"]
    for name in ("rtcbus-eos", "rtcbus-alo", "passthrough", "textbook"):
        assert arms[name]["status"] == "ok" and arms[name]["events_per_s"] > 0, arms[name]
        split = arms[name]["cpu_us_per_event_by_thread"]
        assert set(split) == {"librdkafka threads", "Python threads", "threads that exited"}, split
        assert all(us >= 0 for us in split.values())
    assert arms["quix"]["status"] == "not run in smoke mode"
    if results["shim"]["status"] == "ok":  # oha installed (sh bench/tools.sh)
        for rows in results["shim"]["connections"].values():
            assert {row["runs"][0]["statuses"].get("200", 0) > 0 for row in rows.values()} == {True}
    else:
        assert results["shim"]["status"].startswith("not installed: oha")
    (spool_run,) = results["shim_spool"]["connections"]["8"]["runs"]
    normal, spooled = spool_run["arms"]["normal"], spool_run["arms"]["spooled"]
    assert normal["statuses"].get("200", 0) > 0 and spooled["statuses"].get("200", 0) > 0
    assert normal["metrics"]["stored_kafka"] > 0
    assert spooled["metrics"]["stored_kafka"] == 0 < spooled["metrics"]["stored_spool"]
    assert spool_run["drain"]["drained"] and spool_run["drain"]["forwarded"] > 0
    assert results["shim_spool"]["missing_from_raw"] == 0
    for grid in results["dedupe"]["by_partitions"].values():
        assert {row["bytes_per_id"] > 0 and row["seen_miss_ns"] > 0
                for rows in grid.values() for row in rows.values()} == {True}
    (run,) = results["latency"]["runs"].values()
    assert run["received"] == run["ok"] > 0 and run["p99_ms"] > 0
