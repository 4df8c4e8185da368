"""Detector evaluation against simulated truth: every figure checked against a hand count."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillscope.detect.evaluate import (
    EvaluationInputError,
    adjusted_rand_index,
    allowed_false_positives,
    binomial_ci95,
    campaigns_found,
    detection_delay,
    evaluate_alerts,
    flagged_metrics,
    format_table,
    precision_at_base_rate,
    recall_at_fpr,
    traffic_weighted_recall,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def us(hours: float) -> int:
    """Microseconds since the epoch, ``hours`` after T0."""
    return int((T0 + timedelta(hours=hours)).timestamp()) * 1_000_000


# --- recall at a false-positive budget ----------------------------------------------------------


@pytest.mark.parametrize(
    "budget, legit, allowed",
    [(0.001, 999, 0), (0.001, 1000, 1), (0.01, 250, 2), (0.29, 100, 29), (1.0, 7, 7), (0.01, 0, 0)],
)
def test_allowed_false_positives_is_the_floor_of_budget_times_legit(budget, legit, allowed):
    assert allowed_false_positives(budget, legit) == allowed


LEGIT = [0.1, 0.2, 0.3, 0.9]
CAMPAIGN = [0.9, 0.95, 0.5]


def scored(legit=LEGIT, campaign=CAMPAIGN):
    return np.array(legit + campaign), np.array([False] * len(legit) + [True] * len(campaign))


def test_zero_allowed_false_positives_flags_only_scores_above_every_legit_one():
    result = recall_at_fpr(*scored(), 0.001)
    assert result["allowed_false_positives"] == 0
    # The campaign account tied with the top legitimate one (0.9) is not flagged.
    assert result["threshold"] == 0.95
    assert result["true_positives"] == 1 and result["recall"] == pytest.approx(1 / 3)
    assert result["false_positives"] == 0 and result["achieved_fpr"] == 0.0
    # Exact interval for 0 of 4: [0, 1 - 0.025 ** (1 / 4)].
    assert result["fpr_ci95"] == pytest.approx([0.0, 1 - 0.025**0.25])


def test_ties_at_the_threshold_are_flagged_together():
    # One false positive allowed: the cut sits at the second-highest legit score (0.3); the
    # legitimate 0.9 and the campaign 0.9 go over it together.
    result = recall_at_fpr(*scored(), 0.25)
    assert result["allowed_false_positives"] == 1
    assert result["threshold"] == 0.5
    assert result["false_positives"] == 1 and result["achieved_fpr"] == 0.25
    assert result["recall"] == 1.0


def test_a_tie_that_would_overspend_the_budget_flags_none_of_the_tied():
    # Two legitimate accounts tie at the top with a campaign one; one false positive allowed:
    # flagging the tie would make two, so none of the three is flagged.
    result = recall_at_fpr(*scored([0.1, 0.8, 0.8], [0.8, 0.9]), 0.34)
    assert result["allowed_false_positives"] == 1
    assert result["threshold"] == 0.9 and result["false_positives"] == 0
    assert result["recall"] == 0.5


def test_a_budget_of_one_flags_everything_and_nan_scores_never():
    result = recall_at_fpr(*scored(), 1.0)
    assert result["threshold"] == 0.1 and result["recall"] == 1.0 and result["achieved_fpr"] == 1.0
    scores, is_campaign = scored(LEGIT, [float("nan"), 0.95])
    assert recall_at_fpr(scores, is_campaign, 1.0)["recall"] == 0.5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=30),
    st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5]),
)
def test_threshold_is_the_lowest_that_keeps_within_budget_and_never_splits_ties(rows, budget):
    scores = np.array([float(s) for s, _ in rows])
    is_campaign = np.array([c for _, c in rows])
    result = recall_at_fpr(scores, is_campaign, budget)
    legit = scores[~is_campaign]
    allowed = result["allowed_false_positives"]
    threshold = result["threshold"]
    flagged = scores >= threshold if threshold is not None else np.zeros(len(scores), bool)
    assert int((flagged & ~is_campaign).sum()) == result["false_positives"] <= allowed
    lower = scores[scores < threshold] if threshold is not None else scores
    if len(lower):  # one step down (to the next observed score) would overspend
        assert int((legit >= lower.max()).sum()) > allowed


def test_binomial_interval_is_clopper_pearson():
    low, high = binomial_ci95(5, 5)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 5))
    assert binomial_ci95(0, 0) is None


# --- the detector's own flags -------------------------------------------------------------------


def test_flagged_precision_recall_fpr_and_base_rate():
    flagged = np.array([True, True, False, False, True, False])
    is_campaign = np.array([True, True, True, False, False, False])
    result = flagged_metrics(flagged, is_campaign, base_rate=0.01)
    assert (result["true_positives"], result["false_positives"]) == (2, 1)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["fpr"] == pytest.approx(1 / 3)
    simulated = result["precision_at_base_rate"]["simulated"]
    assert simulated == {"base_rate": 0.5, "precision": pytest.approx(2 / 3)}
    # 0.01 * 2/3 / (0.01 * 2/3 + 0.99 * 1/3) = 0.02 / 1.01
    assert result["precision_at_base_rate"]["given"]["precision"] == pytest.approx(2 / 101)
    assert "given" not in flagged_metrics(flagged, is_campaign)["precision_at_base_rate"]


def test_precision_at_base_rate_is_bayes_rule():
    assert precision_at_base_rate(0.5, 0.01, 0.5) == pytest.approx(0.25 / 0.255)
    assert precision_at_base_rate(0.5, 0.0, 0.001) == 1.0
    assert precision_at_base_rate(0.0, 0.0, 0.1) is None


def test_nothing_flagged_has_no_precision():
    result = flagged_metrics(np.zeros(3, bool), np.array([True, False, False]))
    assert result["precision"] is None and result["precision_ci95"] is None
    assert result["recall"] == 0.0


def test_traffic_weighted_recall_counts_campaign_requests_only():
    requests = np.array([10, 90, 5, 100])
    flagged = np.array([True, False, True, True])
    is_campaign = np.array([True, True, False, False])
    assert traffic_weighted_recall(requests, flagged, is_campaign) == 0.1
    assert traffic_weighted_recall(np.zeros(4), flagged, is_campaign) is None


# --- clusters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "true, pred, ari",
    [
        ("aabb", "xxyy", 1.0),
        ("aabb", "yyxx", 1.0),
        ("abcd", "wxyz", 1.0),  # all singletons on both sides
        ("aaaa", "xxxx", 1.0),
        # Contingency a:{x2, y1}, b:{y1, z2}: 2 pairs together, 6 within a/b, 3 within x/y/z,
        # 15 in all: (2 - 6*3/15) / ((6 + 3)/2 - 6*3/15) = 0.8 / 3.3 = 8/33.
        ("aaabbb", "xxyyzz", 8 / 33),
        ("aabb", "xxyz", 4 / 7),  # scikit-learn's documented example
        ("aabb", "xyxy", -0.5),
        ("aaaa", "wxyz", 0.0),
    ],
)
def test_adjusted_rand_index_by_hand(true, pred, ari):
    assert adjusted_rand_index(list(true), list(pred)) == pytest.approx(ari)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=25))
def test_adjusted_rand_index_is_symmetric_label_blind_and_at_most_one(pairs):
    true, pred = [t for t, _ in pairs], [p for _, p in pairs]
    ari = adjusted_rand_index(true, pred)
    assert ari <= 1 + 1e-12
    assert adjusted_rand_index(pred, true) == pytest.approx(ari)
    assert adjusted_rand_index([f"r{t}" for t in true], [10 - p for p in pred]) == pytest.approx(
        ari
    )
    assert adjusted_rand_index(true, true) == 1.0


def test_adjusted_rand_index_edges():
    assert adjusted_rand_index([], []) is None
    assert adjusted_rand_index(["a"], ["x"]) == 1.0
    with pytest.raises(ValueError):
        adjusted_rand_index(["a"], [])


def test_a_campaign_is_found_by_a_cluster_it_holds_a_strict_majority_of():
    campaign_ids = ["A", "A", "A", "B", "B", None, None, "C"]
    flagged = [True, True, False, True, True, True, True, True]
    clusters = ["c1", "c1", None, "c2", "c2", "c2", "c2", None]
    found = campaigns_found(campaign_ids, flagged, clusters)
    assert found["A"] == {"found": True, "clusters": ["c1"], "accounts": 3, "flagged_accounts": 2}
    assert found["B"]["found"] is False  # half of c2, not a majority
    assert found["C"] == {"found": False, "clusters": [], "accounts": 1, "flagged_accounts": 1}


# --- detection delay ----------------------------------------------------------------------------


HOURLY = np.array([us(h) for h in range(200)])  # one request an hour for 200 hours


@pytest.mark.parametrize(
    "detected_hours, hours, before, within",
    [
        (10, 10.0, 10, True),  # 5% of requests, but within 24 h
        (24, 24.0, 24, True),  # exactly a day
        (30, 30.0, 30, False),  # 15% and 30 h
        (-5, -5.0, 0, True),  # flagged before the campaign started
    ],
)
def test_detection_delay_in_hours_and_requests(detected_hours, hours, before, within):
    delay = detection_delay(HOURLY, us(detected_hours))
    assert delay["detected"] is True
    assert delay["hours"] == pytest.approx(hours)
    assert delay["requests"] == 200 and delay["requests_before"] == before
    assert delay["fraction_before"] == pytest.approx(before / 200)
    assert delay["within_1pct_or_24h"] is within


def test_detection_delay_within_one_percent_though_days_late():
    # 5 requests in the first hours, then 995 after day three: caught at 48 h after 0.5%.
    ts = np.array([us(h) for h in range(5)] + [us(72 + h / 100) for h in range(995)])
    delay = detection_delay(ts, us(48))
    assert delay["hours"] == 48.0 and delay["requests_before"] == 5
    assert delay["fraction_before"] == 0.005 and delay["within_1pct_or_24h"] is True
    assert delay["first_request"] == "2025-01-01T00:00:00+00:00"
    assert delay["detected_at"] == "2025-01-03T00:00:00+00:00"


def test_never_detected_is_all_requests_and_not_within():
    delay = detection_delay(HOURLY, None)
    assert delay["detected"] is False and delay["hours"] is None
    assert delay["requests_before"] == 200 and delay["fraction_before"] == 1.0
    assert delay["within_1pct_or_24h"] is False


# --- files end to end ---------------------------------------------------------------------------
#
# 100 legitimate accounts L0..L99 (one request each); L0..L98 score i/200 (at most 0.49), L99
# scores 0.9 and is flagged into cluster y. Campaign A: a1 0.95, a2 0.9 (tied with L99), a3 0.3;
# campaign B: b1 0.99, b2 0.2. A sends one request an hour for 100 hours, a1 the first 50, a2 the
# next 30, a3 the last 20; B likewise, b1 the first 10, b2 the other 90.
#
# FPR 0.001: 0 false positives allowed, cut at 0.9 -> a1, b1: recall 2/5, threshold 0.95.
# FPR 0.01: 1 allowed, cut at 0.49 -> L99, a1, a2, b1: recall 3/5, threshold 0.9.
# flagged: a1 a2 b1 b2 L99 -> precision 4/5, recall 4/5, FPR 1/100.
# traffic-weighted recall: (50 + 30 + 10 + 90) / 200 = 0.9.
# clusters: a1 a2 -> x; b1 b2 L99 -> y (B holds 2 of 3). ARI over [a1 a2 a3 b1 b2]:
# true AAABB, predicted x x (a3 alone) y y: (2 - 4*2/10) / ((4 + 2)/2 - 4*2/10) = 1.2/2.2 = 6/11.
# first_flagged_at: a1 12 h, a2 5 h, b1 48 h -> A after 5 h (5 requests), B after 48 h (48%).
#
# The baseline scores by volume, but L99 scores 60: cut at 60 -> b2 only (90): recall 1/5.


def legit_ids():
    return [f"L{i}" for i in range(100)]


CAMPAIGN_ACCOUNTS = {"a1": ("A", 50), "a2": ("A", 30), "a3": ("A", 20), "b1": ("B", 10)}
CAMPAIGN_ACCOUNTS["b2"] = ("B", 90)


def write_sim(folder, *, traffic_name="traffic.parquet"):
    folder.mkdir(parents=True, exist_ok=True)
    truth = pa.table(
        {
            "account_id": legit_ids() + list(CAMPAIGN_ACCOUNTS),
            "campaign_id": pa.array(
                [None] * 100 + [c for c, _ in CAMPAIGN_ACCOUNTS.values()], pa.string()
            ),
            "role": ["legitimate"] * 100 + ["hydra"] * 5,
        }
    )
    pq.write_table(truth, folder / "truth.parquet")
    accounts, hours = list(legit_ids()), [1.0] * 100
    offset = {"A": 0, "B": 0}
    for account, (campaign, n) in CAMPAIGN_ACCOUNTS.items():
        accounts += [account] * n
        hours += [float(h) for h in range(offset[campaign], offset[campaign] + n)]
        offset[campaign] += n
    traffic = pa.table(
        {
            "exchange_id": [f"e{i}" for i in range(len(accounts))],
            "ts": pa.array([T0 + timedelta(hours=h) for h in hours], pa.timestamp("us", tz="UTC")),
            "account_id": accounts,
        }
    )
    pq.write_table(traffic, folder / traffic_name)
    return folder / "truth.parquet", folder / traffic_name


def write_alerts(folder, *, drop=(), baseline=True):
    folder.mkdir(parents=True, exist_ok=True)
    scores = {f"L{i}": i / 200 for i in range(99)}
    scores |= {"L99": 0.9, "a1": 0.95, "a2": 0.9, "a3": 0.3, "b1": 0.99, "b2": 0.2}
    clusters = {"a1": "x", "a2": "x", "b1": "y", "b2": "y", "L99": "y"}
    first = {"a1": 12, "a2": 5, "b1": 48, "L99": 30}
    ids = list(scores)
    columns = {
        "account_id": ids,
        "score": [scores[a] for a in ids],
        "flagged": [a in clusters for a in ids],
        "cluster_id": pa.array([clusters.get(a) for a in ids], pa.string()),
        "reasons": [""] * len(ids),
        "first_flagged_at": pa.array(
            [T0 + timedelta(hours=first[a]) if a in first else None for a in ids],
            pa.timestamp("us", tz="UTC"),
        ),
    }
    pq.write_table(
        pa.table({k: v for k, v in columns.items() if k not in drop}), folder / "accounts.parquet"
    )
    if baseline:
        volume = {a: 1.0 for a in legit_ids()} | {"L99": 60.0}
        volume |= {a: float(n) for a, (_, n) in CAMPAIGN_ACCOUNTS.items()}
        pq.write_table(
            pa.table(
                {
                    "account_id": ids,
                    "score": [volume[a] for a in ids],
                    "flagged": [volume[a] >= 90 for a in ids],
                    "cluster_id": pa.array([None] * len(ids), pa.string()),
                    "reasons": ["volume only"] * len(ids),
                }
            ),
            folder / "baseline.parquet",
        )
    return folder


@pytest.fixture
def sim(tmp_path):
    truth, traffic = write_sim(tmp_path / "sim")
    return write_alerts(tmp_path / "alerts"), truth, traffic


def test_evaluate_alerts_end_to_end(sim):
    alerts, truth, traffic = sim
    result = evaluate_alerts(alerts, truth, traffic, base_rate=0.001)
    json.dumps(result, allow_nan=False)  # JSON as it stands
    assert result["population"] == {
        "accounts": 105,
        "campaign_accounts": 5,
        "legit_accounts": 100,
        "campaigns": 2,
        "campaign_requests": 200,
    }
    assert result["recall_at_fpr_0.001"] == pytest.approx(0.4)
    strict = result["at_fpr"]["0.001"]
    assert strict["allowed_false_positives"] == 0 and strict["threshold"] == 0.95
    assert result["recall_at_fpr_0.01"] == pytest.approx(0.6)
    loose = result["at_fpr"]["0.01"]
    assert loose["allowed_false_positives"] == 1 and loose["threshold"] == 0.9
    assert loose["achieved_fpr"] == 0.01
    flagged = result["flagged"]
    assert flagged["precision"] == flagged["recall"] == pytest.approx(0.8)
    assert flagged["fpr"] == pytest.approx(0.01)
    # 0.001 * 0.8 / (0.001 * 0.8 + 0.999 * 0.01)
    given = flagged["precision_at_base_rate"]["given"]["precision"]
    assert given == pytest.approx(0.0008 / (0.0008 + 0.00999))
    assert result["traffic_weighted_recall"] == pytest.approx(0.9)
    assert result["cluster_ari"] == pytest.approx(6 / 11)
    assert result["campaigns_found"]["A"]["clusters"] == ["x"]
    assert result["campaigns_found"]["B"]["clusters"] == ["y"]
    assert result["every_campaign_found"] is True
    delays = result["detection_delay"]["campaigns"]
    assert delays["A"]["hours"] == 5.0 and delays["A"]["requests_before"] == 5
    assert delays["A"]["fraction_before"] == 0.05 and delays["A"]["within_1pct_or_24h"] is True
    assert delays["B"]["hours"] == 48.0 and delays["B"]["fraction_before"] == 0.48
    assert delays["B"]["within_1pct_or_24h"] is False
    assert result["detection_delay"]["campaigns_within"] == 1
    assert result["detection_delay"]["within_1pct_or_24h"] is False

    baseline = result["baseline"]
    assert baseline["recall_at_fpr_0.001"] == pytest.approx(0.2)
    assert baseline["at_fpr"]["0.001"]["threshold"] == 90.0
    assert baseline["cluster_ari"] == 0.0 and baseline["every_campaign_found"] is False
    assert baseline["traffic_weighted_recall"] == pytest.approx(0.45)
    assert baseline["detection_delay"] is None  # no first_flagged_at

    table = format_table(result)
    metric, detector, beside = (list(c.cells) for c in table.columns)
    rows = dict(zip(metric, zip(detector, beside)))
    assert rows["caught within 1% or 24 h"] == ("1/2", "-")
    assert rows["campaigns found"] == ("2/2", "0/2")
    assert rows["recall @ FPR 0.001"][0].startswith("40.00%")


def test_accounts_the_detector_never_saw_are_unflagged_and_strangers_ignored(tmp_path):
    truth, traffic = write_sim(tmp_path / "sim")
    alerts = write_alerts(tmp_path / "alerts", baseline=False)
    table = pq.read_table(alerts / "accounts.parquet")
    keep = [a not in ("b1", "L0") for a in table["account_id"].to_pylist()]
    stranger = table.slice(0, 1).set_column(0, "account_id", pa.array(["zz"]))
    pq.write_table(
        pa.concat_tables([table.filter(pa.array(keep)), stranger]), alerts / "accounts.parquet"
    )
    result = evaluate_alerts(alerts, truth, traffic)
    assert result["accounts_missing_from_alerts"] == 2
    assert result["accounts_unknown_to_truth"] == 1
    assert result["recall_at_fpr_0.001"] == pytest.approx(0.2)  # a1 only; b1 unseen
    assert result["flagged"]["recall"] == pytest.approx(0.6)
    assert "baseline" not in result


def test_without_traffic_requests_come_from_the_alerts_and_there_is_no_delay(sim):
    alerts, truth, _ = sim
    table = pq.read_table(alerts / "accounts.parquet")
    requests = [
        dict(CAMPAIGN_ACCOUNTS).get(a, (None, 1))[1] for a in table["account_id"].to_pylist()
    ]
    pq.write_table(table.append_column("requests", pa.array(requests)), alerts / "accounts.parquet")
    result = evaluate_alerts(alerts, truth)
    assert result["traffic_weighted_recall"] == pytest.approx(0.9)
    assert result["detection_delay"] is None
    assert result["population"]["campaign_requests"] is None


@pytest.mark.parametrize("column", ["score", "flagged", "account_id"])
def test_a_missing_column_is_named(tmp_path, column):
    truth, traffic = write_sim(tmp_path / "sim")
    alerts = write_alerts(tmp_path / "alerts", drop=(column,))
    with pytest.raises(EvaluationInputError, match=f"lacks column.*{column}"):
        evaluate_alerts(alerts, truth, traffic)


def test_a_score_that_is_not_a_number_is_an_input_error(sim):
    alerts, truth, traffic = sim
    table = pq.read_table(alerts / "accounts.parquet")
    words = pa.array(["high"] * table.num_rows)
    pq.write_table(table.set_column(1, "score", words), alerts / "accounts.parquet")
    with pytest.raises(EvaluationInputError, match="score must be numbers"):
        evaluate_alerts(alerts, truth, traffic)


def test_missing_files_and_bad_base_rate(sim, tmp_path):
    alerts, truth, traffic = sim
    with pytest.raises(EvaluationInputError, match="does not exist"):
        evaluate_alerts(alerts, tmp_path / "nowhere.parquet")
    with pytest.raises(EvaluationInputError, match="does not exist"):
        evaluate_alerts(tmp_path / "no-alerts", truth)
    with pytest.raises(EvaluationInputError, match="traffic"):
        evaluate_alerts(alerts, truth, tmp_path / "none.parquet")
    with pytest.raises(EvaluationInputError, match="base rate"):
        evaluate_alerts(alerts, truth, base_rate=1.5)


# --- the command --------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillscope.cli", "detect-eval", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_json_with_traffic_found_beside_the_truth(sim):
    alerts, truth, _ = sim
    result = cli("--alerts", str(alerts), "--truth", str(truth), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["recall_at_fpr_0.001"] == pytest.approx(0.4)
    assert figures["baseline"]["recall_at_fpr_0.001"] == pytest.approx(0.2)
    assert figures["detection_delay"]["campaigns_within"] == 1  # traffic.parquet was found


def test_cli_missing_column_is_one_line_and_exit_2(tmp_path):
    truth, _ = write_sim(tmp_path / "sim")
    alerts = write_alerts(tmp_path / "alerts", drop=("score",))
    result = cli("--alerts", str(alerts), "--truth", str(truth))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "score" in lines[0], result.stderr
