"""What watermarks and antidistillation sampling cost the teacher, and what they cost a distiller.

    .venv/bin/python benchmarks/defences.py --train 128 --steps 160 \
        --json benchmarks/defences_results.json

For every setting (clean, KGW, Gumbel, antidistillation at each --lams strength) the default teacher
answers the same training prompts with the same seeds; a fresh student (same seed, same steps) is
trained on each set of answers at text exposure; and we report

- teacher cost: the clean teacher's NLL (nats/token) and perplexity of the answers, as a ratio to
  the clean setting's in the same run;
- distiller's cost: the student's KL(teacher || student) on held-out prompts answered cleanly, as a
  ratio to the student trained on clean answers.

A defence works when the second ratio rises more than the first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=128, help="training prompts")
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--proxy-prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per answer")
    parser.add_argument("--steps", type=int, default=160, help="student training steps")
    parser.add_argument("--student", default="micro")
    parser.add_argument("--lams", default="", help="antidistillation strengths, e.g. 0.5,2")
    parser.add_argument("--watermarks", default="kgw,gumbel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from distillscope.evaluate import fidelity, teacher_rows
    from distillscope.forensics.defenses import AntidistillationProcessor, downstream_gradient
    from distillscope.forensics.harness import (
        perplexity,
        teacher_nll,
        teacher_outputs,
        train_text_student,
    )
    from distillscope.prompts import load_prompts, select_prompts
    from distillscope.teachers import load_teacher

    teacher = load_teacher("default", batch_size=16)
    tok = teacher.tokenizer
    need = args.train + args.heldout + args.proxy_prompts + 16
    pool = select_prompts(load_prompts("sharegpt"), need, seed=args.seed)
    texts = [p.text for p in pool]
    train = texts[: args.train]
    heldout = texts[args.train : args.train + args.heldout]
    proxy_train = texts[args.train + args.heldout : args.train + args.heldout + args.proxy_prompts]
    downstream = texts[-16:]
    gen = dict(max_new_tokens=args.tokens, seed=args.seed)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    evaluation = teacher_outputs(teacher, heldout, **gen).examples
    rows = teacher_rows(teacher, evaluation)
    settings: dict[str, list] = {"clean": []}
    if args.watermarks:
        from distillscope.forensics.watermark import Watermark, derive_key

        for scheme in args.watermarks.split(","):
            mark = Watermark(scheme=scheme, key=derive_key("benchmark-secret", "acct-1"))
            settings[scheme] = [mark.processor()]
    if args.lams:
        log("training the proxy student")
        proxy_data = teacher_outputs(teacher, proxy_train, **gen).examples
        proxy = train_text_student(proxy_data, tok, student="micro", steps=80, seed=args.seed + 7)
        ds = teacher_outputs(teacher, downstream, **gen).examples
        sequences = [list(e.prompt_ids) + list(e.completion_ids) for e in ds]
        gradient = downstream_gradient(proxy, sequences, pad_id=tok.pad_token_id)
        for lam in (float(x) for x in args.lams.split(",")):
            settings[f"antidistill lam={lam:g}"] = [
                AntidistillationProcessor(proxy, gradient, lam=lam, pad_id=tok.pad_token_id)
            ]
    results = {}
    for name, processors in settings.items():
        log(f"{name}: teacher answering {len(train)} prompts")
        outputs = teacher_outputs(teacher, train, processors=processors, **gen)
        nll = teacher_nll(teacher, outputs.examples)
        log(f"{name}: training the student ({args.steps} steps)")
        student = train_text_student(
            outputs.examples, tok, student=args.student, steps=args.steps, seed=args.seed
        )
        fid = fidelity(student, teacher, evaluation, rows=rows, pad_id=tok.pad_token_id)
        results[name] = {
            "teacher_nll": nll,
            "teacher_perplexity": perplexity(nll),
            "student_kl": fid.kl,
            "student_top1": fid.top1_agreement,
            "answer_tokens": sum(len(e.completion_ids) for e in outputs.examples),
            "generation_seconds": outputs.seconds,
            "example": outputs.texts[0][:160] if outputs.texts else "",
        }
        log(f"{name}: teacher NLL {nll:.3f}, student KL {fid.kl:.3f}")
    clean = results["clean"]
    for entry in results.values():
        entry["teacher_perplexity_ratio"] = (
            entry["teacher_perplexity"] / clean["teacher_perplexity"]
        )
        entry["student_kl_ratio"] = entry["student_kl"] / clean["student_kl"]
    print(f"{'setting':<24} {'teacher ppl':>12} {'x clean':>8} {'student KL':>11} {'x clean':>8}")
    for name, r in results.items():
        print(
            f"{name:<24} {r['teacher_perplexity']:>12.2f} {r['teacher_perplexity_ratio']:>8.3f} "
            f"{r['student_kl']:>11.3f} {r['student_kl_ratio']:>8.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
