"""PNG plots of a run (matplotlib): throughput bars, latency CDF, RSS over time."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Write the plots the results allow; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    arms = {n: a for n, a in results.get("router", {}).get("arms", {}).items() if a["status"] == "ok"}
    if arms:
        figure, axes = plt.subplots(figsize=(7, 3.5))
        names = list(arms)
        axes.bar(names, [arms[n]["events_per_s"] for n in names], color="tab:blue")
        for index, name in enumerate(names):
            runs = [r["events_per_s"] for r in arms[name]["runs"]]
            axes.plot([index] * len(runs), runs, "k.", markersize=4)
        axes.set_ylabel("events/s (median; dots: rounds)")
        axes.set_title("Router throughput, pre-filled raw topic, 3 partitions")
        written.append(_save(figure, out_dir / "router-throughput.png"))

    shim = results.get("shim", {}).get("connections", {})
    if shim:
        figure, axes = plt.subplots(figsize=(7, 3.5))
        labels, values = [], []
        for count, rows in shim.items():
            for arm, row in rows.items():
                labels.append(f"{arm}\n{count} conns")
                values.append(row["rps"])
        axes.bar(labels, values, color="tab:green")
        axes.set_ylabel("requests/s (median)")
        axes.set_title("Shim throughput")
        written.append(_save(figure, out_dir / "shim-throughput.png"))

    latency = results.get("latency", {}).get("runs", {})
    if latency:
        figure, axes = plt.subplots(figsize=(7, 3.5))
        for interval, run in latency.items():
            points = sorted((float(p), ms) for p, ms in run["cdf_ms"].items() if ms is not None)
            axes.plot([ms for _, ms in points], [p for p, _ in points],
                      label=f"commit interval {interval} ms")
        axes.set_xscale("log")
        axes.set_xlabel("POST → read_committed on the domain topic, ms")
        axes.set_ylabel("fraction of events")
        axes.set_title(f"End-to-end latency at {next(iter(latency.values()))['rate']:,.0f} events/s")
        axes.legend()
        written.append(_save(figure, out_dir / "latency-cdf.png"))

    rss_runs = [("memory", results.get("memory", {}))] + [
        (f"e2e {interval} ms", run) for interval, run in latency.items()
    ]
    rss_runs = [(label, run) for label, run in rss_runs if run.get("rss_mb")]
    if rss_runs:
        label, run = rss_runs[0]
        figure, axes = plt.subplots(figsize=(7, 3.5))
        for proc, samples in run["rss_mb"].items():
            axes.plot([t for t, _ in samples], [mb for _, mb in samples], label=proc)
        axes.set_xlabel("seconds")
        axes.set_ylabel("RSS, MB")
        axes.set_ylim(bottom=0)
        axes.set_title(f"RSS over time ({label} run)")
        axes.legend()
        written.append(_save(figure, out_dir / "rss.png"))
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
