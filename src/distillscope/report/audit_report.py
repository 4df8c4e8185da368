"""Turn an exposure audit's ``results.json`` into figures, a self-contained HTML page and a table.

The audit's claim is quantitative (how many teacher queries each exposure level needs to reach a
fidelity target), so the report must make it checkable at a glance and never overstate it:

* every figure puts queries on a log axis, because budgets grow geometrically and the interesting
  question is the *ratio* of queries between levels;
* every level keeps one colour everywhere (``LEVEL_COLOURS``), so figures and tables read together;
* the headline never prints an extrapolated number: a level that missed the target shows the
  audit's reason instead, and an estimate or interval beyond the largest budget is withheld or
  shown as a bound;
* ``report.html`` embeds its images as data URIs and carries no external JS, CSS or fonts, so it
  can be mailed, archived or opened offline and still show everything.

``results`` is read defensively: missing budgets, one seed, null summaries, NaNs and unknown extra
keys degrade the output (no band, an em dash, a note) rather than crash it.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from distillscope.errors import ExposureError
from distillscope.exposure import Exposure, parse_exposure, richness
from distillscope.report.pages import png_uri, write_page

__all__ = [
    "FIGURES",
    "LEVEL_COLOURS",
    "format_headline",
    "level_colour",
    "order_levels",
    "write_audit_report",
]

#: One fixed colour per exposure level, rich (blues/greens) to poor (reds/purple), so the same
#: level looks the same in every figure, in the HTML tables and in the terminal.
LEVEL_COLOURS: dict[str, str] = {
    "full": "#1f4e9c",
    "top50": "#3a8fd9",
    "top20": "#12a089",
    "top10": "#6aa84f",
    "top5": "#e0a100",
    "top3": "#f07c1b",
    "top2": "#b5651d",
    "top1": "#d1304b",
    "text": "#6a3d9a",
}
#: Colours for levels outside ``LEVEL_COLOURS`` (e.g. ``top7``), picked by a stable hash of the
#: name so an unusual level still keeps its colour across runs of the report.
_FALLBACK_COLOURS = ("#8c564b", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#2ca02c")
_UNTRAINED_COLOUR = "#6b6b6b"
_TARGET_COLOUR = "#000000"
_TEACHER_COLOUR = "#333333"

#: The figure files written beside ``report.html``, in page order.
FIGURES = (
    "fidelity_vs_queries.png",
    "metrics_vs_queries.png",
    "behaviour_vs_fidelity.png",
    "transfer_vs_share.png",
)

#: Secondary fidelity metrics for the grid: (key, axis label, which direction is better).
_GRID_METRICS = (
    ("top1_agreement", "top-1 agreement", "higher is better"),
    ("tv", "total variation", "lower is better"),
    ("ece", "expected calibration error", "lower is better"),
    (
        "sample_teacher_logprob",
        "teacher log-lik. of student samples\n(nats/token)",
        "higher is better",
    ),
)

_DASH = "\u2014"


# --------------------------------------------------------------------------------------------
# Reading results defensively
# --------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite float, or None for null, NaN, infinities, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _dict(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (so chained lookups never raise)."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _level(name: str) -> Exposure | None:
    """The exposure level ``name`` spells (``topk:5`` and ``top5`` alike); None if it is none."""
    try:
        return parse_exposure(name, max_k=None)
    except ExposureError:
        return None


def _canonical(level: str) -> str:
    """``topk:5`` and ``top5`` name the same level; colours and ordering use ``top5``."""
    parsed = _level(level)
    return level if parsed is None else str(parsed)


def _richness(level: str) -> tuple[int, float]:
    """Sort key, richest first: full, then top-k by decreasing k, then text, then the unknown."""
    parsed = _level(level)
    return (1, 0.0) if parsed is None else (0, -richness(parsed))


def level_colour(level: str) -> str:
    """The fixed hex colour of an exposure level (a stable fallback for unlisted levels)."""
    key = _canonical(str(level))
    if key in LEVEL_COLOURS:
        return LEVEL_COLOURS[key]
    return _FALLBACK_COLOURS[zlib.crc32(key.encode()) % len(_FALLBACK_COLOURS)]


def order_levels(results: Mapping[str, Any]) -> list[str]:
    """Every exposure level the results mention, richest to poorest.

    Levels come from the config, the runs and the summary, so a level with runs but no config
    entry (or the reverse) still appears; unknown names keep first-seen order after ``text``.
    """
    seen: list[str] = []
    candidates: Iterable[Any] = [
        *_list(_dict(results.get("config")).get("exposures")),
        *(_dict(run).get("exposure") for run in _list(results.get("runs"))),
        *_dict(results.get("summary")).keys(),
    ]
    for level in candidates:
        if isinstance(level, str) and level and level not in seen:
            seen.append(level)
    return sorted(seen, key=lambda lv: (_richness(lv), seen.index(lv)))


def _budgets(results: Mapping[str, Any]) -> list[float]:
    """The positive query budgets of the audit (config first, else whatever the runs used)."""
    values = [_num(b) for b in _list(_dict(results.get("config")).get("budgets"))]
    if not any(v is not None for v in values):
        values = [_num(_dict(run).get("budget")) for run in _list(results.get("runs"))]
    return sorted({v for v in values if v is not None and v > 0})


def _metric(run: Mapping[str, Any], name: str) -> float | None:
    return _num(_dict(run.get("metrics")).get(name))


@dataclass
class _Series:
    """One level's curve for one metric: x (queries), mean over seeds, and an optional band."""

    x: list[float]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    banded: list[bool]


