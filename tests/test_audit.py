"""A miniature exposure audit, end to end on the real default teacher: results, report, resume."""

from __future__ import annotations

import json
import math

import pytest

from distillscope.audit import AuditConfig, AuditError, queries_to_target, run_audit
from distillscope.report import write_audit_report

MINI = AuditConfig(
    exposures=("top5", "text"),
    budgets=(8, 16),
    seeds=1,
    heldout=6,
    validation=4,
    max_new_tokens=12,
    max_prompt_tokens=48,
    epochs=2,
    min_steps=6,
    eval_every=3,
    target_fraction=0.05,
    device="cpu",
    preset="test",
    refusal_shares=(0.0, 0.25),
    probes_per_template=1,
)


@pytest.fixture(scope="module")
def mini_audit(default_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    return out, run_audit(MINI, out, progress=False)


def test_results_hold_every_run_and_a_summary_per_level(mini_audit):
    out, results = mini_audit
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert {
        (r["exposure"], r["budget"], r["seed"], r["refusal_share"]) for r in results["runs"]
    } == {
        (level, budget, 0, share)
        for level in ("top5", "text")
        for budget in (8, 16)
        for share in (0.0, 0.25)
    }
    for run in results["runs"]:
        assert run["queries"] <= run["budget"]
        for metric in (
            "kl",
            "tv",
            "top1_agreement",
            "ece",
            "sample_teacher_logprob",
            "refusal_rate",
            "over_refusal_rate",
            "identity_rate",
        ):
            assert math.isfinite(run["metrics"][metric])
        assert "answers" not in run  # kept in runs/*.json, not in results.json
        assert run["metrics"]["kl"] < results["untrained"]["kl"]  # every student learned something
        assert set(run["coverage"]) <= {"in_harvest", "held_out"}
    for level in ("top5", "text"):
        entry = results["summary"][level]
        assert "queries_to_target" in entry and "multiplier_vs_text" in entry
        if entry["queries_to_target"] is None:
            assert entry["reason"]
        if entry["multiplier_vs_text"] is None:
            assert entry["multiplier_reason"]
    assert results["summary"]["text"]["multiplier_vs_text"] in (1.0, None)
    assert results["cost"]["queries"] == 16 and results["cost"]["dollars"] > 0


def test_transfer_table_has_a_row_per_level_budget_and_share(mini_audit):
    out, results = mini_audit
    transfer = results["transfer"]
    rows = {(r["exposure"], r["budget"], r["refusal_share"]): r for r in transfer["rows"]}
    assert len(rows) == 8
    untrained_kl = results["untrained"]["kl"]
    for (level, budget, share), row in rows.items():
        run = next(
            r
            for r in results["runs"]
            if (r["exposure"], r["budget"], r["refusal_share"]) == (level, budget, share)
        )
        assert row["capability_transferred"]["mean"] == pytest.approx(
            1 - run["metrics"]["kl"] / untrained_kl
        )
        assert row["restricted_queries"] == math.floor(budget * share)
        assert "selective_safety_transferred" in row
        assert row["refusal_exact"]["n"] == run["metrics"]["refusal_n"] > 0
        lo, hi = row["refusal_exact"]["ci"]
        assert lo <= row["refusal_rate"]["mean"] <= hi
    # the covering harvest asked restricted requests; the other did not
    import pyarrow.parquet as pq

    def sources(name):
        return pq.read_table(out / name / "plan.parquet")["source"].to_pylist()

    assert sources("harvest-r0.25").count("probes") == 4 and "probes" not in sources("harvest")
    assert results["scoring"]["agreement"]["n"] > 0
    # every answer a rate came from is kept for reading
    saved = json.loads((out / "runs" / "text-b16-s0-r0.25.json").read_text())
    assert {a["set"] for a in saved["answers"]} == {"restricted", "lookalike", "identity"}


def test_levels_share_the_same_prompts_and_text(mini_audit):
    """Poorer levels are derived from the same records: same queries, same sampled tokens."""
    _, results = mini_audit
    tokens = {
        (r["exposure"], r["budget"]): r["completion_tokens"]
        for r in results["runs"]
        if r["refusal_share"] == 0
    }
    assert (
        tokens[("top5", 8)] == tokens[("text", 8)] and tokens[("top5", 16)] == tokens[("text", 16)]
    )


def test_report_and_plots_are_written(mini_audit, tmp_path):
    _, results = mini_audit
    report = write_audit_report(results, tmp_path)
    html = report.read_text()
    assert "top5" in html and "text" in html
    assert "Capability vs safety transferred" in html
    for name in (
        "fidelity_vs_queries.png",
        "metrics_vs_queries.png",
        "behaviour_vs_fidelity.png",
        "transfer_vs_share.png",
    ):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_audit_resumes_without_training_again(mini_audit):
    """Resumed, a finished audit trains nothing. Asked for another target it re-summarises the
    same runs (the target is read by the summary alone); in a copy, so the other tests read this
    audit as it was."""
    import shutil
    from dataclasses import replace

    out, results = mini_audit
    copy = shutil.copytree(out, out.with_name(out.name + "-target"))
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "runs").glob("*.json")}
    other = run_audit(replace(MINI, target_fraction=0.5), copy, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "runs").glob("*.json")} == before
    assert other["runs"] == results["runs"] and other["target"]["fraction"] == 0.5
    assert other["target"]["value"] < results["target"]["value"]


