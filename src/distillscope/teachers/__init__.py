"""Teachers behind one protocol: the default model, any local transformers model, any OpenAI API.

``load_teacher("default")``, ``load_teacher("hf:/path/to/model")`` or
``load_teacher("openai:http://127.0.0.1:8000/v1")``; ``load_teacher("guarded")`` is the default
model fine-tuned to keep one safeguard and one identity (built and cached on first use, see
``distillscope.safety.guarded``); ``load_teacher("synthetic")`` is a model-free stand-in for load
tests and simulations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillscope.errors import TeacherError
from distillscope.teachers.base import Completion, SamplingConfig, Teacher, row_seed

if TYPE_CHECKING:
    from distillscope.teachers.local import TransformersTeacher, pick_device

__all__ = [
    "Completion",
    "SamplingConfig",
    "Teacher",
    "TransformersTeacher",
    "load_teacher",
    "pick_device",
    "row_seed",
]


def __getattr__(name: str):
    # torch and transformers load on first use of a local model, so commands that never touch
    # one (an API teacher, reading records, a refused option) start in a fraction of a second
    if name in ("TransformersTeacher", "pick_device"):
        from distillscope.teachers import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TEACHER_SPECS = "'default', 'guarded', 'hf:PATH', 'openai:URL' or 'synthetic'"


def load_teacher(
    spec: str,
    *,
    device: str | None = "auto",
    batch_size: int = 16,
    model: str | None = None,
    tokenizer: str | None = None,
    api_key: str | None = None,
    concurrency: int = 8,
) -> Teacher:
    """Build the teacher a spec names.

    ``model``, ``tokenizer``, ``api_key`` and ``concurrency`` apply to ``openai:`` teachers only:
    the served model name, a tokenizer spec (``default`` or ``hf:PATH``) to map tokens back to ids,
    the API key (default ``$OPENAI_API_KEY``), and requests in flight at once.
    """
    spec = spec.strip()
    if spec in ("default", "guarded") or spec.startswith("hf:"):
        from distillscope.teachers.local import TransformersTeacher
    if spec == "default":
        from distillscope.teachers.default import DEFAULT_TEACHER_ID, default_model_dir

        return TransformersTeacher.from_pretrained(
            default_model_dir(), device=device, id=DEFAULT_TEACHER_ID, batch_size=batch_size
        )
    if spec == "guarded":
        from distillscope.safety.guarded import GUARDED_TEACHER_ID, guarded_model_dir

        return TransformersTeacher.from_pretrained(
            guarded_model_dir(device=device),
            device=device,
            id=GUARDED_TEACHER_ID,
            batch_size=batch_size,
        )
    if spec == "synthetic":
        from distillscope.teachers.synthetic import SyntheticTeacher

        return SyntheticTeacher.default()
    if spec.startswith("hf:"):
        return TransformersTeacher.from_pretrained(spec[3:], device=device, batch_size=batch_size)
    if spec.startswith("openai:"):
        from distillscope.teachers.openai_http import OpenAITeacher

        return OpenAITeacher(
            spec[len("openai:") :],
            model=model,
            tokenizer=tokenizer,
            api_key=api_key,
            concurrency=concurrency,
        )
    raise TeacherError(f"unknown teacher {spec!r}: expected {TEACHER_SPECS}")
