"""Output defences: make a teacher's outputs worse training data without making them worse answers.

The exposure defences (a top-k cap, logprob rounding and noise) are gateway tier options
(``distillscope.gateway.tiers.Tier``: ``exposure``, ``round_logprobs``, ``logprob_noise``) and,
for a teacher used without a gateway, ``DefendedTeacher`` below. This module also holds the
sampling-time defence that needs a model of the distiller:

**Antidistillation sampling** (Savani et al. 2025, "Antidistillation Sampling", arXiv:2504.13146).
A *proxy student* stands in for whoever distils the teacher. Let ``L(theta)`` be the proxy's loss on
a held-out set of the teacher's answers (how well the proxy imitates the teacher) and
``g = grad L / |grad L|``. If the proxy took one gradient step on a token ``x`` (raising
``log p_theta(x | context)``), ``L`` would change by about ``eta * <grad L, grad log p_theta(x)>``,
which is the directional derivative of ``log p_theta(x)`` along ``g``. Tokens for which it is
negative teach the proxy to imitate the teacher; tokens for which it is positive do the opposite.
The sampler draws from ``softmax(teacher_logits + lam * delta(x))`` where

    delta(x) = [log p_{theta + eps g}(x | ctx) - log p_theta(x | ctx)] / eps

is that derivative for every candidate ``x`` at once, from two forward passes of the proxy (one at
``theta``, one at the shifted copy) -- the finite-difference trick of the paper. ``lam = 0`` is the
teacher unchanged; larger ``lam`` trades the teacher's likelihood of its own answers for the
proxy's (and, one hopes, a real student's) loss. The trade is measured in
``benchmarks/defences.py`` (results in ``benchmarks/forensics.md``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from transformers import TopPLogitsWarper

from distillscope.errors import TeacherError
from distillscope.exposure import (
    Exposure,
    Signal,
    is_at_least,
    parse_exposure,
    reveal_logprobs,
    tail_mass,
)  # fmt: skip
from distillscope.teachers.base import Completion, SamplingConfig, row_seed


def downstream_gradient(
    proxy, sequences: Sequence[Sequence[int]], *, pad_id: int,
    prompt_lengths: Sequence[int] | None = None,
) -> list:  # fmt: skip
    """The unit-norm gradient of ``proxy``'s mean next-token loss on ``sequences`` (the teacher's
    answers with their prompts), one tensor per parameter.

    With ``prompt_lengths`` only the answer tokens are scored: the first ``prompt_lengths[i]``
    tokens of ``sequences[i]`` are context, not targets. That is the loss a distiller trains on
    (answers given prompts); scoring the prompts too points the gradient partly at how the proxy
    models users' questions, which no student is trained to imitate.
    """
    if prompt_lengths is not None and len(prompt_lengths) != len(sequences):
        raise ValueError("prompt_lengths needs one length per sequence")
    proxy.zero_grad(set_to_none=True)
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq))
        mask[row, : len(seq)] = 1
    device = next(proxy.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    labels = ids.masked_fill(mask == 0, -100)
    for row, length in enumerate(prompt_lengths or ()):
        labels[row, : min(length, width)] = -100
    if not (labels[:, 1:] != -100).any():
        raise ValueError("the proxy's downstream loss has no answer tokens to score")
    was_training = proxy.training
    proxy.train(False)
    with torch.enable_grad():
        loss = proxy(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    grads = [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for p in proxy.parameters()
    ]
    proxy.zero_grad(set_to_none=True)
    proxy.train(was_training)
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the proxy's downstream loss has no usable gradient")
    return [g / norm for g in grads]


class AntidistillationProcessor:
    """A logits processor (``(input_ids, scores) -> scores``) adding ``lam * delta(x)`` to the
    teacher's logits; see the module docstring. ``proxy`` must share the teacher's token ids.

    ``top_p < 1`` keeps the draw inside the teacher's own nucleus: tokens outside the smallest set
    holding ``top_p`` of the *unpenalised* probability are removed, so the penalty reorders
    tokens the teacher finds plausible and never reaches into its tail. ``lam = 0`` with
    ``top_p < 1`` is plain nucleus sampling, the matching baseline.

    ``input_ids`` arrive left-padded with ``pad_id`` in batched generation; the proxy is given the
    matching attention mask and positions so padding does not change its prediction. While a
    generation runs, each call extends the previous one's rows by a token, so the proxy and its
    shifted copy keep key/value caches and read only the new token: the penalty costs two
    one-token forward passes of the proxy per step, not two passes over the whole sequence.
    """

    def __init__(
        self,
        proxy,
        gradient: Sequence[torch.Tensor],
        *,
        lam: float,
        pad_id: int,
        eps: float = 1e-3,
        top_p: float = 1.0,
    ):
        if eps <= 0:
            raise ValueError("eps must be positive")
        self.lam = float(lam)
        self.top_p = _checked_top_p(top_p)
        self.eps = float(eps)
        self.pad_id = pad_id
        self.base = proxy.eval()
        self.shifted = copy.deepcopy(proxy).eval()
        with torch.no_grad():
            for param, direction in zip(self.shifted.parameters(), gradient):
                param.add_(direction.to(param.device, param.dtype), alpha=self.eps)
        self._seen: torch.Tensor | None = None
        self._caches: list | None = None

    def scaled(self, lam: float, *, top_p: float | None = None) -> AntidistillationProcessor:
        """The same penalty at strength ``lam`` (and nucleus ``top_p``, if given), sharing this
        one's proxy weights (not its cache: the two may serve different generations)."""
        other = copy.copy(self)
        other.lam = float(lam)
        other.top_p = self.top_p if top_p is None else _checked_top_p(top_p)
        other._seen, other._caches = None, None
        return other

    @torch.no_grad()
    def delta(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """``delta(x)`` for every vocabulary entry, at the last position of each row."""
        from transformers import DynamicCache

        device = next(self.base.parameters()).device
        ids = input_ids.to(device)
        # left padding: everything before a row's first real token is padding
        mask = (ids != self.pad_id).long().cumsum(-1).clamp(max=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        seen = self._seen
        extends = (
            seen is not None
            and seen.shape[0] == ids.shape[0]
            and seen.shape[1] == ids.shape[1] - 1
            and torch.equal(seen, ids[:, :-1])
        )
        if not extends:
            self._caches = [DynamicCache(), DynamicCache()]
        start = ids.shape[1] - 1 if extends else 0
        out = []
        for model, cache in zip((self.base, self.shifted), self._caches):
            logits = model(
                input_ids=ids[:, start:],
                attention_mask=mask,
                position_ids=positions[:, start:],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
            out.append(torch.log_softmax(logits.float(), dim=-1))
        self._seen = ids
        return (out[1] - out[0]) / self.eps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.lam == 0 and self.top_p == 1:
            return scores
        adjusted = scores.clone()
        if self.lam != 0:
            delta = self.delta(input_ids).to(scores.device)
            vocab = min(delta.shape[-1], scores.shape[-1])
            adjusted[:, :vocab] += self.lam * delta[:, :vocab].to(scores.dtype)
        if self.top_p < 1:
            # the nucleus of the unpenalised scores: transformers' own top-p filter marks it
            outside = torch.isneginf(TopPLogitsWarper(self.top_p)(input_ids, scores.float()))
            adjusted = adjusted.masked_fill(outside, float("-inf"))
        return adjusted


def _checked_top_p(top_p: float) -> float:
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return float(top_p)


def build_antidistillation(
    teacher, *, lam: float, proxy: str = "layers:2", prompts: int = 16, max_new_tokens: int = 48,
    seed: int = 0, prompt_pool: Sequence[str] | None = None, top_p: float = 1.0,
) -> AntidistillationProcessor:  # fmt: skip
    """Antidistillation for a local ``teacher`` (a ``TransformersTeacher``), ready to pass as a
    processor.

    The proxy student is ``proxy``: ``layers:N`` (the teacher's embeddings and N of its layers:
    a pretrained model of the same family, which is what the method needs -- the penalty only
    transfers to real students when the proxy learns like them) or any other student spec. Its
    downstream loss is its next-token loss on the teacher's own clean answers to ``prompts``
    prompts drawn with ``seed`` from ``prompt_pool`` (default: the built-in ShareGPT pool), scored
    on the answer tokens only. ``top_p`` is passed to the processor.
    """
    from distillscope.distill.students import build_student
    from distillscope.forensics.harness import teacher_outputs
    from distillscope.prompts import load_prompts, select_prompts

    if prompts < 1:
        raise ValueError("the proxy's downstream loss needs at least one prompt")
    tokenizer = teacher.tokenizer
    model = build_student(proxy, tokenizer, seed=seed, teacher_model=teacher.model)
    model.to(teacher.device)
    if prompt_pool is None:
        prompt_pool = [p.text for p in select_prompts(load_prompts("sharegpt"), prompts, seed=seed)]
    answers = teacher_outputs(
        teacher, list(prompt_pool)[:prompts], max_new_tokens=max_new_tokens, seed=seed
    ).examples
    sequences = [list(e.prompt_ids) + list(e.completion_ids) for e in answers]
    gradient = downstream_gradient(
        model, sequences, pad_id=tokenizer.pad_token_id,
        prompt_lengths=[len(e.prompt_ids) for e in answers],
    )  # fmt: skip
    return AntidistillationProcessor(
        model, gradient, lam=lam, pad_id=tokenizer.pad_token_id, top_p=top_p
    )


class DefendedTeacher:
    """A teacher behind the output defences a gateway tier applies, for use without a gateway
    (a local harvest, the audit harness measuring what a defence costs a distiller).

    - ``cap``: the richest exposure revealed; a request for more is served at the cap (a tier's
      ``over_limit: clamp``).
    - ``logprob_noise``: the std of Gaussian noise added to every revealed logprob (clipped at 0),
      seeded by the run seed and the prompt, so a rerun reveals the same values.
    - ``round_logprobs``: decimals every revealed logprob is rounded to, after the noise.

    The sampled tokens are the inner teacher's own (sampling-time defences -- antidistillation, a
    watermark -- are the inner teacher's ``processors``). Alternatives are re-sorted by their
    revealed values. ``score`` is refused: a defended teacher reveals nothing but its answers.
    """

    def __init__(
        self, teacher, *, cap: Exposure | str | None = None, round_logprobs: int | None = None,
        logprob_noise: float = 0.0,
    ):  # fmt: skip
        cap = teacher.max_exposure if cap is None else parse_exposure(cap, max_k=None)
        if round_logprobs is not None and not 0 <= round_logprobs <= 8:
            raise TeacherError(f"round_logprobs must be 0..8 decimals, got {round_logprobs}")
        if not logprob_noise >= 0:
            raise TeacherError(f"logprob_noise must be >= 0, got {logprob_noise}")
        self.inner = teacher
        self.max_exposure = cap if is_at_least(teacher.max_exposure, cap) else teacher.max_exposure
        self.round_logprobs = round_logprobs
        self.logprob_noise = float(logprob_noise)
        self.tokenizer = teacher.tokenizer
        self.logprobs_kind = teacher.logprobs_kind
        policy = [f"cap={self.max_exposure}"]
        if round_logprobs is not None:
            policy.append(f"round={round_logprobs}")
        if logprob_noise:
            policy.append(f"noise={logprob_noise:g}")
        self.id = f"{teacher.id}+defended({','.join(policy)})"

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        if not is_at_least(self.max_exposure, sampling.exposure):
            sampling = replace(sampling, exposure=self.max_exposure)
        completions = self.inner.generate(prompts, sampling)
        if self.round_logprobs is None and not self.logprob_noise:
            return completions
        for completion in completions:
            rng = np.random.default_rng(row_seed(sampling.seed, completion.prompt))
            completion.signal = self._reveal(completion.signal, rng)
        return completions

    def _reveal(self, signal: Signal, rng: np.random.Generator) -> Signal:
        def veil(logprobs: np.ndarray | None) -> np.ndarray | None:
            if logprobs is None:
                return None
            return reveal_logprobs(
                logprobs, noise=self.logprob_noise, decimals=self.round_logprobs, rng=rng
            ).astype(np.float32)

        topk_ids, topk = signal.topk_ids, veil(signal.topk_logprobs)
        if topk is not None:
            order = np.argsort(-topk, axis=-1, kind="stable")
            topk_ids = np.take_along_axis(signal.topk_ids, order, axis=-1)
            topk = np.take_along_axis(topk, order, axis=-1)
        return Signal(
            signal.exposure,
            signal.token_ids,
            token_logprobs=veil(signal.token_logprobs),
            topk_ids=topk_ids,
            topk_logprobs=topk,
            tail_mass=None if topk is None else tail_mass(topk),
            full_logprobs=veil(signal.full_logprobs),
        )

    def score(self, prompt_ids, completion_ids):
        raise TeacherError(
            f"{self.id} reveals only its answers; score with the undefended teacher instead"
        )

    def close(self) -> None:
        self.inner.close()
