"""A learned scorer beside the rank-sum: gradient-boosted trees over the detector's evidence,
calibrated to a probability, trained on labelled simulated worlds.

The detector's own score (``signals.combine``) is unsupervised and says why it fires; it is kept.
The learned scorer reads the same per-signal evidence (``evidence_*`` columns of
``accounts.parquet``) in the same structure (context capped by content, ``feature_matrix``), plus
the account's community, and learns how the signals combine in the labelled worlds it
was trained on, never decreasing in any evidence: scikit-learn's
``HistGradientBoostingClassifier`` with isotonic calibration (``CalibratedClassifierCV``). Its
weakness is the detector's strength turned round: it knows only the shapes it saw, so
``detect-eval --cross`` trains it without the shape it is scored on, and both scores are
reported side by side.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from distillscope.detect.signals import CONTENT, SIGNALS, WEIGHTS
from distillscope.errors import DistillscopeError
from distillscope.paths import atomic_path

#: What a scorer flags by default: its threshold on the training worlds' legitimate accounts.
TRAINING_FPR = 0.001


class LearnedScorerError(DistillscopeError):
    """A scorer file that cannot be read, or training data without both classes."""


def feature_matrix(table: pa.Table) -> np.ndarray:
    """One row per account, in the detector's own evidence structure: each content signal's
    evidence, each context signal's evidence capped at the weighted content evidence (as in
    ``signals.combine``: automation, shared infrastructure and templates only add to what the
    requests ask for), and the community (size, -log10 p) for accounts with content evidence.
    Missing columns (an older run) are zeros. Volume is left out: it is no evidence (the
    volume-only baseline finds nothing), and a model free to use it learns the training worlds'
    volumes.

    The cap is what keeps a learned model from learning that automation is distillation from
    worlds whose only automated accounts were campaigns: an integration it never saw has no
    content evidence, so every feature is zero."""
    evidence = {name: _column(table, f"evidence_{name}") for name in SIGNALS}
    content = sum(WEIGHTS[name] * evidence[name] for name in CONTENT)
    columns = [evidence[name] for name in CONTENT]
    columns += [np.minimum(evidence[name], content) for name in SIGNALS if name not in CONTENT]
    has_content = content > 0
    columns.append(_column(table, "community_size") * has_content)
    p = _column(table, "community_p", default=1.0)
    columns.append(-np.log10(np.clip(p, 1e-300, 1.0)) * has_content)
    return np.column_stack(columns)


#: More of any evidence never lowers the probability.
MONOTONE = (1,) * (len(SIGNALS) + 2)


def _column(table: pa.Table, name: str, default: float = 0.0) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, default)
    values = table[name].to_numpy(zero_copy_only=False)
    return np.nan_to_num(np.asarray(values, dtype=float), nan=default)


@dataclass
class LearnedScorer:
    """``fit(tables, labels)`` then ``predict_proba(table)``; ``threshold`` flags at
    ``TRAINING_FPR`` of the training worlds' legitimate accounts."""

    max_iter: int = 200
    max_depth: int = 3
    seed: int = 0
    threshold: float = field(default=math.inf, init=False)
    trained_on: dict = field(default_factory=dict, init=False)

    def fit(self, tables: Sequence[pa.Table], labels: Sequence[np.ndarray]) -> LearnedScorer:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.ensemble import HistGradientBoostingClassifier

        x = np.vstack([feature_matrix(t) for t in tables])
        y = np.concatenate([np.asarray(label, dtype=int) for label in labels])
        if len(set(y.tolist())) < 2 or min(np.bincount(y)) < 3:
            raise LearnedScorerError(
                "the training worlds need at least 3 campaign and 3 legitimate accounts"
            )
        trees = HistGradientBoostingClassifier(
            max_iter=self.max_iter, max_depth=self.max_depth, l2_regularization=1.0,
            monotonic_cst=list(MONOTONE), random_state=self.seed,
        )  # fmt: skip
        self.model_ = CalibratedClassifierCV(trees, method="isotonic", cv=3).fit(x, y)
        legit = self.model_.predict_proba(x[y == 0])[:, 1]
        allowed = math.floor(round(TRAINING_FPR * len(legit), 9))
        ordered = np.sort(legit)[::-1]
        # flag strictly above the (allowed + 1)-th highest legitimate probability
        self.threshold = float(np.nextafter(ordered[allowed], 1)) if allowed < len(ordered) else 0.0
        self.trained_on = {"accounts": int(len(y)), "campaign_accounts": int(y.sum())}
        return self

    def predict_proba(self, table: pa.Table) -> np.ndarray:
        return self.model_.predict_proba(feature_matrix(table))[:, 1]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as staging:
            staging.write_bytes(pickle.dumps(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LearnedScorer:
        path = Path(path)
        try:
            scorer = pickle.loads(path.read_bytes())
        except FileNotFoundError:
            raise LearnedScorerError(f"no learned scorer at {path}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise LearnedScorerError(f"{path} is not a learned scorer ({exc})") from None
        if not isinstance(scorer, cls):
            raise LearnedScorerError(f"{path} is not a learned scorer")
        return scorer


def train_scorer(
    worlds, out: str | Path | None = None, *, progress=None, **detect_kwargs
) -> LearnedScorer:
    """Fit a ``LearnedScorer`` on simulated worlds (a folder of them, one, or a list; detected
    first where needed, see ``crosseval.scored_worlds``) and save it to ``out`` when given."""
    from distillscope.detect.crosseval import scored_worlds

    table = scored_worlds(worlds, progress=progress, **detect_kwargs)
    world = table["world"].to_numpy()
    labels = np.array([c is not None for c in table["campaign_id"].to_pylist()])
    parts = [table.filter(pa.array(world == w)) for w in np.unique(world)]
    scorer = LearnedScorer().fit(parts, [labels[world == w] for w in np.unique(world)])
    if out is not None:
        scorer.save(out)
    return scorer
