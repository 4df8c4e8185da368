"""Fidelity between a student and its teacher on held-out completions, per token.

The teacher's own completions of held-out prompts are re-scored by both models; the metrics are
averaged over completion tokens: KL(teacher ‖ student) in nats, total variation, and top-1
agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from distillscope.distill.train import Example, collate, student_logits


@dataclass
class Fidelity:
    kl: float
    tv: float
    top1_agreement: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def fidelity(
    student, teacher, examples: Sequence[Example], *, batch_size: int = 8, pad_id: int = 0
) -> Fidelity:
    """Per-token fidelity of ``student`` to a local ``teacher`` on ``examples``' completions."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    kl_sum = tv_sum = agree = 0.0
    tokens = 0
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        batch = collate(chunk, pad_id)
        student_lp = torch.log_softmax(student_logits(student, batch, device).float(), -1).cpu()
        dense = teacher.score([e.prompt_ids for e in chunk], [e.completion_ids for e in chunk])
        for i, teacher_lp in enumerate(dense):
            t = torch.from_numpy(teacher_lp).double()
            s = student_lp[i, : len(teacher_lp)].double()
            kl_sum += (t.exp() * (t - s)).sum().item()
            tv_sum += 0.5 * (t.exp() - s.exp()).abs().sum().item()
            agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
            tokens += len(teacher_lp)
    student.train(was_training)
    return Fidelity(
        kl=kl_sum / tokens, tv=tv_sum / tokens, top1_agreement=agree / tokens, tokens=tokens
    )
