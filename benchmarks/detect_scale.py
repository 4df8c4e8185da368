"""How the detector's time grows with the log: the default scenario simulated at several scales
(accounts multiplied, 14 days each), `detect` timed on each, exchanges scored per second.

    .venv/bin/python benchmarks/detect_scale.py --scales 0.5,1,2,4.4 --json out.json

Scale 4.4 of the default scenario is about 1M exchanges. Detection-quality figures come with each
size (recall at FPR 0.1% from detect-eval), so a faster detector cannot silently get worse.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from distillscope.detect import detect, evaluate_alerts
from distillscope.traffic import load_scenario, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default="0.5,1,2,4.4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for scale in [float(s) for s in args.scales.split(",")]:
        root = Path(tempfile.mkdtemp(prefix="detect-scale-"))
        try:
            sim = root / "sim"
            simulate(load_scenario("default").replace(scale=scale), sim, progress=False)
            began = time.perf_counter()
            summary = detect(
                sim / "traffic.duckdb",
                root / "alerts",
                accounts=sim / "accounts.parquet",
                events=sim / "events.parquet",
            )
            seconds = time.perf_counter() - began
            figures = evaluate_alerts(root / "alerts", sim / "truth.parquet")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        row = {
            "scale": scale,
            "exchanges": summary.exchanges,
            "accounts": summary.accounts,
            "seconds": round(seconds, 1),
            "exchanges_per_second": round(summary.exchanges / seconds),
            "recall_at_fpr_0.001": figures["recall_at_fpr_0.001"],
            "flagged_precision": figures["flagged"]["precision"],
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