def _series(results: Mapping[str, Any], level: str, metric: str) -> _Series:
    """Mean and spread of ``metric`` over seeds, per budget, for one level.

    Prefers the runs (band = min..max over seeds); falls back to the summary's ``by_budget``
    (band = mean +/- 1 sd) when a level has no runs. Points without a finite positive x or
    value are dropped, and a point from a single seed has no band.
    """
    groups: dict[float, tuple[list[float], list[float]]] = {}
    for run in map(_dict, _list(results.get("runs"))):
        if run.get("exposure") != level:
            continue
        budget = _num(run.get("budget"))
        queries = _num(run.get("queries"))
        value = _metric(run, metric)
        key = budget if budget is not None else queries
        if key is None or value is None:
            continue
        xs, vs = groups.setdefault(key, ([], []))
        vs.append(value)
        if queries is not None:
            xs.append(queries)
    out = _Series([], [], [], [], [])
    if groups:
        for key in sorted(groups):
            xs, vs = groups[key]
            x = sum(xs) / len(xs) if xs else key
            if x <= 0:
                continue
            mean = sum(vs) / len(vs)
            out.x.append(x)
            out.mean.append(mean)
            out.lo.append(min(vs))
            out.hi.append(max(vs))
            out.banded.append(len(vs) > 1)
        return out
    by_budget = _dict(_dict(_dict(results.get("summary")).get(level)).get("by_budget"))
    points = []
    for budget_key, stats in by_budget.items():
        try:
            x = float(budget_key)
        except (TypeError, ValueError):
            continue
        stat = _dict(_dict(stats).get(metric))
        mean, sd, n = _num(stat.get("mean")), _num(stat.get("sd")), _num(stat.get("n"))
        if mean is None or not math.isfinite(x) or x <= 0:
            continue
        banded = sd is not None and (n is None or n > 1)
        half = sd if banded and sd is not None else 0.0
        points.append((x, mean, mean - half, mean + half, banded))
    for x, mean, lo, hi, banded in sorted(points):
        out.x.append(x)
        out.mean.append(mean)
        out.lo.append(lo)
        out.hi.append(hi)
        out.banded.append(banded)
    return out


# --------------------------------------------------------------------------------------------
# Headline: what the audit found, without extrapolation
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    """A number to ``digits`` significant figures (integers stay whole); an em dash for none."""
    number = _num(value)
    if number is None:
        return _DASH
    if number == int(number) and abs(number) < 1e9:
        return f"{int(number):,}"
    return f"{number:.{digits}g}" if abs(number) >= 1e-3 or number == 0 else f"{number:.2e}"


