"""Copy: train a student from any exposure level (losses, students, the training loop)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from distillscope.distill.train import (
    DistillConfig,
    Example,
    TrainResult,
    distill,
    examples_from_records,
)

__all__ = [
    "DistillConfig",
    "DistillRun",
    "Example",
    "TrainResult",
    "distill",
    "distill_records",
    "examples_from_records",
]


@dataclass
class DistillRun:
    train: TrainResult
    student_parameters: int
    examples: int
    heldout: dict | None


def distill_records(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: DistillConfig,
    *,
    student: str = "tiny",
    teacher: str | None = None,
    tokenizer: str | None = None,
    heldout: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> DistillRun:
    """Train ``student`` on the records in ``data`` at ``config.exposure``; the command's engine.

    ``teacher`` (a local spec) scores online/full/on-policy signals, seeds ``layers:N`` students
    and, with ``heldout`` > 0, measures held-out fidelity on the last ``heldout`` records.
    """
    from distillscope.distill.students import build_student, load_tokenizer_for, parameter_count
    from distillscope.records import RecordSet
    from distillscope.teachers import load_teacher, pick_device

    config.validate()
    torch_device = pick_device(device)
    records = RecordSet(data)
    tok = load_tokenizer_for(records.provenance, tokenizer)
    examples = examples_from_records(records, config.exposure, tok)
    if heldout and heldout >= len(examples):
        from distillscope.distill.train import TrainingError

        raise TrainingError(
            f"--heldout {heldout} leaves no training data ({len(examples)} records)"
        )
    train_set, held = (examples[:-heldout], examples[-heldout:]) if heldout else (examples, [])
    local = load_teacher(teacher, device=str(torch_device)) if teacher else None
    model = build_student(
        student, tok, teacher_model=getattr(local, "model", None), seed=config.seed
    )
    result = distill(
        model,
        train_set,
        out,
        config,
        tokenizer=tok,
        teacher=local,
        device=torch_device,
        progress=progress,
    )
    report = None
    if held and local is not None:
        from distillscope.evaluate import fidelity

        report = fidelity(model, local, held, pad_id=tok.pad_token_id).as_dict()
    return DistillRun(result, parameter_count(model), len(train_set), report)
