"""A bounded load test against an OpenAI-compatible endpoint: N concurrent clients, M requests.

It stops by itself (after ``requests`` requests, or ``deadline`` seconds), keeps going through
connection failures (a server killed mid-load), and remembers the id of every exchange the server
acknowledged with a 200, so a traffic log can be checked against what clients were told.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def server_errors(self) -> int:
        return sum(
            n for status, n in self.statuses.items() if isinstance(status, int) and status >= 500
        )

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests / self.seconds, 1) if self.seconds else None,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
        }


async def run_load(
    url: str,
    api_key: str,
    *,
    model: str,
    clients: int = 32,
    requests: int = 2000,
    max_tokens: int = 16,
    top_logprobs: int | None = 5,
    stream_every: int = 0,
    deadline: float = 300.0,
    on_ack=None,
) -> LoadResult:
    """``requests`` chat completions from ``clients`` concurrent connections to ``url`` (…/v1).

    Every ``stream_every``-th request streams (0: none). ``on_ack(result)`` is called after each
    200, e.g. to kill the server after some number of acknowledgements.
    """
    result = LoadResult()
    counter = iter(range(requests))
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def one(client: httpx.AsyncClient, n: int) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"load test prompt {n}: say something."}],
            "max_tokens": max_tokens,
            "seed": n,
        }
        if top_logprobs is not None:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        stream = bool(stream_every) and n % stream_every == 0
        began = time.perf_counter()
        try:
            if stream:
                body["stream"] = True
                async with client.stream("POST", "/chat/completions", json=body) as response:
                    lines = [line async for line in response.aiter_lines() if line]
                    status = response.status_code
                    done = bool(lines) and lines[-1] == "data: [DONE]"
                    exchange_id = _stream_id(lines) if status == 200 and done else None
                    if status == 200 and not done:
                        status = "incomplete_stream"
            else:
                response = await client.post("/chat/completions", json=body)
                status = response.status_code
                exchange_id = response.json()["id"] if status == 200 else None
        except httpx.TransportError as exc:
            status, exchange_id = type(exc).__name__, None
        result.statuses[status] += 1
        if status == 200:
            result.latencies_ms.append((time.perf_counter() - began) * 1000)
            result.acknowledged.append(exchange_id)
            if on_ack is not None:
                on_ack(result)

    async def worker(client: httpx.AsyncClient) -> None:
        for n in counter:
            if time.perf_counter() - started > deadline:
                return
            await one(client, n)
            result.requests += 1

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:
        await asyncio.gather(*(worker(c) for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


class GatewayProcess:
    """``distillscope serve`` in a child process on a free loopback port (tests, benchmarks).

    ``args`` are extra ``serve`` options (``--db``, ``--keys``, ``--tiers``, ...); the child's
    stderr goes to ``log_file`` (appended) when given.
    """

    def __init__(self, *args: str, teacher: str = "synthetic", log_file: Path | None = None):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.args = ["serve", "--teacher", teacher, "--port", str(self.port), *args]
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> GatewayProcess:
        errors = open(self.log_file, "a") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distillscope.cli", *self.args],
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}")
            try:
                if httpx.get(self.url.replace("/v1", "/health"), timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"the gateway did not start within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(60)

    def stop(self) -> None:
        """SIGTERM: uvicorn finishes, the traffic log drains."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def _stream_id(lines: list[str]) -> str | None:
    for line in lines:
        if line.startswith("data: {"):
            return json.loads(line[6:]).get("id")
    return None