def _ci_text(ci: Any, ceiling: float | None = None) -> str:
    """``[lo, hi]``; an upper end beyond the largest budget is shown as a bound, not a number."""
    ends = _list(ci)
    if len(ends) != 2:
        return ""
    lo, hi = _num(ends[0]), _num(ends[1])
    if lo is None and hi is None:
        return ""

    def end(value: float | None) -> str:
        if value is not None and ceiling is not None and value > ceiling:
            return f"> {_fmt(ceiling)}"
        return _fmt(value)

    return f"[{end(lo)}, {end(hi)}]"


@dataclass
class _HeadlineRow:
    level: str
    queries: str
    queries_ci: str
    multiplier: str
    multiplier_ci: str
    notes: list[str]


def _headline_rows(results: Mapping[str, Any]) -> list[_HeadlineRow]:
    """One row per level: queries to target and the multiplier vs text, each with its interval.

    The audit interpolates between measured budgets and explains every caveat in ``reason`` /
    ``multiplier_reason``; those are always shown. As a second line of defence the report never
    prints a number that could only come from extrapolation: a queries-to-target beyond the
    largest budget is withheld, and so is a multiplier whose level or text baseline never
    reached the target. A value reached already at the smallest budget is an upper bound and is
    shown as one. Where text missed the target but the level hit it and the audit gave no reason,
    the honest statement is a bound (largest budget / the level's queries), stated in words.
    """
    summary = _dict(results.get("summary"))
    budgets = _budgets(results)
    ceiling = budgets[-1] if budgets else None
    floor = budgets[0] if budgets else None
    text_q = _num(_dict(summary.get("text")).get("queries_to_target"))
    text_known = "text" in summary
    text_ok = text_q is not None and (ceiling is None or text_q <= ceiling)
    rows = []
    for level in order_levels(results):
        entry = _dict(summary.get(level))
        notes: list[str] = []
        q = _num(entry.get("queries_to_target"))
        q_ok = q is not None and (ceiling is None or q <= ceiling)
        reason = entry.get("reason")
        if q is not None and not q_ok:
            notes.append(
                f"estimate lies beyond the largest budget ({_fmt(ceiling)}); not shown, "
                "as it would be an extrapolation"
            )
        if reason:
            notes.append(str(reason))
        elif q is None:
            notes.append(
                "target not reached (no reason given)" if entry else "no summary for this level"
            )
        queries = _DASH
        if q_ok and q is not None:
            at_floor = reason and floor is not None and q <= floor
            queries = f"\u2264 {_fmt(q)}" if at_floor else _fmt(q)
        queries_ci = _ci_text(entry.get("queries_to_target_ci"), ceiling) if q_ok else ""

        m = _num(entry.get("multiplier_vs_text"))
        m_ok = m is not None and q_ok and (text_ok or not text_known)
        why = entry.get("multiplier_reason")
        if level != "text":
            if m is not None and not m_ok:
                notes.append(
                    "multiplier withheld: it would rest on an extrapolated queries-to-target"
                )
            if why:
                notes.append(f"multiplier: {why}")
            elif not m_ok and q_ok and q and text_known and not text_ok and ceiling is not None:
                notes.append(
                    f"text did not reach the target within {_fmt(ceiling)} queries, so it "
                    f"needs at least {_fmt(ceiling / q)}\u00d7 as many as this level"
                )
        multiplier = f"{_fmt(m)}\u00d7" if m_ok else _DASH
        multiplier_ci = _ci_text(entry.get("multiplier_vs_text_ci")) if m_ok else ""
        rows.append(_HeadlineRow(level, queries, queries_ci, multiplier, multiplier_ci, notes))
    return rows


