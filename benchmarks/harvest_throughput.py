"""Harvest throughput and storage cost, against named baselines measured in the same run.

    .venv/bin/python benchmarks/harvest_throughput.py --n 64 --batch-size 16 --max-new-tokens 48

Throughput: the default teacher's ``generate`` at top20 (seeded per-prompt Gumbel sampling plus
top-k recording) against plain ``model.generate(do_sample=True)`` on the same prompts, batches,
padding and token budget. Both runs are forced to the same number of new tokens per row so the
ratio compares the loops, not the luck of where EOS falls. Rounds alternate to spread noise.

Storage: bytes per completion token of the top20 Parquet records against two naive layouts, the
dense float32 distribution (V x 4 bytes) and top-20 as int64 ids + float32 logprobs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from distillscope.harvest import harvest
from distillscope.prompts import load_prompts, select_prompts
from distillscope.records import RecordSet
from distillscope.teachers import SamplingConfig, load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    teacher = load_teacher("default", device=args.device, batch_size=args.batch_size)
    prompts = select_prompts(load_prompts("sharegpt"), args.n, seed=0)
    texts = sorted((p.text for p in prompts), key=len)
    sampling = SamplingConfig(
        exposure="top20",
        max_new_tokens=args.max_new_tokens,
        seed=0,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    model, tokenizer = teacher.model, teacher.tokenizer
    pad = tokenizer.pad_token_id

    def ours() -> int:
        # min_new_tokens via stop ids: none, so every row runs the full budget like the baseline
        stops, teacher._stop_ids = teacher._stop_ids, []
        try:
            answers = teacher.generate(texts, sampling)
        finally:
            teacher._stop_ids = stops
        return sum(a.completion_tokens for a in answers)

    @torch.inference_mode()
    def plain() -> int:
        tokens = 0
        for start in range(0, len(texts), args.batch_size):
            encoded = [
                teacher.encode_prompt(t, args.max_prompt_tokens)
                for t in texts[start : start + args.batch_size]
            ]
            width = max(map(len, encoded))
            ids = torch.tensor(
                [[pad] * (width - len(e)) + e for e in encoded], device=teacher.device
            )
            mask = torch.tensor(
                [[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=teacher.device
            )
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                pad_token_id=pad,
            )
            tokens += (out.shape[1] - width) * len(encoded)
        return tokens

    timings: dict[str, list[float]] = {"distillscope": [], "plain_generate": []}
    ours()  # warm-up
    for _ in range(args.rounds):
        for name, run in (("distillscope", ours), ("plain_generate", plain)):
            began = time.perf_counter()
            tokens = run()
            timings[name].append(tokens / (time.perf_counter() - began))
    ours_tps = statistics.median(timings["distillscope"])
    plain_tps = statistics.median(timings["plain_generate"])

    with tempfile.TemporaryDirectory() as out:
        harvest(
            teacher,
            prompts,
            out,
            sampling=sampling,
            batch_size=args.batch_size,
            cache=False,
            progress=False,
        )
        records = RecordSet(out)
        bytes_per_token = records.bytes_on_disk / records.completion_tokens
        vocab = records.provenance.vocab_size
    result = {
        "device": str(teacher.device),
        "threads": torch.get_num_threads(),
        "n": args.n,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "tokens_per_s": {
            "distillscope_top20": round(ours_tps, 1),
            "plain_generate": round(plain_tps, 1),
        },
        "ratio_vs_plain_generate": round(ours_tps / plain_tps, 3),
        "bytes_per_token": {
            "distillscope_top20_parquet": round(bytes_per_token, 1),
            "naive_dense_float32": vocab * 4,
            "naive_top20_int64_float32": 20 * (8 + 4),
        },
        "compression_vs_dense": round(vocab * 4 / bytes_per_token),
        "compression_vs_naive_top20": round(20 * 12 / bytes_per_token, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
