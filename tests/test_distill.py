"""The training loop: alignment, exact resume, clear refusals, and full beating text for real."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from distillscope.distill.students import build_student
from distillscope.distill.train import (
    DistillConfig,
    TrainingError,
    batch_loss,
    collate,
    distill,
    examples_from_records,
    read_metrics,
    step_examples,
    student_logits,
)
from distillscope.errors import IncompatibleDataError
from distillscope.fidelity import fidelity
from distillscope.harvest import harvest
from distillscope.prompts import load_prompts, select_prompts
from distillscope.records import RecordSet
from distillscope.teachers import SamplingConfig

TOPICS = ["rivers", "chess", "bread", "volcanoes", "jazz", "owls", "glass", "tides"]


@pytest.fixture(scope="module")
def tiny_records(tiny_teacher, tmp_path_factory):
    prompts = [
        __import__("distillscope").Prompt(
            f"p{i}", f"Tell me about {TOPICS[i % 8]}, part {i}.", "other", "t"
        )
        for i in range(16)
    ]
    out = tmp_path_factory.mktemp("tiny-harvest")
    sampling = SamplingConfig(exposure="top5", max_new_tokens=12, seed=1)
    harvest(
        tiny_teacher, prompts, out, sampling=sampling, batch_size=8, cache=False, progress=False
    )
    return RecordSet(out)


def _grads(student, examples, config):
    student.zero_grad()
    micro = step_examples(examples, config, 0)
    batches = [collate(m, 2) for m in micro]
    total = sum(int(b.mask.sum()) for b in batches)
    for batch in batches:
        loss = batch_loss(config, student_logits(student, batch, "cpu"), batch, "cpu")
        (loss * int(batch.mask.sum()) / total).backward()
    return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]).clone()


def test_gradient_accumulation_and_batching_do_not_change_the_step(tiny_records, tiny_teacher):
    examples = examples_from_records(tiny_records, "top5", tiny_teacher.tokenizer)
    student = build_student("micro", tiny_teacher.tokenizer, seed=0)
    whole = _grads(student, examples, DistillConfig(exposure="top5", batch_size=8, grad_accum=1))
    split = _grads(student, examples, DistillConfig(exposure="top5", batch_size=2, grad_accum=4))
    torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-7)


def test_each_loss_term_stays_with_its_own_sample(tiny_records, tiny_teacher):
    """A sample's loss inside a shuffled, padded batch equals its loss alone (no row mix-ups)."""
    examples = examples_from_records(tiny_records, "top5", tiny_teacher.tokenizer)
    student = build_student("micro", tiny_teacher.tokenizer, seed=0)
    config = DistillConfig(exposure="top5", batch_size=6)
    [batch_examples] = step_examples(examples, config, 3)
    batch = collate(batch_examples, 2)
    logits = student_logits(student, batch, "cpu")
    for row, example in enumerate(batch_examples):
        only = collate([example], 2)
        alone = batch_loss(config, student_logits(student, only, "cpu"), only, "cpu")
        one_row = type(batch)(
            batch.input_ids,
            batch.attention_mask,
            batch.positions,
            batch.mask & (torch.arange(len(batch_examples))[:, None] == row),
            batch.examples,
        )
        inside = batch_loss(config, logits, one_row, "cpu")
        assert inside.item() == pytest.approx(alone.item(), rel=1e-4)


