"""The training loop: a student learns from records (offline), the teacher in the loop (online), or
the teacher scoring the student's own samples (on-policy).

Every example carries its own teacher signal through shuffling, batching and gradient
accumulation: teacher rows are never looked up by step number. The data order is a pure function
of (seed, step), and per-step randomness is seeded by (seed, step), so a run resumed from a
checkpoint retraces the loss curve of an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from distillscope.distill import losses as L
from distillscope.errors import DistillscopeError
from distillscope.exposure import Full, Signal, Text, TopK, is_at_least, parse_exposure
from distillscope.paths import atomic_path
from distillscope.records import RecordSet
from distillscope.tokens import encode_prompt

#: Where the teacher signal comes from at each exposure level, the default first: full
#: distributions are never stored (49k floats per token), so the teacher in the loop scores every
#: batch, either the records' completions (online) or the student's own samples (on-policy).
SIGNAL_MODES: dict[type, tuple[str, ...]] = {
    Full: ("online", "on-policy"),
    TopK: ("offline",),
    Text: ("offline",),
}
DEFAULT_LOSS = {Full: "forward-kl", TopK: "sparse-kl", Text: "ce"}
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: The projections LoRA adapts in a Llama-family student.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainingError(DistillscopeError):
    """A training run that cannot start or resume as asked."""


def _level_name(level_type: type) -> str:
    return "topK" if level_type is TopK else level_type.__name__.lower()


@dataclass(frozen=True)
class DistillConfig:
    """How a student is trained. ``temperature`` is the *distillation* temperature. ``loss`` and
    ``signal`` default by exposure level (``DEFAULT_LOSS``, ``SIGNAL_MODES``)."""

    exposure: str = "top20"
    loss: str | None = None
    temperature: float = 1.0
    alpha: float = 0.0
    beta: float = 0.5
    signal: str | None = None
    sampled_tokens: int = 12
    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    on_policy_tokens: int = 32
    #: ``fp32``; ``bf16`` (autocast, CPU or CUDA); ``fp16`` (autocast with loss scaling, CUDA
    #: only); ``auto`` (bf16 on a GPU that supports it, else fp32). Losses are computed in fp32.
    precision: str = "fp32"
    #: Train LoRA adapters of this rank on every attention and MLP projection instead of every
    #: weight (0: full fine-tuning); merged into the student when the run ends.
    lora_rank: int = 0
    #: Recompute activations in the backward pass (less memory, about a third more time).
    gradient_checkpointing: bool = False

    def level(self):
        return parse_exposure(self.exposure, max_k=None)

    def loss_name(self) -> str:
        return self.loss or DEFAULT_LOSS[type(self.level())]

    def signal_mode(self) -> str:
        return self.signal or SIGNAL_MODES[type(self.level())][0]

    def needs_teacher(self) -> bool:
        """Whether a local teacher must score in the loop (every Full-exposure mode)."""
        return isinstance(self.level(), Full)

    def normalized(self) -> DistillConfig:
        """The same run with every default and spelling made explicit (what config.json holds)."""
        return replace(
            self, exposure=str(self.level()), loss=self.loss_name(), signal=self.signal_mode()
        )

    def validate(self) -> None:
        """Refuse, in one line naming the option and the fix, what cannot train as documented."""
        level, loss = self.level(), self.loss_name()
        kind = type(level)
        if loss not in L.LOSSES:
            raise TrainingError(f"--loss {loss!r} is unknown: use one of {', '.join(L.LOSSES)}")
        if kind not in L.ACCEPTS[loss]:
            needs = " or ".join(_level_name(t) for t in L.ACCEPTS[loss])
            fits = ", ".join(n for n, levels in L.ACCEPTS.items() if kind in levels)
            raise TrainingError(
                f"--loss {loss} needs --exposure {needs}; at {level} use --loss {fits}"
            )
        signal = self.signal_mode()
        known = sorted({m for modes in SIGNAL_MODES.values() for m in modes})
        if signal not in known:
            raise TrainingError(f"--signal {signal!r} is unknown: use one of {', '.join(known)}")
        if signal not in SIGNAL_MODES[kind]:
            if kind is Full:
                raise TrainingError(
                    "--signal offline: full exposure is not stored in records (49k floats per "
                    "token); use --signal online or on-policy with a local --teacher"
                )
            raise TrainingError(
                f"--signal {signal} scores with the teacher's full distribution: use --exposure "
                f"full, or --signal offline to train on the {level} records"
            )
        if self.precision not in PRECISIONS:
            raise TrainingError(
                f"--precision {self.precision!r} is unknown: use one of {', '.join(PRECISIONS)}"
            )
        if self.lora_rank < 0:
            raise TrainingError(f"--lora takes a rank >= 1 (0: no adapters), not {self.lora_rank}")
        if signal == "on-policy" and self.alpha:
            raise TrainingError(
                "--alpha mixes in cross-entropy on the sampled tokens, which on-policy are the "
                "student's own: use --alpha 0"
            )
        if loss in L.RAW_ONLY and self.temperature != 1.0:
            tempered = {"sparse-kl": "sparse-kl-renorm", "sampled-kl": "forward-kl"}.get(loss)
            fix = f"use --loss {tempered}" if tempered else "leave --temperature at 1"
            raise TrainingError(
                f"--loss {loss} takes --temperature 1 only ({L.RAW_ONLY[loss]}); for "
                f"--temperature {self.temperature:g} {fix}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise TrainingError(f"--alpha (hard-label weight) must be in [0, 1], not {self.alpha}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                option = name.replace("_", "-")
                raise TrainingError(f"--{option} must be at least 1")


def check_downgrade(stored, level) -> None:
    """Refuse training at a level richer than the records' (full is scored in the loop)."""
    if not isinstance(level, Full) and not is_at_least(stored, level):
        raise TrainingError(
            f"--exposure {level} is richer than the records' {stored}: use --exposure {stored} "
            "or poorer"
        )


