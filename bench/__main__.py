"""The benchmark suite of issue 5, in one command.

Run: .venv/bin/python -m bench [--full | --smoke] [--bootstrap HOST:PORT] [--out DIR]
(``make bench`` installs the ``bench`` extra and the Quix virtualenv, then runs the quick suite.)

Sections, each a module with a function returning plain dicts: codec (``bench.codec``),
per-event CPU of each step, without a broker (``bench.floor``), router throughput against
four contenders (``bench.router``), shim throughput and latency
(``bench.shim_bridge``), the shim with its spool engaged and the spool's drain
(``bench.shim_spool``), end-to-end latency by commit interval (``bench.latency``), the
dedupe window's memory, CPU and restore as it grows (``bench.dedupe``), and in
full mode RSS over a 10-minute sustained run. Without ``--bootstrap`` a local Kafka is
started for the run and stopped afterwards. Writes ``<out>/<date>.json`` (raw figures,
machine, versions, targets met) and, except in smoke mode, PNG plots next to it.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import (
    client_path, codec, dedupe, floor, latency, report, router, shim_bridge, shim_spool, shim_steps,
)
from bench.broker import bench_kafka
from bench.workload import raw_records, weights

# Sizes per mode. Quick takes 8–9 minutes on 2 shared cores (the router's arms most of it),
# smoke about a minute and a half.
PROFILES = {
    "smoke": {
        "codec": {"seconds": 0.2, "rounds": 1, "events": 200},
        "floor": {"events": 200, "rounds": 1},
        "client_path": {"events": 2000, "back_to_back_rounds": 1},
        "router": {"events": 300, "rounds": 1, "arms": ("rtcbus-eos", "rtcbus-alo", "passthrough", "textbook")},
        "intervals_drain": (),
        "router_shim_fill": {"events": 200, "rounds": 1},
        "shim": {"seconds": 1, "rounds": 1, "connections": (8,), "warmup_s": 0.5,
                 "arms": ("bare", "bridge")},
        "shim_steps": {"requests": 200, "rounds": 1},
        "shim_spool": {"seconds": 1, "rounds": 1, "connections": (8,), "warmup_s": 0.5,
                       "drain_records": 0},
        "latency": {"rate": 200, "seconds": 2, "intervals": (100,), "repeats": 1},
        "memory_s": 0,
        "dedupe": {"ids": (2000,), "partitions": (24,), "restore_ids": (2000,), "probe_ids": 2000},
    },
    "quick": {
        "codec": {"seconds": 3, "rounds": 3, "events": 2000},
        "floor": {"events": 3000, "rounds": 3},
        "client_path": {"events": 30000},
        "router": {"events": 30000, "rounds": 2, "arms": tuple(a.name for a in router.ARMS)},
        "intervals_drain": (20, 500),
        "router_shim_fill": {"events": 10000, "rounds": 2},
        "shim": {"seconds": 3, "rounds": 2, "connections": (64, 256), "warmup_s": 1,
                 "arms": ("bare", "bare-asgi", "no-kafka", "bridge", "workers-2")},
        "shim_steps": {"requests": 2000, "rounds": 3},
        "shim_spool": {"seconds": 5, "rounds": 1, "connections": (64,), "warmup_s": 1,
                       "drain_records": 20000},
        # repeats: runs at the default 100 ms interval; the p99 target must hold in every one.
        "latency": {"rate": 2000, "seconds": 12, "intervals": (20, 100, 500), "repeats": 5},
        "memory_s": 0,
        "dedupe": {"ids": (10_000, 100_000, 300_000), "partitions": (1, 24), "restore_ids": (300_000,),
                   "probe_ids": 300_000},
    },
    "full": {
        "codec": {"seconds": 5, "rounds": 5, "events": 2000},
        "floor": {"events": 5000, "rounds": 5},
        "client_path": {"events": 100000},
        "router": {"events": 100000, "rounds": 3, "arms": tuple(a.name for a in router.ARMS)},
        "intervals_drain": (20, 500, 1000),
        "router_shim_fill": {"events": 30000, "rounds": 3},
        "shim": {"seconds": 10, "rounds": 3, "connections": (64, 256), "warmup_s": 2,
                 "arms": ("bare", "bare-asgi", "no-kafka", "bridge", "per-report", "workers-2")},
        "shim_steps": {"requests": 5000, "rounds": 5},
        "shim_spool": {"seconds": 10, "rounds": 2, "connections": (64, 256), "warmup_s": 2,
                       "drain_records": 50000},
        "latency": {"rate": 2000, "seconds": 60, "intervals": (20, 100, 500, 1000), "repeats": 5},
        "memory_s": 600,
        "dedupe": {"ids": (10_000, 100_000, 1_000_000, 10_000_000), "partitions": (1, 24),
                   "restore_ids": (1_000_000, 10_000_000), "probe_ids": 1_000_000},
    },
}


def run_all(mode: str, bootstrap: str, kafka_version: str | None) -> dict:
    sizes = PROFILES[mode]
    started = time.monotonic()
    results: dict = {
        "mode": mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": report.machine(kafka_version),
        "workload": {"weights_pct": weights()},
    }

    def section(name: str, work: Callable[[], dict]) -> None:
        print(f"== {name}", flush=True)
        begun = time.monotonic()
        try:
            results[name] = work()
        except Exception as exc:  # one broken section must not lose the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()}
        results[name]["section_s"] = time.monotonic() - begun

    section("codec", lambda: codec.run(**sizes["codec"]))
    section("floor", lambda: floor.run(**sizes["floor"]))
    # The other half of a drain's CPU: the Kafka client's calls, on the broker.
    section("client_path", lambda: client_path.run(bootstrap, **sizes["client_path"]))
    records = raw_records(sizes["router"]["events"])
    arms = [a for a in router.ARMS if a.name in sizes["router"]["arms"]]

    def router_section() -> dict:
        result = router.run(bootstrap, len(records), sizes["router"]["rounds"], arms, records)
        for arm in router.ARMS:
            if arm not in arms:
                result["arms"][arm.name] = {"status": f"not run in {mode} mode"}
        return result

    section("router", router_section)
    # The same two-way comparison with raw filled through the real shim over HTTP, as
    # production fills it (the independent check of the router against the ceiling).
    section("router_shim_fill", lambda: router.run(
        bootstrap, sizes["router_shim_fill"]["events"], sizes["router_shim_fill"]["rounds"],
        [a for a in router.ARMS if a.name in ("rtcbus-eos", "passthrough")], fill_via="shim"))
    section("shim", lambda: shim_bridge.run(bootstrap, **sizes["shim"]))
    # The same request's CPU in one process, step by step: what the shim arms above are made of.
    section("shim_steps", lambda: shim_steps.run(**sizes["shim_steps"]))
    section("shim_spool", lambda: shim_spool.run(bootstrap, **sizes["shim_spool"]))

    def latency_section() -> dict:
        lat = sizes["latency"]
        runs = {
            str(interval): latency.run(bootstrap, lat["rate"], lat["seconds"], interval)
            for interval in lat["intervals"]
        }
        # The default interval again, each run on fresh topics and processes: a tail that
        # holds in one run only is not a tail that holds.
        repeats = [runs["100"]] if "100" in runs else []
        repeats += [latency.run(bootstrap, lat["rate"], lat["seconds"], 100)
                    for _ in range(lat["repeats"] - len(repeats))]
        throughput = {}
        if sizes["intervals_drain"]:
            throughput = router.by_commit_interval(
                bootstrap, sizes["intervals_drain"], 1, records
            )
        eos = results.get("router", {}).get("arms", {}).get("rtcbus-eos", {})
        if "events_per_s" in eos:  # the 100 ms figure is the comparison's
            throughput["100"] = {"runs": eos["runs"], "events_per_s": eos["events_per_s"]}
        return {"runs": runs, "repeats_100": [_repeat(run) for run in repeats], "throughput": throughput}

    section("latency", latency_section)
    section("dedupe", lambda: dedupe.run(rooms=10_000, **sizes["dedupe"]))
    if sizes["memory_s"]:
        # A dedupe window of 2 minutes, so that it fills within the run: with the default
        # 15 minutes the router's RSS grows through a 10-minute run by design.
        section("memory", lambda: latency.run(
            bootstrap, sizes["latency"]["rate"], sizes["memory_s"], 100, rss_every_s=5,
            dedupe_window_s=120))
    # Smoke sizes are far too small for ratios to mean anything.
    results["targets"] = (
        report.targets(results) + shim_spool.targets(results.get("shim_spool", {}))
        + dedupe.targets(results.get("dedupe", {}))
        if mode != "smoke" else []
    )
    results["elapsed_s"] = time.monotonic() - started
    return results


def _repeat(run: dict) -> dict:
    """What a repeated latency run reports: its percentiles and its stages."""
    keys = ("rate", "achieved_rate", "received", "p50_ms", "p99_ms", "max_ms", "stages_p50_ms", "stages_p99_ms",
            "cores_busy")
    return {key: run.get(key) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the long version (20 minutes on 2026-11-25, before later sections were added)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, no plots (CI)")
    parser.add_argument("--bootstrap", help="an existing Kafka; default: start one for the run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    chosen = "full" if args.full else "smoke" if args.smoke else "quick"
    out = Path(args.out)
    with bench_kafka(args.bootstrap) as kafka:
        results = run_all(chosen, kafka.bootstrap_servers, kafka.version)
    if chosen != "smoke":
        from bench.plots import plot

        results["plots"] = [str(p.name) for p in plot(results, out) + dedupe.plot(results.get("dedupe", {}), out)]
    path = report.write(results, out)
    print(report.tables(results))
    print(shim_spool.table(results.get("shim_spool", {})))
    print(dedupe.table(results.get("dedupe", {})))
    print(f"\nwritten: {path} ({results['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
