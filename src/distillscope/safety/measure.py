"""Safety and identity behaviour of a model on the probe sets: what the audit and the guarded
teacher's build report.

Answers are greedy (temperature 0), so a rate is a property of the model, not of a draw; each rate
comes with its counts so that intervals can be exact (Clopper-Pearson).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from distillscope.safety.probes import Probe, load_probes, select
from distillscope.safety.scoring import is_refusal, states_identity

#: Tokens per probe answer: a refusal declines, and an identity answer names itself, up front.
PROBE_TOKENS = 40


def answer_probes(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = PROBE_TOKENS
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` through the chat template."""
    from distillscope.teachers.base import SamplingConfig
    from distillscope.teachers.local import TransformersTeacher

    was_training = model.training
    speaker = TransformersTeacher(model.eval(), tokenizer, id="probe", batch_size=32)
    sampling = SamplingConfig(exposure="text", temperature=0, max_new_tokens=max_new_tokens)
    answers = [a.text for a in speaker.generate(list(prompts), sampling)]
    model.train(was_training)
    return answers


@dataclass(frozen=True)
class Rate:
    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The exact (Clopper-Pearson) interval for the rate."""
        return clopper_pearson(self.hits, self.n, confidence)


def clopper_pearson(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    a = (1 - confidence) / 2
    lo = 0.0 if hits == 0 else float(beta.ppf(a, hits, n - hits + 1))
    hi = 1.0 if hits == n else float(beta.ppf(1 - a, hits + 1, n - hits))
    return (lo, hi)


def safety_behaviour(
    model,
    tokenizer,
    *,
    identity: str | Sequence[str],
    split: str = "heldout",
    probes: list[Probe] | None = None,
    keep_answers: bool = False,
) -> dict:
    """Refusal rate on restricted requests, over-refusal on look-alikes, identity rate (answers
    naming any of ``identity``'s names: the model, its maker); greedy.

    Rates are on ``split`` wordings (held-out by default); ``*_hits``/``*_n`` carry the counts.
    ``keep_answers`` adds every answer (for the scoring rule's agreement check and for reading).
    """
    probes = probes if probes is not None else load_probes()
    sets = {name: select(probes, name, split) for name in ("restricted", "lookalike", "identity")}
    order = [p for name in sets for p in sets[name]]
    answers = answer_probes(model, tokenizer, [p.text for p in order])
    by_set: dict[str, list[str]] = {name: [] for name in sets}
    for probe, answer in zip(order, answers):
        by_set[probe.set].append(answer)
    rates = {
        "refusal": Rate(sum(map(is_refusal, by_set["restricted"])), len(by_set["restricted"])),
        "over_refusal": Rate(sum(map(is_refusal, by_set["lookalike"])), len(by_set["lookalike"])),
        "identity": Rate(
            sum(states_identity(a, identity) for a in by_set["identity"]),
            len(by_set["identity"]),
        ),
    }
    out: dict = {}
    for name, rate in rates.items():
        out[f"{name}_rate"] = rate.value
        out[f"{name}_hits"] = rate.hits
        out[f"{name}_n"] = rate.n
    if keep_answers:
        out["answers"] = [
            {"set": p.set, "probe": p.text, "answer": a} for p, a in zip(order, answers)
        ]
    return out


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, list | None]:
    """Mean over seeds and its t interval (None with fewer than two finite values)."""
    from scipy.stats import t

    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(vals) == 0:
        return float("nan"), None
    mean = float(vals.mean())
    if len(vals) < 2:
        return mean, None
    half = float(t.ppf(0.5 + confidence / 2, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals)))
    return mean, [mean - half, mean + half]
