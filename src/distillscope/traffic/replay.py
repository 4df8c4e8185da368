"""Replay a simulated log against a gateway on this machine: its requests in order, each
account with its own key and user agent, at its relative timing, bounded in requests and time.
Only loopback targets are accepted: simulated campaigns are played against our own gateway,
never against a real service."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import os
import tempfile
import time
import typing
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillscope.errors import DistillscopeError
from distillscope.exposure import request_logprobs
from distillscope.traffic.log import CHAT
from distillscope.traffic.scenario import Scenario
from distillscope.traffic.simulate import simulate

if typing.TYPE_CHECKING:
    from distillscope.gateway.keys import KeyStore


class ReplayError(DistillscopeError):
    """A replay that cannot run: a target off this machine, or a folder that is no simulation."""


#: The most requests one replay sends.
MAX_REPLAY_REQUESTS = 100_000


@dataclass
class ReplaySummary:
    sent: int
    #: Requests per HTTP status the gateway answered (0: no answer, e.g. a timeout).
    statuses: dict[int, int]
    wall_s: float
    #: Per request, in dispatch order: (simulated exchange id, account id, status, the gateway's
    #: response id or None).
    results: list[tuple[str, str, int, str | None]]


def keystore_keys(store: KeyStore, out: str | os.PathLike) -> Callable[[str], str]:
    """API keys for a simulation's accounts, created in the gateway's ``KeyStore`` on first use
    at each account's simulated tier (a key's secret is only known when it is created)."""
    try:
        columns = pq.read_table(Path(out) / "accounts.parquet", columns=["account_id", "tier"])
    except (OSError, pa.ArrowException):
        raise ReplayError(f"{out} holds no simulation (no accounts.parquet)") from None
    tiers = dict(zip(columns["account_id"].to_pylist(), columns["tier"].to_pylist()))

    @functools.cache
    def key(account_id: str) -> str:
        return store.create(account_id, tiers.get(account_id, "text"), name="simulated")[1]

    return key


def replay(
    source: Scenario | str | os.PathLike,
    url: str,
    api_key_for_account: Callable[[str], str] | Mapping[str, str],
    *,
    max_requests: int = 200,
    speedup: float = 3600.0,
    max_gap_s: float = 1.0,
    concurrency: int = 8,
    model: str | None = None,
    max_tokens: int | None = 16,
    accounts: Collection[str] | None = None,
    timeout_s: float = 60.0,
) -> ReplaySummary:
    """Send a simulation's first ``max_requests`` requests to a gateway on this machine.

    ``source`` is a simulation folder, or a Scenario simulated first into a temporary folder.
    Requests go in the log's order, each account with its own key (``api_key_for_account``) and
    user agent, at their simulated times divided by ``speedup``, with any longer pause cut to
    ``max_gap_s``; at most ``concurrency`` are in flight. The gateway serves one model: every
    request asks for ``model`` (default: the gateway's first). ``max_tokens`` caps generation
    (None: as simulated). Refused requests (403 in the log) are not replayed. Only loopback
    targets are accepted: this plays simulated campaigns against our own gateway, never against
    a real service.
    """
    base = _loopback_base(url)
    if not 1 <= max_requests <= MAX_REPLAY_REQUESTS:
        raise ReplayError(f"max_requests must be 1..{MAX_REPLAY_REQUESTS}, not {max_requests}")
    if not speedup > 0 or concurrency < 1 or max_gap_s < 0:
        raise ReplayError("replay needs speedup > 0, concurrency >= 1 and max_gap_s >= 0")
    if isinstance(source, Scenario):
        with tempfile.TemporaryDirectory(prefix="distillscope-replay-") as folder:
            simulate(source, folder, progress=False)
            table = _replay_rows(Path(folder), accounts)
    else:
        table = _replay_rows(Path(source), accounts)
    rows = table.slice(0, max_requests).to_pylist()
    if not rows:
        return ReplaySummary(0, {}, 0.0, [])
    keys: dict[str, str] = {}
    for row in rows:
        account = row["account_id"]
        if account not in keys:
            try:
                keys[account] = (
                    api_key_for_account(account)
                    if callable(api_key_for_account)
                    else api_key_for_account[account]
                )
            except KeyError:
                raise ReplayError(f"no API key for simulated account {account}") from None
    model = model or _served_model(base, keys[rows[0]["account_id"]], timeout_s)
    schedule, at, previous = [], 0.0, rows[0]["ts"]
    for row in rows:
        at += min((row["ts"] - previous).total_seconds() / speedup, max_gap_s)
        previous = row["ts"]
        schedule.append((at, row, _replay_body(row, model, max_tokens), keys[row["account_id"]]))
    began = time.perf_counter()
    results = asyncio.run(_dispatch(base, schedule, concurrency, timeout_s))
    return ReplaySummary(
        sent=len(results),
        statuses=dict(Counter(status for _, _, status, _ in results)),
        wall_s=time.perf_counter() - began,
        results=results,
    )


def _loopback_base(url: str) -> str:
    """The gateway's base URL (without ``/v1``), if it is on this machine."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise ReplayError(f"replay needs the http:// URL of a gateway on this machine, not {url!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ReplayError(
            f"replay only targets a gateway on this machine (127.0.0.1, ::1 or localhost), not "
            f"{host}: it plays simulated campaigns against our own gateway, never a real service"
        )
    path = parts.path.rstrip("/").removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def _replay_rows(folder: Path, accounts: Collection[str] | None) -> pa.Table:
    try:
        table = pq.read_table(folder / "traffic.parquet")
    except (OSError, pa.ArrowException):
        raise ReplayError(f"{folder} holds no simulation (no traffic.parquet)") from None
    keep = pc.not_equal(table["status"], 403)
    if accounts is not None:
        keep = pc.and_(keep, pc.is_in(table["account_id"], pa.array(list(accounts), pa.string())))
    return table.filter(keep)


