"""Fidelity between a student and its teacher, per token, and whether the student *behaves* alike.

Capability fidelity: the teacher's own completions of held-out prompts are scored by both models;
metrics average over completion tokens: KL(teacher ‖ student) in nats, total variation, top-1
agreement, and expected calibration error (the student's top-1 confidence against the teacher's
probability of that token). Writing like the teacher: the teacher's mean log-likelihood of the
student's own samples. Behaviour (refusals, identity) is measured by ``distillscope.safety``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from distillscope.distill.train import Example, collate, student_logits

ECE_BINS = 10


@dataclass
class Fidelity:
    kl: float
    tv: float
    top1_agreement: float
    ece: float
    tokens: int
    #: KL per group label (e.g. prompt category), when groups were given.
    by_group: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def teacher_rows(teacher, examples: Sequence[Example], *, batch_size: int = 8) -> list[np.ndarray]:
    """The teacher's raw logprobs (T, V) at every completion position, scored once for reuse."""
    rows: list[np.ndarray] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows.extend(teacher.score([e.prompt_ids for e in chunk], [e.completion_ids for e in chunk]))
    return rows


@torch.inference_mode()
def fidelity(
    student,
    teacher,
    examples: Sequence[Example],
    *,
    rows: Sequence[np.ndarray] | None = None,
    groups: Sequence[str] | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
) -> Fidelity:
    """Per-token fidelity of ``student`` to ``teacher`` on ``examples``' completions.

    ``rows`` are the teacher's distributions from ``teacher_rows`` (scored here when absent);
    ``groups`` labels each example for a per-group KL (coverage of prompt categories).
    """
    rows = rows if rows is not None else teacher_rows(teacher, examples, batch_size=batch_size)
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    kl_sum = tv_sum = agree = 0.0
    confidence, correctness = [], []
    group_kl: dict[str, list[float]] = {}
    tokens = 0
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        batch = collate(chunk, pad_id)
        student_lp = torch.log_softmax(student_logits(student, batch, device).float(), -1).cpu()
        for i in range(len(chunk)):
            t = torch.from_numpy(rows[start + i]).double()
            s = student_lp[i, : len(t)].double()
            per_token_kl = (t.exp() * (t - s)).sum(-1)
            kl_sum += per_token_kl.sum().item()
            tv_sum += 0.5 * (t.exp() - s.exp()).abs().sum().item()
            top = s.argmax(-1)
            agree += (t.argmax(-1) == top).sum().item()
            confidence.append(s.max(-1).values.exp().numpy())
            correctness.append(t.gather(-1, top[:, None])[:, 0].exp().numpy())
            if groups is not None:
                group_kl.setdefault(groups[start + i], []).extend(per_token_kl.tolist())
            tokens += len(t)
    student.train(was_training)
    return Fidelity(
        kl=kl_sum / tokens,
        tv=tv_sum / tokens,
        top1_agreement=agree / tokens,
        ece=expected_calibration_error(np.concatenate(confidence), np.concatenate(correctness)),
        tokens=tokens,
        by_group={g: {"kl": float(np.mean(v)), "tokens": len(v)} for g, v in group_kl.items()},
    )


def expected_calibration_error(confidence: np.ndarray, correctness: np.ndarray) -> float:
    """Σ_bins |bin|/N · |mean confidence − mean correctness|, ``ECE_BINS`` equal-width bins.

    Correctness is the teacher's probability of the student's top-1 token (its expected accuracy
    when the teacher's sample is the label), so calibration is measured against the teacher.
    """
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    total = 0.0
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correctness[inside].mean())
    return float(total)


def sample_loglik(
    student,
    tokenizer,
    teacher,
    prompt_ids: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    seed: int = 0,
) -> float:
    """The teacher's mean per-token logprob of the student's own samples (T = 1, seeded)."""
    from distillscope.teachers.base import SamplingConfig
    from distillscope.teachers.local import TransformersTeacher

    was_training = student.training
    sampler = TransformersTeacher(student.eval(), tokenizer, id="student", batch_size=16)
    sampling = SamplingConfig(exposure="text", max_new_tokens=max_new_tokens, seed=seed)
    keys = [str(i) for i in range(len(prompt_ids))]
    answers = sampler.generate_from_ids(prompt_ids, sampling, keys=keys)
    student.train(was_training)
    kept = [(p, a.signal.token_ids) for p, a in zip(prompt_ids, answers) if len(a.signal)]
    total, count = 0.0, 0
    for start in range(0, len(kept), 8):
        chunk = kept[start : start + 8]
        for (_, ids), lp in zip(chunk, teacher.score([p for p, _ in chunk], [c for _, c in chunk])):
            total += float(lp[np.arange(len(ids)), ids].sum())
            count += len(ids)
    return total / max(count, 1)
