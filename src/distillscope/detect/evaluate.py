"""How well a detector found distillation campaigns, measured against the simulator's truth.

Inputs: the detector's ``alerts/accounts.parquet`` (one row per account: ``score``, ``flagged``,
``cluster_id``, ``first_flagged_at``), optionally a volume-only ``alerts/baseline.parquet`` in the
same columns, the simulator's ``truth.parquet`` (``campaign_id``; null = legitimate) and its
``traffic.parquet`` (``account_id``, ``ts``) for request weighting and detection delay.

The population is the truth's accounts. An account the detector never saw scores -inf and is not
flagged; accounts the truth does not know are counted and left out. Every choice that could go
either way goes against the detector: a score threshold never splits a tie (all accounts at a
tied score are flagged together, so a legitimate account tied with campaign accounts holds the
threshold above all of them), and unflagged campaign accounts are singleton clusters for the
adjusted Rand index. Recall, FPR and precision carry exact (Clopper-Pearson) 95% intervals.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from rich.table import Table
from scipy.stats import binomtest

from distillscope.errors import DistillscopeError

#: False-positive-rate budgets at which recall is reported (the first is the headline).
FPR_BUDGETS = (0.001, 0.01)
#: A campaign counts as caught early when flagged within this many hours of its first request...
WITHIN_HOURS = 24.0
#: ...or before this fraction of its requests had been served.
WITHIN_FRACTION = 0.01

ALERT_COLUMNS = ("account_id", "score", "flagged", "cluster_id")
#: Alert columns some metrics use when present: detection delay, request weighting.
OPTIONAL_ALERT_COLUMNS = ("first_flagged_at", "requests")
TRUTH_COLUMNS = ("account_id", "campaign_id")
TRAFFIC_COLUMNS = ("account_id", "ts")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US_PER_HOUR = 3_600_000_000


class EvaluationInputError(DistillscopeError):
    """An alerts, truth or traffic file that is missing or lacks what the evaluation needs."""


# --- pure metrics -------------------------------------------------------------------------------


def binomial_ci95(successes: int, trials: int) -> list[float] | None:
    """Exact (Clopper-Pearson) 95% interval for a proportion; None when there were no trials."""
    if trials == 0:
        return None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def _ratio(numerator: int | float, denominator: int | float) -> float | None:
    return float(numerator / denominator) if denominator else None


def allowed_false_positives(fpr_budget: float, legit_accounts: int) -> int:
    """How many legitimate accounts may be flagged at ``fpr_budget`` (0 for small populations)."""
    # round() first: 0.29 * 100 is 28.999999999999996 in floating point, not 29.
    return math.floor(round(fpr_budget * legit_accounts, 9))


def legit_cut(legit_scores: np.ndarray, fpr_budget: float) -> float:
    """The score that accounts must exceed (strictly) so that at most ``fpr_budget`` of these
    legitimate accounts are flagged: the (k+1)-th highest, k the allowed false positives."""
    legit = np.sort(np.nan_to_num(np.asarray(legit_scores, dtype=float), nan=-np.inf))[::-1]
    allowed = allowed_false_positives(fpr_budget, len(legit))
    return float(legit[allowed]) if allowed < len(legit) else -np.inf


def recall_at_fpr(scores: np.ndarray, is_campaign: np.ndarray, fpr_budget: float) -> dict:
    """Recall at the smallest score threshold whose legitimate flag rate fits ``fpr_budget``.

    With k allowed false positives, every account scoring strictly above the (k+1)-th highest
    legitimate score is flagged; the threshold is the lowest such score, so ``score >= threshold``
    flags them. Ties are never split: accounts tied with that legitimate score stay unflagged.
    """
    scores = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf)
    is_campaign = np.asarray(is_campaign, dtype=bool)
    legit = scores[~is_campaign]
    allowed = allowed_false_positives(fpr_budget, len(legit))
    flagged = scores > legit_cut(legit, fpr_budget)
    threshold = float(scores[flagged].min()) if flagged.any() else None
    false_positives = int((flagged & ~is_campaign).sum())
    true_positives = int((flagged & is_campaign).sum())
    campaign_accounts = int(is_campaign.sum())
    return {
        "fpr_budget": fpr_budget,
        "threshold": threshold,
        "allowed_false_positives": allowed,
        "false_positives": false_positives,
        "achieved_fpr": _ratio(false_positives, len(legit)),
        "fpr_ci95": binomial_ci95(false_positives, len(legit)),
        "true_positives": true_positives,
        "recall": _ratio(true_positives, campaign_accounts),
        "recall_ci95": binomial_ci95(true_positives, campaign_accounts),
    }


def precision_at_base_rate(recall: float, fpr: float, base_rate: float) -> float | None:
    """Precision if a ``base_rate`` fraction of accounts were campaign accounts (Bayes' rule)."""
    true_share = base_rate * recall
    flagged_share = true_share + (1 - base_rate) * fpr
    return _ratio(true_share, flagged_share)


def flagged_metrics(
    flagged: np.ndarray, is_campaign: np.ndarray, base_rate: float | None = None
) -> dict:
    """Precision, recall and FPR of the detector's own ``flagged`` decisions.

    ``precision_at_base_rate`` holds the precision at the simulated campaign share (the plain
    precision on this population) and, given ``base_rate``, re-weighted to that share.
    """
    flagged = np.asarray(flagged, dtype=bool)
    is_campaign = np.asarray(is_campaign, dtype=bool)
    campaign_accounts = int(is_campaign.sum())
    legit_accounts = len(is_campaign) - campaign_accounts
    true_positives = int((flagged & is_campaign).sum())
    false_positives = int((flagged & ~is_campaign).sum())
    flagged_accounts = true_positives + false_positives
    recall = _ratio(true_positives, campaign_accounts)
    fpr = _ratio(false_positives, legit_accounts)
    at_base_rate = {
        "simulated": {
            "base_rate": _ratio(campaign_accounts, len(is_campaign)),
            "precision": _ratio(true_positives, flagged_accounts),
        }
    }
    if base_rate is not None:
        given = (
            None
            if recall is None or fpr is None
            else precision_at_base_rate(recall, fpr, base_rate)
        )
        at_base_rate["given"] = {"base_rate": base_rate, "precision": given}
    return {
        "flagged_accounts": flagged_accounts,
        "true_positives": true_positives,
        "false_positives": false_positives,
        "precision": _ratio(true_positives, flagged_accounts),
        "precision_ci95": binomial_ci95(true_positives, flagged_accounts),
        "recall": recall,
        "recall_ci95": binomial_ci95(true_positives, campaign_accounts),
        "fpr": fpr,
        "fpr_ci95": binomial_ci95(false_positives, legit_accounts),
        "precision_at_base_rate": at_base_rate,
    }


def traffic_weighted_recall(
    requests: np.ndarray, flagged: np.ndarray, is_campaign: np.ndarray
) -> float | None:
    """Campaign requests sent from flagged accounts / all campaign requests."""
    requests = np.asarray(requests, dtype=np.int64)
    is_campaign = np.asarray(is_campaign, dtype=bool)
    caught = int(requests[is_campaign & np.asarray(flagged, dtype=bool)].sum())
    return _ratio(caught, int(requests[is_campaign].sum()))


def _pairs(counts) -> int:
    return sum(c * (c - 1) // 2 for c in counts)


def adjusted_rand_index(
    labels_true: Sequence[Hashable], labels_pred: Sequence[Hashable]
) -> float | None:
    """Hubert-Arabie adjusted Rand index of two labelings, exact from the contingency table.

    1 for identical partitions (including two trivial ones), about 0 for chance, negative below;
    None for no items.
    """
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"{len(labels_true)} true labels but {len(labels_pred)} predicted")
    n = len(labels_true)
    if n == 0:
        return None
    together = _pairs(Counter(zip(labels_true, labels_pred)).values())
    true_pairs = _pairs(Counter(labels_true).values())
    pred_pairs = _pairs(Counter(labels_pred).values())
    all_pairs = n * (n - 1) // 2
    # (index - expected) / (max - expected), multiplied through by 2 * all_pairs to stay integral.
    numerator = 2 * (together * all_pairs - true_pairs * pred_pairs)
    denominator = (true_pairs + pred_pairs) * all_pairs - 2 * true_pairs * pred_pairs
    return 1.0 if denominator == 0 else numerator / denominator


def campaigns_found(
    campaign_ids: Sequence[str | None],
    flagged: Sequence[bool],
    cluster_ids: Sequence[str | None],
) -> dict[str, dict]:
    """Per campaign: the detected clusters whose flagged members are mostly (> half) its accounts.

    A campaign is ``found`` when there is at least one such cluster.
    """
    members: dict[str, Counter] = {}
    for campaign, is_flagged, cluster in zip(campaign_ids, flagged, cluster_ids):
        if is_flagged and cluster is not None:
            members.setdefault(cluster, Counter())[campaign] += 1
    majority: dict[str, list[str]] = {}
    for cluster, counts in sorted(members.items()):
        campaign, count = counts.most_common(1)[0]
        if campaign is not None and 2 * count > counts.total():
            majority.setdefault(campaign, []).append(cluster)
    accounts = Counter(c for c in campaign_ids if c is not None)
    flagged_accounts = Counter(c for c, f in zip(campaign_ids, flagged) if c is not None and f)
    return {
        campaign: {
            "found": campaign in majority,
            "clusters": majority.get(campaign, []),
            "accounts": accounts[campaign],
            "flagged_accounts": flagged_accounts[campaign],
        }
        for campaign in sorted(accounts)
    }


def _iso(us: int | None) -> str | None:
    return None if us is None else (_EPOCH + timedelta(microseconds=us)).isoformat()


def detection_delay(request_ts_us: np.ndarray, detected_at_us: int | None) -> dict:
    """How long, and how many of a campaign's requests, until its first account was flagged.

    ``request_ts_us``: the campaign's request times (microseconds since the epoch, UTC);
    ``detected_at_us``: the earliest ``first_flagged_at`` of its accounts, None if never flagged.
    A request at the very moment of detection does not count as before it.
    """
    request_ts_us = np.asarray(request_ts_us, dtype=np.int64)
    total = len(request_ts_us)
    first = int(request_ts_us.min()) if total else None
    if detected_at_us is None:
        before, hours = total, None
    else:
        before = int((request_ts_us < detected_at_us).sum())
        hours = None if first is None else (detected_at_us - first) / _US_PER_HOUR
    fraction = _ratio(before, total)
    within = detected_at_us is not None and (
        (hours is not None and hours <= WITHIN_HOURS)
        or (fraction is not None and fraction <= WITHIN_FRACTION)
    )
    return {
        "detected": detected_at_us is not None,
        "first_request": _iso(first),
        "detected_at": _iso(detected_at_us),
        "hours": hours,
        "requests": total,
        "requests_before": before,
        "fraction_before": fraction,
        "within_1pct_or_24h": within,
    }


# --- the population and the files --------------------------------------------------------------


@dataclass(frozen=True)
class _Accounts:
    """The truth's accounts, one detector's view of each aligned to them."""

    campaign_ids: list[str | None]
    scores: np.ndarray
    flagged: np.ndarray
    cluster_ids: list[str | None]
    #: None when the alerts have no ``first_flagged_at`` (then there is no detection delay).
    first_flagged_us: list[int | None] | None
    requests: np.ndarray | None
    missing_from_alerts: int
    unknown_to_truth: int

    @property
    def is_campaign(self) -> np.ndarray:
        return np.array([c is not None for c in self.campaign_ids], dtype=bool)


def _read(path: Path, columns: Sequence[str], what: str, optional: Sequence[str] = ()) -> pa.Table:
    if not path.exists():
        raise EvaluationInputError(f"{what} {path} does not exist")
    try:
        dataset = ds.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise EvaluationInputError(f"{what} {path} is not readable Parquet: {exc}") from None
    names = dataset.schema.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise EvaluationInputError(
            f"{what} {path} lacks column(s) {', '.join(missing)} (has {', '.join(names)})"
        )
    return dataset.to_table(columns=[*columns, *(c for c in optional if c in names)])


def _strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column if pa.types.is_string(column.type) else pc.cast(column, pa.string())


def _micros(column: pa.ChunkedArray, what: str) -> pa.ChunkedArray:
    """Timestamps as int64 microseconds since the epoch, UTC (naive ones are taken as UTC)."""
    if not pa.types.is_timestamp(column.type):
        raise EvaluationInputError(f"{what} must be a timestamp column, not {column.type}")
    in_micros = pc.cast(column, pa.timestamp("us", tz=column.type.tz), safe=False)
    return pc.cast(in_micros, pa.int64())


def _unique_ids(ids: pa.ChunkedArray, what: str) -> None:
    if pc.count_distinct(ids).as_py() != len(ids) or ids.null_count:
        raise EvaluationInputError(f"{what}: account_id must be unique and present on every row")


def _align(truth: pa.Table, alerts: pa.Table, requests: np.ndarray | None, what: str) -> _Accounts:
    truth_ids = _strings(truth["account_id"])
    alert_ids = _strings(alerts["account_id"])
    _unique_ids(alert_ids, what)
    at = pc.index_in(truth_ids, value_set=alert_ids)  # null where the detector never saw one
    try:
        scores = pc.take(pc.cast(alerts["score"], pa.float64()), at)
        flagged = pc.take(pc.cast(alerts["flagged"], pa.bool_()), at)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise EvaluationInputError(
            f"{what}: score must be numbers, flagged booleans ({exc})"
        ) from None
    first = None
    if "first_flagged_at" in alerts.column_names:
        first = pc.take(_micros(alerts["first_flagged_at"], f"{what} first_flagged_at"), at)
    if requests is None and "requests" in alerts.column_names:
        taken = pc.take(pc.cast(alerts["requests"], pa.int64()), at)
        requests = pc.fill_null(taken, 0).to_numpy()
    seen = pc.count(at).as_py()
    return _Accounts(
        campaign_ids=_strings(truth["campaign_id"]).to_pylist(),
        scores=pc.fill_null(scores, -math.inf).to_numpy(),
        flagged=pc.fill_null(flagged, False).to_numpy(zero_copy_only=False).astype(bool),
        cluster_ids=pc.take(_strings(alerts["cluster_id"]), at).to_pylist(),
        first_flagged_us=None if first is None else first.to_pylist(),
        requests=requests,
        missing_from_alerts=len(truth_ids) - seen,
        unknown_to_truth=len(alert_ids) - seen,
    )


def _campaign_requests(
    truth: pa.Table, traffic: pa.Table
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Requests per truth account, and each campaign's request times (int64 microseconds)."""
    truth_ids = _strings(truth["account_id"])
    at = pc.index_in(_strings(traffic["account_id"]), value_set=truth_ids)
    known = pc.is_valid(at).to_numpy(zero_copy_only=False)
    index = pc.fill_null(at, 0).to_numpy()[known]
    if traffic["ts"].null_count:
        raise EvaluationInputError("traffic: ts must be present on every row")
    ts = _micros(traffic["ts"], "traffic ts").to_numpy()[known]
    requests = np.bincount(index, minlength=len(truth_ids)).astype(np.int64)
    campaigns = _strings(truth["campaign_id"]).to_pylist()
    codes = {name: i for i, name in enumerate(sorted({c for c in campaigns if c is not None}))}
    code = np.array([-1 if c is None else codes[c] for c in campaigns], dtype=np.int64)
    row_code = code[index]
    return requests, {name: ts[row_code == i] for name, i in codes.items()}


def _score(
    accounts: _Accounts, request_times: dict[str, np.ndarray] | None, base_rate: float | None
) -> dict:
    """Every metric for one detector's view of the population."""
    is_campaign = accounts.is_campaign
    at_fpr = {str(b): recall_at_fpr(accounts.scores, is_campaign, b) for b in FPR_BUDGETS}
    predicted = [
        cluster if flagged and cluster is not None else ("unclustered", i)
        for i, (flagged, cluster) in enumerate(zip(accounts.flagged, accounts.cluster_ids))
    ]
    campaign_rows = np.flatnonzero(is_campaign)
    found = campaigns_found(accounts.campaign_ids, accounts.flagged, accounts.cluster_ids)
    result = {f"recall_at_fpr_{b}": at_fpr[b]["recall"] for b in at_fpr}
    result |= {
        "at_fpr": at_fpr,
        "flagged": flagged_metrics(accounts.flagged, is_campaign, base_rate),
        "traffic_weighted_recall": None
        if accounts.requests is None
        else traffic_weighted_recall(accounts.requests, accounts.flagged, is_campaign),
        "cluster_ari": adjusted_rand_index(
            [accounts.campaign_ids[i] for i in campaign_rows], [predicted[i] for i in campaign_rows]
        ),
        "campaigns_found": found,
        "every_campaign_found": all(c["found"] for c in found.values()) if found else None,
        "detection_delay": None,
        "accounts_missing_from_alerts": accounts.missing_from_alerts,
        "accounts_unknown_to_truth": accounts.unknown_to_truth,
    }
    if request_times is not None and accounts.first_flagged_us is not None:
        detected: dict[str, int] = {}
        for campaign, first in zip(accounts.campaign_ids, accounts.first_flagged_us):
            if campaign is not None and first is not None:
                detected[campaign] = min(first, detected.get(campaign, first))
        delays = {c: detection_delay(request_times[c], detected.get(c)) for c in sorted(found)}
        within = sum(d["within_1pct_or_24h"] for d in delays.values())
        result["detection_delay"] = {
            "campaigns": delays,
            "campaigns_within": within,
            "within_1pct_or_24h": within == len(delays) if delays else None,
        }
    return result


def evaluate_alerts(
    alerts_dir: str | Path,
    truth_path: str | Path,
    traffic_path: str | Path | None = None,
    *,
    base_rate: float | None = None,
) -> dict:
    """Score a detector's alerts (and its baseline's, when present) against simulated truth.

    ``alerts_dir`` holds ``accounts.parquet`` and optionally ``baseline.parquet``; without
    ``traffic_path`` the request-weighted recall comes from the alerts' ``requests`` column (if
    any) and there is no detection delay, nor is there for alerts without ``first_flagged_at``
    (``detection_delay`` is None). ``base_rate`` re-weights the flagged precision to that
    campaign share. Returns a JSON-serialisable dict; the headline is ``recall_at_fpr_0.001``.
    """
    alerts_dir, truth_path = Path(alerts_dir), Path(truth_path)
    if base_rate is not None and not 0 <= base_rate <= 1:
        raise EvaluationInputError(f"base rate must lie in [0, 1], got {base_rate}")
    if not alerts_dir.is_dir():
        raise EvaluationInputError(f"alerts folder {alerts_dir} does not exist")
    truth = _read(truth_path, TRUTH_COLUMNS, "truth")
    _unique_ids(_strings(truth["account_id"]), f"truth {truth_path}")
    requests = request_times = None
    if traffic_path is not None:
        traffic = _read(Path(traffic_path), TRAFFIC_COLUMNS, "traffic")
        requests, request_times = _campaign_requests(truth, traffic)
    accounts_path = alerts_dir / "accounts.parquet"
    alerts = _read(accounts_path, ALERT_COLUMNS, "alerts", optional=OPTIONAL_ALERT_COLUMNS)
    is_campaign = pc.is_valid(truth["campaign_id"]).to_numpy(zero_copy_only=False)
    campaign_accounts = int(is_campaign.sum())
    result = {
        "inputs": {
            "alerts": str(accounts_path),
            "truth": str(truth_path),
            "traffic": None if traffic_path is None else str(traffic_path),
        },
        "population": {
            "accounts": truth.num_rows,
            "campaign_accounts": campaign_accounts,
            "legit_accounts": truth.num_rows - campaign_accounts,
            "campaigns": pc.count_distinct(truth["campaign_id"]).as_py(),
            "campaign_requests": None if requests is None else int(requests[is_campaign].sum()),
        },
    }
    result |= _score(
        _align(truth, alerts, requests, f"alerts {accounts_path}"), request_times, base_rate
    )
    baseline_path = alerts_dir / "baseline.parquet"
    if baseline_path.exists():
        baseline = _read(baseline_path, ALERT_COLUMNS, "baseline", optional=OPTIONAL_ALERT_COLUMNS)
        result["inputs"]["baseline"] = str(baseline_path)
        aligned = _align(truth, baseline, requests, f"baseline {baseline_path}")
        result["baseline"] = _score(aligned, request_times, base_rate)
    return result


# --- the table ----------------------------------------------------------------------------------


def _pct(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.2f}%"
    return text if ci is None else f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _rows(figures: dict) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for budget, at in figures["at_fpr"].items():
        threshold = "-" if at["threshold"] is None else f"{at['threshold']:.4g}"
        rows += [
            (f"recall @ FPR {budget}", _pct(at["recall"], at["recall_ci95"])),
            ("  score threshold", threshold),
            ("  allowed false positives", str(at["allowed_false_positives"])),
            ("  achieved FPR", _pct(at["achieved_fpr"], at["fpr_ci95"])),
        ]
    flagged = figures["flagged"]
    rows += [
        ("flagged accounts", str(flagged["flagged_accounts"])),
        ("  precision", _pct(flagged["precision"], flagged["precision_ci95"])),
        ("  recall", _pct(flagged["recall"], flagged["recall_ci95"])),
        ("  FPR", _pct(flagged["fpr"], flagged["fpr_ci95"])),
    ]
    given = flagged["precision_at_base_rate"].get("given")
    if given:
        rows.append((f"  precision at base rate {given['base_rate']:g}", _pct(given["precision"])))
    ari = figures["cluster_ari"]
    found = figures["campaigns_found"]
    rows += [
        ("traffic-weighted recall", _pct(figures["traffic_weighted_recall"])),
        ("cluster ARI", "-" if ari is None else f"{ari:.3f}"),
        ("campaigns found", f"{sum(c['found'] for c in found.values())}/{len(found)}"),
    ]
    delay = figures["detection_delay"]
    caught = "-" if delay is None else f"{delay['campaigns_within']}/{len(delay['campaigns'])}"
    rows.append(("caught within 1% or 24 h", caught))
    return rows


def format_table(result: dict) -> Table:
    """The headline figures, detector beside baseline when there is one."""
    population = result["population"]
    table = Table(
        title=f"detection: {population['campaign_accounts']} campaign accounts in "
        f"{population['campaigns']} campaigns, {population['legit_accounts']} legitimate"
    )
    table.add_column("metric")
    table.add_column("detector", justify="right")
    rows = _rows(result)
    if "baseline" not in result:
        for row in rows:
            table.add_row(*row)
        return table
    table.add_column("baseline", justify="right")
    for (label, ours), (_, baseline) in zip(rows, _rows(result["baseline"])):
        table.add_row(label, ours, baseline)
    return table


def write_evaluation(alerts_dir: str | Path, result: dict) -> None:
    """Save ``result`` as ``evaluation.json`` in the alerts folder and show it in its report.html
    (detector beside the volume-only baseline): the page is re-rendered, so a second evaluation
    replaces the first."""
    import json

    from distillscope.report.detection import add_evaluation

    alerts_dir = Path(alerts_dir)
    (alerts_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    ours = _rows(result)
    theirs = _rows(result["baseline"]) if "baseline" in result else [("", "-")] * len(ours)
    rows = [(label, a, b) for (label, a), (_, b) in zip(ours, theirs)]
    add_evaluation(alerts_dir, rows, result["population"])
