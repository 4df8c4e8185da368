"""KD training throughput and loss memory: distillscope against TRL's GKD, in one process.

    .venv/bin/python benchmarks/kd_throughput.py

(defaults: --n 32 --max-new-tokens 32 --max-prompt-tokens 64 --batch-size 8 --warmup 2 --steps 5
--threads 1 --memory-t 32,128; about 6-7 minutes on 2 shared CPU cores. TRL comes from
``.venv/bin/pip install trl``, which adds ``datasets`` and leaves torch alone; without it the TRL
rows are skipped.)

Everything trains the same student (the built-in ``tiny`` Llama sharing the teacher's tokenizer,
``build_student("tiny", tokenizer, seed=0)``, built afresh for every method so all start from the
same weights) against the same teacher (``load_teacher("default")``, SmolLM2-135M-Instruct,
float32, vocabulary 49,152), on the same batches: one top20 harvest of ShareGPT prompts, cut into
optimiser steps by distillscope's ``step_examples`` (seed 0), so step s of every method sees the
same 8 sequences. AdamW, the same lr, weight decay 0, gradient clipping at 1.0 everywhere.

Throughput: completion tokens per second of one optimiser step (collation, teacher forward where
there is one, student forward, loss, backward, clipping, AdamW), median over the timed steps after
the warm-up steps; ``best`` is the fastest timed step, a figure less exposed to other jobs.

* ``ours_offline_sparse_top20``: distillscope's step as ``distill`` takes it (``collate``,
  ``student_logits``, ``batch_loss`` with ``DistillConfig(exposure="top20", loss="sparse-kl")``)
  on the harvested top-20 records: no teacher in the loop;
* ``distill_offline_sparse_top20``: ``distill()`` itself, one step per call, timed by its own
  clock (``metrics.jsonl``): checks that the hand-written step above is what ``distill`` does;
* ``ours_online_forward_kl`` / ``ours_online_jsd``: ``DistillConfig(exposure="full",
  signal="online", loss="forward-kl" | "jsd", beta=0.5)`` with the raw teacher passed to
  ``batch_loss`` (not the ``ScoreCache`` that ``distill`` wraps it in), so every step pays a
  teacher forward, like TRL;
* ``trl_gkd_trainer_jsd``: ``trl.experimental.gkd.GKDTrainer`` itself (TRL >= 1.x keeps it under
  ``trl.experimental``): lmbda=0, seq_kd=False, beta=0.5 (off-policy), ``teacher_model`` = the same
  teacher model object, a sequential sampler and a collator that build the same padded rows
  (labels -100 on prompt and padding, as TRL's ChatML collator), ``max_steps`` = warm-up + timed
  steps. Its step time runs from the end of the previous round to its ``on_step_end`` callback;
* ``trl_loss_loop_jsd`` / ``trl_loss_loop_forward_kl``: the body of ``GKDTrainer.compute_loss``
  in a plain loop: student and teacher logits over the full padded sequence, causal shift, TRL's
  own ``GKDTrainer.generalized_jsd_loss`` masked by ``labels != -100`` (beta 0.5; beta 0 is TRL's
  forward KL). The JSD row checks the loop against the Trainer; the forward-KL row is the
  like-for-like partner of ``ours_online_forward_kl``.

* ``trl_distillation_loss_jsd``: the body of TRL's stable ``DistillationTrainer._compute_loss``
  (``trl.trainer.distillation_trainer``) in a plain loop: completion-only hidden states of both
  backbones and its chunked generalised JSD (beta 0.5). The Trainer itself only trains on
  completions it samples from the student, so fixed batches can reach its loss but not its loop.

Methods run round-robin: GKDTrainer drives, and its ``on_step_end`` callback runs step s of every
other method before the Trainer goes on, so noise from other jobs on the machine spreads over all
of them. ``loss_check`` compares the step-0 losses: same batch and weights, so distillscope's JSD
x beta(1-beta) must equal TRL's (TRL does not normalise), and forward KL TRL's beta=0.

Memory: one fresh subprocess per row. The figure is the growth of the kernel's resident-memory
high-water mark (``VmHWM`` in ``/proc/self/status``) over the resident set at the moment the
inputs exist, the mark having been reset there through ``/proc/self/clear_refs`` (value 5): what
the loss's forward + backward (or the student step's) adds on top of its inputs, gradients
included. ``ru_maxrss`` is reported beside it but is not usable here: a child started by
vfork/exec inherits its parent's peak in ``ru_maxrss`` (Linux copies the old mm's high-water mark
into ``signal->maxrss`` at exec), and the parent has already peaked at several GB (teacher, seven
students, TRL's loss), so the child's own peak never shows (it reads 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

V_DEFAULT = 49_152


# --------------------------------------------------------------------------------------------
# memory probes (run in a fresh subprocess each)
# --------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rand_logprobs(shape, scale: float, seed: int) -> torch.Tensor:
    """Random log-probabilities built row by row, so no full-size temporary raises the peak."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape)
    for i in range(shape[0]):
        out[i] = torch.log_softmax(torch.randn(shape[1:], generator=g) * scale, dim=-1)
    return out


