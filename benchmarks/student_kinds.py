"""Exposure multipliers for a random-init and a pretrained student, side by side.

Two audits of the same teacher, levels, budgets and seeds that differ only in ``--student``:

    distillscope audit --teacher default --preset quick --seeds 2 --out runs/audit-micro
    distillscope audit --teacher default --preset quick --seeds 2 --student layers:4 \
        --out runs/audit-layers4

then:

    python benchmarks/student_kinds.py runs/audit-micro runs/audit-layers4 \
        --json benchmarks/student_kinds_results.json

prints one markdown row per exposure level with each student's KL at every budget, queries to the
target and multiplier vs text (ranges over seeds), and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _range(value, ci, reason) -> str:
    if value is None:
        return reason or "n/a"
    text = f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text + (" (a bound)" if reason else "")


def student_row(results: dict, level: str) -> dict:
    entry = results["summary"][level]
    metric = results["target"].get("metric", "kl")
    return {
        "by_budget": {b: v[metric]["mean"] for b, v in entry["by_budget"].items()},
        "queries_to_target": entry["queries_to_target"],
        "queries_to_target_ci": entry["queries_to_target_ci"],
        "queries_reason": entry["reason"],
        "multiplier_vs_text": entry["multiplier_vs_text"],
        "multiplier_vs_text_ci": entry["multiplier_vs_text_ci"],
        "multiplier_reason": entry["multiplier_reason"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audits", nargs="+", type=Path, help="audit folders (results.json)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    audits = {}
    for folder in args.audits:
        results = json.loads((folder / "results.json").read_text())
        config = results["config"]
        metric = results["target"].get("metric", "kl")
        name = config["student"] + (
            f" ({config['student_tokenizer']} tokens)" if config.get("student_tokenizer") else ""
        )
        audits[name] = {
            "folder": str(folder),
            "metric": metric,
            "untrained": results["untrained"][metric],
            "target_kl": results["target"]["value"],
            "seeds": config["seeds"],
            "budgets": config["budgets"],
            "minutes": round(results["seconds"] / 60, 1)
            if isinstance(results.get("seconds"), int | float) else None,
            "levels": {level: student_row(results, level) for level in results["summary"]},
        }
    students = list(audits)
    print("| level | " + " | ".join(
        f"{s}: {audits[s]['metric']} @{'/'.join(map(str, audits[s]['budgets']))} | "
        f"{s}: queries to target | "
        f"{s}: multiplier vs text" for s in students) + " |")  # fmt: skip
    print("|---|" + "---|---|---|" * len(students))
    for level in audits[students[0]]["levels"]:
        cells = []
        for s in students:
            row = audits[s]["levels"].get(level)
            if row is None:
                cells += ["n/a"] * 3
                continue
            cells.append(" / ".join(f"{v:.2f}" for v in row["by_budget"].values()))
            cells.append(_range(row["queries_to_target"], row["queries_to_target_ci"],
                                row["queries_reason"]))  # fmt: skip
            cells.append(_range(row["multiplier_vs_text"], row["multiplier_vs_text_ci"],
                                row["multiplier_reason"]))  # fmt: skip
        print(f"| {level} | " + " | ".join(cells) + " |")
    for s in students:
        a = audits[s]
        print(f"{s}: untrained {a['metric']} {a['untrained']:.2f}, seeds {a['seeds']}, "
              f"{a['folder']}, {a['minutes']} min")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(audits, indent=2) + "\n")


if __name__ == "__main__":
    main()
