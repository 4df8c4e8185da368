"""The detection report: what an analyst reads after ``distillscope detect`` (and ``detect-eval``).

``detection_page`` gathers the page's figures from the detector's account table (a pure
function: no I/O), ``write_detection_report`` saves them as ``report.json`` and renders
``report.html``, and ``add_evaluation`` re-renders that page from ``report.json`` with an
evaluation's figures, so a second evaluation replaces the first and nothing edits HTML.

The page shows the score distribution against the flag threshold, each cluster (members,
requests, median score, example reasons), and for each flagged account its requests per day,
its per-signal evidence (-ln p of each signal, the ``evidence_*`` columns) and the reasons.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from distillscope.report.pages import write_page

#: Flagged accounts listed on the page (the rest are in accounts.parquet).
MAX_ACCOUNTS = 500
#: Bars of the score histogram.
BINS = 40


def score_histogram(scores: Sequence[float], threshold: float, bins: int = BINS) -> dict:
    """Counts of ``scores`` in ``bins`` equal bins spanning them and ``threshold``; each bin
    says whether it lies at or above the threshold (drawn in the flag colour)."""
    values = np.asarray(scores, dtype=float)
    values = values[np.isfinite(values)]
    top = max(float(values.max()) if len(values) else 0.0, threshold) * 1.02 or 1.0
    counts, edges = np.histogram(values, bins=bins, range=(0.0, top))
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "flagged": (edges[:-1] >= threshold).tolist(),
        "threshold": threshold,
    }


def detection_page(
    table: pa.Table,
    summary: Mapping[str, Any],
    threshold: float,
    timeline: Mapping[str, Mapping[date, int]],
    days: Sequence[date],
) -> dict:
    """The page's figures, JSON-ready: ``table`` is the detector's account table, ``timeline``
    each flagged account's requests per day over ``days`` (the log's days, in order)."""
    rows = table.to_pylist()
    signals = [c.removeprefix("evidence_") for c in table.column_names if c.startswith("evidence_")]
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -r["score"])
    members: dict[str, list[dict]] = {}
    for row in rows:
        if row["cluster_id"]:
            members.setdefault(row["cluster_id"], []).append(row)
    clusters = [
        {
            "cluster_id": cluster,
            "accounts": len(group),
            "flagged": sum(bool(r["flagged"]) for r in group),
            "requests": sum(r["requests"] for r in group),
            "median_score": float(np.median([r["score"] for r in group])),
            "members": [r["account_id"] for r in sorted(group, key=lambda r: -r["score"])],
            "example_reasons": _reason_lines(group[0]["reasons"])[:6],
        }
        for cluster, group in members.items()
    ]
    clusters.sort(key=lambda c: -c["median_score"])
    return {
        "summary": dict(summary),
        "threshold": threshold,
        "scores": score_histogram([r["score"] for r in rows], threshold),
        "clusters": clusters,
        "signals": signals,
        "days": [d.isoformat() for d in days],
        "shown": min(len(flagged), MAX_ACCOUNTS),
        "flagged": [
            {
                "account_id": r["account_id"],
                "score": r["score"],
                "cluster_id": r["cluster_id"] or "",
                "requests": r["requests"],
                "reasons": _reason_lines(r["reasons"]),
                "evidence": [_finite(r[f"evidence_{s}"]) for s in signals],
                "per_day": [timeline.get(r["account_id"], {}).get(d, 0) for d in days],
            }
            for r in flagged[:MAX_ACCOUNTS]
        ],
    }


def _finite(value: float | None) -> float:
    return 0.0 if value is None or not math.isfinite(value) else abs(float(value))


def _reason_lines(reasons: str) -> list[str]:
    """The detector's ``reasons`` (``;``-separated) as one line each."""
    return [part.strip() for part in (reasons or "").split("; ") if part.strip()]


def write_detection_report(
    out: str | Path, page: dict, evaluation: Mapping[str, Any] | None = None
) -> Path:
    """Save ``page`` as ``out/report.json`` and render ``out/report.html``; returns the HTML."""
    out = Path(out)
    (out / "report.json").write_text(json.dumps(page, indent=1, default=str))
    return write_page(
        out / "report.html", "detection.html.j2", title="distillscope detect",
        evaluation=evaluation, **page,
    )  # fmt: skip


def add_evaluation(
    alerts_dir: str | Path, rows: Sequence[tuple[str, str, str]], population: Mapping[str, Any]
) -> Path | None:
    """Re-render the alerts folder's report.html with an evaluation: ``rows`` of (metric,
    detector, volume-only baseline) and the truth's ``population``. None without a report."""
    alerts_dir = Path(alerts_dir)
    saved = alerts_dir / "report.json"
    if not saved.exists():
        return None
    page = json.loads(saved.read_text())
    evaluation = {"rows": [list(r) for r in rows], "population": dict(population)}
    return write_detection_report(alerts_dir, page, evaluation)