def format_headline(results: Mapping[str, Any]) -> Table:
    """The headline as a ``rich`` table for the terminal: same rows and rules as the HTML page.

    Cells are ``rich.text.Text`` so square brackets in reasons are never read as markup.
    """
    target = _dict(results.get("target"))
    fraction = _num(target.get("fraction"))
    title = "Queries to reach the fidelity target"
    if fraction is not None:
        metric = str(target.get("metric", "kl"))
        metric = "KL" if metric == "kl" else metric
        title += f" (close {fraction:.0%} of the untrained\u2192teacher {metric} gap)"
    table = Table(title=title, title_justify="left")
    table.add_column("level")
    table.add_column("queries to target", justify="right")
    table.add_column("CI", justify="right")
    table.add_column("\u00d7 vs text", justify="right")
    table.add_column("CI", justify="right")
    table.add_column("note", overflow="fold")
    for row in _headline_rows(results):
        table.add_row(
            Text(row.level, style=f"bold {level_colour(row.level)}"),
            Text(row.queries),
            Text(row.queries_ci),
            Text(row.multiplier),
            Text(row.multiplier_ci),
            Text("; ".join(row.notes)),
        )
    return table


def _ratio_cell(stat: Any) -> str:
    stat = _dict(stat)
    mean = _num(stat.get("mean"))
    if mean is None or math.isnan(mean):
        return _DASH
    ci = _list(stat.get("ci"))
    return f"{mean:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if len(ci) == 2 else "")


def _rate_cell(stat: Any, exact: Any) -> str:
    mean = _num(_dict(stat).get("mean"))
    exact = _dict(exact)
    if mean is None or math.isnan(mean):
        return _DASH
    ci = _list(exact.get("ci"))
    return f"{mean:.0%}" + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if len(ci) == 2 else "")


#: The transfer table: header and how to read a cell from one row of ``results["transfer"]``.
_TRANSFER_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("level", lambda r: str(r.get("exposure"))),
    ("budget", lambda r: _fmt(r.get("budget"))),
    ("refusal share", lambda r: f"{_num(r.get('refusal_share')) or 0:.0%}"),
    ("restricted queries", lambda r: _fmt(r.get("restricted_queries"))),
    ("capability transferred", lambda r: _ratio_cell(r.get("capability_transferred"))),
    ("safety transferred", lambda r: _ratio_cell(r.get("safety_transferred"))),
    ("selective safety", lambda r: _ratio_cell(r.get("selective_safety_transferred"))),
    ("refusal", lambda r: _rate_cell(r.get("refusal_rate"), r.get("refusal_exact"))),
    ("over-refusal", lambda r: _rate_cell(r.get("over_refusal_rate"), r.get("over_refusal_exact"))),
    ("identity", lambda r: _rate_cell(r.get("identity_rate"), r.get("identity_exact"))),
)


def transfer_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """The transfer table's cells, one list per (level, budget, refusal share)."""
    rows = _list(_dict(results.get("transfer")).get("rows"))
    return [[get(_dict(r)) for _, get in _TRANSFER_COLUMNS] for r in rows]


def _reference_line(results: Mapping[str, Any]) -> str:
    transfer = _dict(results.get("transfer"))
    teacher, untrained = _dict(transfer.get("teacher")), _dict(transfer.get("untrained"))

    def pct(v: Any) -> str:
        n = _num(v)
        return _DASH if n is None else f"{n:.0%}"

    return (
        f"teacher: refusal {pct(teacher.get('refusal_rate'))}, over-refusal "
        f"{pct(teacher.get('over_refusal_rate'))}, identity {pct(teacher.get('identity_rate'))}; "
        f"untrained student: refusal {pct(untrained.get('refusal_rate'))}, identity "
        f"{pct(untrained.get('identity_rate'))}"
    )


def format_transfer(results: Mapping[str, Any]) -> Table | None:
    """Capability vs safety transferred as a ``rich`` table (None when the audit has no rows)."""
    rows = transfer_rows(results)
    if not rows:
        return None
    table = Table(
        title="Capability vs safety transferred (held-out wordings; mean [95% CI] over seeds)",
        title_justify="left",
        caption=_reference_line(results),
        caption_justify="left",
    )
    for name, _ in _TRANSFER_COLUMNS:
        table.add_column(name, justify="left" if name == "level" else "right")
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    return table


