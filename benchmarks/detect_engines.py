"""`detect` on DuckDB and on Spark (local mode) over the same log: seconds per step for each
engine, one after the other in one run, and whether their flags, clusters and scores agree.

    .venv/bin/python benchmarks/detect_engines.py --scale 4.4 --sim /tmp/sim1m \
        --json benchmarks/detect_engines_results.json            # ~1.1M exchanges

The log is simulated once into ``--sim`` (the default scenario at ``--scale``) and reused; both
engines read its Parquet copy (``traffic.parquet``), which Spark's executors read themselves.
The per-step seconds are what a cluster sizing starts from (benchmarks/detection.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from detect_profile import timed  # this folder is on the path when run as a script

import distillscope.detect.detector as detector
from distillscope.detect.engine import DuckEngine, SparkEngine
from distillscope.traffic import load_scenario, simulate

#: ``_digest`` holds ``_elicitation`` and ``_buckets`` (inclusive seconds)
STEPS = ("_load", "_digest", "_elicitation", "_buckets", "_merge", "_intents", "_features",
         "_communities", "_report")  # fmt: skip


def timed_detect(sim: Path, out: Path, steps=STEPS, **kwargs):
    """``detect`` over ``sim``'s Parquet log with each of ``steps`` timed: the summary, the
    total seconds, and the inclusive seconds per step (largest first)."""
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    originals = {name: getattr(detector, name) for name in steps}
    for name, step in originals.items():
        setattr(detector, name, timed(seconds, calls, name, step))
    try:
        began = time.perf_counter()
        summary = detector.detect(
            sim / "traffic.parquet", out, accounts=sim / "accounts.parquet",
            events=sim / "events.parquet", **kwargs,
        )  # fmt: skip
        total = time.perf_counter() - began
    finally:
        for name, step in originals.items():
            setattr(detector, name, step)
    ranked = {k: round(v, 2) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    return summary, total, ranked


def run(engine, sim: Path, out: Path) -> dict:
    summary, total, steps = timed_detect(sim, out, engine=engine)
    return {
        "engine": engine.name,
        "exchanges": summary.exchanges,
        "accounts": summary.accounts,
        "flagged": summary.flagged,
        "seconds": round(total, 1),
        "exchanges_per_second": round(summary.exchanges / total),
        "steps": steps,
    }


def parity(a: Path, b: Path) -> dict:
    x = pq.read_table(a / "accounts.parquet").sort_by("account_id")
    y = pq.read_table(b / "accounts.parquet").sort_by("account_id")

    def clusters(t):
        found: dict = {}
        for acc, c in zip(t["account_id"].to_pylist(), t["cluster_id"].to_pylist()):
            if c:
                found.setdefault(c, []).append(acc)
        return sorted(sorted(m) for m in found.values())

    return {
        "same_accounts": x["account_id"].to_pylist() == y["account_id"].to_pylist(),
        "same_flags": x["flagged"].to_pylist() == y["flagged"].to_pylist(),
        "same_clusters": clusters(x) == clusters(y),
        "max_score_difference": float(
            np.max(np.abs(x["score"].to_numpy() - y["score"].to_numpy()))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=4.4)
    parser.add_argument("--sim", type=Path, required=True)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--engine", choices=("both", "duckdb", "spark"), default="both",
                        help="one engine per process for large logs (the other one's memory "
                        "is not held meanwhile); --out keeps its folder for the parity check")
    parser.add_argument("--partitions", type=int, help="Spark's shuffle partitions")
    parser.add_argument("--driver-memory", help="Spark's heap in local mode, e.g. 14g")
    parser.add_argument("--out", type=Path, help="keep the detectors' folders here")
    parser.add_argument("--parity", type=Path, nargs=2, metavar="FOLDER",
                        help="only compare two kept folders")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()  # fmt: skip
    if args.parity:
        print(json.dumps(parity(*args.parity)))
        return
    if not (args.sim / "scenario.yaml").exists():
        simulate(load_scenario("default").replace(scale=args.scale), args.sim, progress=False)
    work = args.out or Path(tempfile.mkdtemp(prefix="detect-engines-"))
    results = []
    if args.engine in ("both", "duckdb"):
        results.append(run(DuckEngine(), args.sim, work / "duckdb"))
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.engine in ("both", "spark"):
        began = time.perf_counter()
        memory = {"spark.driver.memory": args.driver_memory} if args.driver_memory else None
        spark = SparkEngine(args.master, partitions=args.partitions, config=memory)
        started = time.perf_counter() - began
        results.append(
            {**run(spark, args.sim, work / "spark"), "jvm_start_seconds": round(started, 1)}
        )
        print(json.dumps(results[-1], indent=2), flush=True)
    report = {"runs": results, "master": args.master, "partitions": args.partitions,
              "driver_memory": args.driver_memory}  # fmt: skip
    if args.engine == "both":
        report["spark_over_duckdb"] = round(results[1]["seconds"] / results[0]["seconds"], 2)
        report["parity"] = parity(work / "duckdb", work / "spark")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
