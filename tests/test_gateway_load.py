"""Load on loopback against a real `distillscope serve` process: no 5xx, and the traffic log holds
exactly one whole row per acknowledged exchange, also across a SIGKILL mid-load.

32 concurrent clients send 1,024 requests (a share of them streamed) to the synthetic teacher,
whose answers take microseconds, so the gateway and its log are what is under load.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from distillscope.gateway import KeyStore
from distillscope.gateway.loadtest import GatewayProcess, run_load
from distillscope.gateway.traffic import read_traffic

MODEL = "distillscope-synthetic"
CLIENTS, REQUESTS = 32, 1024
TIERS = (
    "tiers:\n  load:\n    exposure: top5\n    requests_per_minute: null\n"
    "    tokens_per_minute: null\n    concurrency: null\n"
)


def start_server(root: Path) -> GatewayProcess:
    """`distillscope serve` in a child process, on the test's log, keys and tiers."""
    (root / "tiers.yaml").write_text(TIERS)
    return GatewayProcess(
        "--db", str(root / "traffic.duckdb"),
        "--keys", str(root / "keys.sqlite"),
        "--tiers", str(root / "tiers.yaml"),
        log_file=root / "server.log",
    ).start()  # fmt: skip


@pytest.fixture()
def root(tmp_path) -> tuple[Path, str]:
    key = KeyStore(tmp_path / "keys.sqlite").create("loader", "load")[1]
    return tmp_path, key


def whole(row: dict) -> bool:
    needed = ("account_id", "key_id", "prompt", "completion", "prompt_tokens", "latency_ms")
    return all(row[name] is not None for name in needed) and row["completion_tokens"] >= 1


def test_load_no_5xx_and_one_row_per_200(root):
    path, key = root
    server = start_server(path)
    try:
        result = asyncio.run(
            run_load(
                server.url, key, model=MODEL, clients=CLIENTS, requests=REQUESTS, stream_every=8
            )
        )
    finally:
        server.stop()
    assert result.requests == REQUESTS
    assert result.server_errors == 0 and result.ok == REQUESTS, result.summary()
    rows = read_traffic(path / "traffic.duckdb").to_pylist()
    ok = [r for r in rows if r["status"] == 200]
    assert len(ok) == len(rows) == REQUESTS
    assert sorted(r["exchange_id"] for r in ok) == sorted(result.acknowledged)
    assert all(whole(r) and r["exposure_served"] == "top5" for r in ok)
    assert sum(r["stream"] for r in ok) == REQUESTS // 8


def test_kill_mid_load_loses_no_acknowledged_exchange(root):
    path, key = root
    server = start_server(path)
    killed = {}

    def kill_after_some(result) -> None:
        if result.ok >= 400 and not killed:
            killed["at"] = result.ok
            server.process.send_signal(signal.SIGKILL)  # a crash: no clean-up at all

    result = asyncio.run(
        run_load(
            server.url,
            key,
            model=MODEL,
            clients=CLIENTS,
            requests=REQUESTS,
            stream_every=8,
            on_ack=kill_after_some,
            deadline=120,
        )
    )
    server.process.wait(30)
    assert killed and result.server_errors == 0
    acknowledged = set(result.acknowledged)
    assert len(acknowledged) == result.ok >= 400
    # The server comes back on the same log (loading the journal the kill left) and serves.
    server = start_server(path)
    try:
        after = asyncio.run(run_load(server.url, key, model=MODEL, clients=8, requests=64))
    finally:
        server.stop()
    assert after.ok == 64
    rows = read_traffic(path / "traffic.duckdb").to_pylist()
    ids = [r["exchange_id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert all(whole(r) for r in rows if r["status"] == 200)
    present = set(ids)
    assert acknowledged <= present, f"{len(acknowledged - present)} acknowledged rows lost"
    assert set(after.acknowledged) <= present
    # Rows beyond the acknowledged ones: exchanges committed just before the kill, whose answer
    # never reached the client. Never more than one in-flight request per client.
    assert len(present) - len(acknowledged) - len(after.acknowledged) <= CLIENTS
