"""Gateway overhead and the cost of logging, measured in one run on this machine.

1. Latency: the same backend called in-process (``TeacherBackend.generate``) vs through the
   gateway over loopback HTTP (one client, sequential requests, key check, limits, policy, log
   commit before the answer): p50/p99 of each, and the difference.
2. Throughput: ``--clients`` concurrent clients against `distillscope serve` with the traffic log
   off, on DuckDB, and (with ``--postgres URL``) on PostgreSQL: requests/s and their ratio to the
   log-off run.

The backend is the synthetic teacher (answers in about a millisecond), so the gateway is what is
measured. Usage:

    .venv/bin/python benchmarks/gateway_overhead.py --requests 4000 --clients 32 \
        [--postgres postgresql://postgres@127.0.0.1:5433/distillscope] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from distillscope.gateway import KeyStore, TeacherBackend
from distillscope.gateway.backends import GenerationRequest
from distillscope.gateway.loadtest import GatewayProcess, run_load
from distillscope.gateway.traffic import read_traffic
from distillscope.teachers import load_teacher

MODEL = "distillscope-synthetic"
TIERS = (
    "tiers:\n  bench:\n    exposure: top5\n    requests_per_minute: null\n"
    "    tokens_per_minute: null\n    concurrency: null\n"
)
PROMPT = "benchmark prompt: say something."


def start_server(root: Path, db: str) -> tuple[GatewayProcess, str]:
    args = ["--db", db, "--keys", str(root / "keys.sqlite"), "--tiers", str(root / "tiers.yaml")]
    server = GatewayProcess(*args).start()
    return server, server.url


def stop(server: GatewayProcess) -> None:
    server.stop()


def in_process_latency(n: int, max_tokens: int) -> list[float]:
    backend = TeacherBackend(load_teacher("synthetic"), model_name=MODEL)
    times = []

    async def run() -> None:
        for i in range(n):
            request = GenerationRequest(
                messages=[{"role": "user", "content": PROMPT}],
                prompt=None,
                temperature=1.0,
                max_tokens=max_tokens,
                seed=i,
                top_logprobs=5,
            )
            began = time.perf_counter()
            backend.count_prompt_tokens(request)
            await backend.generate(request)
            times.append((time.perf_counter() - began) * 1000)

    asyncio.run(run())
    return times


def gateway_latency(url: str, key: str, n: int, max_tokens: int) -> list[float]:
    times = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        for i in range(n):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens,
                "seed": i,
                "logprobs": True,
                "top_logprobs": 5,
            }
            began = time.perf_counter()
            response = client.post("/chat/completions", json=body)
            times.append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200, response.text
    return times


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per throughput run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--latency-requests", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per log setting")
    parser.add_argument("--postgres", help="a postgresql:// URL to also measure")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    results: dict = {"args": vars(args) | {"json": str(args.json) if args.json else None}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "tiers.yaml").write_text(TIERS)
        key = KeyStore(root / "keys.sqlite").create("bench", "bench")[1]

        base = in_process_latency(args.latency_requests, args.max_tokens)
        process, url = start_server(root, str(root / "latency.duckdb"))
        try:
            gateway_latency(url, key, 50, args.max_tokens)  # warm-up
            through = gateway_latency(url, key, args.latency_requests, args.max_tokens)
        finally:
            stop(process)
        results["latency_ms"] = {
            "in_process": {"p50": pct(base, 50), "p99": pct(base, 99)},
            "gateway": {"p50": pct(through, 50), "p99": pct(through, 99)},
            "overhead": {
                "p50": round(pct(through, 50) - pct(base, 50), 3),
                "p99": round(pct(through, 99) - pct(base, 99), 3),
            },
        }
        print(json.dumps(results["latency_ms"], indent=2))

        settings = {"off": "off", "duckdb": str(root / "traffic.duckdb")}
        if args.postgres:
            settings["postgres"] = args.postgres
        runs: dict[str, list] = {name: [] for name in settings}
        for repeat in range(args.repeats):
            for name, db in settings.items():  # interleaved, so drift hits every setting alike
                process, url = start_server(root, db)
                try:
                    asyncio.run(run_load(url, key, model=MODEL, clients=8, requests=200))
                    load = asyncio.run(
                        run_load(
                            url,
                            key,
                            model=MODEL,
                            clients=args.clients,
                            requests=args.requests,
                            max_tokens=args.max_tokens,
                        )
                    )
                finally:
                    stop(process)
                summary = load.summary()
                if name == "duckdb":
                    rows = read_traffic(db)
                    summary["log_rows_for_acknowledged"] = int(
                        len(set(rows["exchange_id"].to_pylist()) & set(load.acknowledged))
                    )
                    Path(db).unlink()
                runs[name].append(summary)
                print(repeat, name, json.dumps(summary))
        off = np.median([r["requests_per_second"] for r in runs["off"]])
        results["throughput"] = {
            name: {
                "requests_per_second_median": float(
                    np.median([r["requests_per_second"] for r in rs])
                ),
                "ratio_to_log_off": round(
                    float(np.median([r["requests_per_second"] for r in rs]) / off), 3
                ),
                "runs": rs,
            }
            for name, rs in runs.items()
        }
    print(
        json.dumps(
            {
                k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                for k, v in results["throughput"].items()
            },
            indent=2,
        )
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
