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
    heldout: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> DistillRun:
    """Train ``student`` on the records in ``data`` at ``config.exposure``; the command's engine.

    ``teacher`` (a local spec) scores online/full/on-policy signals, seeds ``layers:N`` students
    and, with ``heldout`` > 0, measures held-out fidelity on the last ``heldout`` records.

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
    }
    _check_inputs(Path(out), inputs)
    torch_device = pick_device(device)
    tok = load_tokenizer_for(records.provenance, tokenizer)
    examples = examples_from_records(records, config.exposure, tok)
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
    for name in ("student", "teacher", "heldout"):
        theirs, ours = held.get(name), inputs[name]
        if theirs != ours:
            asked = f"--{name} {ours}" if ours is not None else f"no --{name}"
            fix = f"--{name} {theirs}" if theirs is not None else f"no --{name}"
            raise TrainingError(
                f"{asked}: the run in {out} was trained with {name} {theirs}; use a new --out, "
                f"or {fix} to resume it"
            )
