"""The benchmarks still start and produce figures (CI runs this smoke test, not the benchmarks)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_codec_bench_runs_and_reports_every_contender():
    result = subprocess.run(
        [sys.executable, "-m", "bench.codec", "--seconds", "0.3", "--rounds", "1"],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(.+?)\s+([\d,]+)\s+([\d.]+)x$", result.stdout, re.MULTILINE)
    assert len(rows) == 6, result.stdout
    assert all(int(rate.replace(",", "")) > 0 for _, rate, _ in rows)


@pytest.mark.kafka
def test_router_bench_runs_against_a_broker(kafka):
    result = subprocess.run(
        [sys.executable, "-m", "bench.router", "--events", "300", "--rounds", "1",
         "--intervals", "100", "--bootstrap", kafka.bootstrap_servers],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = re.findall(r"^\s+100 ms\s+([\d,]+)\s+1\.00x", result.stdout, re.MULTILINE)
    assert int(row.replace(",", "")) > 0