def test_resume_retraces_the_uninterrupted_loss_curve(tiny_records, tiny_teacher, tmp_path):
    examples = examples_from_records(tiny_records, "top5", tiny_teacher.tokenizer)
    config = DistillConfig(
        exposure="top5", steps=12, batch_size=4, checkpoint_every=4, lr=3e-3, seed=3
    )
    tok = tiny_teacher.tokenizer
    distill(
        build_student("micro", tok, seed=0),
        examples,
        tmp_path / "a",
        config,
        tokenizer=tok,
        progress=False,
    )
    first = distill(
        build_student("micro", tok, seed=0),
        examples,
        tmp_path / "b",
        config,
        tokenizer=tok,
        progress=False,
        stop_after=6,
    )
    assert first.steps == 6 and len(read_metrics(tmp_path / "b")) == 6
    resumed = distill(
        build_student("micro", tok, seed=0),
        examples,
        tmp_path / "b",
        config,
        tokenizer=tok,
        progress=False,
    )
    assert resumed.resumed_from == 4
    a = [m["loss"] for m in read_metrics(tmp_path / "a")]
    b = [m["loss"] for m in read_metrics(tmp_path / "b")]
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=1e-6)
    assert (tmp_path / "b" / "student" / "config.json").exists()


def test_mismatched_tokenizer_is_refused_before_training(tiny_records, tiny_dir):
    other = AutoTokenizer.from_pretrained(tiny_dir)
    other.add_tokens(["<|not-in-the-records|>"])
    with pytest.raises(IncompatibleDataError, match="misalign"):
        examples_from_records(tiny_records, "top5", other)


@pytest.mark.parametrize(
    "config, message",
    [
        (DistillConfig(exposure="text", loss="sparse-kl"), "needs --exposure topK"),
        (DistillConfig(exposure="full", signal="offline"), "not stored"),
        (DistillConfig(exposure="top5", loss="nope"), "is unknown"),
        (DistillConfig(exposure="top5", signal="on-policy"), "use --exposure full"),
    ],
)
def test_impossible_configs_are_refused(config, message):
    with pytest.raises(TrainingError, match=message):
        config.validate()


def test_full_exposure_student_beats_text_student_on_heldout_kl(default_teacher, tmp_path):
    """A real run on the default teacher: same prompts, steps, seed; only the exposure differs."""
    prompts = select_prompts(load_prompts("sharegpt"), 40, seed=7)
    sampling = SamplingConfig(exposure="top20", max_new_tokens=24, seed=0, max_prompt_tokens=64)
    harvest(
        default_teacher,
        prompts,
        tmp_path / "h",
        sampling=sampling,
        batch_size=40,
        cache=False,
        progress=False,
    )
    tok = default_teacher.tokenizer
    everything = examples_from_records(RecordSet(tmp_path / "h"), "top20", tok)
    train, heldout = everything[:32], everything[32:]
    results = {}
    for exposure, signal in (("full", "online"), ("text", "offline")):
        config = DistillConfig(
            exposure=exposure,
            signal=signal,
            steps=40,
            batch_size=8,
            lr=3e-3,
            seed=0,
            checkpoint_every=40,
        )
        examples = examples_from_records(RecordSet(tmp_path / "h"), exposure, tok)[:32]
        student = build_student("micro", tok, seed=0)
        distill(
            student,
            examples,
            tmp_path / exposure,
            config,
            tokenizer=tok,
            teacher=default_teacher,
            progress=False,
        )
        results[exposure] = fidelity(student, default_teacher, heldout, pad_id=tok.pad_token_id)
    untrained = fidelity(
        build_student("micro", tok, seed=0), default_teacher, heldout, pad_id=tok.pad_token_id
    )
    assert results["full"].kl < untrained.kl and results["text"].kl < untrained.kl
    assert results["full"].kl < results["text"].kl, results
    assert len(train) == 32


