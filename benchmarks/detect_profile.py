"""Where `detect`'s time goes: each step of `distillscope.detect.detector` wrapped in a timer,
one run over a simulated log (inclusive seconds and calls per step).

    .venv/bin/python benchmarks/detect_profile.py --scale 4.4 --sim /tmp/sim1m   # ~1.1M exchanges

The log is simulated once into ``--sim`` and reused. Compare two versions of the code by running
this from each checkout on the same log (``PYTHONPATH=OTHER/src``), one after the other.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import distillscope.detect.detector as detector
from distillscope.traffic import load_scenario, simulate

#: inclusive: ``_digest`` holds ``_elicitation`` and ``_buckets``; ``_prepare`` holds all up to
#: ``_features``; ``_self_referenced`` holds ``_rank`` and ``_communities``
STEPS = ("_prepare", "_load", "_digest", "_elicitation", "_buckets", "_merge", "_intents",
         "_features", "_self_referenced", "_rank", "_communities", "_significant", "_assemble",
         "_write", "_report")  # fmt: skip


def timed(seconds: dict, calls: dict, name: str, step):
    """``step`` adding its inclusive seconds to ``seconds[name]`` and counting its calls."""

    def run(*a, **k):
        began = time.perf_counter()
        try:
            return step(*a, **k)
        finally:
            seconds[name] += time.perf_counter() - began
            calls[name] += 1

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=4.4)
    parser.add_argument("--sim", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.sim / "scenario.yaml").exists():
        simulate(load_scenario("default").replace(scale=args.scale), args.sim, progress=False)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    for name in STEPS:
        setattr(detector, name, timed(seconds, calls, name, getattr(detector, name)))
    began = time.perf_counter()
    summary = detector.detect(
        args.sim / "traffic.duckdb",
        Path(tempfile.mkdtemp(prefix="detect-profile-")),
        accounts=args.sim / "accounts.parquet",
        events=args.sim / "events.parquet",
    )
    total = time.perf_counter() - began
    report = {
        "exchanges": summary.exchanges,
        "seconds": round(total, 1),
        "exchanges_per_second": round(summary.exchanges / total),
        "steps": {k: {"seconds": round(v, 2), "calls": calls[k]} for k, v in
                  sorted(seconds.items(), key=lambda kv: -kv[1])},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
