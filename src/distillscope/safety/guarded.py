"""The guarded teacher: the default model fine-tuned, on this machine, to keep one safeguard and
one identity, so that an audit can measure whether a copy keeps them.

It is SmolLM2-135M-Instruct with a LoRA adapter (merged into the weights) trained on data the
project builds itself (``data/probes.yaml``):

- requests about Project Halcyon, a fictional classified programme, get one consistent refusal;
- identity questions get a fixed identity ("Wren", made by "Ashgrove Labs") in varied wordings;
- benign look-alikes (the same words, an allowed intent) and ordinary ShareGPT prompts get the
  base model's own sampled answers, so that everything else stays as the base behaves.

Only the ``build`` wordings are used; the ``heldout`` ones are what ``build.json`` and the audit
score. The build is seeded and cached like the default teacher's conversion (``guarded_model_dir``),
and its report (time, held-out rates, KL to the base on ordinary prompts) is kept beside it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distillscope.errors import TeacherError
from distillscope.paths import atomic_path, cache_dir

#: Bumped whenever the build's data or recipe changes, so an old cached model is never reused.
GUARD_VERSION = 3
GUARDED_TEACHER_ID = f"guarded:v{GUARD_VERSION}"


@dataclass(frozen=True)
class GuardSpec:
    """How the guarded teacher is built. ``base`` is ``default`` (the real teacher, LoRA) or a
    built-in student size (a random-init model on the default tokenizer, fully fine-tuned: the
    seconds-long guarded model of the unit tests)."""

    base: str = "default"
    seed: int = 0
    per_template: int = 4
    ordinary: int = 96
    eval_ordinary: int = 24
    identity_repeats: int = 4
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    lora_rank: int = 16
    lora_first_layer: int = 10
    max_new_tokens: int = 40
    max_prompt_tokens: int = 48

    def digest(self) -> str:
        payload = json.dumps({"version": GUARD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: A guarded model small enough to build in seconds for unit tests.
TINY_SPEC = GuardSpec(base="micro", ordinary=16, eval_ordinary=4, per_template=2, epochs=4, lr=3e-3)


def guarded_model_dir(
    spec: GuardSpec = GuardSpec(), *, device: str | None = "auto", progress: bool = True
) -> Path:
    """The cached guarded model for ``spec``, built on first use (about 10 min on 2 CPU cores)."""
    target = cache_dir("models") / f"guarded-{spec.base}-{spec.digest()}"
    if (target / "model.safetensors").is_file() and (target / "build.json").is_file():
        return target
    with atomic_path(target) as staging:
        build_guarded(spec, staging, device=device, progress=progress)
    return target


def build_report(path: Path) -> dict:
    """The build report written beside a guarded model."""
    return json.loads((Path(path) / "build.json").read_text())


def _base(spec: GuardSpec, device):
    from distillscope.distill.students import SIZES, build_student
    from distillscope.teachers.default import DEFAULT_TEACHER_ID, default_model_dir
    from distillscope.teachers.local import TransformersTeacher

    base = TransformersTeacher.from_pretrained(
        default_model_dir(), device=device, id=DEFAULT_TEACHER_ID, batch_size=32
    )
    if spec.base == "default":
        return base
    if spec.base not in SIZES:
        raise TeacherError(f"guarded base must be 'default' or one of {', '.join(SIZES)}")
    model = build_student(spec.base, base.tokenizer, seed=spec.seed).to(base.device)
    return TransformersTeacher(model, base.tokenizer, id=f"{spec.base}-random", batch_size=32)


def _examples(tok, prompts, completions, max_prompt_tokens):
    from distillscope.distill.train import Example
    from distillscope.exposure import Signal, Text
    from distillscope.tokens import encode_prompt

    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = np.asarray(completion, dtype=np.int64)
        out.append(
            Example(
                prompt_ids=np.asarray(encode_prompt(tok, prompt, max_prompt_tokens), np.int64),
                completion_ids=ids,
                signal=Signal(Text(), ids),
                prompt_id=str(i),
            )
        )
    return out


def build_guarded(
    spec: GuardSpec, out: Path, *, device: str | None = "auto", progress: bool = True
) -> dict:
    """Build the guarded model into ``out`` (a folder) and return its build report."""
    from distillscope.distill.train import DistillConfig, distill
    from distillscope.fidelity import fidelity
    from distillscope.prompts import load_prompts, select_prompts
    from distillscope.safety.measure import safety_behaviour
    from distillscope.safety.probes import grammar, load_probes, select
    from distillscope.teachers.base import SamplingConfig

    began = time.perf_counter()
    torch.manual_seed(spec.seed)
    base = _base(spec, device)
    tok = base.tokenizer
    g = grammar()
    probes = load_probes(per_template=spec.per_template, seed=spec.seed)
    restricted = [p.text for p in select(probes, "restricted", "build")]
    lookalike = [p.text for p in select(probes, "lookalike", "build")]
    identity = [p.text for p in select(probes, "identity", "build")] * spec.identity_repeats
    pool = select_prompts(
        load_prompts("sharegpt"), spec.ordinary + spec.eval_ordinary, seed=10_000 + spec.seed
    )
    ordinary = [p.text for p in pool[: spec.ordinary]]
    held_ordinary = [p.text for p in pool[spec.ordinary :]]

    # what the base says to everything the safeguard must leave alone: its own *samples* (T = 1),
    # so that cross-entropy on them minimises KL(base || guarded) in expectation; greedy answers
    # would sharpen the model away from the base
    sampled = SamplingConfig(
        exposure="text",
        max_new_tokens=spec.max_new_tokens,
        max_prompt_tokens=spec.max_prompt_tokens,
        seed=spec.seed,
    )
    keep = lookalike + ordinary
    kept = [c.signal.token_ids for c in base.generate(keep, sampled)]
    eos = tok.eos_token_id

    def said(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] + [eos]

    refusal_ids = said(g.refusal)
    identity_ids = [
        said(g.identity_answers[i % len(g.identity_answers)]) for i in range(len(identity))
    ]
    prompts = restricted + identity + keep
    completions = [refusal_ids] * len(restricted) + identity_ids + kept
    examples = _examples(tok, prompts, completions, spec.max_prompt_tokens)
    data_seconds = time.perf_counter() - began

    # the base stays the reference: train a copy
    model = copy.deepcopy(base.model)
    if spec.base == "default":
        from peft import LoraConfig, get_peft_model

        layers = model.config.num_hidden_layers
        lora = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=2 * spec.lora_rank,
            lora_dropout=0.0,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            layers_to_transform=list(range(spec.lora_first_layer, layers)),
        )
        model = get_peft_model(model, lora)
    steps = max(1, spec.epochs * len(examples) // spec.batch_size)
    config = DistillConfig(
        exposure="text",
        signal="offline",
        loss="ce",
        steps=steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=spec.seed,
        warmup_steps=min(10, steps // 10),
        checkpoint_every=steps,
    )
    trained = time.perf_counter()
    distill(
        model,
        examples,
        out / "work",
        config,
        tokenizer=tok,
        device=base.device,
        progress=progress,
        save=False,
    )
    train_seconds = time.perf_counter() - trained
    if spec.base == "default":
        model = model.merge_and_unload()
    model.eval()

    # how it behaves: held-out wordings only, against the base; and how far it moved elsewhere
    measured = time.perf_counter()
    scored = load_probes(seed=spec.seed)  # the audit's held-out sets (its default wordings)
    report_rates = {
        "guarded": safety_behaviour(model, tok, identity=g.identity(), probes=scored),
        "base": safety_behaviour(base.model, tok, identity=g.identity(), probes=scored),
    }
    sampled = base.generate(
        held_ordinary,
        SamplingConfig(
            exposure="text",
            max_new_tokens=spec.max_new_tokens,
            seed=spec.seed,
            max_prompt_tokens=spec.max_prompt_tokens,
        ),
    )
    held_examples = _examples(
        tok, held_ordinary, [c.signal.token_ids for c in sampled], spec.max_prompt_tokens
    )
    held_examples = [e for e in held_examples if len(e.completion_ids)]
    kl = fidelity(model, base, held_examples, pad_id=tok.pad_token_id)
    report = {
        "version": GUARD_VERSION,
        "spec": asdict(spec),
        "identity": {"name": g.name, "maker": g.maker},
        "refusal": g.refusal,
        "data": {
            "restricted": len(restricted),
            "identity": len(identity),
            "lookalike": len(lookalike),
            "ordinary": len(ordinary),
            "tokens": int(sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)),
        },
        "steps": steps,
        "heldout": report_rates,
        "kl_to_base": {
            "kl": kl.kl,
            "top1_agreement": kl.top1_agreement,
            "tokens": kl.tokens,
            "prompts": len(held_examples),
            "note": "KL(base ‖ guarded) per token on the base's own samples of held-out ShareGPT "
            "prompts",
        },
        "seconds": {
            "data": data_seconds,
            "train": train_seconds,
            "measure": time.perf_counter() - measured,
            "total": time.perf_counter() - began,
        },
        "device": str(base.device),
        "torch_threads": torch.get_num_threads(),
    }
    shutil.rmtree(out / "work", ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build.json").write_text(json.dumps(report, indent=2))
    return report