def _transfer_figure(results: Mapping[str, Any], levels: Sequence[str]) -> Any:
    """Capability and safety transferred against the harvest's refusal share, largest budget."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 5.0), dpi=100)
    ax = fig.add_subplot()
    rows = [_dict(r) for r in _list(_dict(results.get("transfer")).get("rows"))]
    budgets = sorted({_num(r.get("budget")) or 0 for r in rows})
    drawn = 0
    if budgets:
        top = budgets[-1]
        for level in levels:
            mine = sorted(
                (r for r in rows if r.get("exposure") == level and _num(r.get("budget")) == top),
                key=lambda r: _num(r.get("refusal_share")) or 0.0,
            )
            if not mine:
                continue
            xs = [100 * (_num(r.get("refusal_share")) or 0.0) for r in mine]
            for key, style in (("capability_transferred", "-"), ("safety_transferred", "--")):
                ys = [_num(_dict(r.get(key)).get("mean")) for r in mine]
                if all(y is None or math.isnan(y) for y in ys):
                    continue
                ax.plot(
                    xs,
                    [float("nan") if y is None else y for y in ys],
                    style,
                    marker="o",
                    color=level_colour(level),
                    label=f"{level}: {key.split('_')[0]}",
                )
                drawn += 1
        ax.set_title(f"budget {top:g} queries", fontsize=10)
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xlabel("restricted requests in the harvest (%)")
    ax.set_ylabel("transferred (1 = as the teacher)")
    if drawn:
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no transfer rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _log_queries_axis(ax: Any, budgets: Sequence[float]) -> None:
    """Log x axis ticked at the audit's budgets, labelled with plain numbers (16, not 10^1.2)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    if budgets:
        ax.xaxis.set_major_locator(FixedLocator(list(budgets)))
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        ax.xaxis.set_major_formatter(formatter)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(budgets) == 1:
            ax.set_xlim(budgets[0] / 2, budgets[0] * 2)
    ax.set_xlabel("teacher queries (log scale)")
    ax.grid(True, which="major", alpha=0.3)


def _plot_levels(ax: Any, results: Mapping[str, Any], levels: Sequence[str], metric: str) -> int:
    """Draw each level's mean line and seed band for ``metric``; returns how many were drawn."""
    drawn = 0
    for level in levels:
        s = _series(results, level, metric)
        if not s.x:
            continue
        colour = level_colour(level)
        ax.plot(s.x, s.mean, "-o", color=colour, lw=2.2, ms=5, label=level, zorder=3)
        if any(s.banded):
            lo = [lo if b else m for lo, m, b in zip(s.lo, s.mean, s.banded)]
            hi = [hi if b else m for hi, m, b in zip(s.hi, s.mean, s.banded)]
            ax.fill_between(s.x, lo, hi, color=colour, alpha=0.18, lw=0, zorder=2)
        drawn += 1
    return drawn


def _no_data(ax: Any, what: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"no {what} to plot",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color=_UNTRAINED_COLOUR,
    )


