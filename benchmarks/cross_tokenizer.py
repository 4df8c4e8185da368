"""Cross-tokenizer distillation: a GPT-2-tokenizer student trained from the default teacher's top-k
records (span alignment, sparse-kl) against the same student trained on the same records' text
alone (ce), at equal queries, over seeds (benchmarks/cross_tokenizer.md).

    .venv/bin/python benchmarks/cross_tokenizer.py --out runs/cross-tokenizer \
        --json benchmarks/cross_tokenizer_results.json

About 10 minutes on 2 CPU cores. The harvest is cached by content and resumable; rerunning
retrains the students (nothing else is kept). Both arms see the same prompts, the same sampled
answers, the same student initialisation per seed, and the same steps and learning rate; only
the loss differs (top-k through the alignment, or the answer's tokens alone).

Scored on held-out prompts (never harvested for training), two ways
(``distillscope.crossfidelity``): the teacher's log-likelihood of the student's own samples,
re-encoded in the teacher's tokens (per teacher token; higher is better), and the student's NLL
of the teacher's held-out answers in nats per byte (lower is better).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cross-tokenizer"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--queries", type=int, default=96)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--exposure", default="top20")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--student", default="tiny")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from distillscope import RecordSet, load_prompts, load_teacher, select_prompts
    from distillscope.crossfidelity import fidelity_across
    from distillscope.distill import DistillConfig, distill
    from distillscope.distill.crosstok import cross_examples
    from distillscope.distill.students import build_student, load_student_tokenizer
    from distillscope.harvest import harvest
    from distillscope.teachers import SamplingConfig

    torch.set_num_threads(2)
    began = time.perf_counter()
    teacher = load_teacher("default", device="cpu", batch_size=32)
    prompts = select_prompts(load_prompts("sharegpt"), args.queries + args.heldout, seed=0)
    sampling = SamplingConfig(
        exposure=args.exposure,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        seed=0,
    )
    folders = {"train": args.out / "train", "heldout": args.out / "heldout"}
    harvest(teacher, prompts[: args.queries], folders["train"], sampling=sampling, progress=False)
    harvest(teacher, prompts[args.queries :], folders["heldout"], sampling=sampling, progress=False)
    harvest_seconds = time.perf_counter() - began

    gpt2 = load_student_tokenizer("gpt2")
    train = RecordSet(folders["train"])
    arms = {
        "topk": ("sparse-kl", cross_examples(train, args.exposure, gpt2, teacher.tokenizer)),
        "text": ("ce", cross_examples(train, "text", gpt2, teacher.tokenizer)),
    }
    held_records = RecordSet(folders["heldout"])
    held = cross_examples(held_records, "text", gpt2, teacher.tokenizer)
    teacher_prompts = [e.prompt_ids for e in held_records.exchanges("text")]
    aligned = [float((e.signal.tail_mass > 0).mean()) for e in arms["topk"][1]]
    steps = args.epochs * args.queries // args.batch_size

    def measure(model, seed: int) -> dict:
        return fidelity_across(
            model, gpt2, teacher, held, teacher_prompts, max_new_tokens=args.max_new_tokens,
            seed=seed,
        )  # fmt: skip

    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs.append(
            {
                "arm": "untrained",
                "seed": seed,
                **measure(build_student(args.student, gpt2, seed=seed), seed),
            }
        )
        for arm, (loss, examples) in arms.items():
            config = DistillConfig(
                exposure=args.exposure if arm == "topk" else "text",
                loss=loss,
                steps=steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=seed,
                warmup_steps=min(10, steps // 5),
                checkpoint_every=steps,
            )
            student = build_student(args.student, gpt2, seed=seed)
            t0 = time.perf_counter()
            work = args.out / "work" / f"{arm}-s{seed}"
            result = distill(student, examples, work, config, tokenizer=gpt2, progress=False,
                             save=False)  # fmt: skip
            row = {
                "arm": arm,
                "seed": seed,
                "loss": loss,
                "steps": steps,
                "final_loss": result.final_loss,
                "train_seconds": time.perf_counter() - t0,
                **measure(student, seed),
            }
            runs.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work, ignore_errors=True)

    def mean(arm: str, key) -> float:
        return float(np.mean([key(r) for r in runs if r["arm"] == arm]))

    summary = {
        arm: {
            "teacher_loglik_per_token": mean(arm, lambda r: r["teacher_loglik"]["per_token"]),
            "teacher_loglik_per_byte": mean(arm, lambda r: r["teacher_loglik"]["per_byte"]),
            "text_nll_per_byte": mean(arm, lambda r: r["text_nll_per_byte"]),
        }
        for arm in ("untrained", "text", "topk")
    }
    by_seed = {r["seed"]: {} for r in runs}
    for r in runs:
        by_seed[r["seed"]][r["arm"]] = r
    summary["topk_beats_text_on_teacher_loglik"] = [
        s["topk"]["teacher_loglik"]["per_token"] > s["text"]["teacher_loglik"]["per_token"]
        for s in by_seed.values()
    ]
    summary["topk_beats_text_on_text_nll"] = [
        s["topk"]["text_nll_per_byte"] < s["text"]["text_nll_per_byte"] for s in by_seed.values()
    ]
    teacher_own = [
        float(np.mean(e.signal.token_logprobs)) for e in held_records.exchanges(args.exposure)
    ]
    result = {
        "settings": vars(args) | {"out": str(args.out), "json": str(args.json), "steps": steps},
        "student_tokenizer": "gpt2",
        "teacher": teacher.id,
        "queries": len(train),
        "heldout_prompts": len(held),
        "aligned_share_of_student_positions": float(np.mean(aligned)),
        "teacher_own_answers_loglik_per_token": float(np.mean(teacher_own)),
        "harvest_seconds": harvest_seconds,
        "total_seconds": time.perf_counter() - began,
        "runs": runs,
        "summary": summary,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
