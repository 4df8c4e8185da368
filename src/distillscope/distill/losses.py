"""Distillation losses as pure functions of (student logits, teacher signal, mask, temperature).

Shapes: ``student_logits`` is (B, T, V) at the positions that predict completion tokens; ``mask``
is (B, T), true where a position counts. Every loss returns the mean over counted positions.

Temperatures. Teacher logprobs arrive *raw* (temperature 1, what local teachers store). The
*distillation* temperature ``temperature`` softens both sides; the ×T² factor that keeps gradient
scale independent of T (Hinton et al. 2015) is applied once, in ``_scale``. The *sampling*
temperature of a harvest never enters here unless a server returned processed logprobs; then
``retemper`` undoes it first.

Each loss names the signal it takes in ``SIGNAL_OF``; ``YIELDS`` says which signals each exposure
level gives, and ``ACCEPTS`` (derived from both) the levels each loss can train at. The training
loop builds a batch's signal from ``SIGNAL_OF``, so what is accepted is what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from distillscope.exposure import Full, Text, TopK


class _OnDevice:
    def to(self, device):
        """The same signal with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class DenseSignal(_OnDevice):
    """The teacher's full distribution: raw logprobs (B, T, V)."""

    logprobs: torch.Tensor


@dataclass(frozen=True)
class SparseSignal(_OnDevice):
    """Top-k teacher logprobs (B, T, k), their token ids, and the tail mass (B, T) they leave."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor


@dataclass(frozen=True)
class SampledSignal(_OnDevice):
    """Tokens drawn from a proposal (B, T, m), with importance weights summing to 1 per position,
    and the teacher's raw logprobs of those tokens (for the loss value; gradients do not need them).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    teacher_logprobs: torch.Tensor


@dataclass(frozen=True)
class HardSignal(_OnDevice):
    """The sampled tokens only (B, T): one-hot targets."""

    ids: torch.Tensor


def retemper(logprobs: torch.Tensor, from_temperature: float, to_temperature: float = 1.0):
    """Re-normalise logprobs produced at ``from_temperature`` as if produced at ``to_temperature``.

    Exact for a full distribution: logprobs at T are logits/T minus a constant, so scaling by
    T/T' and re-normalising gives logits/T'.
    """
    if from_temperature == to_temperature:
        return logprobs
    return torch.log_softmax(logprobs.float() * (from_temperature / to_temperature), dim=-1)


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _tempered(student_logits: torch.Tensor, signal: DenseSignal, temperature: float):
    """Teacher and student log-distributions at the distillation temperature."""
    teacher = torch.log_softmax(signal.logprobs.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return teacher, student


def _scale(temperature: float) -> float:
    """Hinton's T²: soft-target gradients shrink as 1/T², so scale the loss back up, once."""
    return temperature**2


def forward_kl(
    student_logits: torch.Tensor,
    signal: DenseSignal,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher_T ‖ student_T) × T², mean over counted positions (mode-covering)."""
    teacher, student = _tempered(student_logits, signal, temperature)
    per = (teacher.exp() * (teacher - student)).sum(-1)
    return _scale(temperature) * _masked_mean(per, mask)


def reverse_kl(
    student_logits: torch.Tensor,
    signal: DenseSignal,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(student_T ‖ teacher_T) × T², mean over counted positions (mode-seeking)."""
    teacher, student = _tempered(student_logits, signal, temperature)
    per = (student.exp() * (student - teacher)).sum(-1)
    return _scale(temperature) * _masked_mean(per, mask)


def generalized_jsd(
    student_logits: torch.Tensor,
    signal: DenseSignal,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence, normalised so β=0 is forward KL and β=1 reverse KL.

    With M = βP + (1−β)Q (P teacher, Q student):
    JSD_β = [β·KL(P‖M) + (1−β)·KL(Q‖M)] / (β(1−β)), which tends to KL(P‖Q) as β→0 and to
    KL(Q‖P) as β→1 (the endpoints are computed exactly). Unnormalised (as in Agarwal et al. 2024,
    GKD) it would vanish at both ends.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, signal, mask, temperature=temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, signal, mask, temperature=temperature)
    teacher, student = _tempered(student_logits, signal, temperature)
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log(1 - beta))
    kl_teacher = (teacher.exp() * (teacher - mixture)).sum(-1)
    kl_student = (student.exp() * (student - mixture)).sum(-1)
    per = (beta * kl_teacher + (1 - beta) * kl_student) / (beta * (1 - beta))
    return _scale(temperature) * _masked_mean(per, mask)


