"""Incremental detection (``detect --state``) against full reruns on one log: the day-N job
(one day of exchanges read, the other days from the stored digests) versus a full run at the
same cut-off, timed one after the other in one process, with per-step seconds and parity.

    .venv/bin/python benchmarks/detect_incremental.py --sim /tmp/sim1m --scale 4.4 \
        --json benchmarks/detect_incremental_results.json                 # ~1.1M exchanges
    .venv/bin/python benchmarks/detect_incremental.py --sim /tmp/sim1m --replay   # every day

For the last day of the log: (1) a full run at the end of the log; (2) the state built for all
days before it (one run, itself timed); (3) the day-N incremental job at the same cut-off as (1);
then (4) the same job again on a warm state, and the parity of (3) with (1). ``--replay`` also
runs every day's job in order from an empty state (what a daily schedule does), each compared
with a full run at its cut-off when ``--check-every`` divides its day.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from detect_engines import parity, timed_detect  # this folder is on the path as a script

from distillscope.traffic import load_scenario, simulate

STEPS = ("_load", "_digest", "_elicitation", "_buckets", "_merge", "_intents", "_features",
         "_self_referenced", "_communities", "_report")  # fmt: skip


def run(sim: Path, out: Path, **kwargs) -> dict:
    summary, total, steps = timed_detect(sim, out, STEPS, **kwargs)
    return {
        "exchanges": summary.exchanges,
        "flagged": summary.flagged,
        "seconds": round(total, 1),
        "note": next((n for n in summary.notes if n.startswith("incremental:")), None),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=4.4)
    parser.add_argument("--sim", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--replay", action="store_true")
    parser.add_argument("--check-every", type=int, default=7)
    args = parser.parse_args()
    if not (args.sim / "scenario.yaml").exists():
        simulate(load_scenario("default").replace(scale=args.scale), args.sim, progress=False)
    ts = pq.read_table(args.sim / "traffic.parquet", columns=["ts"])["ts"]
    start = pc.min(ts).as_py().replace(hour=0, minute=0, second=0, microsecond=0)
    days = (pc.max(ts).as_py() - start).days + 1
    end = start + timedelta(days=days)
    work = Path(tempfile.mkdtemp(prefix="detect-incremental-"))
    state = work / "state"
    result: dict = {"days": days, "log": str(args.sim / "traffic.parquet")}
    result["full"] = run(args.sim, work / "full", until=end)
    print("full", result["full"], flush=True)
    result["build"] = run(args.sim, work / "build", until=end - timedelta(days=1), state=state)
    print("state for days 1..N-1", result["build"], flush=True)
    result["incremental"] = run(args.sim, work / "inc", until=end, state=state)
    print(f"day {days} job", result["incremental"], flush=True)
    result["parity"] = parity(work / "full", work / "inc")
    result["full_over_incremental"] = round(
        result["full"]["seconds"] / result["incremental"]["seconds"], 2
    )
    print("parity", result["parity"], "ratio", result["full_over_incremental"], flush=True)
    if args.replay:
        shutil.rmtree(state)
        result["replay"] = []
        for k in range(1, days + 1):
            until = start + timedelta(days=k)
            job = run(args.sim, work / f"day{k}", until=until, state=state)
            job["day"] = k
            if k % args.check_every == 0 or k == days:
                full = run(args.sim, work / f"full{k}", until=until)
                job["full_seconds"] = full["seconds"]
                job["parity"] = parity(work / f"full{k}", work / f"day{k}")
            print("replay", k, job, flush=True)
            result["replay"].append(job)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
