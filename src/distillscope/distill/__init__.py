"""Copy: train a student from any exposure level (losses, students, the training loop)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    student_tokenizer: str | None = None,
    heldout: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> DistillRun:
    """Train ``student`` on the records in ``data`` at ``config.exposure``; the command's engine.

    ``teacher`` (a local spec) scores online/full/on-policy signals, seeds ``layers:N`` students
    and, with ``heldout`` > 0, measures held-out fidelity on the last ``heldout`` records.
    ``student_tokenizer`` (``gpt2`` or ``hf:PATH``) gives the student another vocabulary than the
    records': their text is re-tokenised and top-k signals aligned (``distill.crosstok``), so only
    ``sparse-kl`` at topK and ``ce`` train, and the student is a built-in size or ``hf:PATH``.

    Everything is checked before anything is written to ``out``: a refused run leaves ``out`` as
    it was. A run resumed in ``out`` must name the same data, student, teacher and held-out split
    (``inputs.json``) as well as the same config.
    """
    from distillscope.distill.students import build_student, load_tokenizer_for, parameter_count
    from distillscope.distill.train import TrainingError, check_downgrade, check_resume
    from distillscope.records import RecordSet
    from distillscope.teachers import load_teacher, pick_device

    config.validate()
    if config.needs_teacher() and teacher is None:
        raise TrainingError(
            f"--exposure {config.level()} needs a local --teacher to score in the loop"
        )
    if heldout and teacher is None:
        raise TrainingError("--heldout measures fidelity against the teacher: give --teacher")
    if student_tokenizer is not None:
        _check_cross(config, student, heldout)
    check_resume(out, config)
    records = RecordSet(data)
    check_downgrade(records.exposure, config.level())
    inputs = {
        "data": str(records.path),
        "data_fingerprint": records.fingerprint(),
        "records": len(records),
        "student": student,
        "teacher": teacher,
        "heldout": heldout,
        "student_tokenizer": student_tokenizer,
    }
    _check_inputs(Path(out), inputs)
    torch_device = pick_device(device)
    if student_tokenizer is None:
        tok = load_tokenizer_for(records.provenance, tokenizer)
        examples = examples_from_records(records, config.exposure, tok)
    else:
        from distillscope.distill.crosstok import cross_examples
        from distillscope.distill.students import load_student_tokenizer

        reader = (
            load_tokenizer_for(records.provenance, tokenizer)
            if records.provenance.token_ids
            else None
        )
        tok = load_student_tokenizer(student_tokenizer)
        examples = cross_examples(records, config.exposure, tok, reader)
    if heldout and heldout >= len(examples):
        raise TrainingError(
            f"--heldout {heldout} leaves no training data ({len(examples)} records)"
        )
    train_set, held = (examples[:-heldout], examples[-heldout:]) if heldout else (examples, [])
    local = load_teacher(teacher, device=str(torch_device)) if teacher else None
    model = build_student(
        student, tok, teacher_model=getattr(local, "model", None), seed=config.seed
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / INPUTS).write_text(json.dumps(inputs, indent=2))
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
        from distillscope.fidelity import fidelity

        report = fidelity(model, local, held, pad_id=tok.pad_token_id).as_dict()
    return DistillRun(result, parameter_count(model), len(train_set), report)


def _check_cross(config, student: str, heldout: int) -> None:
    """Refuse what a student with another tokenizer cannot train, in one line each."""
    from distillscope.distill.train import TrainingError

    if config.loss_name() not in CROSS_LOSSES:
        raise TrainingError(
            f"--loss {config.loss_name()} with --student-tokenizer: the aligned signal trains "
            f"with {' or '.join(CROSS_LOSSES)}"
        )
    if student.strip().startswith("layers:"):
        raise TrainingError(
            "--student layers:N copies the teacher's embeddings: with --student-tokenizer use a "
            "built-in size or hf:PATH"
        )
    if heldout:
        raise TrainingError(
            "--heldout measures per-token KL in the teacher's vocabulary: with "
            "--student-tokenizer use --heldout 0"
        )


#: Losses a student with another tokenizer trains with (the aligned top-k, or its own tokens).
CROSS_LOSSES = ("sparse-kl", "ce")

#: What a distill run was trained from, beside its config.json.
INPUTS = "inputs.json"


def _check_inputs(out: Path, inputs: dict) -> None:
    """Refuse to resume a run in ``out`` from other data, another student, teacher or split."""
    from distillscope.distill.train import TrainingError

    path = out / INPUTS
    if not path.exists():
        return
    held = json.loads(path.read_text())
    if held.get("data_fingerprint") != inputs["data_fingerprint"]:
        raise TrainingError(
            f"--data {inputs['data']} is not the data the run in {out} trained on "
            f"({held.get('data')}, {held.get('records')} records): use a new --out, or that --data"
        )
    for name in ("student", "teacher", "heldout", "student_tokenizer"):
        theirs, ours = held.get(name), inputs[name]
        if theirs != ours:
            flag = "--" + name.replace("_", "-")
            asked = f"{flag} {ours}" if ours is not None else f"no {flag}"
            fix = f"{flag} {theirs}" if theirs is not None else f"no {flag}"
            raise TrainingError(
                f"{asked}: the run in {out} was trained with {name} {theirs}; use a new --out, "
                f"or {fix} to resume it"
            )
