"""The detector's account-level signals, each fitted on reference traffic and scored against it.

A signal is one number per account, higher meaning more campaign-like (``SIGNALS`` says what each
measures; ``detector._features`` computes them all in SQL, on DuckDB or Spark). Fitting a signal
keeps its distribution among reference accounts; scoring turns a new account's value into the
conformal tail probability ``p = (1 + #reference accounts >= x) / (1 + #reference accounts)``
-- rank-based, so a signal that is zero for most accounts gives no evidence at zero, and a value
above every reference account's is as rare as the reference can say (1 / (n + 1)), never an
extrapolated tail.

``Reference`` holds every signal's fitted distribution. Fitted on the scored log itself (what
``detect`` does without ``reference=``), each account is ranked among its peers; fitted on earlier
traffic without its banned accounts (``fit_reference`` / ``distillscope detect-fit``), a new log
is scored against what ordinary traffic looked like, which a campaign that grows to be a large part
of the log cannot dilute. Flag thresholds come from the reference too: each signal's evidence
drawn independently across reference accounts keeps every signal's distribution and destroys what
makes a campaign, several signals high in the same account.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distillscope.errors import DistillscopeError
from distillscope.paths import atomic_path


@dataclass(frozen=True)
class AccountSignal:
    """What one account-level signal is and how it counts (``exposure.Signal`` is something
    else: what a teacher's answer reveals)."""

    name: str
    description: str
    #: How much the signal counts in the score (a weighted Fisher sum of -ln p). The signals
    #: specific to a harvest (asking for the reasoning, sweeping tool catalogues) weigh 1.5: at
    #: the reference's extreme, with context evidence behind them, each flags an account alone
    #: (``combine`` caps context at the content's weight, so at 1.0 one content signal never
    #: could). A focus on a training-target capability is what many users have: 0.75.
    weight: float
    #: ``content``: what the requests ask for (evidence of distillation on its own); ``context``:
    #: how they are sent (automation, shared infrastructure, templates, logprobs), which
    #: integrations and offices share with campaigns and so only adds to content evidence.
    kind: str = "context"
    #: A share of the account's requests: scored by its exact lower confidence bound.
    share: bool = False
    #: What a share is a share of: ``requests``, or ``tasks`` (distinct templates and distinct
    #: untemplated prompts: a template wrapped round users' text is one task however often sent).
    per: str = "requests"
    #: Log columns (or side inputs) it needs; without them it is not measured.
    needs: tuple[str, ...] = ()
    #: The least value that is evidence at all (an effect size): below it p = 1 however rare
    #: the value is among reference accounts, or however many requests make it significant.
    floor: float = 0.0


SIGNAL_LIST = (
    AccountSignal("elicitation", "share of prompts asking to see the reasoning or a narrated "
                  "trace (a learned classifier, detect.elicitation)", 1.5, kind="content",
                  share=True, floor=0.02),
    AccountSignal("concentration", "share of the account's distinct tasks in its most-used "
                  "training-target capability (coding, tool use, reasoning)", 0.75,
                  kind="content", share=True, per="tasks"),
    AccountSignal("tool_coverage", "distinct tool catalogues (sets of tools offered) in its "
                  "requests: an agent product offers its own tools, a harvest sweeps many", 1.5,
                  kind="content", needs=("messages",)),
    AccountSignal("template", "share of requests in prompt-template clusters shared by several "
                  "accounts", 1.5, share=True),
    AccountSignal("regularity", "inter-arrival regularity (1 / coefficient of variation)", 1.0),
    AccountSignal("around_clock", "entropy of the hour-of-day histogram (automation runs all "
                  "day)", 0.5),
    AccountSignal("ip_sharing", "most accounts seen on one of the account's IP addresses", 1.0,
                  needs=("client_ip",)),
    AccountSignal("ip_rotation", "distinct IP addresses per request", 1.0,
                  needs=("client_ip",)),
    AccountSignal("automation_ua", "share of requests from HTTP libraries rather than apps", 0.5,
                  share=True, needs=("user_agent",)),
    AccountSignal("logprobs", "share of requests asking for logprobs", 0.5, share=True,
                  needs=("exposure_requested",)),
    AccountSignal("pivot", "share of its first-day traffic after a model release that went to "
                  "the new model", 1.0, needs=("model", "events")),
    AccountSignal("fingerprint", "accounts sharing its payment fingerprint", 1.0,
                  needs=("accounts",)),
    AccountSignal("banned_link", "links (fingerprint, IP, template cluster) to banned accounts",
                  1.0, needs=("banned",)),
)  # fmt: skip
#: What each account-level signal measures (higher = more campaign-like).
SIGNALS = {s.name: s.description for s in SIGNAL_LIST}
WEIGHTS = {s.name: s.weight for s in SIGNAL_LIST}
#: Signals that are evidence of distillation on their own; the others only add to them.
CONTENT = tuple(s.name for s in SIGNAL_LIST if s.kind == "content")
#: Signals that are shares of an account's requests: scored by their lower confidence bound.
SHARES = tuple(s.name for s in SIGNAL_LIST if s.share)
#: Each signal's effect-size floor (``AccountSignal.floor``). Elicitation's is 2% of requests (its
#: lower bound): a harvest asks for the reasoning in a material share of what it sends (the
#: simulator's campaigns 15-100%), while an integration whose users' text says "step by step"
#: in 15 of 2,245 requests is significant by volume alone and is not a harvest.
FLOORS = {s.name: s.floor for s in SIGNAL_LIST}


def measured_signals(missing: Iterable[str]) -> frozenset[str]:
    """The signals a log measures when ``missing`` (columns or side inputs) are absent."""
    missing = set(missing)
    return frozenset(s.name for s in SIGNAL_LIST if not missing.intersection(s.needs))


def share_lower_bound(hits: np.ndarray, trials: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """The exact (Clopper-Pearson) one-sided lower confidence bound of ``hits / trials``.

    An account that sent one request asking for step-by-step reasoning has a share of 1 but
    almost no evidence; 34 of 44 is evidence. The bound ranks the second above the first.
    """
    from scipy.stats import beta

    hits = np.asarray(hits, dtype=float)
    trials = np.asarray(trials, dtype=float)
    bound = np.zeros_like(hits)
    some = hits > 0
    bound[some] = beta.ppf(1 - confidence, hits[some], trials[some] - hits[some] + 1)
    return bound


class EmpiricalTail:
    """One signal fitted on reference accounts: the upper tail of its values among them.

    A share signal (``hits`` of an account's ``trials`` requests) also keeps the reference's
    pooled rate, and its tail probability is the larger of the rank one and the exact binomial
    tail ``P(Bin(trials, rate) >= hits)``: both must call it rare. Ranks alone overstate small
    shares when most accounts score zero (one request in a hundred asking for step-by-step
    reasoning would outrank every account that never asked); the binomial alone overstates
    heterogeneous ones (a user who always asks for it is rare but not impossible).
    """

    def __init__(self, values: np.ndarray, hits: np.ndarray | None = None,
                 trials: np.ndarray | None = None, floor: float = 0.0):  # fmt: skip
        self.floor = floor
        #: The reference accounts' values, in their order (the null shuffles them).
        self.reference = _clean(values)
        self.values = np.sort(self.reference)
        self.hits = None if hits is None else np.asarray(hits, dtype=float)
        self.trials = None if trials is None else np.asarray(trials, dtype=float)
        self.rate = (
            float(self.hits.sum() / max(self.trials.sum(), 1)) if self.hits is not None else None
        )

    def p(self, values: np.ndarray, hits=None, trials=None) -> np.ndarray:
        """``(1 + #reference >= x) / (1 + n)``, 1 at x <= 0 (a zero is no evidence) and below the
        floor; for a share, at least the binomial tail of ``hits`` in ``trials`` at the
        reference's rate."""
        values = _clean(values)
        n = len(self.values)
        at_least = n - np.searchsorted(self.values, values, side="left")
        p = (1 + at_least) / (1 + n)
        if self.rate is not None and hits is not None:
            from scipy.stats import binom

            hits = np.asarray(hits, dtype=float)
            p = np.maximum(p, binom.sf(hits - 1, np.asarray(trials, dtype=float), self.rate))
        p[(values <= 0) | (values < self.floor)] = 1.0
        return p

    def evidence(self, values: np.ndarray, hits=None, trials=None) -> np.ndarray:
        return -np.log(self.p(values, hits, trials))

    def reference_evidence(self) -> np.ndarray:
        """The reference accounts' own evidence (what the permutation null shuffles)."""
        return self.evidence(self.reference, self.hits, self.trials)

    def evidence_of(self, table: pa.Table, name: str) -> np.ndarray:
        """Evidence of signal ``name`` for each row of a features table."""
        if self.rate is None or f"{name}_trials" not in table.column_names:
            return self.evidence(table[name])
        return self.evidence(
            table[name], table[f"{name}_hits"].to_numpy(), table[f"{name}_trials"].to_numpy()
        )


def _clean(values) -> np.ndarray:
    """Floats, NaN as 0, rounded to 9 decimals: DuckDB's parallel sums differ in the last bits
    from run to run, and equal values must tie (a rank is the evidence)."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = values.to_numpy(zero_copy_only=False)
    return np.round(np.nan_to_num(np.asarray(values, dtype=float)), 9)


class BadReferenceError(DistillscopeError):
    """A reference file that cannot be read, or one fitted on no accounts."""


#: Key of the fit's description in reference.parquet's schema metadata.
_META = b"distillscope.reference"


@dataclass
class Reference:
    """Every signal fitted on reference accounts (one row per account, one column per signal)."""

    values: pa.Table
    #: Signals the reference traffic measured; the others fall back to the scored log's own.
    measured: frozenset[str]
    exchanges: int = 0
    source: str = ""
    excluded: int = 0
    fitted_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def fit(
        cls,
        features: pa.Table,
        measured: Iterable[str],
        *,
        exclude: Iterable[str] = (),
        exchanges: int = 0,
        source: str = "",
    ) -> Reference:
        """Fit on ``features`` (``detector._features``'s table), leaving out ``exclude``d accounts
        (banned ones: the reference should look like ordinary traffic)."""
        exclude = set(exclude)
        keep = np.array([a not in exclude for a in features["account_id"].to_pylist()], bool)
        kept = features.filter(pa.array(keep))
        if kept.num_rows == 0:
            raise BadReferenceError("no accounts left to fit the reference on")
        columns = {name: pa.array(_clean(kept[name]), pa.float64()) for name in SIGNALS}
        for name in SHARES:
            for part in ("hits", "trials"):
                column = kept[f"{name}_{part}"].to_numpy()
                columns[f"{name}_{part}"] = pa.array(column, pa.float64())
        columns["requests"] = pa.array(kept["requests"].to_numpy(), pa.float64())
        values = pa.table(columns)
        return cls(values, frozenset(measured), exchanges, source, int((~keep).sum()))

    def strata(self) -> np.ndarray | None:
        """The reference accounts' volume strata for the null (None for an old reference file
        without request counts)."""
        if "requests" not in self.values.column_names:
            return None
        return volume_strata(self.values["requests"].to_numpy())

    @property
    def accounts(self) -> int:
        return self.values.num_rows

    def tails(self, scored: pa.Table, scored_measured: Iterable[str]) -> tuple[dict, list[str]]:
        """Each signal's fitted tail, and notes on the signals fitted on ``scored`` instead
        (measured there, not in the reference: a reference of zeros would make any value rare)."""
        scored_measured = set(scored_measured)
        tails, notes = {}, []
        for name in SIGNALS:
            own = name not in self.measured and name in scored_measured
            table = scored if own else self.values
            share = name in SHARES and f"{name}_trials" in table.column_names
            tails[name] = EmpiricalTail(
                table[name],
                table[f"{name}_hits"].to_numpy() if share else None,
                table[f"{name}_trials"].to_numpy() if share else None,
                floor=FLOORS[name],
            )
            if own:
                notes.append(f"signal {name} not measured in the reference: fitted on this log")
        return tails, notes

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "version": 1,
            "measured": sorted(self.measured),
            "exchanges": self.exchanges,
            "source": self.source,
            "excluded": self.excluded,
            "fitted_at": self.fitted_at,
        }
        table = self.values.replace_schema_metadata({_META: json.dumps(meta).encode()})
        with atomic_path(path) as staging:
            pq.write_table(table, staging)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        path = Path(path)
        if not path.is_file():
            raise BadReferenceError(
                f"no reference at {path} (fit one with distillscope detect-fit)"
            )
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            reason = str(exc).splitlines()[0]
            raise BadReferenceError(
                f"{path} is not a detector reference (not a Parquet file: {reason})"
            ) from None
        raw = (table.schema.metadata or {}).get(_META)
        missing = [name for name in SIGNALS if name not in table.column_names]
        if raw is None or missing:
            raise BadReferenceError(
                f"{path} is not a detector reference"
                + (f" (no {', '.join(missing)} column)" if missing else "")
                + ": fit one with distillscope detect-fit"
            )
        meta = json.loads(raw)
        if table.num_rows == 0:
            raise BadReferenceError(f"{path} was fitted on no accounts")
        kept = [c for c in table.column_names if c in SIGNALS or c == "requests" or any(
            c in (f"{name}_hits", f"{name}_trials") for name in SHARES)]  # fmt: skip
        return cls(
            table.select(kept).replace_schema_metadata(None),
            frozenset(meta.get("measured", SIGNALS)),
            int(meta.get("exchanges", 0)),
            meta.get("source", ""),
            int(meta.get("excluded", 0)),
            meta.get("fitted_at", ""),
        )


def combine(evidence: dict[str, np.ndarray]) -> np.ndarray:
    """The score from each signal's evidence (-ln p): ``2 * (C + min(X, C))``, where C is the
    weighted sum over content signals and X over context signals.

    Automation is not distillation: machine-regular timing, HTTP-library user agents, shared
    addresses and templates are what a customer's integration or an office looks like too. They
    strengthen content evidence (what the requests ask for) and never replace it: an account with
    no content evidence scores 0 however automated it is, and context at most doubles the rest.
    """
    content = sum(WEIGHTS[name] * evidence[name] for name in CONTENT)
    context = sum(WEIGHTS[name] * evidence[name] for name in SIGNALS if name not in CONTENT)
    return 2 * (content + np.minimum(context, content))


def score(features: pa.Table, tails: dict[str, EmpiricalTail]) -> tuple[np.ndarray, dict]:
    """The combined score (``combine``) and each signal's evidence, -ln p."""
    evidence = {name: tails[name].evidence_of(features, name) for name in SIGNALS}
    return combine(evidence), evidence


def volume_strata(requests: np.ndarray, bins: int = 10) -> np.ndarray:
    """Each account's request-count decile (ties kept together): the null shuffles within one."""
    requests = np.asarray(requests, dtype=float)
    edges = np.unique(np.quantile(requests, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, requests, side="right")


#: Evidence (-ln p) at which a signal is named among an account's reasons: p <= 0.05.
REASON = math.log(20)


def content_score(evidence: dict[str, np.ndarray]) -> np.ndarray:
    """``2 * C``: the part of ``combine`` that says what the requests ask for."""
    return 2 * sum(WEIGHTS[name] * evidence[name] for name in CONTENT)


def content_reason(evidence: dict[str, np.ndarray]) -> np.ndarray:
    """Accounts with a content signal at p <= 0.05: a reason of their own to be in a campaign."""
    return np.logical_or.reduce([evidence[name] >= REASON for name in CONTENT])


@dataclass(frozen=True)
class Null:
    """Scores of accounts whose signals are unrelated: each signal's reference evidence shuffled
    across the reference accounts independently (``permutation_null``)."""

    #: The null scores, ascending.
    scores: np.ndarray
    #: Each null account's content score (``content_score``) and whether it has a content reason.
    content: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reasoned: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def threshold(self, fpr: float) -> float:
        """The score a null account exceeds with probability ``fpr``."""
        return float(np.quantile(self.scores, 1 - fpr))

    def community_p(self, median_content: float, members: int) -> float:
        """How often ``members`` unrelated accounts that each have a content reason would have a
        median content score of ``median_content`` or more: the exact binomial tail of at least
        half of them exceeding it. A community is formed by what its members share (templates,
        addresses, timing), so it is tested on what they ask for alone, against accounts chosen
        the way its members were: a hydra's heads each look modest, a hundred of them together do
        not; an office whose members each have a weak reason is an office."""
        from scipy.stats import binom

        chosen = self.content[self.reasoned]
        q = (1 + int((chosen >= median_content).sum())) / (1 + len(chosen))
        return float(binom.sf(math.ceil(members / 2) - 1, members, min(q, 1.0)))


def permutation_null(
    tails: dict[str, EmpiricalTail],
    *,
    permutations: int,
    seed: int,
    strata: np.ndarray | None = None,
) -> Null:
    """The null of ``Null``: every signal keeps its distribution and loses what makes a campaign,
    several signals high in the same account. A signal fitted on another table is drawn from it
    with replacement. With ``strata`` (``volume_strata`` of the reference accounts) the shuffle
    stays within each stratum: a busy account has more chances to show every share signal at
    once, and that ordinary correlation must survive into the null or busy users look like
    campaigns.
    """
    rng = np.random.default_rng(seed)
    evidence = {name: tail.reference_evidence() for name, tail in tails.items()}
    n = max(len(e) for e in evidence.values())
    groups = [np.flatnonzero(strata == k) for k in np.unique(strata)] if strata is not None else []

    def shuffled(e: np.ndarray) -> np.ndarray:
        if len(e) != n:
            return rng.choice(e, n)
        if not groups:
            return rng.permutation(e)
        out = np.empty_like(e)
        for index in groups:
            out[index] = e[rng.permutation(index)]
        return out

    draws = [{name: shuffled(e) for name, e in evidence.items()} for _ in range(permutations)]
    return Null(
        np.sort(np.concatenate([combine(draw) for draw in draws])),
        np.concatenate([content_score(draw) for draw in draws]),
        np.concatenate([content_reason(draw) for draw in draws]),
    )
