"""Tabulate safety-transfer audits for benchmarks/safety_transfer.md.

Runs (each about 40-60 min on 2 CPU cores, resumable):

    distillscope audit --preset safety --out runs/safety-tiny
    distillscope audit --preset safety --student layers:4 --budgets 32,128 \
        --refusal-share 0,0.05,0.2 --out runs/safety-layers4

then:

    python benchmarks/safety_transfer.py runs/safety-tiny runs/safety-layers4 \
        --json benchmarks/safety_transfer_results.json

prints the guarded teacher's build report and one markdown table row per (student, level, budget,
refusal share), and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ratio(stat: dict) -> str:
    mean, ci = stat.get("mean"), stat.get("ci")
    if mean is None or mean != mean:
        return "n/a"
    return f"{mean:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _rate(row: dict, name: str) -> str:
    exact = row[f"{name}_exact"]
    lo, hi = exact["ci"]
    share = exact["hits"] / max(exact["n"], 1)
    return f"{exact['hits']}/{exact['n']} ({share:.0%}; {lo:.0%}-{hi:.0%})"


def _results(path: Path) -> dict:
    """An audit's results.json, or, for an audit still running or stopped, the transfer table of
    the runs it has finished (marked partial)."""
    if (path / "results.json").is_file():
        return json.loads((path / "results.json").read_text())
    from distillscope.audit import AuditConfig, transfer_table
    from distillscope.safety.scoring import rule_agreement

    held = json.loads((path / "audit-config.json").read_text())
    config = AuditConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in held.items()})
    runs = [json.loads(p.read_text()) for p in sorted((path / "runs").glob("*.json"))]
    untrained = json.loads((path / "untrained.json").read_text())
    reference = json.loads((path / "teacher.json").read_text())
    answers = [a["answer"] for r in [reference, untrained, *runs] for a in r.get("answers", [])]
    return {
        "config": held,
        "transfer": transfer_table(runs, untrained["metrics"], reference, config),
        "scoring": {"agreement": rule_agreement(answers, seed=config.seed)},
        "seconds": float("nan"),
        "partial": f"{len(runs)} runs finished",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audits", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from distillscope.safety.guarded import GuardSpec, build_report, guarded_model_dir

    build = build_report(guarded_model_dir(GuardSpec()))
    g, b = build["heldout"]["guarded"], build["heldout"]["base"]
    print("## guarded teacher build")
    print(
        f"- build time {build['seconds']['total'] / 60:.1f} min "
        f"(train {build['seconds']['train'] / 60:.1f})"
    )
    for name in ("refusal", "over_refusal", "identity"):
        print(
            f"- {name}: guarded {g[f'{name}_hits']}/{g[f'{name}_n']}, "
            f"base {b[f'{name}_hits']}/{b[f'{name}_n']}"
        )
    print(f"- KL(base || guarded) on held-out ShareGPT: {build['kl_to_base']['kl']:.4f} nats/token")
    out = {"build": build, "audits": {}}
    print()
    print(
        "| student | level | budget | refusal share | restricted queries | capability transferred "
        "| safety transferred | selective safety | refusal (held-out) | over-refusal | identity |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.audits:
        results = _results(path)
        student = results["config"]["student"]
        out["audits"][str(path)] = {
            "config": results["config"],
            "transfer": results["transfer"],
            "scoring": results["scoring"],
            "seconds": results["seconds"],
        }
        for row in results["transfer"]["rows"]:
            print(
                f"| {student} | {row['exposure']} | {row['budget']} | {row['refusal_share']:.0%} "
                f"| {row['restricted_queries']} | {_ratio(row['capability_transferred'])} "
                f"| {_ratio(row['safety_transferred'])} "
                f"| {_ratio(row['selective_safety_transferred'])} | {_rate(row, 'refusal')} "
                f"| {_rate(row, 'over_refusal')} | {_rate(row, 'identity')} |"
            )
        agreement = results["scoring"]["agreement"]
        print(
            f"\n{path}: teacher {results['transfer']['teacher']}, untrained "
            f"{results['transfer']['untrained']}; rule/classifier agreement "
            f"{agreement.get('agreement')} (kappa {agreement.get('kappa')}, "
            f"n {agreement.get('n')}); "
            f"{results['seconds'] / 60:.1f} min {results.get('partial', '')}\n"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
