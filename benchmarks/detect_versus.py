"""The detector against an earlier version of itself on one log, in one run: seconds and quality.

    .venv/bin/python benchmarks/detect_versus.py --sim SIM --baseline c25fd01 [--json out.json]

SIM is a simulation folder (`distillscope simulate ... --out SIM`). The baseline revision is
checked out into a temporary git worktree and imported from there in a subprocess, so both
versions read the same log on the same machine, one after the other (machines here are noisy: a
ratio measured in one run means more than two absolute times from two days). Each run's flags are
scored against SIM's truth with the current `evaluate_alerts`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, sys, time
from pathlib import Path
from distillscope.detect import detect
sim, out = Path(sys.argv[1]), Path(sys.argv[2])
side = {k: sim / f"{k}.parquet" for k in ("accounts", "events") if (sim / f"{k}.parquet").exists()}
began = time.perf_counter()
summary = detect(sim / "traffic.duckdb", out, **side)
print(json.dumps({"seconds": time.perf_counter() - began, "exchanges": summary.exchanges,
                  "flagged": summary.flagged, "module": __import__("distillscope").__file__}))
"""


def _run(sim: Path, out: Path, src: Path | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(sim), str(out)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from distillscope.detect import evaluate_alerts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sim", type=Path, required=True)
    parser.add_argument("--baseline", default="c25fd01", help="git revision of the baseline")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="detect-versus-"))
    tree = root / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), args.baseline],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        results = {}
        for name, src in (("baseline", tree / "src"), ("current", None)):
            run = _run(args.sim, root / name, src)
            figures = evaluate_alerts(root / name, args.sim / "truth.parquet")
            run |= {
                "recall_at_fpr_0.001": figures["recall_at_fpr_0.001"],
                "flag_precision": figures["flagged"]["precision"],
                "flag_fpr": figures["flagged"]["fpr"],
            }
            results[name] = run
            print(name, json.dumps(run), flush=True)
        results["time_ratio"] = results["current"]["seconds"] / results["baseline"]["seconds"]
        results["baseline_revision"] = args.baseline
        print(f"current / baseline time: {results['time_ratio']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], capture_output=True)


if __name__ == "__main__":
    main()
