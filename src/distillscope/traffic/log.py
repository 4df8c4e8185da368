"""The log being written: accounts, requests, the exchanges table and the truth beside it.

Every population logs through a ``Log`` of its own (its own random stream) into shared row
lists; ``write`` turns them into the simulation's files: ``traffic.duckdb`` and
``traffic.parquet`` (the gateway's ``EXCHANGE_SCHEMA``), ``accounts.parquet`` (what a key store
knows), ``truth.parquet`` (each account's campaign, shape, role, profile, bans),
``exchange_truth.parquet`` (each exchange's content), ``events.parquet`` and ``scenario.yaml``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distillscope.exposure import exposure_name, request_logprobs
from distillscope.traffic.clients import hex_id
from distillscope.traffic.material import Material
from distillscope.traffic.scenario import Scenario

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass
class Account:
    """What the key store knows of an account, and the truth about it."""

    account_id: str
    key_id: str
    tier: str
    created_at: float  # seconds from the window's start; negative: before it
    payment_fingerprint: str
    email_domain: str
    org: str | None
    #: ``background``, a legitimate population's shape or a campaign's shape.
    shape: str
    role: str  # legitimate, campaign, replacement
    #: What kind of account within its shape (background: individual, corporate, vpn,
    #: integration; other shapes: the shape's own word for it).
    profile: str
    campaign_id: str | None = None
    banned_at: float | None = None
    replaces: str | None = None


@dataclass
class Request:
    """What a client sends, and who it is."""

    account: Account
    ip: str
    user_agent: str
    endpoint: str
    model: str
    messages: list[dict[str, str]]
    stream: bool
    temperature: float | None
    max_tokens: int
    seed: int | None
    exposure: str
    #: How long the answer would be, before ``max_tokens`` cuts it.
    answer_tokens: int
    campaign_id: str | None
    #: legitimate, template, grammar, cot_wrap, trajectory or ordinary (blocked rows: apart).
    content: str
    template_id: str | None = None
    #: The capability asked for (default: the template id's first part).
    capability: str | None = None


class Log:
    """The exchanges table as rows of values in ``EXCHANGE_SCHEMA`` order, plus their truth."""

    def __init__(
        self,
        r: random.Random,
        material: Material,
        scenario: Scenario,
        rows: list[tuple],
        truth: list[tuple],
    ):
        from distillscope.gateway.tiers import BUILTIN_TIERS

        self.r = r
        self.words = material.words
        self.chars = scenario.completion_chars
        self.end = scenario.days * 86400
        self.tiers = BUILTIN_TIERS
        self.rows, self.truth = rows, truth
        self._served: dict[tuple[str, str], str] = {}

    def filler(self, tokens: int) -> str:
        """Answer-like text of about ``tokens`` tokens (cut to ``completion_chars``)."""
        words = max(1, round(tokens / 1.3))
        if self.chars is not None:
            words = min(words, self.chars // 4 + 1)
        start = self.r.randrange(len(self.words) - words)
        text = " ".join(self.words[start : start + words])
        return text if self.chars is None else text[: self.chars]

    def send(
        self, t: float, q: Request, *, rate_limited: float, automated: bool
    ) -> tuple[str, float]:
        """Log ``q`` at ``t``, after up to three 429s and their retries; the answer and when it
        ended. Requests outside the window are not logged (the answer is still made up, for a
        conversation that goes on)."""
        r = self.r
        for attempt in range(3):
            if r.random() >= rate_limited:
                break
            self._row(t, q, status=429, latency_ms=r.uniform(1.0, 8.0))
            t += 2**attempt + r.uniform(0, 0.3) if automated else r.uniform(3, 40)
        tokens = min(q.answer_tokens, q.max_tokens)
        answer = self.filler(tokens)
        latency = r.lognormvariate(math.log(0.35), 0.35)  # to the first token
        latency += tokens * r.lognormvariate(math.log(0.018), 0.15)
        finish = "length" if q.answer_tokens >= q.max_tokens else "stop"
        self._row(t, q, status=200, latency_ms=latency * 1000, answer=answer, tokens=tokens,
                  finish=finish)  # fmt: skip
        return answer, t + latency

    def blocked(self, t: float, account: Account, ip: str, user_agent: str, campaign: str) -> None:
        """A banned account's request: refused with 403 before its body is read."""
        if not 0 <= t < self.end:
            return
        exchange_id = f"err-{hex_id(self.r, 32)}"
        self.rows.append((
            exchange_id, t, account.account_id, account.key_id, account.tier, ip, user_agent,
            CHAT, None, None, None, None, None, None, self.r.uniform(1.0, 5.0), False, None,
            None, None, None, None, 403, "blocked", None,
        ))  # fmt: skip
        self.truth.append((exchange_id, account.account_id, campaign, "blocked", None, None))

    def _row(self, t, q: Request, *, status, latency_ms, answer=None, tokens=None, finish=None):
        if not 0 <= t < self.end:
            return
        account = q.account
        chat = q.endpoint == CHAT
        if status == 200:
            exchange_id = f"{'chatcmpl' if chat else 'cmpl'}-{hex_id(self.r, 32)}"
        else:
            exchange_id = f"err-{hex_id(self.r, 32)}"
        prompt = q.messages[-1]["content"]
        prompt_tokens = round(1.3 * sum(len(m["content"].split()) for m in q.messages))
        prompt_tokens += 4 * len(q.messages) if chat else 1
        self.rows.append((
            exchange_id, t, account.account_id, account.key_id, account.tier, q.ip, q.user_agent,
            q.endpoint, q.model, json.dumps(q.messages, ensure_ascii=False) if chat else None,
            prompt, answer, prompt_tokens if status == 200 else None, tokens, latency_ms,
            q.stream, q.temperature, q.max_tokens, q.seed, q.exposure,
            self._serve(q.exposure, account.tier), status,
            None if status == 200 else "rate_limit_exceeded", finish,
        ))  # fmt: skip
        capability = q.capability or (q.template_id.split("/")[0] if q.template_id else None)
        self.truth.append(
            (exchange_id, account.account_id, q.campaign_id, q.content, q.template_id, capability)
        )

    def _serve(self, requested: str, tier_name: str) -> str:
        """What the tier lets through of what was asked, in the gateway's terms (clamp)."""
        key = (requested, tier_name)
        if key not in self._served:
            served = self.tiers[tier_name].clamp(*request_logprobs(requested))
            self._served[key] = exposure_name(*served)
        return self._served[key]