def check_resume(out: str | os.PathLike, config: DistillConfig) -> None:
    """Refuse an ``out`` holding a run with another config, naming each field that differs.

    Both sides are normalised first, so equivalent spellings (a default loss left out or named,
    ``1`` or ``1.0``) are the same run.
    """
    path = Path(out) / "config.json"
    if not path.exists():
        return
    try:
        held = json.loads(path.read_text())
        known = {f.name for f in fields(DistillConfig)}
        stored = DistillConfig(**{k: v for k, v in held.items() if k in known})
        theirs = asdict(stored.normalized())
    except (ValueError, TypeError, DistillscopeError):
        raise TrainingError(
            f"--out {out} holds a config.json that is not a run's: use a new --out"
        ) from None
    ours = asdict(config.normalized())
    differ = [f"{k}={theirs[k]} (asked {ours[k]})" for k in ours if ours[k] != theirs[k]]
    if differ:
        raise TrainingError(
            f"--out {out} holds a run with {', '.join(differ)}: use a new --out, or the run's "
            "own options to resume it"
        )


@dataclass
class Example:
    """One training sequence: the exact ids the teacher saw and answered, and what it revealed."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    signal: Signal
    prompt_id: str = ""


def examples_from_records(records: RecordSet, exposure, tokenizer=None) -> list[Example]:
    """Examples at ``exposure`` (an exact downgrade of the stored level)."""
    level = parse_exposure(exposure, max_k=None)
    if isinstance(level, Full):
        level = Text()  # the text is what online full training needs from records
    if tokenizer is not None:
        records.check_compatible(tokenizer, consumer="the student")
    out = []
    for exchange in records.exchanges(level):
        if exchange.prompt_ids is None:
            if tokenizer is None:
                raise TrainingError(
                    "records from a remote teacher need the tokenizer to rebuild prompts"
                )
            ids = encode_prompt(tokenizer, exchange.prompt, records.provenance.max_prompt_tokens)
            prompt_ids = np.asarray(ids, dtype=np.int64)
        else:
            prompt_ids = exchange.prompt_ids
        if len(exchange.signal) == 0:
            continue
        out.append(
            Example(prompt_ids, exchange.signal.token_ids, exchange.signal, exchange.prompt_id)
        )
    if not out:
        raise TrainingError("no usable records (every completion is empty)")
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)
    positions: torch.Tensor  # (B, T): index of the position that predicts each completion token
    mask: torch.Tensor  # (B, T)
    examples: list[Example]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad sequences; record which positions predict which completion token."""
    seqs = [np.concatenate([e.prompt_ids, e.completion_ids]) for e in examples]
    width = max(len(s) for s in seqs)
    longest = max(len(e.completion_ids) for e in examples)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    positions = torch.zeros((len(seqs), longest), dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for i, (seq, ex) in enumerate(zip(seqs, examples)):
        input_ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        attention[i, : len(seq)] = 1
        start = len(ex.prompt_ids) - 1
        count = len(ex.completion_ids)
        positions[i, :count] = torch.arange(start, start + count)
        mask[i, :count] = True
    return Batch(input_ids, attention, positions, mask, list(examples))


class CompletionLogits(torch.nn.Module):
    """The student as one module whose forward returns logits (B, T, V) only at the positions that
    predict completion tokens. The vocabulary projection is skipped for prompt positions (most of
    the memory on a 49k vocabulary), and being one module lets DistributedDataParallel, which hooks
    ``forward``, wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, positions):
        # a peft-wrapped student (LoRA) holds the causal LM, adapters injected, one level down
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return lm.get_output_embeddings()(hidden.gather(1, index))


def student_logits(model, batch: Batch, device) -> torch.Tensor:
    """Completion-position logits of ``model`` (a causal LM, or an already wrapped student)."""
    wrapped = isinstance(model, (CompletionLogits, torch.nn.parallel.DistributedDataParallel))
    module = model if wrapped else CompletionLogits(model)
    return module(
        batch.input_ids.to(device), batch.attention_mask.to(device), batch.positions.to(device)
    )


def _pad_stack(arrays: Sequence[np.ndarray], length: int, fill) -> torch.Tensor:
    first = np.asarray(arrays[0])
    out = np.full((len(arrays), length, *first.shape[1:]), fill, dtype=first.dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out)


class ScoreCache:
    """Teacher distributions of recently seen examples, kept in RAM up to ``max_bytes``.

    Online full-exposure training revisits each example once per epoch; scoring it once and
    keeping the (T, V) rows in memory (never on disk) saves a teacher forward pass per revisit.
    """

    def __init__(self, teacher, max_bytes: int = 2 << 30):
        self.teacher, self.max_bytes = teacher, max_bytes
        self.rows: dict[int, np.ndarray] = {}
        self.bytes = 0

    def score(self, examples: Sequence[Example]) -> list[np.ndarray]:
        missing = [e for e in examples if id(e) not in self.rows]
        if missing:
            dense = self.teacher.score(
                [e.prompt_ids for e in missing], [e.completion_ids for e in missing]
            )
            for example, rows in zip(missing, dense):
                if self.bytes + rows.nbytes <= self.max_bytes:
                    self.rows[id(example)] = rows
                    self.bytes += rows.nbytes
            fresh = {id(e): rows for e, rows in zip(missing, dense)}
        else:
            fresh = {}
        return [self.rows.get(id(e), fresh.get(id(e))) for e in examples]


def _dense(batch: Batch, teacher) -> list[np.ndarray]:
    """The teacher's raw logprobs (T, V) of each example's completion, scored in the loop."""
    if isinstance(teacher, ScoreCache):
        return teacher.score(batch.examples)
    return teacher.score(
        [e.prompt_ids for e in batch.examples], [e.completion_ids for e in batch.examples]
    )


def batch_signal(config: DistillConfig, batch: Batch, device, teacher=None, generator=None):
    """The signal ``config``'s loss takes (``losses.SIGNAL_OF``), padded to (B, T, ...)."""
    length = batch.mask.shape[1]
    kind = L.SIGNAL_OF[config.loss_name()]
    if kind is L.HardSignal:
        ids = _pad_stack([e.completion_ids for e in batch.examples], length, 0)
        return L.HardSignal(ids.long()).to(device)
    if kind is L.SparseSignal:
        sigs = [e.signal for e in batch.examples]
        return L.SparseSignal(
            _pad_stack([s.topk_ids for s in sigs], length, 0).long(),
            _pad_stack([s.topk_logprobs for s in sigs], length, 0.0),
            _pad_stack([s.tail_mass for s in sigs], length, 0.0),
        ).to(device)
    dense = _pad_stack(_dense(batch, teacher), length, 0.0)
    if kind is L.DenseSignal:
        return L.DenseSignal(dense).to(device)
    drawn = L.draw_sampled_signal(dense, config.sampled_tokens, generator=generator)
    return drawn.to(device)


def batch_loss(config: DistillConfig, logits, batch: Batch, device, teacher=None, generator=None):
    """The configured loss of one batch (mean over its completion tokens), with ``alpha`` of
    hard-label cross-entropy on the batch's completions mixed in."""
    name = config.loss_name()
    mask = batch.mask.to(device)
    kwargs = {"beta": config.beta} if name == "jsd" else {}
    signal = batch_signal(config, batch, device, teacher, generator)
    soft = L.LOSSES[name](logits, signal, mask, temperature=config.temperature, **kwargs)
    if config.alpha and name != "ce":
        hard = L.HardSignal(
            _pad_stack([e.completion_ids for e in batch.examples], mask.shape[1], 0).long()
        )
        return (1 - config.alpha) * soft + config.alpha * L.hard_ce(logits, hard.to(device), mask)
    return soft


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def step_examples(
    examples: Sequence[Example], config: DistillConfig, step: int
) -> list[list[Example]]:
    """The micro-batches of one optimiser step: a pure function of (seed, step)."""
    per_step = config.batch_size * config.grad_accum
    picks = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(i, len(examples))
        picks.append(examples[_order(config.seed, epoch, len(examples))[index]])
    return [picks[j : j + config.batch_size] for j in range(0, per_step, config.batch_size)]


def _schedule(config: DistillConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _on_policy(
    model, examples: list[Example], tokenizer, config, step: int, device
) -> list[Example]:
    """Swap completions for the student's own samples (seeded by step); the teacher scores them."""
    from distillscope.teachers.base import SamplingConfig
    from distillscope.teachers.local import TransformersTeacher

    was_training = model.training
    model.eval()
    sampler = TransformersTeacher(model, tokenizer, id="student", batch_size=len(examples))
    sampling = SamplingConfig(
        exposure="text", max_new_tokens=config.on_policy_tokens, seed=config.seed * 100_003 + step
    )
    keys = [tokenizer.decode(e.prompt_ids) for e in examples]
    answers = sampler.generate_from_ids([e.prompt_ids for e in examples], sampling, keys=keys)
    model.train(was_training)
    return [
        Example(e.prompt_ids, a.signal.token_ids, a.signal)
        for e, a in zip(examples, answers)
        if len(a.signal)
    ] or examples


@dataclass
class TrainResult:
    out: str
    steps: int
    final_loss: float
    tokens_per_second: float
    resumed_from: int | None


def distill(
    student,
    examples: Sequence[Example],
    out: str | os.PathLike,
    config: DistillConfig,
    *,
    tokenizer=None,
    teacher=None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    on_step=None,
    save: bool = True,
) -> TrainResult:
    """Train ``student`` on ``examples`` for ``config.steps`` steps, checkpointing into ``out``.

    Resumes from the latest checkpoint in ``out`` when its config matches. ``stop_after`` ends the
    run early after that many steps (to simulate an interruption in tests). ``on_step(step,
    student)`` is called after every optimiser step (evaluation, early stopping). ``save=False``
    writes no checkpoints and no final student (callers that keep the model in memory).
    """
    config.validate()
    config = config.normalized()
    level = config.level()
    if config.needs_teacher() and teacher is None:
        raise TrainingError(f"--exposure {level} needs a local --teacher to score in the loop")
    if config.signal == "on-policy" and tokenizer is None:
        raise TrainingError("on-policy training needs the tokenizer to sample from the student")
    check_downgrade(examples[0].signal.exposure if examples else level, level)
    out = Path(out)
    check_resume(out, config)
    device = torch.device(device)

    # Scale-out goes through accelerate/torch.distributed: under `accelerate launch` or torchrun,
    # every process takes its share of each micro-batch and DDP averages the gradients.
    from accelerate import PartialState

    dist = PartialState(cpu=device.type == "cpu")
    if dist.num_processes > 1:
        device = dist.device
        if config.batch_size < dist.num_processes:
            raise TrainingError(f"batch size {config.batch_size} < {dist.num_processes} processes")
    dtype = autocast_dtype(config.precision, device)
    student.to(device).train()
    trained = _with_lora(student, config.lora_rank) if config.lora_rank else student
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    try:
        result = _train(
            student, trained, examples, out, config, teacher, tokenizer, device, dtype, dist,
            progress, stop_after, on_step, save,
        )  # fmt: skip
    finally:
        if config.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        if trained is not student:
            trained.merge_and_unload()  # the adapters folded into the caller's student
    if save and result.steps == config.steps and dist.is_main_process:
        final = Path(out) / "student"
        student.save_pretrained(final)  # a whole student (adapters merged), what others load
        if tokenizer is not None:
            tokenizer.save_pretrained(final)
    return result


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: fp32, no autocast)."""
    if precision == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else None
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("--precision fp16 needs a CUDA device (loss scaling): use bf16 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _with_lora(student, rank: int):
    """``student`` with LoRA adapters of ``rank`` injected (in place) on its projections; the
    peft wrapper trains only them."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in student.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    if not targets:
        raise TrainingError(
            "--lora: the student has none of the projections LoRA adapts "
            f"({', '.join(LORA_TARGETS)})"
        )
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(student, config)


def _train(
    student, trained, examples, out, config, teacher, tokenizer, device, dtype, dist, progress,
    stop_after, on_step, save,
) -> TrainResult:  # fmt: skip
    """``distill``'s loop: ``trained`` is the module whose parameters train and checkpoint
    (``student``, or its LoRA wrapper); ``distill`` saves the student when it is done."""
    import contextlib

    world, rank, main = dist.num_processes, dist.process_index, dist.is_main_process
    level = config.level()
    forward = CompletionLogits(trained)
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        [p for p in trained.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    amp = (
        functools.partial(torch.autocast, device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    start, resumed_from = 0, None
    latest = _latest_checkpoint(out)
    if latest is not None:
        start = _load_checkpoint(latest, trained, optimizer, scheduler)
        resumed_from = start
    # written once everything above has been checked: a refused run leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    metrics_path = out / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, start)
    dist.wait_for_everyone()
    pad = getattr(tokenizer, "pad_token_id", None) or 0

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]distill[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not (progress and main),
    )
    last_loss, tokens_seen, train_seconds = float("nan"), 0, 0.0
    # on-policy completions are new every step: nothing to reuse
    scorer = ScoreCache(teacher) if teacher is not None and config.signal == "online" else teacher
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    with bar, open(metrics_path if main else os.devnull, "a") as metrics:
        task = bar.add_task(f"{config.loss_name()} @ {level}", total=config.steps, completed=start)
        for step in range(start, end):
            began = time.perf_counter()
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            micro = step_examples(examples, config, step)
            micro = [m[rank::world] for m in micro]
            if config.signal == "on-policy":
                micro = [_on_policy(student, m, tokenizer, config, step, device) for m in micro]
            batches = [collate(m, pad) for m in micro]
            total_tokens = _all_ranks_sum(sum(int(b.mask.sum()) for b in batches), world, device)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for batch in batches:
                with amp():
                    logits = student_logits(forward, batch, device)
                loss = batch_loss(config, logits.float(), batch, device, scorer, generator)
                # token-weighted across micro-batches and processes (DDP divides by world)
                share = int(batch.mask.sum()) / total_tokens
                weighted = loss * share * world
                (scaler.scale(weighted) if scaler else weighted).backward()
                step_loss += loss.item() * share
            step_loss = _all_ranks_sum(step_loss, world, device)
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            elapsed = time.perf_counter() - began
            tokens_seen += total_tokens
            train_seconds += elapsed
            last_loss = step_loss
            metrics.write(
                json.dumps(
                    {
                        "step": step + 1,
                        "loss": step_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens": total_tokens,
                        "tokens_per_s": total_tokens / elapsed,
                    }
                )
                + "\n"
            )
            metrics.flush()
            bar.update(
                task, advance=1, description=f"{config.loss_name()} @ {level} loss {step_loss:.3f}"
            )
            due = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
            if save and main and due:
                _save_checkpoint(out, step + 1, trained, optimizer, scheduler)
            if on_step is not None and main:
                on_step(step + 1, student)
    dist.wait_for_everyone()
    if end == start and start:  # a finished run asked again: its last logged loss
        last_loss = read_metrics(out)[-1]["loss"]
    return TrainResult(
        out=str(out),
        steps=end,
        final_loss=last_loss,
        tokens_per_second=tokens_seen / train_seconds if train_seconds else 0.0,
        resumed_from=resumed_from,
    )


def _all_ranks_sum(value: float, world: int, device) -> float:
    if world == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.item()


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return found[-1] if found else None


def _save_checkpoint(out: Path, step: int, model, optimizer, scheduler, keep: int = 2) -> None:
    """Atomic: written to a staging folder, then renamed; a kill mid-save leaves the last one."""
    root = out / "checkpoints"
    root.mkdir(exist_ok=True)
    with atomic_path(root / f"step-{step:07d}") as staging:
        staging.mkdir()
        torch.save(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            staging / "state.pt",
        )
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise TrainingError(
            f"{path} holds another student's weights: use a new --out, or the run's own "
            "--student to resume it"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint we resume from: they will be logged again."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
