"""Measure what a watermark or a defence costs the teacher and the distiller, on one footing.

Each setting (clean, a watermark, antidistillation at some strength) is a list of logits
processors applied by the local teacher while it answers the same prompts with the same seeds.
For each setting:

- **teacher cost**: the clean teacher's mean negative log-likelihood (nats/token) of the answers it
  gave under the setting, and its perplexity -- how much less the answers look like the teacher's
  own best guesses. A setting that sharpens the distribution (a low temperature, a penalty that
  empties the tail) *lowers* this perplexity without making answers better, so the harness also
  reports the **distortion**: the mean per-token KL(sampled || clean teacher), in nats, between
  the distribution the setting actually sampled from and the teacher's own;
- **distiller's gain**: a student trained on those answers (text exposure: the answers are all a
  text-only API reveals) and its per-token KL(teacher || student) on held-out prompts answered
  cleanly, from the same student seed and the same number of steps for every setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from distillscope.distill.train import Example


@dataclass
class Outputs:
    """A teacher's answers under one setting."""

    examples: list[Example]
    texts: list[str]
    seconds: float
    #: mean per-token KL(sampled || clean teacher), nats, when measured
    distortion: float | None = None
    #: the clean teacher's mean NLL of the answers (nats/token), measured with the distortion
    teacher_nll: float | None = None
    #: the prompt each of ``texts`` answers (prompts with an empty answer are left out of both)
    prompts: list[str] = field(default_factory=list)


def teacher_outputs(
    teacher, prompts: Sequence[str], *, max_new_tokens: int, seed: int = 0, processors=(),
    temperature: float = 1.0, max_prompt_tokens: int = 128, distortion: bool = False,
    batch_size: int | None = None,
) -> Outputs:  # fmt: skip
    """``teacher`` (a TransformersTeacher) answering ``prompts`` with ``processors`` applied,
    ``batch_size`` prompts at a time (default: the teacher's own).

    ``distortion=True`` also measures ``Outputs.distortion`` (see the module docstring) and, from
    the same scoring pass, ``Outputs.teacher_nll``; the examples carry text only either way.
    """
    import time

    from distillscope.exposure import Text
    from distillscope.records import Signal
    from distillscope.teachers.base import SamplingConfig

    sampling = SamplingConfig(
        exposure="full" if distortion else "text", temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, max_prompt_tokens=max_prompt_tokens,
    )  # fmt: skip
    began = time.perf_counter()
    examples, texts, asked = [], [], []
    kl_sum, nll_sum, kl_tokens = 0.0, 0.0, 0
    step = batch_size or teacher.batch_size
    for start in range(0, len(prompts), step):
        chunk = list(prompts[start : start + step])
        encoded = [teacher.encode_prompt(p, max_prompt_tokens) for p in chunk]
        answers = teacher.generate_from_ids(encoded, sampling, keys=chunk, processors=processors)
        answers = [a for a in answers if len(a.signal)]
        if distortion and answers:
            clean = teacher.score(
                [a.prompt_ids for a in answers], [a.signal.token_ids for a in answers]
            )
            for answer, p in zip(answers, clean):
                kl_sum += _kl_rows(answer.signal.full_logprobs, p, temperature)
                nll_sum -= float(p[np.arange(len(p)), answer.signal.token_ids].sum())
                kl_tokens += len(p)
        for answer in answers:
            ids = answer.signal.token_ids
            examples.append(
                Example(np.asarray(answer.prompt_ids, np.int64), ids, Signal(Text(), ids))
            )
            texts.append(answer.text)
            asked.append(answer.prompt)
    seconds = time.perf_counter() - began
    if not kl_tokens:
        return Outputs(examples, texts, seconds, prompts=asked)
    return Outputs(examples, texts, seconds, kl_sum / kl_tokens, nll_sum / kl_tokens, asked)


def _kl_rows(sampled_logprobs: np.ndarray, clean_logprobs: np.ndarray, temperature: float) -> float:
    """Sum over positions of KL(q || p), q the distribution sampled at ``temperature``."""
    import torch

    q = torch.from_numpy(np.asarray(sampled_logprobs, np.float32)).double()
    p = torch.from_numpy(np.asarray(clean_logprobs, np.float32)).double()
    if temperature == 0:
        # greedy: q is a point mass on the argmax
        top = q.argmax(-1, keepdim=True)
        return float(-p.gather(-1, top).sum())
    q = torch.log_softmax(q / temperature, dim=-1)
    # tokens the sampler ruled out (a nucleus, a forced choice) have q = 0: they add nothing
    terms = torch.where(q > float("-inf"), q.exp() * (q - p), torch.zeros_like(q))
    return float(terms.sum())


def teacher_nll(teacher, examples: Sequence[Example], *, batch_size: int = 8) -> float:
    """The (clean) teacher's mean negative log-likelihood, nats per token, of ``examples``."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = teacher.score([e.prompt_ids for e in chunk], [e.completion_ids for e in chunk])
        for example, lp in zip(chunk, rows):
            ids = np.asarray(example.completion_ids)
            total -= float(lp[np.arange(len(ids)), ids].sum())
            count += len(ids)
    return total / max(count, 1)


def train_text_student(
    examples: Sequence[Example], tokenizer, *, student: str = "micro", steps: int = 120,
    batch_size: int = 8, lr: float = 3e-3, seed: int = 0, device: str = "cpu", teacher_model=None,
):  # fmt: skip
    """A fresh student trained on ``examples``' text (cross-entropy on the answers); ``student``
    is a size (``micro``, ``tiny``, ...) or ``layers:N`` (the teacher's first and last layers,
    pretrained: pass ``teacher_model``)."""
    import tempfile

    from distillscope.distill.students import build_student
    from distillscope.distill.train import DistillConfig, distill

    model = build_student(student, tokenizer, seed=seed, teacher_model=teacher_model)
    config = DistillConfig(
        exposure="text", steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        checkpoint_every=steps, warmup_steps=min(10, steps // 5),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        distill(model, examples, work, config, tokenizer=tokenizer, device=device,
                progress=False, save=False)  # fmt: skip
    return model.eval()


def perplexity(nll: float) -> float:
    return math.exp(nll)