# --- the files ----------------------------------------------------------------------------------


def exchanges_table(rows: list[tuple], start: datetime) -> pa.Table:
    from distillscope.gateway.traffic import EXCHANGE_SCHEMA

    origin = int(start.timestamp() * 1_000_000)
    # in time order (then by id) before the arrays are built: a column of more than 2 GB of text
    # (a few million exchanges) comes back from ``pa.array`` in chunks, and ``take`` over
    # chunks concatenates them first, past a string array's 32-bit offsets
    rows = sorted(rows, key=lambda row: (round(row[1] * 1_000_000), row[0]))
    columns = list(zip(*rows)) if rows else [()] * len(EXCHANGE_SCHEMA)
    # rows stop before the columns added later (tools, tool_calls: simulated tool catalogues
    # travel in the messages, as a system message), which are null here
    columns += [(None,) * len(rows)] * (len(EXCHANGE_SCHEMA) - len(columns))
    columns[1] = [origin + round(t * 1_000_000) for t in columns[1]]
    return pa.Table.from_arrays(
        [pa.array(values, type=f.type) for values, f in zip(columns, EXCHANGE_SCHEMA)],
        schema=EXCHANGE_SCHEMA,
    )


#: Columns of ``exchange_truth.parquet``, in the order ``Log`` records them.
_CONTENT_COLUMNS = (
    "exchange_id", "account_id", "campaign_id", "content", "template_id", "capability"
)  # fmt: skip


def truth_tables(
    accounts: list[Account], truth: list[tuple], start: datetime
) -> dict[str, pa.Table]:
    def when(seconds: float | None) -> datetime | None:
        return None if seconds is None else start + timedelta(seconds=seconds)

    accounts = sorted(accounts, key=lambda a: a.account_id)
    stamp = pa.timestamp("us", tz="UTC")
    return {
        "accounts": pa.table(
            {
                "account_id": [a.account_id for a in accounts],
                "created_at": pa.array([when(a.created_at) for a in accounts], stamp),
                "payment_fingerprint": [a.payment_fingerprint for a in accounts],
                "email_domain": [a.email_domain for a in accounts],
                "org": pa.array([a.org for a in accounts], pa.string()),
                "tier": [a.tier for a in accounts],
                "key_id": [a.key_id for a in accounts],
            }
        ),
        "truth": pa.table(
            {
                "account_id": [a.account_id for a in accounts],
                "campaign_id": pa.array([a.campaign_id for a in accounts], pa.string()),
                "shape": [a.shape for a in accounts],
                "role": [a.role for a in accounts],
                "profile": [a.profile for a in accounts],
                "created_at": pa.array([when(a.created_at) for a in accounts], stamp),
                "banned_at": pa.array([when(a.banned_at) for a in accounts], stamp),
                "replaces": pa.array([a.replaces for a in accounts], pa.string()),
            }
        ),
        "exchange_truth": pa.table(
            {
                name: pa.array(values, pa.string())
                for name, values in zip(_CONTENT_COLUMNS, zip(*truth) if truth else [()] * 6)
            }
        ).sort_by("exchange_id"),
    }


def write(
    out: Path, scenario: Scenario, table: pa.Table, extra: dict[str, pa.Table], start: datetime
) -> None:
    """The simulation's files in ``out`` (the module docstring lists them). ``scenario.yaml`` is
    written last: its presence marks a complete simulation."""
    import duckdb

    from distillscope.gateway.traffic import open_traffic_log

    (out / "scenario.yaml").unlink(missing_ok=True)
    pq.write_table(table, out / "traffic.parquet", compression="zstd")
    for name, extra_table in extra.items():
        pq.write_table(extra_table, out / f"{name}.parquet", compression="zstd")
    releases = [("available", scenario.base_model, start)]
    if scenario.new_model and scenario.release_day < scenario.days:
        releases.append(
            ("release", scenario.new_model, start + timedelta(days=scenario.release_day))
        )
    kinds, names, times = zip(*releases)
    events = pa.table(
        {
            "name": list(names),
            "time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "kind": list(kinds),
        }
    )
    pq.write_table(events, out / "events.parquet")
    database = out / "traffic.duckdb"
    database.unlink(missing_ok=True)
    with open_traffic_log(database):  # the gateway's own table, created the gateway's way
        pass
    with duckdb.connect(str(database)) as con:
        con.execute("SET enable_progress_bar = false")
        con.register("simulated", table)
        con.execute("INSERT INTO exchanges SELECT * FROM simulated")
        con.unregister("simulated")
    (out / "scenario.yaml").write_text(scenario.to_yaml(), encoding="utf-8")