def _fidelity_figure(results: Mapping[str, Any], levels: Sequence[str]) -> Any:
    """Held-out KL vs queries: the figure the whole audit is about."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 5.4), dpi=100)
    ax = fig.add_subplot()
    drawn = _plot_levels(ax, results, levels, "kl")
    _log_queries_axis(ax, _budgets(results))
    untrained = _metric({"metrics": results.get("untrained")}, "kl")
    if untrained is not None:
        ax.axhline(
            untrained,
            ls="--",
            lw=1.6,
            color=_UNTRAINED_COLOUR,
            label=f"untrained student ({_fmt(untrained)})",
        )
    target = _dict(results.get("target"))
    target_value = _num(target.get("value"))
    if target_value is not None and target.get("metric", "kl") == "kl":
        fraction = _num(target.get("fraction"))
        share = f"close {fraction:.0%} of gap, " if fraction is not None else ""
        ax.axhline(
            target_value,
            ls=":",
            lw=2.0,
            color=_TARGET_COLOUR,
            label=f"target ({share}{_fmt(target_value)})",
        )
    if not drawn:
        _no_data(ax, "runs")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("held-out KL(teacher \u2016 student), nats/token\n(lower is better)")
    ax.set_title(
        f"Fidelity vs teacher queries \u2014 {results.get('teacher', 'teacher')}", fontsize=11
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    return fig


def _metrics_figure(results: Mapping[str, Any], levels: Sequence[str]) -> Any:
    """The secondary fidelity metrics, so a KL win is not mistaken for agreement everywhere."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 7.2), dpi=100)
    axes = fig.subplots(2, 2).ravel()
    budgets = _budgets(results)
    untrained = results.get("untrained")
    reference = results.get("teacher_reference")
    for ax, (metric, label, better) in zip(axes, _GRID_METRICS):
        drawn = _plot_levels(ax, results, levels, metric)
        _log_queries_axis(ax, budgets)
        floor = _metric({"metrics": untrained}, metric)
        if floor is not None:
            ax.axhline(floor, ls="--", lw=1.4, color=_UNTRAINED_COLOUR, label="untrained student")
        ref = _metric({"metrics": reference}, metric)
        if ref is not None:
            ax.axhline(ref, ls="-.", lw=1.4, color=_TEACHER_COLOUR, label="teacher's own samples")
        if not drawn:
            _no_data(ax, "runs")
        ax.set_ylabel(label, fontsize=9)
        ax.set_title(f"{label.splitlines()[0]} ({better})", fontsize=10)
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="lower center",
            ncol=min(len(handles), 7),
            fontsize=9,
            frameon=False,
        )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _behaviour_figure(results: Mapping[str, Any], levels: Sequence[str]) -> Any:
    """Refusal rate vs KL per run: does copying capability also copy the teacher's behaviour?"""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 5.0), dpi=100)
    ax = fig.add_subplot()
    runs = [_dict(r) for r in _list(results.get("runs"))]
    budgets = _budgets(results)
    lo_b, hi_b = (math.log(budgets[0]), math.log(budgets[-1])) if budgets else (0.0, 0.0)
    drawn = 0
    y_max = 0.0
    for level in levels:
        xs, ys, sizes = [], [], []
        for run in runs:
            if run.get("exposure") != level:
                continue
            kl, refusal = _metric(run, "kl"), _metric(run, "refusal_rate")
            if kl is None or refusal is None:
                continue
            q = _num(run.get("budget")) or _num(run.get("queries"))
            scale = 0.5
            if q is not None and q > 0 and hi_b > lo_b:
                scale = min(max((math.log(q) - lo_b) / (hi_b - lo_b), 0.0), 1.0)
            xs.append(kl)
            ys.append(refusal)
            sizes.append(30 + 90 * scale)
        if xs:
            y_max = max(y_max, *ys)
            ax.scatter(
                xs,
                ys,
                s=sizes,
                color=level_colour(level),
                alpha=0.85,
                edgecolors="white",
                linewidths=0.8,
                label=level,
                zorder=3,
            )
            drawn += 1
    untrained = _dict(results.get("untrained"))
    u_kl, u_ref = _num(untrained.get("kl")), _num(untrained.get("refusal_rate"))
    if u_kl is not None and u_ref is not None:
        ax.scatter(
            [u_kl],
            [u_ref],
            marker="X",
            s=90,
            color=_UNTRAINED_COLOUR,
            label="untrained student",
            zorder=4,
        )
    teacher_refusal = _num(_dict(results.get("teacher_reference")).get("refusal_rate"))
    if teacher_refusal is not None:
        ax.axhline(
            teacher_refusal,
            ls="-.",
            lw=1.6,
            color=_TEACHER_COLOUR,
            label=f"teacher refusal rate ({_fmt(teacher_refusal)})",
        )
    if not drawn:
        _no_data(ax, "runs with refusal rate and KL")
    ax.set_xlabel(
        "held-out KL(teacher \u2016 student), nats/token (capability fidelity; lower is closer)"
    )
    ax.set_ylabel("refusal rate on probe prompts")
    # Zoom to the data (rates are often a few percent) but never past the meaningful [0, 1].
    y_max = max(y_max, teacher_refusal or 0.0, u_ref or 0.0)
    top = min(1.02, y_max * 1.25 + 0.03)
    ax.set_ylim(-0.02 * max(top, 0.1), top)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        "Behaviour vs capability fidelity (one point per run; larger = more queries)", fontsize=11
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CAPTIONS = {
    "fidelity_vs_queries.png": (
        "Held-out KL(teacher \u2016 student) in nats/token (lower is better) against teacher "
        "queries on a log axis. Lines: mean over seeds; bands: min\u2013max over seeds; dashed: "
        "the untrained student; dotted: the target."
    ),
    "metrics_vs_queries.png": (
        "Top-1 agreement, total variation, calibration error, and the teacher's log-likelihood "
        "of the student's own samples, against queries (same lines and bands)."
    ),
    "behaviour_vs_fidelity.png": (
        "Per run: refusal rate on probe prompts against KL. Copying capability need not copy "
        "behaviour; the dash-dotted line is the teacher's own refusal rate."
    ),
    "transfer_vs_share.png": (
        "Capability transferred (solid: share of the untrained\u2192teacher KL gap closed) and "
        "safety transferred (dashed: student refusal rate over the teacher's, held-out restricted "
        "wordings) against the share of restricted requests in the harvest, at the largest budget."
    ),
}