def _student_topk_and_tail(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """Student log q at the teacher's top-k ids, and log of the mass on every other token."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    at_ids = student.gather(-1, ids)
    rest = student.scatter(-1, ids, float("-inf"))
    return at_ids, torch.logsumexp(rest, dim=-1)


def sparse_kl(
    student_logits: torch.Tensor,
    signal: SparseSignal,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL over k+1 buckets: the teacher's top-k tokens, and everything else as one tail bucket.

    Unbiased in the sense that matters: it is zero only when the student matches the teacher on
    each top-k token *and* on the total tail mass, and it equals dense KL when k = V. Only T=1: the
    shape of the tail is unknown, so it cannot be re-tempered. Slots at -inf count for nothing
    (give them the id of a counted slot, so no other token leaves the tail): this is how
    ``distill.crosstok`` passes candidates the student's vocabulary cannot spell, and a one-hot
    row (logprob 0, no tail) makes the loss exactly cross-entropy on that token.
    """
    if temperature != 1.0:
        raise ValueError(
            "sparse KL with a tail bucket needs temperature 1 (the tail cannot be re-tempered); "
            "use sparse_kl_renormalized for a tempered top-k loss"
        )
    student_at, student_tail = _student_topk_and_tail(student_logits, signal.ids, 1.0)
    teacher = signal.logprobs.float()
    p = teacher.exp()
    # a slot at -inf carries no mass (a cross-tokenizer candidate the student cannot spell)
    per = torch.where(p > 0, p * (teacher - student_at), torch.zeros_like(p)).sum(-1)
    tail = signal.tail_mass.float().clamp_min(0.0)
    # k = V leaves no tail: any teacher "tail" is float rounding, and the student has none either
    has_tail = (tail > 0) & torch.isfinite(student_tail)
    log_tail = torch.log(torch.where(has_tail, tail, torch.ones_like(tail)))
    per = per + torch.where(has_tail, tail * (log_tail - student_tail), torch.zeros_like(tail))
    return _masked_mean(per, mask)


def sparse_kl_renormalized(
    student_logits: torch.Tensor,
    signal: SparseSignal,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL between teacher and student both renormalised over the teacher's top-k ids, × T².

    The biased variant (cached top-k as a distribution, as many toolkits do): it ignores the tail,
    so a student can put arbitrary mass outside the top-k at no cost. Kept for comparison.
    """
    teacher = torch.log_softmax(signal.logprobs.float() / temperature, dim=-1)
    student_at = student_logits.float().gather(-1, signal.ids) / temperature
    student = torch.log_softmax(student_at, dim=-1)
    per = (teacher.exp() * (teacher - student)).sum(-1)
    return _scale(temperature) * _masked_mean(per, mask)


def sampled_kl(
    student_logits: torch.Tensor,
    signal: SampledSignal,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Random-sampling KD (Anshumann et al. 2025): an unbiased estimate of KL(teacher ‖ student).

    Σ_j w_j (log p_j − log q_j) over tokens drawn from a proposal with importance weights w
    (w = counts/m when drawn from the teacher itself). Its gradient in the student is unbiased for
    the dense forward-KL gradient. Only T=1 (the weights are for the raw distribution).
    """
    if temperature != 1.0:
        raise ValueError("sampled KD estimates the raw (T=1) KL; temperature must be 1")
    student = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, signal.ids)
    per = (signal.weights.float() * (signal.teacher_logprobs.float() - student)).sum(-1)
    return _masked_mean(per, mask)


def hard_ce(
    student_logits: torch.Tensor,
    signal: HardSignal,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy on the sampled tokens: sequence-level KD (Kim & Rush 2016) / SFT on text."""
    logprobs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    per = -logprobs.gather(-1, signal.ids.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(per, mask)


def draw_sampled_signal(
    teacher_logprobs: torch.Tensor, m: int, *, generator: torch.Generator | None = None
) -> SampledSignal:
    """Draw m tokens per position from the teacher itself (proposal = teacher), weights counts/m."""
    flat = teacher_logprobs.float().reshape(-1, teacher_logprobs.shape[-1])
    draws = torch.multinomial(flat.exp(), m, replacement=True, generator=generator)
    ids = draws.reshape(*teacher_logprobs.shape[:-1], m)
    weights = torch.full(ids.shape, 1.0 / m)
    return SampledSignal(ids, weights, teacher_logprobs.gather(-1, ids))


#: The teacher signal each loss is a function of (what the training loop builds for it).
SIGNAL_OF: dict[str, type] = {
    "forward-kl": DenseSignal,
    "reverse-kl": DenseSignal,
    "jsd": DenseSignal,
    "sampled-kl": SampledSignal,
    "sparse-kl": SparseSignal,
    "sparse-kl-renorm": SparseSignal,
    "ce": HardSignal,
}

#: The signals each exposure level yields. Full is the teacher's whole distribution, scored in the
#: loop (sampled tokens are drawn from it); a loss on the text alone at Full would train on text,
#: not on what Full reveals, so it is a Text loss. TopK records carry their top-k and their text.
YIELDS: dict[type, tuple[type, ...]] = {
    Full: (DenseSignal, SampledSignal),
    TopK: (SparseSignal, HardSignal),
    Text: (HardSignal,),
}

#: What each loss can be computed from: the exposure levels that yield its signal.
ACCEPTS: dict[str, tuple[type, ...]] = {
    loss: tuple(level for level, signals in YIELDS.items() if signal in signals)
    for loss, signal in SIGNAL_OF.items()
}

#: Losses defined at temperature 1 only, and why: the distillation temperature must be 1.
RAW_ONLY: dict[str, str] = {
    "sparse-kl": "the tail bucket's shape is unknown, so it cannot be re-tempered",
    "sampled-kl": "the importance weights are for the raw distribution",
    "ce": "hard labels have no temperature",
}

LOSSES = {
    "forward-kl": forward_kl,
    "reverse-kl": reverse_kl,
    "jsd": generalized_jsd,
    "sampled-kl": sampled_kl,
    "sparse-kl": sparse_kl,
    "sparse-kl-renorm": sparse_kl_renormalized,
    "ce": hard_ce,
}
