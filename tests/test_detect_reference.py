"""Signals fitted on reference traffic: a reference fitted on the scored log itself changes
nothing, one fitted on other (clean) traffic finds campaigns that ranking among peers dilutes,
and the file round-trips through the CLI with clear errors for a wrong one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from distillscope.detect import (
    BadReferenceError,
    DetectConfig,
    Reference,
    detect,
    evaluate_alerts,
    fit_reference,
)
from distillscope.detect.signals import SIGNALS, EmpiricalTail
from distillscope.traffic import load_scenario, simulate


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """The smoke scenario twice: seed 0 is scored, seed 1 is last week's traffic."""
    root = tmp_path_factory.mktemp("sims")
    for seed in (0, 1):
        simulate(load_scenario("smoke"), root / f"s{seed}", seed=seed, progress=False)
    return root / "s0", root / "s1"


def _inputs(sim):
    return {"accounts": sim / "accounts.parquet", "events": sim / "events.parquet"}


def _campaign_accounts(sim) -> list[str]:
    truth = pq.read_table(sim / "truth.parquet", columns=["account_id", "campaign_id"])
    return [a for a, c in zip(*truth.to_pydict().values()) if c]


def test_the_tail_is_the_conformal_p_value():
    tail = EmpiricalTail(np.array([0.0, 1.0, 2.0, 2.0, 5.0]))
    # (1 + #reference >= x) / (1 + n); zero is never evidence; above every value: 1 / (n + 1)
    assert tail.p(np.array([2.0, 5.0, 9.0, 0.0, -1.0])).tolist() == [4 / 6, 2 / 6, 1 / 6, 1, 1]
    # equal up to DuckDB's last-bit noise ties
    assert tail.p(np.array([2.0 + 1e-15]))[0] == tail.p(np.array([2.0]))[0]


def test_a_reference_fitted_on_the_log_itself_is_ranking_among_all_peers(sims, tmp_path):
    """Without trimming (``trim_rounds=0``) the default ranks each account among all the log's
    accounts, which is exactly a reference fitted on the log itself."""
    scored, _ = sims
    own = fit_reference(scored / "traffic.duckdb", tmp_path / "own.parquet", **_inputs(scored))
    untrimmed = DetectConfig(trim_rounds=0)
    detect(scored / "traffic.duckdb", tmp_path / "plain", config=untrimmed, **_inputs(scored))
    detect(
        scored / "traffic.duckdb", tmp_path / "fitted", reference=tmp_path / "own.parquet",
        config=untrimmed, **_inputs(scored),
    )  # fmt: skip
    plain = pq.read_table(tmp_path / "plain" / "accounts.parquet")
    fitted = pq.read_table(tmp_path / "fitted" / "accounts.parquet")
    assert own.accounts == plain.num_rows and own.excluded == 0
    np.testing.assert_allclose(fitted["score"].to_numpy(), plain["score"].to_numpy())
    assert fitted["flagged"].to_pylist() == plain["flagged"].to_pylist()