#: The runs table: a header and how to read the cell from one run (None: steps (best step)).
_RUN_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("budget", lambda r: r.get("budget")),
    ("seed", lambda r: r.get("seed")),
    ("queries", lambda r: r.get("queries")),
    ("completion tokens", lambda r: r.get("completion_tokens")),
    ("steps (best)", None),
    ("seconds", lambda r: r.get("seconds")),
    ("KL", lambda r: _metric(r, "kl")),
    ("TV", lambda r: _metric(r, "tv")),
    ("top-1", lambda r: _metric(r, "top1_agreement")),
    ("ECE", lambda r: _metric(r, "ece")),
    ("teacher log-lik.", lambda r: _metric(r, "sample_teacher_logprob")),
    ("refusal share", lambda r: r.get("refusal_share", 0.0)),
    ("refusal", lambda r: _metric(r, "refusal_rate")),
    ("over-refusal", lambda r: _metric(r, "over_refusal_rate")),
    ("identity", lambda r: _metric(r, "identity_rate")),
    ("KL, harvested categories", lambda r: _coverage_kl(r, "in_harvest")),
    ("KL, unseen categories", lambda r: _coverage_kl(r, "held_out")),
)


def _coverage_kl(run: Mapping[str, Any], part: str) -> Any:
    return _dict(_dict(run.get("coverage")).get(part)).get("kl")


def _runs(results: Mapping[str, Any], levels: Sequence[str]) -> list[dict]:
    """One row per trained student, in level, budget, seed order."""
    rank = {level: i for i, level in enumerate(levels)}
    runs = [_dict(r) for r in _list(results.get("runs"))]
    runs.sort(
        key=lambda r: (
            rank.get(str(r.get("exposure")), len(rank)),
            _num(r.get("budget")) or 0.0,
            _num(r.get("refusal_share")) or 0.0,
            _num(r.get("seed")) or 0.0,
        )
    )
    rows = []
    for run in runs:
        cells = [
            f"{_fmt(run.get('steps'))} ({_fmt(run.get('best_step'))})" if get is None else
            _fmt(get(run))
            for _, get in _RUN_COLUMNS
        ]  # fmt: skip
        rows.append({"level": str(run.get("exposure", "?")), "cells": cells})
    return rows


