"""Power of the radioactivity test: how much watermarked training data makes a student detectable.

    .venv/bin/python benchmarks/radioactivity.py --train 256 --fractions 0,0.05,0.1,0.25,0.5,1 \
        --json benchmarks/radioactivity_results.json

The default teacher answers the same training prompts twice with the same seeds: once with the
KGW watermark of one account (defaults gamma 0.25, delta 2, h 4, self-hash), once clean. For each
fraction rho, a student (same seed, same steps) is distilled at text exposure from a mix: the first
rho of the prompts answered with the watermark, the rest clean. Then

- closed-model test: the student answers fresh prompts; its answers are scored with the key;
- open-model test: the student reads the watermarked answers; its predictions are scored;

each with the exact p-value and the number of (deduplicated) tokens scored. Also reported: the
same closed test under 100 other keys on the rho = 1 student (false-accusation check) and the
watermark's quality cost (the clean teacher's perplexity of the watermarked answers vs the clean).
Sander et al. 2024 report p < 1e-5 with 5% of the fine-tuning data watermarked (closed model,
with their filtering and a 7B student trained on 100k instructions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=256, help="training prompts")
    parser.add_argument("--probe", type=int, default=128, help="fresh prompts for the closed test")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--student", default="micro", help="a size, or layers:N of the teacher")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fractions", default="0,0.05,0.1,0.25,0.5,1")
    parser.add_argument("--scheme", default="kgw")
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("--delta", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-student", type=Path, default=None, help="keep the rho=1 student")
    parser.add_argument(
        "--attacks",
        default="paraphrase,resample",
        help="attacks on the rho=1 data: paraphrase, resample (or empty)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np

    from distillscope.forensics.harness import teacher_nll, teacher_outputs, train_text_student
    from distillscope.forensics.radioactivity import (
        ask_suspect,
        closed_model_test,
        open_model_test,
    )
    from distillscope.forensics.watermark import Watermark, derive_key
    from distillscope.prompts import load_prompts, select_prompts
    from distillscope.teachers import load_teacher
    from distillscope.teachers.local import TransformersTeacher

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    teacher = load_teacher("default", batch_size=32)
    tok = teacher.tokenizer
    pool = [p.text for p in select_prompts(load_prompts("sharegpt"), args.train + args.probe,
                                           seed=args.seed)]  # fmt: skip
    train, probe = pool[: args.train], pool[args.train :]
    mark = Watermark(args.scheme, derive_key("benchmark-secret", "acct-harvester"),
                     delta=args.delta, context=args.context)  # fmt: skip
    gen = dict(max_new_tokens=args.tokens, seed=args.seed)
    log(f"teacher answering {len(train)} prompts with the {args.scheme} watermark")
    marked = teacher_outputs(teacher, train, processors=[mark.processor()], **gen)
    log("... and clean")
    clean = teacher_outputs(teacher, train, **gen)
    own = mark.detect([e.completion_ids for e in marked.examples],
                      [e.prompt_ids for e in marked.examples])  # fmt: skip
    quality = {
        "clean_nll": teacher_nll(teacher, clean.examples),
        "watermarked_nll": teacher_nll(teacher, marked.examples),
        "teacher_outputs_log10_p": own.log10_p,
        "teacher_outputs_tokens_scored": own.tokens_scored,
    }
    quality["perplexity_ratio"] = float(np.exp(quality["watermarked_nll"] - quality["clean_nll"]))
    log(f"quality: {quality}")
    marked_by_prompt = dict(zip([e.prompt_ids.tobytes() for e in marked.examples], marked.examples))
    reading = [(e.prompt_ids.tolist(), e.completion_ids.tolist()) for e in marked.examples]

    def distil_and_test(data, received):
        """A student trained on ``data``, its answers to the probe prompts, the closed test, and
        the reading test on ``received`` (the watermarked answers the account was served)."""
        student = train_text_student(data, tok, student=args.student, steps=args.steps,
                                     lr=args.lr, teacher_model=teacher.model,
                                     seed=args.seed)  # fmt: skip
        asked = ask_suspect(student, probe, tokenizer=tok, max_new_tokens=args.tokens,
                            seed=args.seed + 1)  # fmt: skip
        return (
            student,
            asked,
            closed_model_test(student, mark, asked),
            open_model_test(student, mark, received or reading),
        )

    rows = []
    for rho in (float(x) for x in args.fractions.split(",")):
        cut = round(rho * len(clean.examples))
        data = []
        for i, example in enumerate(clean.examples):
            twin = marked_by_prompt.get(example.prompt_ids.tobytes())
            data.append(twin if i < cut and twin is not None else example)
        wm_tokens = sum(len(e.completion_ids) for e in data[:cut])
        log(f"rho {rho:g}: training a {args.student} student on {len(data)} answers")
        # reading mode feeds the suspect what the account received: the marked answers it used
        student, asked, closed, opened = distil_and_test(data, reading[:cut])
        row = {
            "fraction": rho,
            "watermarked_answers": cut,
            "watermarked_tokens": wm_tokens,
            "training_tokens": sum(len(e.completion_ids) for e in data),
            "closed_log10_p": closed.log10_p,
            "closed_tokens_scored": closed.tokens_scored,
            "closed_green_share": closed.statistic / max(closed.tokens_scored, 1),
            "open_log10_p": opened.log10_p,
            "open_tokens_scored": opened.tokens_scored,
            "open_green_share": opened.statistic / max(opened.tokens_scored, 1),
        }
        if rho == 1.0:
            others = [
                closed_model_test(student, Watermark(args.scheme, derive_key("other", f"a{i}"),
                                                     delta=args.delta, context=args.context),
                                  asked).log10_p
                for i in range(100)
            ]  # fmt: skip
            row["other_keys_min_log10_p"] = min(others)
            first_student = student
            if args.save_student:
                student.save_pretrained(args.save_student)
                tok.save_pretrained(args.save_student)
        rows.append(row)
        log(json.dumps(row))
    attacks = {}
    for attack in filter(None, args.attacks.split(",")):
        if attack == "paraphrase":
            # the distiller rewrites every watermarked answer with a clean model before training
            asks = [f"Rewrite the following text in your own words:\n\n{t}" for t in marked.texts]
            rewritten = teacher_outputs(teacher, asks, **gen)
            data = [type(e)(m.prompt_ids, e.completion_ids, e.signal)
                    for m, e in zip(marked.examples, rewritten.examples)]  # fmt: skip
        elif attack == "resample":
            # the distiller trains a first student on the watermarked answers, then a second
            # student on the first one's own answers to the same prompts
            again = teacher_outputs(TransformersTeacher(first_student, tok, id="s1",
                                                        batch_size=32), train, **gen)  # fmt: skip
            data = again.examples
        else:
            raise SystemExit(f"unknown attack {attack!r}")
        log(f"attack {attack}: training a student on {len(data)} answers")
        student, asked, closed, opened = distil_and_test(data, reading)
        attacks[attack] = {
            "closed_log10_p": closed.log10_p, "closed_tokens_scored": closed.tokens_scored,
            "open_log10_p": opened.log10_p, "open_tokens_scored": opened.tokens_scored,
        }  # fmt: skip
        log(f"attack {attack}: {attacks[attack]}")
    print(
        f"{'rho':>5} {'wm tokens':>9} {'closed p':>10} {'scored':>7} {'open p':>10} {'scored':>7}"
    )
    for r in rows:
        closed_p = 10 ** r["closed_log10_p"]
        print(f"{r['fraction']:>5g} {r['watermarked_tokens']:>9} {closed_p:>10.2g} "
              f"{r['closed_tokens_scored']:>7} {10 ** r['open_log10_p']:>10.2g} "
              f"{r['open_tokens_scored']:>7}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "quality": quality, "rows": rows,
                                         "attacks": attacks}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
