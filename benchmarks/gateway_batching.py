"""Dynamic batching: requests/s of `distillscope serve` with the real default teacher, batched vs
one at a time, measured in one run on this machine.

``--clients`` concurrent clients (the official ``openai`` async client) each send
``--per-client`` chat requests to a gateway subprocess (``--db off``, open, so the backend is what
is measured), once with ``--max-batch 1`` and once with ``--max-batch N``; ``--repeats`` rounds
alternate the two, so drift hits each alike. Every setting sends the same prompts with the same
``max_tokens``, seeds and temperature, and the answers are compared between settings (a padded
batch can round a near-tie into another token; the share of identical answers is reported).
Usage:

    .venv/bin/python benchmarks/gateway_batching.py --clients 16 --per-client 2 \
        --max-tokens 128 --max-prompt-tokens 256 --json benchmarks/gateway_batching_results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import openai
import torch

from distillscope.gateway.loadtest import GatewayProcess
from distillscope.prompts import load_prompts, select_prompts


def prompts(n: int, max_prompt_tokens: int | None) -> list[str]:
    """``n`` ShareGPT first turns (seeded), those of at most ``max_prompt_tokens`` when given."""
    from transformers import AutoTokenizer

    from distillscope.teachers.default import default_tokenizer_dir
    from distillscope.tokens import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir(), local_files_only=True)
    chosen = []
    for p in select_prompts(load_prompts("sharegpt"), 20 * n, seed=0):
        if max_prompt_tokens is None or len(encode_prompt(tokenizer, p.text, 1 << 62)) <= (
            max_prompt_tokens
        ):
            chosen.append(p.text)
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"fewer than {n} prompts of at most {max_prompt_tokens} tokens")


async def load(url: str, asked: list[str], clients: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for i, text in enumerate(asked):
        queue.put_nowait((i, text))
    answers: dict[int, str] = {}
    tokens = 0
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            i, text = queue.get_nowait()
            start = time.perf_counter()
            answer = await client.chat.completions.create(
                model="distillscope-default",
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
                temperature=1.0,
                seed=i,
            )
            latencies.append(time.perf_counter() - start)
            answers[i] = answer.choices[0].message.content
            tokens += answer.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - start
    await client.close()
    return {
        "seconds": seconds,
        "requests_per_s": len(asked) / seconds,
        "tokens_per_s": tokens / seconds,
        "completion_tokens": tokens,
        "p50_latency_s": statistics.median(latencies),
        "answers": [answers[i] for i in range(len(asked))],
    }


def serve(max_batch: int) -> GatewayProcess:
    return GatewayProcess(
        "--db", "off", "--open", "--max-batch", str(max_batch), teacher="default"
    ).start(timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=256,
        help="only ShareGPT prompts up to this many tokens (0: any length)",
    )
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    asked = prompts(args.clients * args.per_client, args.max_prompt_tokens or None)
    runs: dict[str, list[dict]] = {"one at a time": [], "batched": []}
    settings = {"one at a time": 1, "batched": args.max_batch}
    for repeat in range(args.repeats):
        for name, max_batch in settings.items():
            server = serve(max_batch)
            try:
                url = server.url
                asyncio.run(load(url, asked[: args.clients], args.clients, args.max_tokens))
                result = asyncio.run(load(url, asked, args.clients, args.max_tokens))
            finally:
                server.stop()
            runs[name].append(result)
            print(
                f"round {repeat + 1} {name:>13}: {result['requests_per_s']:.2f} requests/s, "
                f"{result['tokens_per_s']:.1f} tokens/s, p50 {result['p50_latency_s']:.2f} s",
                flush=True,
            )
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in results),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "p50_latency_s": statistics.median(r["p50_latency_s"] for r in results),
            "runs_requests_per_s": [round(r["requests_per_s"], 3) for r in results],
        }
    alone, batched = runs["one at a time"][0]["answers"], runs["batched"][0]["answers"]
    same = sum(a == b for a, b in zip(alone, batched, strict=True)) / len(alone)
    ratio = summary["batched"]["requests_per_s"] / summary["one at a time"]["requests_per_s"]
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "clients": args.clients,
        "requests": len(asked),
        "max_tokens": args.max_tokens,
        "max_prompt_tokens": args.max_prompt_tokens or None,
        "max_batch": args.max_batch,
        "settings": summary,
        "batched_over_one_at_a_time": ratio,
        "identical_answers": same,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