def _cost(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    cost = _dict(results.get("cost"))
    prices = _dict(cost.get("prices_per_million"))
    items = [
        ("teacher queries", _fmt(cost.get("queries"))),
        ("prompt tokens", _fmt(cost.get("prompt_tokens"))),
        ("completion tokens", _fmt(cost.get("completion_tokens"))),
        ("price per million input tokens", _money(prices.get("input"))),
        ("price per million output tokens", _money(prices.get("output"))),
        ("estimated API cost", _money(_num(cost.get("dollars")))),
        ("audit wall time", _seconds(results.get("seconds"))),
    ]
    known = {"queries", "prompt_tokens", "completion_tokens", "prices_per_million", "dollars"}
    extra = [
        (str(k), _fmt(v) if _num(v) is not None else str(v))
        for k, v in cost.items()
        if k not in known
    ]
    return [*items, *extra]


def _money(value: Any) -> str:
    number = _num(value)
    if number is None:
        return _DASH
    return f"${number:.4f}" if number < 1 else f"${number:,.2f}"


def _seconds(value: Any) -> str:
    number = _num(value)
    if number is None:
        return _DASH
    return f"{number:.1f} s" if number < 120 else f"{number / 60:.1f} min"


def _how_to_read(results: Mapping[str, Any]) -> dict:
    """The words of "how to read this" that depend on the audit: target share, metric,
    interval kind and the untrained student's figures."""
    target = _dict(results.get("target"))
    fraction = _num(target.get("fraction"))
    value = _num(target.get("value"))
    untrained = _num(_dict(results.get("untrained")).get("kl"))
    metric = str(target.get("metric", "kl"))
    metric = "KL" if metric == "kl" else metric
    kinds = {
        str(_dict(entry).get("ci_kind"))
        for entry in _dict(results.get("summary")).values()
        if _dict(entry).get("ci_kind")
    }
    numbers = ""
    if untrained is not None and value is not None:
        numbers = (
            f" Here the untrained student scores {_fmt(untrained)} nats/token, so the "
            f"target is {metric} \u2264 {_fmt(value)}."
        )
    return {
        "share": f"{fraction:.0%}" if fraction is not None else "a fixed fraction",
        "metric": metric,
        "numbers": numbers,
        "interval": f"bracketed intervals are the {kinds.pop()}"
        if len(kinds) == 1
        else "bracketed intervals come from the seeds",
    }


def _page(results: Mapping[str, Any], levels: Sequence[str], out_dir: Path) -> dict:
    """Everything ``templates/audit.html.j2`` shows."""
    teacher = results.get("teacher") or _dict(results.get("config")).get("teacher") or "unknown"
    config = _dict(results.get("config"))
    subtitle = [f"teacher: {teacher}"] + [
        f"{key}: {config[key]}" for key in ("student", "preset") if config.get(key) is not None
    ]
    levels_seen = {row.level for row in _headline_rows(results)} | set(levels)
    levels_seen |= {str(_dict(r).get("exposure", "?")) for r in _list(results.get("runs"))}
    return {
        "title": f"Exposure audit \u2014 {teacher}",
        "subtitle": " \u00b7 ".join(subtitle),
        "colours": {level: level_colour(level) for level in levels_seen},
        "headline": _headline_rows(results),
        "read": _how_to_read(results),
        "figures": [
            {"name": n, "caption": _CAPTIONS[n], "uri": png_uri((out_dir / n).read_bytes())}
            for n in FIGURES
        ],
        "transfer_columns": [name for name, _ in _TRANSFER_COLUMNS],
        "transfer": transfer_rows(results),
        "transfer_reference": _reference_line(results),
        "scoring": _dict(results.get("scoring")),
        "run_columns": [name for name, _ in _RUN_COLUMNS],
        "runs": _runs(results, levels),
        "cost": _cost(results),
        "config": [
            (str(k), v if isinstance(v, str) else json.dumps(v, default=str))
            for k, v in config.items()
        ],
    }


def write_audit_report(results: dict, out_dir: str | Path) -> Path:
    """Write the audit's figures and ``report.html`` into ``out_dir``; return the HTML's path.

    The PNGs are written beside the page (for slides and diffs) and embedded in it as data URIs
    (so the page alone is the whole report, offline). Matplotlib is imported here and switched
    to Agg, so importing ``distillscope.report`` costs nothing and works on headless machines.
    """
    import matplotlib

    matplotlib.use("Agg")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    levels = order_levels(results)
    builders = {
        "fidelity_vs_queries.png": _fidelity_figure,
        "metrics_vs_queries.png": _metrics_figure,
        "behaviour_vs_fidelity.png": _behaviour_figure,
        "transfer_vs_share.png": _transfer_figure,
    }
    for name in FIGURES:
        fig = builders[name](results, levels)
        fig.savefig(out / name, format="png", dpi=100, facecolor="white")
    return write_page(out / "report.html", "audit.html.j2", **_page(results, levels, out))