def _replay_body(row: dict, model: str, max_tokens: int | None) -> dict:
    """The request a simulated row stands for, as the gateway's API takes it."""
    body: dict[str, object] = {"model": model, "stream": False}
    asked = row["max_tokens"]
    body["max_tokens"] = min(asked or max_tokens, max_tokens) if max_tokens else asked
    for name in ("temperature", "seed"):
        if row[name] is not None:
            body[name] = row[name]
    top, prompt_n = request_logprobs(row["exposure_requested"] or "text")
    if row["endpoint"] == CHAT:
        body["messages"] = json.loads(row["messages"])
        if top is not None:
            body["logprobs"] = True
            if top:
                body["top_logprobs"] = top
    else:
        body["prompt"] = row["prompt"]
        if top is not None:
            body["logprobs"] = top
    if prompt_n is not None:
        body["prompt_logprobs"] = prompt_n
    return body


def _served_model(base: str, key: str, timeout_s: float) -> str:
    import httpx

    try:
        answer = httpx.get(
            f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s
        )
        answer.raise_for_status()
        return answer.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ReplayError(f"cannot list the models of the gateway at {base}: {exc}") from None


async def _dispatch(base: str, schedule: list, concurrency: int, timeout_s: float) -> list:
    import httpx

    results: list = [None] * len(schedule)
    slots = asyncio.Semaphore(concurrency)

    async def send(i: int, row: dict, body: dict, key: str) -> None:
        status, response_id = 0, None
        try:
            answer = await client.post(
                row["endpoint"],
                json=body,
                headers={
                    "Authorization": f"Bearer {key}",
                    "User-Agent": row["user_agent"] or "distillscope-replay",
                },
            )
            status = answer.status_code
            if status == 200:
                response_id = answer.json().get("id")
        except httpx.TimeoutException:
            pass
        except httpx.TransportError as exc:
            raise ReplayError(f"lost the gateway at {base}: {exc}") from None
        finally:
            slots.release()
        results[i] = (row["exchange_id"], row["account_id"], status, response_id)

    async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as client:
        loop = asyncio.get_running_loop()
        origin = loop.time()
        tasks = []
        for i, (at, row, body, key) in enumerate(schedule):
            delay = origin + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()  # in order: request i starts before request i + 1
            tasks.append(asyncio.create_task(send(i, row, body, key)))
        await asyncio.gather(*tasks)
    return results