def _rand_logits(shape, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape)
    for i in range(shape[0]):
        out[i] = torch.randn(shape[1:], generator=g) * scale
    return out


def _measure(run, warmup: bool = True) -> dict:
    """Peak resident memory that ``run()`` adds (after one warm-up call if ``warmup``)."""
    if warmup:
        run()
    gc.collect()
    base_rss = _status_kib("VmRSS")
    reset = _reset_peak()
    base_hwm = _status_kib("VmHWM")
    base_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    peak_hwm = _status_kib("VmHWM")
    peak_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_added_mb": round((peak_hwm - base_rss) / 1024, 1),
        "ru_maxrss_added_mb": round((peak_ru - base_ru) / 1024, 1),
        "baseline_rss_mb": round(base_rss / 1024, 1),
        "hwm_reset": reset and base_hwm <= base_rss + 1024,
    }


def _probe_loss(spec: dict) -> dict:
    """Forward + backward of one loss on given (B, T, V) student logits."""
    from distillscope.distill import losses as L

    b, t, v, k = spec["B"], spec["T"], spec["V"], spec["k"]
    name = spec["loss"]
    student = _rand_logits((b, t, v), 2.0, 1).requires_grad_()
    mask = torch.ones(b, t, dtype=torch.bool)
    inputs = {}
    if name == "sparse_kl":
        # the offline signal: top-k ids/logprobs and tail mass; no dense teacher tensor exists
        ids = torch.empty(b, t, k, dtype=torch.long)
        lps = torch.empty(b, t, k)
        for i in range(b):
            row = _rand_logprobs((1, t, v), 3.0, 2 + i)[0]
            lps[i], ids[i] = torch.topk(row, k, dim=-1)
            del row
        tail = (1 - lps.exp().sum(-1)).clamp_min(0)
        signal = L.SparseSignal(ids, lps, tail)

        def loss_fn():
            return L.sparse_kl(student, signal, mask)

        inputs["teacher_signal_mb"] = round((ids.nbytes + lps.nbytes + tail.nbytes) / 2**20, 2)
    elif name in ("forward_kl", "generalized_jsd"):
        signal = L.DenseSignal(_rand_logprobs((b, t, v), 3.0, 2))
        fn = L.forward_kl if name == "forward_kl" else L.generalized_jsd
        kwargs = {} if name == "forward_kl" else {"beta": 0.5}

        def loss_fn():
            return fn(student, signal, mask, **kwargs)

        inputs["teacher_signal_mb"] = round(signal.logprobs.nbytes / 2**20, 1)
    elif name in ("trl_generalized_jsd", "trl_forward_kl"):
        from trl.experimental.gkd import GKDTrainer

        teacher_logits = _rand_logits((b, t, v), 3.0, 2)
        labels = torch.zeros(b, t, dtype=torch.long)
        beta = 0.5 if name == "trl_generalized_jsd" else 0.0

        def loss_fn():
            return GKDTrainer.generalized_jsd_loss(student, teacher_logits, labels, beta=beta)

        inputs["teacher_signal_mb"] = round(teacher_logits.nbytes / 2**20, 1)
    else:
        raise ValueError(name)

    def run():
        student.grad = None
        loss_fn().backward()

    out = _measure(run)
    logits_mb = student.nbytes / 2**20
    out.update(inputs)
    out["student_logits_mb"] = round(logits_mb, 1)
    out["peak_added_in_logits"] = round(out["peak_added_mb"] / logits_mb, 2)
    return out


