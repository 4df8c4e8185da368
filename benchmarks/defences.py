"""What watermarks and antidistillation sampling cost the teacher, and what they cost a distiller.

    .venv/bin/python benchmarks/defences.py --seeds 0,1,2 --proxy layers:2 --student layers:4 \
        --lams 0.01,0.03 --temperatures 0.8 --watermarks '' \
        --json benchmarks/antidistillation_results.json

For every setting (clean, KGW, Gumbel, antidistillation at each --lams strength, plain temperature
sampling at each --temperatures value) the default teacher answers the same training prompts with
the same seeds; a fresh student (same initialisation, same steps) is trained on each set of answers
at text exposure; and we report, per seed and as ratios to the clean setting of the same seed,

- teacher cost: the clean teacher's perplexity of the answers, and the distortion -- the mean
  per-token KL(sampled || clean teacher) of the distribution each setting sampled from; and two
  measures that do not ask the teacher: ``repetition`` (the share of an answer's token bigrams
  that repeat an earlier one in it; degenerate loops have low perplexity) and ``relevance`` (mean
  cosine of all-MiniLM-L6-v2 embeddings of prompt and answer);
- distiller's cost: the student's KL(teacher || student) on held-out prompts answered cleanly, and
  the share of the clean student's gain over its untrained initialisation that the setting takes
  away (``gain_lost``: 0 = no effect, 1 = the student learnt nothing).

Temperature is the baseline a defence must beat (Savani et al. 2025 compare against it): it too
makes answers worse training data, at a cost to the teacher. Each seed draws its own prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=96, help="training prompts")
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--downstream", type=int, default=16, help="proxy's downstream prompts")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per answer")
    parser.add_argument("--steps", type=int, default=200, help="student training steps")
    parser.add_argument("--student", default="micro", help="micro, tiny, ... or layers:N")
    parser.add_argument("--student-lr", type=float, default=None,
                        help="default: 3e-3 (random init), 1e-4 (layers:N)")  # fmt: skip
    parser.add_argument("--proxy", default="layers:2", help="antidistillation's proxy student")
    parser.add_argument("--lams", default="", help="antidistillation strengths, e.g. 0.01,0.03")
    parser.add_argument("--temperatures", default="", help="temperature baselines, e.g. 0.8")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="keep antidistillation inside the teacher's nucleus (and add the "
                             "plain nucleus-sampling baseline)")  # fmt: skip
    parser.add_argument("--watermarks", default="kgw,gumbel")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--teacher-only",
        action="store_true",
        help="recompute only the teacher-side figures of settings already in "
        "--json (the answers are seeded, so they are the same answers)",
    )
    parser.add_argument("--resume", action="store_true",
                        help="run only the settings --json does not hold yet")  # fmt: skip
    args = parser.parse_args()

    from distillscope.distill.students import build_student
    from distillscope.fidelity import fidelity, teacher_rows
    from distillscope.forensics.defenses import build_antidistillation
    from distillscope.forensics.harness import (
        perplexity,
        teacher_outputs,
        train_text_student,
    )
    from distillscope.prompts import load_prompts, select_prompts
    from distillscope.teachers import load_teacher

    teacher = load_teacher("default", batch_size=16)
    tok = teacher.tokenizer
    pretrained = args.student.startswith("layers:")
    lr = args.student_lr or (1e-4 if pretrained else 3e-3)
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict = {"commands": [], "seeds": {}}
    if args.resume and args.json and args.json.exists():
        report = json.loads(args.json.read_text())
    report["commands"].append(" ".join(sys.argv))

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def save() -> None:
        report["summary"] = summarise(report["seeds"])
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

    for seed in seeds:
        need = args.train + args.heldout + args.downstream
        pool = [p.text for p in select_prompts(load_prompts("sharegpt"), need, seed=seed)]
        train = pool[: args.train]
        heldout = pool[args.train : args.train + args.heldout]
        downstream = pool[args.train + args.heldout :]
        gen = dict(max_new_tokens=args.tokens, seed=seed)
        evaluation = teacher_outputs(teacher, heldout, **gen).examples
        rows = teacher_rows(teacher, evaluation)
        results = report["seeds"].setdefault(str(seed), {})
        if "untrained" not in results:
            untrained = build_student(args.student, tok, seed=seed, teacher_model=teacher.model)
            kl = fidelity(untrained, teacher, evaluation, rows=rows, pad_id=tok.pad_token_id).kl
            results["untrained"] = {"student_kl": kl}
            del untrained
        init_kl = results["untrained"]["student_kl"]
        settings: dict[str, tuple[list, float]] = {"clean": ([], 1.0)}
        for scheme in filter(None, args.watermarks.split(",")):
            from distillscope.forensics.watermark import Watermark, derive_key

            mark = Watermark(scheme=scheme, key=derive_key("benchmark-secret", "acct-1"))
            settings[scheme] = ([mark.processor()], 1.0)
        for temperature in (float(x) for x in filter(None, args.temperatures.split(","))):
            settings[f"temperature {temperature:g}"] = ([], temperature)
        nucleus = f" top_p={args.top_p:g}" if args.top_p < 1 else ""
        names = {
            float(x): f"antidistill {args.proxy} lam={float(x):g}{nucleus}"
            for x in filter(None, args.lams.split(","))
        }
        if nucleus:
            names[0.0] = f"nucleus{nucleus}"
        if any((name in results) == args.teacher_only for name in names.values()):
            log(f"seed {seed}: proxy {args.proxy}, downstream loss on {args.downstream} answers")
            penalty = build_antidistillation(
                teacher, lam=0.0, proxy=args.proxy, prompts=args.downstream,
                max_new_tokens=args.tokens, seed=seed, prompt_pool=downstream,
            )  # fmt: skip
            for lam, name in names.items():
                settings[name] = ([penalty.scaled(lam, top_p=args.top_p)], 1.0)
        for name, (processors, temperature) in settings.items():
            if (name in results) != args.teacher_only:
                continue
            log(f"seed {seed}, {name}: teacher answering {len(train)} prompts")
            outputs = teacher_outputs(
                teacher, train, processors=processors, temperature=temperature,
                distortion=True, **gen,
            )  # fmt: skip
            nll = outputs.teacher_nll  # scored with the distortion, in the same pass
            teacher_side = {
                "teacher_nll": nll,
                "teacher_perplexity": perplexity(nll),
                "distortion": outputs.distortion,
                "repetition": repetition(outputs.examples),
                "relevance": relevance(outputs.prompts, outputs.texts),
                "answer_tokens": sum(len(e.completion_ids) for e in outputs.examples),
                "generation_seconds": outputs.seconds,
                "example": outputs.texts[0][:160] if outputs.texts else "",
            }
            if args.teacher_only:
                results[name].update(teacher_side)
                log(f"seed {seed}, {name}: teacher side {teacher_side}")
                save()
                continue
            log(f"seed {seed}, {name}: training the {args.student} student ({args.steps} steps)")
            began = time.perf_counter()
            student = train_text_student(
                outputs.examples, tok, student=args.student, steps=args.steps, lr=lr, seed=seed,
                teacher_model=teacher.model,
            )  # fmt: skip
            train_seconds = time.perf_counter() - began
            fid = fidelity(student, teacher, evaluation, rows=rows, pad_id=tok.pad_token_id)
            results[name] = {
                **teacher_side,
                "student_kl": fid.kl,
                "student_top1": fid.top1_agreement,
                "train_seconds": train_seconds,
            }
            log(
                f"seed {seed}, {name}: teacher ppl {perplexity(nll):.2f}, distortion "
                f"{outputs.distortion:.3f}, student KL {fid.kl:.3f} (untrained {init_kl:.3f})"
            )
            save()
    print_table(report["summary"])


def repetition(examples) -> float:
    """The share of answer-token bigrams that repeat an earlier bigram of the same answer."""
    repeated = total = 0
    for example in examples:
        ids = [int(t) for t in example.completion_ids]
        pairs = list(zip(ids, ids[1:]))
        repeated += len(pairs) - len(set(pairs))
        total += len(pairs)
    return repeated / total if total else 0.0


def relevance(prompts, texts) -> float:
    """Mean cosine similarity of each prompt's and its answer's sentence embeddings."""
    from distillscope.detect.paraphrase import embed

    if not texts:
        return 0.0
    asked, answered = embed(prompts, max_words=64), embed(texts, max_words=64)
    return float((asked * answered).sum(axis=1).mean())


def summarise(by_seed: dict) -> dict:
    """Per setting and seed, the figures against that seed's ``clean`` setting (ratios, and rises
    in nats per token on both sides), with their geometric or plain means; a penalty kept inside
    a nucleus is also compared with plain nucleus sampling at the same ``top_p`` (``vs_nucleus``).
    """
    summary: dict = {}
    for seed, results in by_seed.items():
        clean = results.get("clean")
        if clean is None:
            continue
        gain = results["untrained"]["student_kl"] - clean["student_kl"]
        for name, r in results.items():
            if name == "untrained":
                continue
            entry = summary.setdefault(name, {"seeds": []})
            entry["seeds"].append(int(seed))
            figures = {
                "teacher_perplexity_ratio": r["teacher_perplexity"] / clean["teacher_perplexity"],
                "distortion": r["distortion"],
                "student_kl_ratio": r["student_kl"] / clean["student_kl"],
                "gain_lost": (r["student_kl"] - clean["student_kl"]) / gain,
                **_rises(r, clean),
            }
            for key in ("repetition", "relevance"):
                if key in r:
                    figures[key] = r[key]
            for key, value in figures.items():
                entry.setdefault(key, []).append(value)
            baseline = results.get(f"nucleus {name.split()[-1]}")
            if name.startswith("antidistill") and "top_p=" in name and baseline:
                for key, value in _rises(r, baseline).items():
                    entry.setdefault("vs_nucleus", {}).setdefault(key, []).append(value)
    for entry in summary.values():
        for key in ("teacher_perplexity_ratio", "student_kl_ratio"):
            entry[f"{key}_geomean"] = math.exp(statistics.fmean(math.log(x) for x in entry[key]))
        for group in (entry, entry.get("vs_nucleus", {})):
            for key in [k for k, v in group.items() if isinstance(v, list) and k != "seeds"]:
                if not key.endswith("_ratio"):
                    group[f"{key}_mean"] = statistics.fmean(group[key])
    return summary


def _rises(r: dict, base: dict) -> dict:
    """How far a setting moved from ``base``: nats per token on both sides (the teacher's NLL of
    its answers, the student's KL), and the answers' relevance and repetition where measured."""
    rises = {
        "teacher_nll_rise": r["teacher_nll"] - base["teacher_nll"],
        "student_kl_rise": r["student_kl"] - base["student_kl"],
    }
    for key in ("relevance", "repetition"):
        if key in r and key in base:
            rises[f"{key}_change"] = r[key] - base[key]
    return rises


def print_table(summary: dict) -> None:
    header = (f"{'setting':<40} {'ppl x clean':>11} {'distortion':>10} {'student KL x':>12} "
              f"{'gain lost':>9} {'teacher +NLL':>12} {'student +KL':>11} {'relevance':>9} "
              f"{'repetition':>10}")  # fmt: skip
    print(f"{header}  per seed (KL x)")
    for name, e in summary.items():
        per_seed = ", ".join(f"{x:.3f}" for x in e["student_kl_ratio"])
        quality = "".join(
            f" {e[f'{key}_mean']:>{width}.3f}" if f"{key}_mean" in e else f" {'-':>{width}}"
            for key, width in (("relevance", 9), ("repetition", 10))
        )
        print(
            f"{name:<40} {e['teacher_perplexity_ratio_geomean']:>11.3f} "
            f"{e['distortion_mean']:>10.3f} {e['student_kl_ratio_geomean']:>12.3f} "
            f"{e['gain_lost_mean']:>9.3f} {e['teacher_nll_rise_mean']:>12.3f} "
            f"{e['student_kl_rise_mean']:>11.3f}{quality}  {per_seed}"
        )
    for name, e in summary.items():
        if "vs_nucleus" in e:
            vs = e["vs_nucleus"]
            changes = ", ".join(f"{k[:-5]} {v:+.3f}" for k, v in vs.items() if k.endswith("_mean"))
            print(f"{name} against plain nucleus sampling (means): {changes}")


if __name__ == "__main__":
    main()
