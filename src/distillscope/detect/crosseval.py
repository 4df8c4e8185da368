"""Evaluation that cannot flatter: every shape held out of tuning in turn, the worst case reported.

A detector tuned on the worlds it is scored on measures its tuning. ``cross_evaluate`` takes
simulated worlds whose truth names each account's ``shape`` (``distillscope simulate --scenario
shapes``, ``--random-shapes N``), runs the detector on each (once; the run is kept in
``WORLD/alerts``), and then, for every shape but the ordinary background, holds that shape out:

- what is tuned (a score threshold at the FPR budget, the learned scorer and its threshold) sees
  only the accounts of the other shapes, in every world;
- the held-out shape's accounts are then scored: its recall if it is a campaign shape, the share
  of its accounts flagged if it is a legitimate population.

Four methods side by side: the detector's own flags (the permutation null: nothing tuned at all),
its score at the tuned threshold, the learned scorer (``detect.learned``) at its tuned threshold,
and the volume-only baseline (request count at the tuned threshold). Rates carry exact
(Clopper-Pearson) 95% intervals; the headline is the worst held-out campaign shape's recall and
the worst held-out legitimate population's flag rate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillscope.detect.evaluate import EvaluationInputError, binomial_ci95, legit_cut
from distillscope.detect.learned import LearnedScorer, LearnedScorerError

METHODS = ("detector_flags", "detector_tuned", "learned", "volume")
#: The ordinary population every world has: never held out (there is nothing to hold it against).
BACKGROUND = "background"


def world_folders(root: str | os.PathLike) -> list[Path]:
    """``root`` itself when it is a simulation, else every folder below it that is one
    (``world-000``..., at any depth)."""
    root = Path(root)
    if (root / "truth.parquet").exists():
        return [root]
    worlds = sorted(p.parent for p in root.rglob("truth.parquet"))
    if not worlds:
        raise EvaluationInputError(f"no simulated worlds (folders with truth.parquet) in {root}")
    return worlds


def _alerts(world: Path, rerun: bool, detect_kwargs: dict) -> Path:
    from distillscope.detect.detector import detect

    out = world / "alerts"
    if rerun or not (out / "accounts.parquet").exists():
        side = {
            name: world / f"{name}.parquet"
            for name in ("accounts", "events")
            if (world / f"{name}.parquet").exists()
        }
        detect(world / "traffic.duckdb", out, **side, **detect_kwargs)
    return out


def _load(world: Path, alerts: Path, index: int) -> pa.Table:
    truth = pq.read_table(world / "truth.parquet", columns=["account_id", "campaign_id", "shape"])
    table = pq.read_table(alerts / "accounts.parquet")
    joined = table.join(truth, "account_id", join_type="inner")
    return joined.append_column("world", pa.array(np.full(joined.num_rows, index)))


def scored_worlds(
    worlds: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    rerun: bool = False,
    progress: Callable[[str], None] | None = None,
    **detect_kwargs,
) -> pa.Table:
    """Every account of every world: the detector's output joined with the truth (``shape``,
    ``campaign_id``), the world's index and folder. Worlds are detected first where needed."""
    if isinstance(worlds, str | os.PathLike):
        folders = world_folders(worlds)
    else:
        folders = [f for w in worlds for f in world_folders(w)]
    tables = []
    for index, world in enumerate(folders):
        if progress:
            progress(f"detect {world} ({index + 1}/{len(folders)})")
        table = _load(world, _alerts(world, rerun, detect_kwargs), index)
        tables.append(table.append_column("world_folder", pa.array([str(world)] * table.num_rows)))
    return pa.concat_tables(tables, promote_options="default")