def _probe_step(spec: dict) -> dict:
    """Student forward + loss + backward on a (B, P+T) batch: logits where, and which loss."""
    from transformers import AutoTokenizer

    from distillscope.distill import losses as L
    from distillscope.distill.students import build_student
    from distillscope.distill.train import Batch, student_logits
    from distillscope.teachers.default import default_model_dir

    b, p, t = spec["B"], spec["P"], spec["T"]
    mode = spec["mode"]
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    model = build_student("tiny", tokenizer, seed=0).train()
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, v, (b, p + t), generator=g)
    attention = torch.ones_like(input_ids)
    positions = torch.arange(p - 1, p + t - 1).expand(b, -1).contiguous()
    mask = torch.ones(b, t, dtype=torch.bool)
    batch = Batch(input_ids, attention, positions, mask, [])
    if mode == "trl_full_seq_trl_jsd":
        from trl.experimental.gkd import GKDTrainer

        teacher = _rand_logits((b, p + t, v), 3.0, 2)  # TRL's teacher logits: full sequence
        labels = input_ids.clone()
        labels[:, :p] = -100

        def step():
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            return GKDTrainer.generalized_jsd_loss(
                logits[:, :-1], teacher[:, :-1], labels[:, 1:], beta=0.5
            )

        teacher_mb = teacher.nbytes / 2**20
    else:
        signal = L.DenseSignal(_rand_logprobs((b, t, v), 3.0, 2))  # ours: completion rows only
        teacher_mb = signal.logprobs.nbytes / 2**20

        def step():
            if mode == "ours_positions_ours_jsd":
                logits = student_logits(model, batch, "cpu")
            elif mode == "full_seq_then_gather_ours_jsd":
                full = model(input_ids=input_ids, attention_mask=attention).logits
                index = positions.unsqueeze(-1).expand(-1, -1, full.shape[-1])
                logits = full.gather(1, index)
            else:
                raise ValueError(mode)
            return L.generalized_jsd(logits, signal, mask, beta=0.5)

    def run():
        model.zero_grad(set_to_none=True)
        step().backward()

    out = _measure(run, warmup=spec.get("warmup", False))
    out["teacher_input_mb"] = round(teacher_mb, 1)
    out["completion_logits_mb"] = round(b * t * v * 4 / 2**20, 1)
    out["full_seq_logits_mb"] = round(b * (p + t) * v * 4 / 2**20, 1)
    return out


