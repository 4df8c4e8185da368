"""Fidelity between a student and a teacher that tokenize differently (Measure).

Per-token KL needs one vocabulary; across two, two measures still compare students fairly:

- ``sample_loglik_across``: writing like the teacher. The student samples answers to held-out
  prompts in its own ids; the text is re-encoded with the teacher's tokenizer and the teacher
  scores it after the prompt as the teacher saw it. Mean teacher logprob per teacher token (the
  teacher's tokens, so students with different tokenizers share one unit), and per byte.
- ``text_nll_per_byte``: reading like the teacher. The student's negative log-likelihood of the
  teacher's own held-out answers (re-tokenised for it, ``distill.crosstok``), in nats per byte
  of text, a unit no tokenizer decides.

``fidelity.py`` measures same-tokenizer students; these two are what an audit of a student with
another tokenizer reports beside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distillscope.distill.train import Example, collate, student_logits
from distillscope.tokens import token_bytes_table


def sample_loglik_across(
    student,
    student_tokenizer,
    teacher,
    student_prompts: Sequence[np.ndarray],
    teacher_prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    seed: int = 0,
) -> dict:
    """The teacher's log-likelihood of the student's own samples (T = 1, seeded), re-encoded in
    the teacher's tokens: ``per_token`` (mean over teacher tokens), ``per_byte``, ``tokens``,
    ``answers`` (non-empty samples scored)."""
    from distillscope.teachers.base import SamplingConfig
    from distillscope.teachers.local import TransformersTeacher

    was_training = student.training
    sampler = TransformersTeacher(student.eval(), student_tokenizer, id="student", batch_size=16)
    sampling = SamplingConfig(exposure="text", max_new_tokens=max_new_tokens, seed=seed)
    keys = [str(i) for i in range(len(student_prompts))]
    answers = sampler.generate_from_ids(student_prompts, sampling, keys=keys)
    student.train(was_training)
    kept = []
    for prompt, answer in zip(teacher_prompts, answers):
        ids = teacher.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
        if ids:
            kept.append((prompt, np.asarray(ids, dtype=np.int64), len(answer.text.encode())))
    total, tokens, size = 0.0, 0, 0
    for start in range(0, len(kept), 8):
        chunk = kept[start : start + 8]
        rows = teacher.score([p for p, _, _ in chunk], [c for _, c, _ in chunk])
        for (_, ids, nbytes), lp in zip(chunk, rows):
            total += float(lp[np.arange(len(ids)), ids].sum())
            tokens += len(ids)
            size += nbytes
    return {
        "per_token": total / max(tokens, 1),
        "per_byte": total / max(size, 1),
        "tokens": tokens,
        "answers": len(kept),
    }


@torch.no_grad()
def text_nll_per_byte(
    student, student_tokenizer, examples: Sequence[Example], device="cpu"
) -> float:
    """The student's negative log-likelihood of ``examples``' completions (in its own ids, end of
    answer included), in nats per byte of their text (special tokens spell no bytes)."""
    special = set(student_tokenizer.added_tokens_decoder)
    pieces = [
        b"" if i in special else spelled
        for i, spelled in enumerate(token_bytes_table(student_tokenizer))
    ]
    pad_id = student_tokenizer.pad_token_id or 0
    was_training = student.training
    student.eval()
    total, size = 0.0, 0
    for start in range(0, len(examples), 8):
        chunk = list(examples[start : start + 8])
        batch = collate(chunk, pad_id)
        logprobs = torch.log_softmax(student_logits(student, batch, device).float(), dim=-1)
        for i, example in enumerate(chunk):
            ids = torch.as_tensor(example.completion_ids, dtype=torch.long)
            total -= float(logprobs[i, torch.arange(len(ids)), ids].sum())
            size += sum(len(pieces[int(t)]) for t in example.completion_ids)
    student.train(was_training)
    return total / max(size, 1)


def fidelity_across(
    student,
    student_tokenizer,
    teacher,
    heldout: Sequence[Example],
    teacher_prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    seed: int = 0,
) -> dict:
    """Both measures on held-out exchanges: ``heldout`` re-tokenised for the student
    (``distill.crosstok.cross_examples`` at text), ``teacher_prompts`` the same prompts as the
    teacher saw them. What an audit of a student with another tokenizer reports per run."""
    return {
        "teacher_loglik": sample_loglik_across(
            student,
            student_tokenizer,
            teacher,
            [e.prompt_ids for e in heldout],
            teacher_prompts,
            max_new_tokens=max_new_tokens,
            seed=seed,
        ),
        "text_nll_per_byte": text_nll_per_byte(student, student_tokenizer, heldout),
    }