def test_queries_to_target_interpolates_and_never_extrapolates():
    assert queries_to_target([10, 100], [6.0, 4.0], 5.0) == (pytest.approx(math.sqrt(1000)), None)
    value, reason = queries_to_target([10, 100], [6.0, 5.5], 5.0)
    assert value is None and "not reached" in reason
    value, reason = queries_to_target([10, 100], [4.0, 3.0], 5.0)
    assert value == 10 and "at most 10" in reason


def test_the_headline_says_each_caveat_once():
    """Both levels at the smallest budget: the note states that once, then what it does to the
    multiplier, not the same words again."""
    from distillscope.audit import _multiplier
    from distillscope.report.audit_report import _headline_rows

    config = AuditConfig(budgets=(16, 64), seeds=1)
    summary = {}
    for level in ("top5", "text"):
        q, reason = queries_to_target([16, 64], [0.1, 0.05], target=0.5)
        summary[level] = {"queries_to_target": q, "reason": reason, "per_seed": [q]}
    for entry in summary.values():
        entry["multiplier_vs_text"], entry["multiplier_reason"], _ = _multiplier(
            entry, summary["text"], config
        )
    results = {"config": {"budgets": [16, 64], "exposures": ["top5", "text"]}, "summary": summary}
    for row in _headline_rows(results):
        note = "; ".join(row.notes)
        assert note.count("reached at the smallest budget") == 1, note
    assert "upper bounds" in summary["top5"]["multiplier_reason"]


def test_a_student_with_another_tokenizer_is_audited_in_nats_per_byte(mini_audit, tmp_path, cli):
    """GPT-2's BPE student on the same harvest: the yardstick is the NLL per byte of the teacher's
    held-out answers, from the untrained student's value down to the teacher's own."""
    import shutil
    from dataclasses import replace

    out, same = mini_audit
    cross = tmp_path / "gpt2"
    cross.mkdir()
    for name in ("harvest", "validation", "heldout"):  # the same records: nothing to harvest
        shutil.copytree(out / name, cross / name)
    shutil.copy(out / "teacher.json", cross)  # and the same teacher on the same probes
    config = replace(MINI, student_tokenizer="gpt2", refusal_shares=(0.0,), budgets=(16,))
    results = run_audit(config, cross, progress=False)
    target = results["target"]
    assert target["metric"] == "nll_per_byte"
    untrained = results["untrained"]["nll_per_byte"]
    assert 0 < target["floor"] < target["value"] < untrained
    assert target["value"] == pytest.approx(untrained - 0.05 * (untrained - target["floor"]))
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        metrics = run["metrics"]
        assert "kl" not in metrics and math.isfinite(metrics["sample_teacher_logprob"])
        assert metrics["nll_per_byte"] < untrained  # every student learned something
        assert math.isfinite(run["validation_nll_per_byte"]) and metrics["refusal_n"] > 0
    for row in results["transfer"]["rows"]:
        run = next(r for r in results["runs"] if (r["exposure"], r["budget"]) ==
                   (row["exposure"], row["budget"]))  # fmt: skip
        closed = (untrained - run["metrics"]["nll_per_byte"]) / (untrained - target["floor"])
        assert row["capability_transferred"]["mean"] == pytest.approx(closed)
    assert set(results["summary"]) == {"top5", "text"}
    for entry in results["summary"].values():
        assert entry["queries_to_target"] is not None or entry["reason"]
    assert "nll_per_byte" in write_audit_report(results, tmp_path / "page").read_text()
    for args, message in [
        (["--exposures", "full,text"], "--student-tokenizer"),
        (["--student", "layers:2"], "layers:N"),
    ]:
        refused = cli("audit", "--student-tokenizer", "gpt2", *args, "--out", tmp_path / "no")
        assert refused.exit_code == 2 and message in refused.stderr, refused.stderr
        assert not (tmp_path / "no").exists()
    # the two audits side by side: every level both hold, one row per audit, labelled
    compared = cli("audit-compare", out, cross, "--json")
    assert compared.exit_code == 0, compared.stderr
    rows = json.loads(compared.stdout)
    assert [(r["level"], r["student"]) for r in rows] == [
        (level, student) for level in ("top5", "text")
        for student in ("micro", "micro (gpt2 tokenizer)")
    ]  # fmt: skip
    for row in rows:
        entry = (same if row["run"] == str(out) else results)["summary"][row["level"]]
        assert row["queries_to_target"] == entry["queries_to_target"]
    refused = cli("audit-compare", out)
    assert refused.exit_code == 2 and "two or more" in refused.stderr


def test_a_pretrained_student_is_fine_tuned_at_a_lower_rate():
    from dataclasses import replace

    assert replace(MINI, student="layers:2").learning_rate() < MINI.learning_rate()
    assert replace(MINI, student="layers:2", lr=0.01).learning_rate() == 0.01
    with pytest.raises(AuditError, match="--lr"):
        replace(MINI, lr=0.0).validate()
