"""The exposure audit's report: figures, a self-contained page that a real browser renders, and a
terminal table that never prints an extrapolated number.

The browser check is the point: a page can be valid HTML and still show nothing (a broken data
URI, an external asset that is unreachable offline). So report.html is opened in real headless
Chromium, and the test fails, never skips, when Chromium is missing: ``make test`` installs it
with scripts/ensure-chromium.sh first.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from markupsafe import escape
from PIL import Image
from rich.console import Console

from distillscope.report import format_headline, write_audit_report
from distillscope.report.audit_report import (
    FIGURES,
    _headline_rows,
    level_colour,
    order_levels,
)

CHROMIUM = Path("/usr/bin/chromium")
LEVELS = ["full", "top20", "top5", "top1", "text"]
BUDGETS = [16, 64]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT_REASON = "target not reached within budgets up to 64 queries"


def _results() -> dict:
    """A realistic audit: 5 levels x 2 budgets x 2 seeds; text never reaches the target."""
    untrained_kl = 8.4
    # Held-out KL per level at budgets 16 and 64: richer exposure converges in fewer queries.
    kl = {
        "full": (3.9, 2.6),
        "top20": (4.1, 2.8),
        "top5": (4.9, 3.4),
        "top1": (6.2, 4.0),
        "text": (7.6, 6.3),
    }
    runs = []
    for level in LEVELS:
        for b_index, budget in enumerate(BUDGETS):
            for seed in range(2):
                value = kl[level][b_index] + (0.15 if seed else -0.15)
                fidelity = 1 - value / untrained_kl
                runs.append(
                    {
                        "exposure": level,
                        "budget": budget,
                        "seed": seed,
                        "queries": budget,
                        "completion_tokens": budget * 24,
                        "steps": budget * 3,
                        "best_step": budget * 2,
                        "seconds": 3.0 + budget * 0.2,
                        "metrics": {
                            "kl": value,
                            "tv": 0.97 - 0.6 * fidelity,
                            "top1_agreement": 0.01 + 0.6 * fidelity,
                            "ece": 0.3 - 0.2 * fidelity,
                            "sample_teacher_logprob": -9.1 + 6 * fidelity,
                            "refusal_rate": round(0.1 * fidelity + 0.02 * seed, 3),
                        },
                        "coverage": {
                            "in_harvest": {"kl": value - 0.1, "tokens": 300},
                            "held_out": {"kl": value + 0.4, "tokens": 120},
                        },
                        "future_field": {"ignored": True},
                    }
                )

    def by_budget(level: str) -> dict:
        out = {}
        for budget in BUDGETS:
            mine = [r for r in runs if r["exposure"] == level and r["budget"] == budget]
            out[str(budget)] = {}
            for metric in mine[0]["metrics"]:
                values = [r["metrics"][metric] for r in mine]
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                out[str(budget)][metric] = {"mean": mean, "sd": sd, "n": len(values)}
        return out

    target = untrained_kl / 2

    def to_target(kls: list[float]) -> tuple[float | None, str | None]:
        """The audit's rule: interpolate in log(queries), never extrapolate."""
        for i, (b, value) in enumerate(zip(BUDGETS, kls)):
            if value <= target:
                if i == 0:
                    return float(b), f"reached at the smallest budget: at most {b} queries"
                b0, k0 = BUDGETS[i - 1], kls[i - 1]
                frac = (k0 - target) / (k0 - value)
                return math.exp(math.log(b0) + frac * (math.log(b) - math.log(b0))), None
        return None, TEXT_REASON

    summary = {}
    for level in LEVELS:
        mine = [r for r in runs if r["exposure"] == level]
        q, reason = to_target(list(kl[level]))
        per_seed = [
            to_target([r["metrics"]["kl"] for r in mine if r["seed"] == s])[0] for s in range(2)
        ]
        ok = None not in per_seed
        summary[level] = {
            "queries_to_target": q,
            "reason": reason,
            "queries_to_target_ci": [min(per_seed), max(per_seed)] if ok else None,
            "ci_kind": "range over seeds" if ok else None,
            "per_seed": per_seed,
            "by_budget": by_budget(level),
            "multiplier_vs_text": None,
            "multiplier_vs_text_ci": None,
            "multiplier_reason": (
                f"text did not reach the target within budgets: multiplier > {64 / q:.1f}"
                if q
                else "this level did not reach the target"
            ),
        }
    return {
        "config": {
            "teacher": "default",
            "exposures": LEVELS,
            "budgets": BUDGETS,
            "seeds": 2,
            "target_fraction": 0.5,
            "student": "micro",
            "preset": "quick",
            "lr": 3e-3,
            "notes": "<script>alert('x')</script>",
        },
        "teacher": "default:SmolLM2-135M-Instruct.Q4_1",
        "untrained": {
            "kl": untrained_kl,
            "tv": 0.97,
            "top1_agreement": 0.01,
            "ece": 0.3,
            "sample_teacher_logprob": -9.1,
            "refusal_rate": 0.0,
        },
        "teacher_reference": {"sample_teacher_logprob": -1.9, "refusal_rate": 0.1},
        "target": {"metric": "kl", "fraction": 0.5, "value": target},
        "runs": runs,
        "summary": summary,
        "cost": {
            "queries": 64,
            "prompt_tokens": 5000,
            "completion_tokens": 1500,
            "prices_per_million": {"input": 0.15, "output": 0.6},
            "dollars": 0.0017,
        },
        "seconds": 420.0,
        "schema_version": 3,
    }


