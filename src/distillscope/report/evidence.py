"""The radioactivity evidence page: each test's exact p-value beside the same test with control
keys, and the suspect's answers with the scored tokens highlighted.

``write_evidence`` writes ``evidence.json`` (the tests as data) and ``evidence.html`` (rendered
from ``templates/evidence.html.j2``) into a folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from distillscope.forensics.radioactivity import RadioactivityResult
from distillscope.report.pages import write_page


def p_text(log10_p: float) -> str:
    """A p-value as text, exact far below the smallest float (10^-1234.5)."""
    return f"{10**log10_p:.3g}" if log10_p > -300 else f"10^{log10_p:.1f}"


def verdict(log10_p: float) -> str:
    """What a p-value says about the suspect, in words."""
    if log10_p <= -5:
        return "strong evidence of training on our outputs (p < 1e-5)"
    if log10_p <= -2:
        return "some evidence (p < 0.01); not enough alone"
    return "no evidence"


def pvalue_axis(log10_p: float, controls: Sequence[float]) -> dict:
    """Where the tested key and each control key sit on an axis of -log10 p (a log1p scale, so
    p 0.3 and p 1e-60 both show), as fractions of its width, with its ticks."""
    top = max([-log10_p, *(-c for c in controls), 6.0]) * 1.05

    def at(value: float) -> float:
        return math.log1p(max(value, 0.0)) / math.log1p(top)

    ticks = [(0.0, "p 1")] + [(at(v), f"p 1e-{v}") for v in (2, 5, 10, 20, 50, 100) if v < top]
    return {"ours": at(-log10_p), "controls": [at(-c) for c in controls], "ticks": ticks}


def write_evidence(
    out: str | os.PathLike, results: Sequence[RadioactivityResult], *, account: str | None = None
) -> Path:
    """``evidence.json`` and a human-readable ``evidence.html`` in ``out``; returns the HTML."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"account": account, "tests": [r.as_dict() for r in results]}
    (out / "evidence.json").write_text(json.dumps(payload, indent=2))
    tests = [
        r.as_dict() | {"p_text": p_text(r.log10_p), "verdict": verdict(r.log10_p),
                       "controls": [c | {"p_text": p_text(c["log10_p"])} for c in r.controls],
                       "axis": pvalue_axis(r.log10_p, [c["log10_p"] for c in r.controls])}
        for r in results
    ]  # fmt: skip
    title = "Radioactivity evidence" + (f" for account {account}" if account else "")
    return write_page(out / "evidence.html", "evidence.html.j2", title=title, tests=tests)