def test_clean_reference_traffic_finds_what_ranking_among_peers_dilutes(sims, tmp_path):
    """In the smoke log a third of the accounts are campaign accounts: ranked among all of them
    (``trim_rounds=0``) their shares look ordinary. Ranked against last week's traffic without
    its campaign accounts (what a provider has after banning them), every campaign is found; so
    it is by the default, which ranks against the log less the communities it found."""
    scored, last_week = sims
    reference = fit_reference(
        last_week / "traffic.duckdb", exclude=_campaign_accounts(last_week), **_inputs(last_week)
    )
    assert reference.excluded == len(set(_campaign_accounts(last_week)) & set(
        pq.read_table(last_week / "traffic.parquet", columns=["account_id"])["account_id"]
        .to_pylist()
    ))  # fmt: skip
    detect(
        scored / "traffic.duckdb", tmp_path / "peers", config=DetectConfig(trim_rounds=0),
        **_inputs(scored),
    )  # fmt: skip
    detect(scored / "traffic.duckdb", tmp_path / "trimmed", **_inputs(scored))
    summary = detect(
        scored / "traffic.duckdb", tmp_path / "ref", reference=reference, **_inputs(scored)
    )
    peers = evaluate_alerts(tmp_path / "peers", scored / "truth.parquet")
    fitted = evaluate_alerts(tmp_path / "ref", scored / "truth.parquet")
    trimmed = evaluate_alerts(tmp_path / "trimmed", scored / "truth.parquet")
    assert fitted["every_campaign_found"] and not peers["every_campaign_found"]
    assert trimmed["every_campaign_found"] and trimmed["recall_at_fpr_0.001"] >= 0.9
    assert fitted["recall_at_fpr_0.001"] >= 0.9
    flagged = pq.read_table(tmp_path / "ref" / "accounts.parquet").to_pylist()
    campaign = set(_campaign_accounts(scored))
    hits = [row["account_id"] in campaign for row in flagged if row["flagged"]]
    assert len(hits) == summary.flagged and sum(hits) / len(hits) >= 0.9
    assert any("reference of" in note for note in summary.notes)


def test_a_signal_the_reference_did_not_measure_is_fitted_on_the_scored_log(sims, tmp_path):
    scored, last_week = sims
    blind = fit_reference(last_week / "traffic.duckdb")  # no events, no account metadata
    assert {"pivot", "fingerprint"}.isdisjoint(blind.measured)
    summary = detect(scored / "traffic.duckdb", tmp_path, reference=blind, **_inputs(scored))
    assert "signal pivot not measured in the reference: fitted on this log" in summary.notes
    # a reference of zeros would make every non-zero pivot as rare as can be (p = 1 / (n + 1)):
    # the fallback ranks the scored log's pivots among themselves instead
    table = pq.read_table(tmp_path / "accounts.parquet")
    scored_values = table.rename_columns([c.removeprefix("signal_") for c in table.column_names])
    tails, _ = blind.tails(scored_values, SIGNALS)
    pivots = scored_values["pivot"].to_numpy()
    assert (pivots > 0).sum() > 10
    np.testing.assert_array_equal(tails["pivot"].values, np.sort(np.round(pivots, 9)))
    assert tails["pivot"].p(pivots[pivots > 0]).max() > 1 / (blind.accounts + 1)
    # a signal both measured is scored against the reference
    np.testing.assert_array_equal(
        tails["template"].values, np.sort(blind.values["template"].to_numpy())
    )


def test_detect_fit_cli_round_trips_and_refuses_what_is_not_a_reference(sims, tmp_path):
    scored, last_week = sims

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "distillscope.cli", *map(str, args)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    block = tmp_path / "banned.txt"
    block.write_text("".join(f"account:{a}\n" for a in _campaign_accounts(last_week)))
    fit = cli(
        "detect-fit", "--log", last_week / "traffic.duckdb", "--exclude", block,
        "--out", tmp_path / "ref.parquet",
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert "left out" in fit.stdout
    loaded = Reference.load(tmp_path / "ref.parquet")
    assert loaded.excluded > 0 and set(SIGNALS) <= set(loaded.values.column_names)
    run = cli(
        "detect", "--log", scored / "traffic.duckdb", "--reference", tmp_path / "ref.parquet",
        "--out", tmp_path / "alerts",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "reference of" in run.stderr
    for wrong in (scored / "truth.parquet", tmp_path / "absent.parquet", block):
        refused = cli(
            "detect", "--log", scored / "traffic.duckdb", "--reference", wrong,
            "--out", tmp_path / "no",
        )  # fmt: skip
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "reference" in refused.stderr
    with pytest.raises(BadReferenceError, match="no accounts left"):
        fit_reference(
            last_week / "traffic.parquet",
            exclude=pq.read_table(last_week / "traffic.parquet", columns=["account_id"])[
                "account_id"
            ].to_pylist(),
        )
