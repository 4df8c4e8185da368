"""Robustness curves: how detection holds up as campaigns try harder to look ordinary.

Each point of a curve is a whole experiment: the scenario simulated with one knob set on every
campaign (``Scenario.for_all_campaigns``), the detector run on it, the flags evaluated against the
truth. The knobs are the ones a campaign operator controls:

- ``mixing_share``: share of ordinary ShareGPT prompts sent as camouflage;
- ``paraphrase_rate``: share of templated prompts reworded;
- ``timing_jitter``: how irregular each account's request times are (0: a clock);
- ``ip_rotation``: chance a request leaves from another proxy address.

Every point is written to ``out/points/<knob>=<value>.json`` as soon as it is done, so an
interrupted sweep resumes where it stopped; the simulated logs are deleted after scoring.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rich.table import Table

from distillscope.detect.detector import DetectConfig, detect
from distillscope.detect.evaluate import evaluate_alerts
from distillscope.traffic import Scenario, ScenarioError, load_scenario, simulate

#: The knobs swept by default and their values (the issue's ranges; the default scenario's
#: settings lie inside each range).
KNOBS: dict[str, tuple[float, ...]] = {
    "mixing_share": (0.05, 0.2, 0.35, 0.5),
    "paraphrase_rate": (0.0, 0.25, 0.5, 0.75),
    "timing_jitter": (0.05, 0.2, 0.5, 1.0),
    "ip_rotation": (0.0, 0.3, 0.6, 1.0),
}
#: The figures kept for each point.
FIGURES = ("recall_at_fpr_0.001", "recall_at_fpr_0.01", "precision", "campaigns_found")


def parse_knobs(text: str) -> dict[str, tuple[float, ...]]:
    """``"mixing_share=0.05,0.5;ip_rotation=0,1"`` -> knobs; a bare name gets its default values."""
    knobs: dict[str, tuple[float, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if not values:
            if name not in KNOBS:
                raise ScenarioError(f"no default values for knob {name!r}; give name=v1,v2")
            knobs[name] = KNOBS[name]
            continue
        try:
            knobs[name] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ScenarioError(f"knob {name}: values must be numbers, not {values!r}") from None
    if not knobs:
        raise ScenarioError("no knobs to sweep")
    return knobs


def robustness(
    out: str | os.PathLike,
    *,
    scenario: Scenario | str = "default",
    knobs: Mapping[str, Sequence[float]] | None = None,
    scale: float = 0.5,
    config: DetectConfig | None = None,
    on_point: Callable[[str, float, dict], None] | None = None,
) -> dict[str, list[dict]]:
    """Sweep each knob over its values (the others at the scenario's settings) and return, per
    knob, one row per value: ``value`` and the ``FIGURES`` of the detector on that simulation.

    ``scale`` multiplies every account count (0.5 of the default scenario: ~1,000 legitimate
    accounts and ~150 campaign accounts, about 40 s a point on 2 cores).
    """
    out = Path(out)
    base = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    base = base.replace(scale=base.scale * scale)
    knobs = dict(knobs or KNOBS)
    for name, values in knobs.items():
        base.for_all_campaigns(**{name: values[0]})  # unknown knobs fail before any work
    curves: dict[str, list[dict]] = {}
    for name, values in knobs.items():
        curves[name] = []
        for value in values:
            point = out / "points" / f"{name}={value:g}.json"
            if point.exists():
                row = json.loads(point.read_text())
            else:
                row = _run_point(base.for_all_campaigns(**{name: value}), out / "work", config)
                row = {"knob": name, "value": value, **row}
                point.parent.mkdir(parents=True, exist_ok=True)
                point.write_text(json.dumps(row, indent=2))
            curves[name].append(row)
            if on_point is not None:
                on_point(name, value, row)
    (out / "robustness.json").write_text(json.dumps(curves, indent=2))
    return curves


def _run_point(scenario: Scenario, work: Path, config: DetectConfig | None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    sim, alerts = work / "sim", work / "alerts"
    summary = simulate(scenario, sim, progress=False)
    detect(
        sim / "traffic.duckdb", alerts, accounts=sim / "accounts.parquet",
        events=sim / "events.parquet", config=config,
    )  # fmt: skip
    figures = evaluate_alerts(alerts, sim / "truth.parquet", sim / "traffic.parquet")
    found = figures["campaigns_found"]
    row = {
        "recall_at_fpr_0.001": figures["recall_at_fpr_0.001"],
        "recall_at_fpr_0.01": figures["recall_at_fpr_0.01"],
        "precision": figures["flagged"]["precision"],
        "campaigns_found": sum(c["found"] for c in found.values()),
        "campaigns": len(found),
        "campaign_accounts": figures["population"]["campaign_accounts"],
        "baseline_recall_at_fpr_0.001": figures.get("baseline", {}).get("recall_at_fpr_0.001"),
        "exchanges": summary.exchanges,
    }
    shutil.rmtree(work, ignore_errors=True)
    return row


def format_curves(curves: Mapping[str, list[dict]]) -> Table:
    """One row per (knob, value): the detector's recall at FPR 0.1% and 1%, flag precision and
    campaigns found as clusters."""
    table = Table(title="robustness: every campaign set to each value in turn")
    for column in ("knob", "value", "recall @ FPR 0.1%", "recall @ FPR 1%", "precision", "found"):
        table.add_column(column, justify="left" if column == "knob" else "right")
    for name, rows in curves.items():
        for row in rows:
            precision = row["precision"]
            table.add_row(
                name, f"{row['value']:g}", f"{100 * row['recall_at_fpr_0.001']:.1f}%",
                f"{100 * row['recall_at_fpr_0.01']:.1f}%",
                "-" if precision is None else f"{100 * precision:.1f}%",
                f"{row['campaigns_found']}/{row['campaigns']}",
            )  # fmt: skip
    return table