def _assert_png(path: Path, min_size: tuple[int, int] = (400, 300)) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
    return image.convert("RGB")


def _pixels_near(image: Image.Image, hex_colour: str, tolerance: int = 16) -> int:
    """How many pixels lie within ``tolerance`` of a colour on every channel."""
    target = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    bands = image.split()
    masks = [
        band.point(lambda v, t=t: 255 if abs(v - t) <= tolerance else 0)
        for band, t in zip(bands, target)
    ]
    from PIL import ImageChops

    both = ImageChops.multiply(ImageChops.multiply(masks[0], masks[1]), masks[2])
    return both.histogram()[255]


def _chromium(*args: str, tmp: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh (make test does) to install it"
    )
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    results = _results()
    out = tmp_path_factory.mktemp("audit-report")
    page = write_audit_report(results, out)
    return results, page


def test_figures_are_real_pngs(report):
    _, page = report
    for name in FIGURES:
        path = page.parent / name
        assert path.stat().st_size > 15_000, f"{name} is suspiciously small"
        image = _assert_png(path)
        assert len(image.getcolors(maxcolors=1 << 20) or []) > 50, f"{name} looks blank"
    fidelity = _assert_png(page.parent / "fidelity_vs_queries.png")
    for level in LEVELS:
        assert _pixels_near(fidelity, level_colour(level), tolerance=4) > 40, level


def test_html_is_self_contained_and_escaped(report):
    results, page = report
    text = page.read_text(encoding="utf-8")
    assert page.name == "report.html"
    for level in LEVELS:
        assert f">{level}<" in text
    assert TEXT_REASON in text
    assert results["teacher"] in text
    # The headline never invents numbers: text missed, so no multiplier is printed...
    for row in _headline_rows(results):
        assert row.multiplier == "\u2014" and row.multiplier_ci == "", row
    # ...but the audit's caveats are: the bound on the multiplier, and an upper bound where the
    # target was met at the smallest budget.
    top5 = results["summary"]["top5"]
    assert html.escape(top5["multiplier_reason"]) in text
    assert "reached at the smallest budget: at most 16 queries" in text
    assert ">\u2264 16<" in text
    # Offline: no external fetches of any kind, and user text is escaped.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script" not in text.lower().replace("&lt;script", "")
    assert str(escape("<script>alert('x')</script>")) in text  # the escaper the templates use
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == len(FIGURES)
    for uri, name in zip(uris, FIGURES):
        assert base64.b64decode(uri) == (page.parent / name).read_bytes()