@pytest.mark.parametrize(
    "config",
    [
        DistillConfig(
            exposure="top5", loss="sparse-kl-renorm", temperature=2.0, steps=3, batch_size=4
        ),
        DistillConfig(exposure="top5", loss="sparse-kl", alpha=0.5, steps=3, batch_size=4),
    ],
    ids=["renormalised-top5", "mixed-hard-soft"],
)
def test_settings_beyond_the_matrix_train(config, tiny_records, tiny_teacher, tmp_path):
    tok = tiny_teacher.tokenizer
    examples = examples_from_records(tiny_records, config.exposure, tok)
    student = build_student("micro", tok, seed=0)
    before = [p.detach().clone() for p in student.parameters()]
    result = distill(
        student, examples, tmp_path, config, tokenizer=tok, teacher=tiny_teacher, progress=False
    )
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert result.steps == 3 and len(losses) == 3 and all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_layers_student_starts_from_the_teacher(tiny_teacher):
    student = build_student("layers:1", tiny_teacher.tokenizer, teacher_model=tiny_teacher.model)
    assert student.config.num_hidden_layers == 1
    torch.testing.assert_close(
        student.get_input_embeddings().weight, tiny_teacher.model.get_input_embeddings().weight
    )


def test_two_process_data_parallel_run_matches_one_process(tiny_records, tiny_dir, tmp_path):
    """Scale-out via torch.distributed (torchrun, gloo on CPU): the loss curve of one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = str(Path(__file__).with_name("ddp_run.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, worker, str(tiny_records.path), str(tiny_dir), str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            worker,
            str(tiny_records.path),
            str(tiny_dir),
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = [m["loss"] for m in read_metrics(tmp_path / "one")]
    two = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-4)


# --- every (exposure, loss, signal) through the command line: trains as documented, or one line

LOSS_NAMES = (
    "forward-kl",
    "reverse-kl",
    "jsd",
    "sampled-kl",
    "sparse-kl",
    "sparse-kl-renorm",
    "ce",
)
SIGNALS = ("offline", "online", "on-policy")
#: The documented matrix (README, distill): full is scored by the teacher in the loop, top-k and
#: text records are the signal themselves.
TRAINS = {
    *(("full", loss, s) for loss in LOSS_NAMES[:4] for s in ("online", "on-policy")),
    *(("top5", loss, "offline") for loss in ("sparse-kl", "sparse-kl-renorm", "ce")),
    ("text", "ce", "offline"),
}
MATRIX = [(e, loss, s) for e in ("full", "top5", "text") for loss in LOSS_NAMES for s in SIGNALS]


def test_the_cli_loss_choices_are_the_losses():
    from distillscope.cli import Loss
    from distillscope.distill.losses import ACCEPTS, LOSSES, SIGNAL_OF

    assert [m.value for m in Loss] == list(LOSSES) == list(SIGNAL_OF) == list(ACCEPTS)
    assert sorted(LOSS_NAMES) == sorted(LOSSES)


@pytest.mark.parametrize("exposure, loss, signal", [c for c in MATRIX if c not in TRAINS])
def test_a_combination_that_cannot_train_is_refused_in_one_line(
    exposure, loss, signal, cli, tmp_path
):
    from conftest import one_line_error

    out = tmp_path / "s"
    result = cli("distill", "--data", tmp_path / "none", "--out", out, "--exposure", exposure,
                 "--loss", loss, "--signal", signal)  # fmt: skip
    one_line_error(result, "--")
    assert not out.exists()


@pytest.mark.parametrize("exposure, loss, signal", sorted(TRAINS))
def test_every_accepted_combination_trains_through_the_cli(
    exposure, loss, signal, cli, tiny_records, tiny_dir, tmp_path
):
    import json

    teacher = ("--teacher", f"hf:{tiny_dir}") if exposure == "full" else ()
    if signal == "on-policy":
        teacher += ("--on-policy-tokens", 4)
    out = tmp_path / "s"
    result = cli("distill", "--data", tiny_records.path, "--out", out, "--exposure", exposure,
                 "--loss", loss, "--signal", signal, "--student", "micro", "--steps", 1,
                 "--batch-size", 4, "--device", "cpu", "--json", *teacher)  # fmt: skip
    assert result.exit_code == 0, (result.stderr, result.exception)
    run = json.loads(result.stdout)
    assert run["train"]["steps"] == 1 and np.isfinite(run["train"]["final_loss"])
    held = json.loads((out / "config.json").read_text())
    assert (held["exposure"], held["loss"], held["signal"]) == (exposure, loss, signal)


@pytest.mark.parametrize(
    "args, words",
    [
        (("--exposure", "top5", "--loss", "sparse-kl", "--temperature", 2), ["sparse-kl-renorm"]),
        (("--exposure", "full", "--loss", "sampled-kl", "--temperature", 2), ["forward-kl"]),
        (("--exposure", "text", "--temperature", 2), ["--temperature 1"]),
        (("--exposure", "full", "--signal", "on-policy", "--alpha", 0.5), ["--alpha 0"]),
        (("--exposure", "full"), ["--teacher"]),
        (("--exposure", "top5", "--heldout", 2), ["--heldout", "--teacher"]),
        (("--exposure", "top5", "--precision", "fp8"), ["--precision", "bf16"]),
    ],
)  # fmt: skip
def test_options_that_cannot_hold_together_are_refused(args, words, cli, tmp_path):
    from conftest import one_line_error

    out = tmp_path / "s"
    one_line_error(cli("distill", "--data", tmp_path, "--out", out, *args), *words)
    assert not out.exists()


def test_a_finished_run_resumes_only_as_itself(cli, tiny_records, tmp_path):
    """Rerunning a finished run reports its loss; other data, students or settings are refused
    naming what differs; equivalent spellings of the same settings are the same run."""
    import json
    import shutil

    from conftest import one_line_error

    out = tmp_path / "s"
    base = ("distill", "--data", tiny_records.path, "--out", out, "--student", "micro",
            "--steps", 2, "--batch-size", 4, "--device", "cpu", "--exposure", "top5")  # fmt: skip
    first = cli(*base, "--json")
    assert first.exit_code == 0, first.stderr
    again = cli(
        *base, "--loss", "sparse-kl", "--signal", "offline", "--temperature", "1.0", "--json"
    )
    assert again.exit_code == 0, again.stderr
    loss = json.loads(again.stdout)["train"]["final_loss"]
    assert loss == pytest.approx(json.loads(first.stdout)["train"]["final_loss"])
    one_line_error(cli(*base, "--lr", 0.01), "lr=0.001 (asked 0.01)")
    one_line_error(cli(*base, "--loss", "ce"), "loss=sparse-kl (asked ce)")
    other = tmp_path / "other"
    shutil.copytree(tiny_records.path, other)
    for extra in sorted((other / "records").glob("part-*.parquet"))[1:]:
        extra.unlink()
    swapped = [str(other) if a == tiny_records.path else a for a in base]
    one_line_error(cli(*swapped), "--data", str(tiny_records.path))
    student = [("tiny" if a == "micro" else a) for a in base]
    one_line_error(cli(*student), "--student tiny", "micro")
    assert json.loads((out / "config.json").read_text())["loss"] == "sparse-kl"


@pytest.mark.parametrize(
    "args, words",
    [
        (("--exposure", "top20"), ["--exposure top20", "top5"]),
        (("--exposure", "top5", "--student", "huge"), ["huge"]),
        (("--exposure", "full", "--teacher", "hf:/no/such/model"), ["/no/such/model"]),
        (("--exposure", "top5", "--heldout", 99, "--teacher", "default"), ["--heldout 99"]),
    ],
)
def test_odd_inputs_are_one_line_and_leave_nothing(args, words, cli, tiny_records, tmp_path):
    from conftest import one_line_error

    out = tmp_path / "s"
    found = cli("distill", "--data", tiny_records.path, "--out", out, "--device", "cpu", *args)
    one_line_error(found, *words)
    assert not out.exists()


# --- practical training: LoRA adapters, autocast, gradient checkpointing --------------------


def _micro_run(tiny_records, tiny_teacher, out, **options):
    tok = tiny_teacher.tokenizer
    examples = examples_from_records(tiny_records, "top5", tok)
    config = DistillConfig(exposure="top5", steps=6, batch_size=4, lr=3e-3, seed=1, **options)
    student = build_student("micro", tok, seed=0)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    result = distill(student, examples, out, config, tokenizer=tok, progress=False)
    return student, before, result


def test_a_lora_run_trains_only_the_adapters_and_saves_a_whole_student(
    tiny_records, tiny_teacher, tmp_path
):
    student, before, result = _micro_run(tiny_records, tiny_teacher, tmp_path / "s", lora_rank=4)
    assert result.steps == 6 and np.isfinite(result.final_loss)
    after = dict(student.named_parameters())
    assert set(after) == set(before)  # merged: no adapter left in the caller's student
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("_proj.weight") for name in changed)
    assert not any("embed" in name or "norm" in name for name in changed)
    saved = tmp_path / "s" / "student"
    assert (saved / "config.json").exists() and not (saved / "adapter_config.json").exists()
    loaded = type(student).from_pretrained(saved)
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, after[name])


def test_an_interrupted_lora_run_resumes_its_adapters(tiny_records, tiny_teacher, tmp_path):
    tok = tiny_teacher.tokenizer
    examples = examples_from_records(tiny_records, "top5", tok)
    config = DistillConfig(
        exposure="top5", steps=6, batch_size=4, lr=3e-3, seed=1, lora_rank=4, checkpoint_every=3
    )
    whole = dict(out=tmp_path / "a", tokenizer=tok, progress=False)
    distill(build_student("micro", tok, seed=0), examples, config=config, **whole)
    parts = dict(out=tmp_path / "b", tokenizer=tok, progress=False)
    distill(build_student("micro", tok, seed=0), examples, config=config, stop_after=3, **parts)
    resumed = distill(build_student("micro", tok, seed=0), examples, config=config, **parts)
    assert resumed.resumed_from == 3
    a = [m["loss"] for m in read_metrics(tmp_path / "a")]
    b = [m["loss"] for m in read_metrics(tmp_path / "b")]
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_bf16_autocast_and_checkpointing_train_to_the_fp32_curve(
    tiny_records, tiny_teacher, tmp_path
):
    _, _, plain = _micro_run(tiny_records, tiny_teacher, tmp_path / "fp32")
    _, _, ckpt = _micro_run(
        tiny_records, tiny_teacher, tmp_path / "ckpt", gradient_checkpointing=True
    )
    _, _, bf16 = _micro_run(tiny_records, tiny_teacher, tmp_path / "bf16", precision="bf16")
    fp32 = [m["loss"] for m in read_metrics(tmp_path / "fp32")]
    # recomputing activations changes no arithmetic
    np.testing.assert_allclose([m["loss"] for m in read_metrics(tmp_path / "ckpt")], fp32, 1e-5)
    # bf16 matmuls: not bit for bit (autocast is on), the same start within bf16's precision,
    # and it learns as fp32 does. The losses are small (about 3e-5), so rounding that compounds
    # over steps moves the later ones by several per cent: compare the drop, not each step.
    low = [m["loss"] for m in read_metrics(tmp_path / "bf16")]
    assert np.all(np.isfinite(low)) and low != fp32
    np.testing.assert_allclose(low[0], fp32[0], rtol=0.03)
    assert 1 - low[-1] / low[0] >= 0.5 * (1 - fp32[-1] / fp32[0]) > 0
    assert plain.steps == ckpt.steps == bf16.steps == 6


def test_fp16_without_a_gpu_and_unknown_precisions_are_refused(
    tiny_records, tiny_teacher, tmp_path
):
    with pytest.raises(TrainingError, match="--precision fp16 needs a CUDA device"):
        _micro_run(tiny_records, tiny_teacher, tmp_path / "s", precision="fp16")
    assert not (tmp_path / "s").exists()
    with pytest.raises(TrainingError, match="--precision 'fp8' is unknown"):
        DistillConfig(precision="fp8").validate()