def cross_evaluate(
    worlds: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    fpr: float = 0.001,
    rerun: bool = False,
    progress: Callable[[str], None] | None = None,
    **detect_kwargs,
) -> dict:
    """Leave-one-shape-out over ``worlds`` (a folder of worlds, one world, or a list): per shape
    and method the held-out rate with its interval, and the worst cases. ``detect_kwargs`` go to
    ``detect`` for worlds not yet scored (or all of them with ``rerun``)."""
    table = scored_worlds(worlds, rerun=rerun, progress=progress, **detect_kwargs)
    folders = sorted(set(table["world_folder"].to_pylist()))
    shapes = sorted(set(table["shape"].to_pylist()) - {BACKGROUND, None})
    is_campaign = pc.is_valid(table["campaign_id"]).to_numpy(zero_copy_only=False)
    shape = np.array(table["shape"].to_pylist(), dtype=object)
    world = table["world"].to_numpy()
    score = table["score"].to_numpy()
    volume = table["requests"].to_numpy().astype(float)
    flags = table["flagged"].to_numpy(zero_copy_only=False)
    rows = {}
    for held in shapes:
        if progress:
            progress(f"hold out {held}")
        test = shape == held
        tune = ~test
        campaign_shape = bool(is_campaign[test].any())
        flagged = {
            "detector_flags": flags[test],
            "detector_tuned": score[test] > legit_cut(score[tune & ~is_campaign], fpr),
            "volume": volume[test] > legit_cut(volume[tune & ~is_campaign], fpr),
        }
        try:
            scorer = LearnedScorer().fit(
                [table.filter(pa.array(tune & (world == w))) for w in np.unique(world)],
                [is_campaign[tune & (world == w)] for w in np.unique(world)],
            )
            flagged["learned"] = scorer.predict_proba(table.filter(pa.array(test))) >= (
                scorer.threshold
            )
        except LearnedScorerError:
            flagged["learned"] = None
        rows[held] = {
            "kind": "campaign" if campaign_shape else "legitimate",
            "accounts": int(test.sum()),
            "worlds": int(len(np.unique(world[test]))),
            **{method: _rate(flagged.get(method)) for method in METHODS},
        }
    return {
        "fpr_budget": fpr,
        "worlds": [str(f) for f in folders],
        "accounts": int(table.num_rows),
        "shapes": rows,
        "worst": _worst(rows),
    }


def _rate(flagged: np.ndarray | None) -> dict | None:
    if flagged is None:
        return None
    hits, n = int(np.sum(flagged)), int(len(flagged))
    return {"flagged": hits, "rate": hits / n if n else None, "ci95": binomial_ci95(hits, n)}


def _worst(rows: dict) -> dict:
    """Per method: the lowest recall over held-out campaign shapes and the highest flag rate over
    held-out legitimate populations, each with the shape it came from."""
    worst = {}
    for method in METHODS:
        campaign = [(r[method]["rate"], s) for s, r in rows.items()
                    if r["kind"] == "campaign" and r[method]]  # fmt: skip
        legit = [(r[method]["rate"], s) for s, r in rows.items()
                 if r["kind"] == "legitimate" and r[method]]  # fmt: skip
        worst[method] = {
            "campaign_recall": min(campaign) if campaign else None,
            "legitimate_flag_rate": max(legit) if legit else None,
        }
    return worst


def write_cross(result: dict, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def format_cross(result: dict):
    """A rich table: one row per held-out shape, one column per method, the worst cases last."""
    from rich.table import Table

    table = Table(
        title=f"held out of tuning, flagged at FPR <= {result['fpr_budget']:.1%} "
        f"({result['accounts']:,} accounts, {len(result['worlds'])} worlds)"
    )
    table.add_column("held-out shape")
    table.add_column("accounts", justify="right")
    for method in METHODS:
        table.add_column(method.replace("_", " "), justify="right")

    def cell(rate: dict | None) -> str:
        if rate is None or rate["rate"] is None:
            return "-"
        low, high = rate["ci95"]
        return f"{rate['rate']:.1%} [{low:.0%}, {high:.0%}]"

    for kind, label in (("campaign", "recall"), ("legitimate", "flagged")):
        for shape, row in sorted(result["shapes"].items()):
            if row["kind"] == kind:
                table.add_row(
                    f"{shape} ({label})", f"{row['accounts']:,}",
                    *(cell(row[m]) for m in METHODS),
                )  # fmt: skip
    worst = result["worst"]

    def extreme(key: str) -> list[str]:
        out = []
        for method in METHODS:
            value = worst[method][key]
            out.append("-" if value is None else f"{value[0]:.1%} ({value[1]})")
        return out

    table.add_row("worst campaign recall", "", *extreme("campaign_recall"), style="bold")
    table.add_row("worst legitimate flagged", "", *extreme("legitimate_flag_rate"), style="bold")
    return table