def test_real_chromium_renders_the_page(report, tmp_path):
    _, page = report
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri(), tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.exists(), done.stderr[-2000:]
    image = _assert_png(shot, min_size=(1280, 2000))
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1500, "the screenshot looks blank"
    # The figures fill most of the first screenful: every level's line colour must cover far
    # more pixels than its 10x10 table swatch, which only happens if Chromium decoded and
    # painted the embedded images.
    for level in LEVELS:
        assert _pixels_near(image, level_colour(level), tolerance=6) > 1000, level

    dom = _chromium("--dump-dom", page.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.findall(r"<img\b[^>]*>", dom.stdout)
    assert len(images) == len(FIGURES), "the rendered DOM lost images"
    for tag in images:
        match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert match, tag[:200]
        decoded = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
        assert decoded.format == "PNG" and decoded.width > 0 and decoded.height > 0


def test_headline_table_for_terminal(report):
    results, _ = report
    table = format_headline(results)
    assert [c.header for c in table.columns][:2] == ["level", "queries to target"]
    assert table.row_count == len(LEVELS)
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    rendered = console.export_text()
    for level in LEVELS:
        assert level in rendered
    assert TEXT_REASON in rendered
    q = results["summary"]["top5"]["queries_to_target"]
    assert f"{q:.3g}" in rendered and "multiplier > " in rendered and "\u2264 16" in rendered


def test_bound_is_stated_when_the_audit_gives_no_multiplier_reason(report):
    results = copy.deepcopy(report[0])
    results["summary"]["top5"]["multiplier_reason"] = None
    q = results["summary"]["top5"]["queries_to_target"]
    notes = {row.level: " ".join(row.notes) for row in _headline_rows(results)}
    assert f"at least {64 / q:.3g}\u00d7 as many as this level" in notes["top5"]


def test_extrapolation_is_never_printed():
    """A queries-to-target beyond the largest budget, or a multiplier built on one, is withheld."""
    results = _results()
    results["summary"]["top1"]["queries_to_target"] = 97.5  # past the largest budget (64)
    results["summary"]["top1"]["multiplier_vs_text"] = 0.7
    results["summary"]["text"]["queries_to_target"] = 60.0
    results["summary"]["top5"]["queries_to_target"] = 30.2
    results["summary"]["top5"]["multiplier_vs_text"] = 1.99
    results["summary"]["top5"]["multiplier_reason"] = None
    results["summary"]["top5"]["multiplier_vs_text_ci"] = [1.5, 2.6]
    results["summary"]["top5"]["queries_to_target_ci"] = [25.0, 80.0]
    rows = {row.level: row for row in _headline_rows(results)}
    assert rows["top1"].queries == rows["top1"].multiplier == "\u2014"
    assert "beyond the largest budget" in " ".join(rows["top1"].notes)
    assert rows["top5"].queries == "30.2" and rows["top5"].queries_ci == "[25, > 64]"
    assert rows["top5"].multiplier == "1.99\u00d7" and rows["top5"].multiplier_ci == "[1.5, 2.6]"
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(format_headline(results))
    rendered = console.export_text()
    assert "97.5" not in rendered and "0.7\u00d7" not in rendered and "> 64]" in rendered


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(
            lambda r: r["runs"].__setitem__(
                slice(None),
                [x for x in r["runs"] if not (x["exposure"] == "top5" and x["budget"] == 64)],
            ),
            id="missing-budget",
        ),
        pytest.param(
            lambda r: r["runs"].__setitem__(slice(None), [x for x in r["runs"] if x["seed"] == 0]),
            id="single-seed",
        ),
        pytest.param(
            lambda r: r.__setitem__(
                "summary",
                {
                    level: {"queries_to_target": None, "reason": None, "multiplier_vs_text": None}
                    for level in LEVELS
                },
            ),
            id="all-null-summary",
        ),
        pytest.param(lambda r: r.__setitem__("summary", {}), id="no-summary"),
        pytest.param(
            lambda r: (r.__setitem__("runs", []), r.pop("cost")), id="no-runs-summary-only"
        ),
        pytest.param(
            lambda r: r["runs"][0]["metrics"].update(kl=float("nan"), ece=None),
            id="nan-and-null-metrics",
        ),
        pytest.param(
            lambda r: (
                r["runs"].append({"exposure": "top7", "budget": 16, "metrics": {"kl": 5.0}}),
                r.__setitem__("extra", {"deep": [1, 2, {"x": None}]}),
            ),
            id="unknown-level-and-keys",
        ),
        pytest.param(lambda r: r.__setitem__("config", {"budgets": [64]}), id="one-budget"),
    ],
)
def test_degenerate_results_do_not_crash(mutate, tmp_path):
    results = copy.deepcopy(_results())
    mutate(results)
    json.dumps(results)  # still the JSON the audit would write (NaN aside)
    page = write_audit_report(results, tmp_path / "out")
    for name in FIGURES:
        _assert_png(page.parent / name)
    assert "<img" in page.read_text(encoding="utf-8")
    Console(file=io.StringIO()).print(format_headline(results))


def test_levels_are_ordered_richest_first_with_fixed_colours():
    results = {
        "runs": [{"exposure": e} for e in ["text", "top1", "weird", "topk:50", "full"]],
        "summary": {"top5": {}},
    }
    assert order_levels(results) == ["full", "topk:50", "top5", "top1", "text", "weird"]
    assert level_colour("topk:5") == level_colour("top5")
    assert len({level_colour(level) for level in LEVELS}) == len(LEVELS)
    assert level_colour("weird") == level_colour("weird")