def _run_probe(spec: dict, threads: int) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    script = os.path.abspath(__file__)
    proc = subprocess.run(
        [sys.executable, script, "--threads", str(threads), "--probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_section(
    ts: list[int], batch: int, prompt_len: int, k: int, have_trl: bool, threads: int
) -> dict:
    losses = ["forward_kl", "generalized_jsd", "sparse_kl"]
    if have_trl:
        losses += ["trl_generalized_jsd", "trl_forward_kl"]
    loss_rows = {}
    for t in ts:
        for name in losses:
            spec = {"kind": "loss", "loss": name, "B": batch, "T": t, "V": V_DEFAULT, "k": k}
            loss_rows[f"{name}@T={t}"] = _run_probe(spec, threads)
    modes = ["ours_positions_ours_jsd", "full_seq_then_gather_ours_jsd"]
    if have_trl:
        modes.append("trl_full_seq_trl_jsd")
    step_rows = {}
    for t in ts:
        for mode in modes:
            spec = {"kind": "step", "mode": mode, "B": batch, "P": prompt_len, "T": t}
            step_rows[f"{mode}@T={t}"] = _run_probe(spec, threads)
    return {
        "method": "fresh subprocess per row; VmHWM after one warm-up call, with the high-water "
        "mark reset (clear_refs=5) once inputs exist; peak_added_mb = VmHWM - VmRSS at reset",
        "loss_only": {"B": batch, "V": V_DEFAULT, "k": k, "rows": loss_rows},
        "student_step": {
            "B": batch,
            "P": prompt_len,
            "what": "tiny student forward + generalized JSD (beta 0.5) + backward; "
            "'ours_positions' = distillscope student_logits (vocab projection only at completion "
            "positions); 'full_seq_then_gather' = model(...).logits over every position then "
            "gathered; 'trl_full_seq' = GKDTrainer.compute_loss's way (full logits, shifted, "
            "TRL loss over every position, masked by labels)",
            "rows": step_rows,
        },
    }


# --------------------------------------------------------------------------------------------
# throughput
# --------------------------------------------------------------------------------------------


class TimedTeacher:
    """Delegates ``score`` to a teacher and adds up the seconds it spends there."""

    def __init__(self, teacher):
        self.teacher, self.seconds = teacher, 0.0

    def score(self, prompt_ids, completion_ids):
        began = time.perf_counter()
        try:
            return self.teacher.score(prompt_ids, completion_ids)
        finally:
            self.seconds += time.perf_counter() - began


def trl_rows(examples, pad: int) -> dict:
    """The padded rows GKDTrainer.compute_loss sees: right-padded ids, labels -100 on the prompt
    and padding (what TRL's ChatML collator produces), same width as distillscope's collate."""
    seqs = [np.concatenate([e.prompt_ids, e.completion_ids]).astype(np.int64) for e in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, e) in enumerate(zip(seqs, examples)):
        input_ids[i, : len(seq)] = torch.from_numpy(seq)
        attention[i, : len(seq)] = 1
        labels[i, len(e.prompt_ids) : len(seq)] = torch.from_numpy(seq[len(e.prompt_ids) :])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class OursLoop:
    """One optimiser step as ``distill`` takes it (train.py: collate, student_logits, batch_loss,
    backward, clip, AdamW, schedule), with the raw teacher instead of ScoreCache."""

    def __init__(self, name, config, student, pad, teacher=None):
        from distillscope.distill.train import _schedule

        self.name, self.config, self.student, self.pad = name, config, student.train(), pad
        self.teacher = TimedTeacher(teacher) if teacher is not None else None
        self.opt = torch.optim.AdamW(
            student.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(config))
        config.validate()

    def step(self, examples) -> tuple[int, float]:
        from distillscope.distill.train import batch_loss, collate, student_logits

        batch = collate(examples, self.pad)
        tokens = int(batch.mask.sum())
        self.opt.zero_grad(set_to_none=True)
        logits = student_logits(self.student, batch, "cpu")
        loss = batch_loss(self.config, logits, batch, "cpu", self.teacher, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.max_grad_norm)
        self.opt.step()
        self.sched.step()
        return tokens, float(loss.detach())

    @property
    def teacher_seconds(self):
        return self.teacher.seconds if self.teacher else 0.0


class TrlLossLoop:
    """``GKDTrainer.compute_loss`` in a plain loop: full-sequence student and teacher logits,
    causal shift, TRL's ``generalized_jsd_loss`` masked by labels; then clip and AdamW."""

    def __init__(self, name, beta, student, teacher_model, pad, lr):
        from trl.experimental.gkd import GKDTrainer

        self.loss_fn = GKDTrainer.generalized_jsd_loss
        self.name, self.beta, self.student, self.pad = name, beta, student.train(), pad
        self.teacher_model = teacher_model
        self.opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
        self.teacher_seconds = 0.0

    def _loss(self, inputs) -> torch.Tensor:
        # as GKDTrainer.compute_loss: the logits go out of scope before backward
        out = self.student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        began = time.perf_counter()
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_out = self.teacher_model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        self.teacher_seconds += time.perf_counter() - began
        return self.loss_fn(
            student_logits=out.logits[:, :-1, :],
            teacher_logits=teacher_out.logits[:, :-1, :],
            labels=inputs["labels"][:, 1:],
            beta=self.beta,
        )

    def step(self, examples) -> tuple[int, float]:
        inputs = trl_rows(examples, self.pad)
        tokens = int((inputs["labels"][:, 1:] != -100).sum())
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        return tokens, float(loss.detach())


class TrlDistillationLossLoop:
    """``DistillationTrainer._compute_loss`` (TRL's stable distillation trainer) in a plain loop:
    prompts left-padded and completions right-padded as its generation step lays them out, the
    student's and the teacher's *backbones* over the whole sequence, the hidden states of the
    completion positions only, and TRL's own ``_chunked_divergence_loss`` (the lm_head projection
    and the generalised JSD tile by tile, never the full logits); then clip and AdamW.

    The Trainer itself generates its completions from the student (on-policy) in TRL 1.16: it has
    no path for fixed completions, so the same batches can only be fed to its loss."""

    def __init__(self, name, beta, student, teacher_model, pad, lr):
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        self.loss_fn = _chunked_divergence_loss
        self.name, self.beta, self.student, self.pad = name, beta, student.train(), pad
        self.teacher_model = teacher_model
        self.opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
        self.teacher_seconds = 0.0

    def rows(self, examples):
        width_p = max(len(e.prompt_ids) for e in examples)
        width_c = max(len(e.completion_ids) for e in examples)
        ids = torch.full((len(examples), width_p + width_c), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            p, c = len(e.prompt_ids), len(e.completion_ids)
            ids[i, width_p - p : width_p] = torch.as_tensor(e.prompt_ids, dtype=torch.long)
            ids[i, width_p : width_p + c] = torch.as_tensor(e.completion_ids, dtype=torch.long)
            mask[i, width_p - p : width_p + c] = 1
        return ids, mask, mask[:, width_p:], width_c

    @staticmethod
    def _hidden(model, ids, mask, keep):
        out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state[:, :-1, :][:, -keep:, :]

    def step(self, examples) -> tuple[int, float]:
        ids, mask, completion_mask, keep = self.rows(examples)
        tokens = int(completion_mask.sum())
        self.opt.zero_grad(set_to_none=True)
        hs = self._hidden(self.student, ids, mask, keep)
        began = time.perf_counter()
        self.teacher_model.eval()
        with torch.no_grad():
            ht = self._hidden(self.teacher_model, ids, mask, keep)
        self.teacher_seconds += time.perf_counter() - began
        loss, _, _ = self.loss_fn(
            hs,
            ht,
            self.student.get_output_embeddings().weight,
            self.teacher_model.get_output_embeddings().weight,
            completion_mask,
            self.beta,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        return tokens, float(loss.detach())


def summarise(times: list[float], tokens: list[int], warmup: int) -> dict:
    t, n = times[warmup:], tokens[warmup:]
    rates = [a / b for a, b in zip(n, t)]
    return {
        "timed_steps": len(t),
        "median_step_s": round(statistics.median(t), 3),
        "median_tokens_per_s": round(statistics.median(rates), 1),
        "best_tokens_per_s": round(max(rates), 1),
        "mean_tokens_per_s": round(sum(n) / sum(t), 1),
        "median_steps_per_s": round(1 / statistics.median(t), 3),
        "step_s": [round(x, 3) for x in t],
    }


class RoundRobin:
    """Steps every plain loop once per round, recording times, tokens and the first loss."""

    def __init__(self, loops):
        self.loops = loops
        self.times = {lp.name: [] for lp in loops}
        self.tokens = {lp.name: [] for lp in loops}
        self.first_loss: dict[str, float] = {}
        self.teacher_at_warmup = {lp.name: 0.0 for lp in loops}

    def round(self, s: int, examples, warmup: int) -> None:
        if s == warmup:
            self.teacher_at_warmup = {lp.name: lp.teacher_seconds for lp in self.loops}
        for lp in self.loops:
            gc.collect()
            began = time.perf_counter()
            n, loss = lp.step(examples)
            elapsed = time.perf_counter() - began
            self.times[lp.name].append(getattr(lp, "internal_seconds", None) or elapsed)
            self.tokens[lp.name].append(n)
            self.first_loss.setdefault(lp.name, loss)
            print(f"  step {s} {lp.name}: {self.times[lp.name][-1]:.2f}s", file=sys.stderr)
        gc.collect()

    def results(self, warmup: int) -> dict:
        out = {}
        for lp in self.loops:
            row = summarise(self.times[lp.name], self.tokens[lp.name], warmup)
            timed = sum(self.times[lp.name][warmup:])
            teacher_s = lp.teacher_seconds - self.teacher_at_warmup[lp.name]
            if teacher_s:
                row["teacher_share_of_step"] = round(teacher_s / timed, 3)
            row["loss_at_step_0"] = round(self.first_loss[lp.name], 5)
            out[lp.name] = row
        return out


def run_all(loops, batches, warmup, gkd=None) -> dict:
    """Round-robin over methods: step s of every method, then step s + 1.

    With ``gkd`` (the arguments of ``make_gkd_trainer``), TRL's GKDTrainer drives: its
    ``on_step_end`` callback times the Trainer's step (from the end of the previous callback, so
    data loading and the Trainer's own bookkeeping count), then runs step s of every plain loop.
    """
    rr = RoundRobin(loops)
    out: dict = {}
    trainer = None
    if gkd is not None:
        try:
            trainer, clock = make_gkd_trainer(rr, batches, warmup, **gkd)
        except Exception as exc:  # noqa: BLE001 - report, and time the plain loops alone
            out["trl_gkd_trainer_jsd"] = {"error": f"{type(exc).__name__}: {exc}"}
    if trainer is not None:
        result = trainer.train()
        pad = gkd["pad"]
        tokens = [int((trl_rows(ex, pad)["labels"][:, 1:] != -100).sum()) for ex in batches]
        row = summarise(clock.times, tokens, warmup)
        metrics = result.metrics
        own = metrics["train_runtime"] - clock.inside
        row["trainer_metrics"] = {
            k: round(v, 3) for k, v in metrics.items() if k.startswith("train_")
        }
        row["trainer_own_runtime_s"] = round(own, 2)
        row["trainer_own_steps_per_s"] = round(len(batches) / own, 4)
        row["trainer_own_tokens_per_s"] = round(sum(tokens) / own, 1)
        row["loss_at_step_0"] = clock.first_loss
        row["note"] = (
            "step time from the end of the previous round to on_step_end: data loading, teacher "
            "forward, student forward/backward, clip, AdamW, Trainer bookkeeping. trainer_metrics "
            "are TRL's own (train_runtime covers every step, warm-up and start-up included, and "
            "also the other methods run inside its callbacks); trainer_own_* take those out"
        )
        out["trl_gkd_trainer_jsd"] = row
    else:
        for s, examples in enumerate(batches):
            rr.round(s, examples, warmup)
    return rr.results(warmup) | out


def make_gkd_trainer(rr, batches, warmup, *, student, teacher_model, tokenizer, pad, lr, workdir):
    """TRL's GKDTrainer itself, off-policy, on the same batches in the same order."""
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [e for examples in batches for e in examples]
    dataset = datasets.Dataset.from_list([{"row": i} for i in range(len(rows))])

    def collator(features):
        return trl_rows([rows[f["row"]] for f in features], pad)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.first_loss = None
            self.mark = 0.0
            self.inside = 0.0  # seconds spent running the other methods inside this callback

        def on_train_begin(self, args, state, control, **kw):
            gc.collect()
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.mark)
            s = len(self.times) - 1
            print(f"  step {s} trl_gkd_trainer_jsd: {self.times[-1]:.2f}s", file=sys.stderr)
            began = time.perf_counter()
            rr.round(s, batches[s], warmup)
            self.mark = time.perf_counter()
            self.inside += self.mark - began

    class LossAtFirstStep(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if clock.first_loss is None:
                value = loss[0] if isinstance(loss, tuple) else loss
                clock.first_loss = round(float(value.detach()), 5)
            return loss

    config = GKDConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=len(batches[0]),
        gradient_accumulation_steps=1,
        max_steps=len(batches),
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lmbda=0.0,
        beta=0.5,
        seq_kd=False,
        temperature=1.0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_length=None,
    )
    clock = Clock()
    trainer = LossAtFirstStep(
        model=student,
        teacher_model=teacher_model,
        args=config,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    return trainer, clock


class DistillLoop:
    """``distill()`` itself, one step per call (``stop_after=1``, resuming from the checkpoint it
    writes after every step), timed by its own clock: ``tokens_per_s`` in ``metrics.jsonl`` covers
    step_examples, collate, forward, loss, backward, clip and AdamW, not the checkpoint save."""

    teacher_seconds = 0.0

    def __init__(self, name, config, student, examples, tokenizer, workdir):
        self.name, self.config, self.student = name, config, student
        self.examples, self.tokenizer, self.workdir = examples, tokenizer, workdir
        self.internal_seconds: float | None = None

    def step(self, examples) -> tuple[int, float]:
        from distillscope.distill.train import distill, read_metrics

        distill(
            self.student,
            self.examples,
            self.workdir,
            self.config,
            tokenizer=self.tokenizer,
            progress=False,
            stop_after=1,
        )
        last = read_metrics(self.workdir)[-1]
        self.internal_seconds = last["tokens"] / last["tokens_per_s"]
        return last["tokens"], last["loss"]


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="ShareGPT prompts harvested")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 by default: on 2 cores shared with other jobs, 2 OpenMP threads "
        "stall at every barrier whenever one core is taken, which made steps 10-20x slower "
        "and erratic)",
    )
    parser.add_argument("--memory-t", default="32,128", help="T values of the memory table")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-gkd-trainer", action="store_true")
    parser.add_argument("--json-out", help="also write the JSON result here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.probe:
        spec = json.loads(args.probe)
        result = _probe_loss(spec) if spec["kind"] == "loss" else _probe_step(spec)
        print(json.dumps(result))
        return

    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    began_all = time.perf_counter()
    try:
        import trl  # noqa: F401
        from trl.experimental.gkd import GKDTrainer  # noqa: F401

        have_trl, trl_version = True, trl.__version__
    except ImportError as exc:
        have_trl, trl_version = False, f"not importable: {exc}"

    result: dict = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_cores_visible": os.cpu_count(),
            "torch_threads": args.threads,
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "trl": trl_version,
        },
        "settings": vars(args) | {"probe": None},
    }
    import transformers

    result["machine"]["transformers"] = transformers.__version__

    with tempfile.TemporaryDirectory(prefix="kd-throughput-") as tmp:
        tmp = Path(tmp)
        prompt_len = 64 + 24  # a typical templated prompt, replaced by the harvest's median
        if not args.skip_throughput:
            from distillscope.distill.students import build_student
            from distillscope.distill.train import (
                DistillConfig,
                examples_from_records,
                step_examples,
            )
            from distillscope.harvest import harvest
            from distillscope.prompts import load_prompts, select_prompts
            from distillscope.records import RecordSet
            from distillscope.teachers import SamplingConfig, load_teacher

            teacher = load_teacher("default", device="cpu", batch_size=args.batch_size)
            tokenizer = teacher.tokenizer
            pad = getattr(tokenizer, "pad_token_id", None) or 0  # as distill() picks it
            prompts = select_prompts(load_prompts("sharegpt"), args.n, seed=0)
            sampling = SamplingConfig(
                exposure="top20",
                max_new_tokens=args.max_new_tokens,
                max_prompt_tokens=args.max_prompt_tokens,
                seed=0,
            )
            began = time.perf_counter()
            harvest(teacher, prompts, tmp / "top20", sampling=sampling, cache=False, progress=False)
            harvest_s = time.perf_counter() - began
            records = RecordSet(tmp / "top20")
            examples = examples_from_records(records, "top20", tokenizer)
            base = DistillConfig(
                exposure="top20", loss="sparse-kl", batch_size=args.batch_size, lr=args.lr
            )
            total = args.warmup + args.steps
            batches = [step_examples(examples, base, s)[0] for s in range(total)]
            prompt_lens = [len(e.prompt_ids) for e in examples]
            prompt_len = int(statistics.median(prompt_lens))
            widths = [max(len(e.prompt_ids) + len(e.completion_ids) for e in b) for b in batches]
            completion = [max(len(e.completion_ids) for e in b) for b in batches]
            result["data"] = {
                "harvest_seconds": round(harvest_s, 1),
                "examples": len(examples),
                "completion_tokens": int(sum(len(e.completion_ids) for e in examples)),
                "median_prompt_tokens": prompt_len,
                "steps": total,
                "completion_tokens_per_step": [
                    int(sum(len(e.completion_ids) for e in b)) for b in batches
                ],
                "padded_width_per_step_S": widths,
                "padded_completion_per_step_T": completion,
                "vocab": len(tokenizer),
            }

            def student():
                return build_student("tiny", tokenizer, seed=0)

            loops = [
                OursLoop("ours_offline_sparse_top20", base, student(), pad),
                OursLoop(
                    "ours_online_forward_kl",
                    DistillConfig(
                        exposure="full",
                        signal="online",
                        loss="forward-kl",
                        batch_size=args.batch_size,
                        lr=args.lr,
                    ),
                    student(),
                    pad,
                    teacher,
                ),
                OursLoop(
                    "ours_online_jsd",
                    DistillConfig(
                        exposure="full",
                        signal="online",
                        loss="jsd",
                        beta=0.5,
                        batch_size=args.batch_size,
                        lr=args.lr,
                    ),
                    student(),
                    pad,
                    teacher,
                ),
            ]
            if have_trl:
                loops += [
                    TrlLossLoop("trl_loss_loop_jsd", 0.5, student(), teacher.model, pad, args.lr),
                    TrlLossLoop(
                        "trl_loss_loop_forward_kl", 0.0, student(), teacher.model, pad, args.lr
                    ),
                ]
                try:
                    from trl.trainer.distillation_trainer import (  # noqa: F401
                        _chunked_divergence_loss,
                    )
                except ImportError:  # a TRL without the stable DistillationTrainer
                    pass
                else:
                    loops.append(
                        TrlDistillationLossLoop(
                            "trl_distillation_loss_jsd", 0.5, student(), teacher.model, pad,
                            args.lr,
                        )  # fmt: skip
                    )
            loops.insert(
                1,
                DistillLoop(
                    "distill_offline_sparse_top20",
                    DistillConfig(
                        exposure="top20",
                        loss="sparse-kl",
                        steps=total,
                        batch_size=args.batch_size,
                        lr=args.lr,
                        checkpoint_every=1,
                        seed=0,
                    ),
                    student(),
                    examples,
                    tokenizer,
                    tmp / "distill",
                ),
            )
            gkd = None
            if have_trl and not args.skip_gkd_trainer:
                gkd = {
                    "student": student(),
                    "teacher_model": teacher.model,
                    "tokenizer": tokenizer,
                    "pad": pad,
                    "lr": args.lr,
                    "workdir": tmp / "gkd",
                }
            print("timing (round-robin over methods)", file=sys.stderr)
            tp = run_all(loops, batches, args.warmup, gkd)
            loops.clear()
            gkd = None
            gc.collect()
            result["throughput"] = tp
            result["ratios_tokens_per_s"] = ratios(tp)
            result["loss_check"] = loss_check(tp)
            del teacher
            gc.collect()

        if not args.skip_memory:
            print("memory probes", file=sys.stderr)
            ts = [int(t) for t in args.memory_t.split(",")]
            result["memory"] = memory_section(
                ts, args.batch_size, prompt_len, 20, have_trl, args.threads
            )
    result["total_seconds"] = round(time.perf_counter() - began_all, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


def ratios(tp: dict) -> dict:
    """ours / TRL tokens/s (> 1: distillscope is faster), on the median step and the best step."""
    pairs = {
        "ours_online_jsd / trl_gkd_trainer_jsd": ("ours_online_jsd", "trl_gkd_trainer_jsd"),
        "ours_online_forward_kl / trl_gkd_trainer_jsd": (
            "ours_online_forward_kl",
            "trl_gkd_trainer_jsd",
        ),
        "ours_offline_sparse_top20 / trl_gkd_trainer_jsd": (
            "ours_offline_sparse_top20",
            "trl_gkd_trainer_jsd",
        ),
        "ours_online_jsd / trl_loss_loop_jsd": ("ours_online_jsd", "trl_loss_loop_jsd"),
        "ours_online_forward_kl / trl_loss_loop_forward_kl": (
            "ours_online_forward_kl",
            "trl_loss_loop_forward_kl",
        ),
        "ours_offline_sparse_top20 / trl_loss_loop_jsd": (
            "ours_offline_sparse_top20",
            "trl_loss_loop_jsd",
        ),
        "ours_online_jsd / trl_distillation_loss_jsd": (
            "ours_online_jsd",
            "trl_distillation_loss_jsd",
        ),
        "ours_online_forward_kl / trl_distillation_loss_jsd": (
            "ours_online_forward_kl",
            "trl_distillation_loss_jsd",
        ),
        "trl_loss_loop_jsd / trl_gkd_trainer_jsd (stand-in check)": (
            "trl_loss_loop_jsd",
            "trl_gkd_trainer_jsd",
        ),
        "distill_offline_sparse_top20 / ours_offline_sparse_top20 (loop check)": (
            "distill_offline_sparse_top20",
            "ours_offline_sparse_top20",
        ),
    }
    out = {}
    for stat in ("median_tokens_per_s", "best_tokens_per_s"):
        col = {}
        for label, (a, b) in pairs.items():
            ra, rb = (tp.get(a) or {}).get(stat), (tp.get(b) or {}).get(stat)
            if ra and rb:
                col[label] = round(ra / rb, 3)
        out[stat] = col
    return out


def loss_check(tp: dict) -> dict:
    """Same batch, same init: ours JSD x beta(1-beta) should equal TRL's JSD (TRL does not
    normalise), and ours forward KL TRL's beta=0."""
    get = lambda n: (tp.get(n) or {}).get("loss_at_step_0")  # noqa: E731
    out = {}
    if get("ours_online_jsd") is not None and get("trl_loss_loop_jsd") is not None:
        out["ours_jsd_x_0.25"] = round(get("ours_online_jsd") * 0.25, 5)
        out["trl_jsd"] = get("trl_loss_loop_jsd")
    if get("ours_online_forward_kl") is not None and get("trl_loss_loop_forward_kl") is not None:
        out["ours_forward_kl"] = get("ours_online_forward_kl")
        out["trl_beta0"] = get("trl_loss_loop_forward_kl")
    if get("trl_gkd_trainer_jsd") is not None:
        out["trl_gkd_trainer_jsd"] = get("trl_gkd_trainer_jsd")
    if get("trl_distillation_loss_jsd") is not None:
        out["trl_distillation_loss_jsd"] = get("trl_distillation_loss_jsd")
    return out


if __name__ == "__main__":
    main()
