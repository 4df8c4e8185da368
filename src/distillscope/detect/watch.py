"""The provider's loop: detection on a schedule, alerts kept for review, flags acted on.

``watch_once(log, state)`` runs ``detect`` over the traffic log as it is now (a PostgreSQL log is
read while the gateway writes to it; a folder of Parquet segments too), then keeps every flagged
account in an *alerts* table:

- in the same database as the traffic log when that is PostgreSQL (table ``alerts``), else in
  ``STATE/alerts.duckdb`` (a gateway holds its DuckDB file while it serves);
- an account flagged for the first time is a new alert, ``queued`` for review, unless its score
  is at least ``block_above`` times the flag threshold: then it is ``blocked`` at once (a
  stricter bar than the flag's, for what no analyst needs to look at first);
- a reviewer ``confirm``s an alert (blocked) or ``dismiss``es it (allow-listed: never queued or
  blocked again by the watch); each decision is recorded with its time and reviewer, and
  ``labels()`` gives them back as ground truth for ``detect-eval``;
- the block list file (``block_file``), which the gateway re-reads within a second, is rewritten
  from the alerts that are ``blocked`` or ``confirmed``; lines already in it that the watch did not
  write (``account:ID`` of another source) are kept.

``webhook``: new alerts are POSTed as JSON to that URL; a failure is reported, never fatal.
Every run's full detection output stays in ``STATE/runs/<UTC time>/`` for reading.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from distillscope.detect.detector import DetectConfig, DetectError, detect
from distillscope.gateway.keys import Block, parse_block_list, write_block_list
from distillscope.paths import is_database_url

#: review states of an alert
STATUSES = ("queued", "blocked", "confirmed", "dismissed")
_COLUMNS = (
    "account_id", "status", "score", "threshold", "cluster_id", "reasons", "requests",
    "first_flagged", "last_flagged", "auto_blocked", "reviewed_at", "reviewer", "note",
)  # fmt: skip
_SCHEMA = """CREATE TABLE IF NOT EXISTS alerts (
    account_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    cluster_id TEXT,
    reasons TEXT,
    requests BIGINT,
    first_flagged TIMESTAMPTZ NOT NULL,
    last_flagged TIMESTAMPTZ NOT NULL,
    auto_blocked BOOLEAN NOT NULL,
    reviewed_at TIMESTAMPTZ,
    reviewer TEXT,
    note TEXT
)"""
_MARK = "  # watch:"


class WatchError(DetectError):
    """A watch that cannot run as asked."""


@dataclass
class WatchRun:
    """What one watch cycle did."""

    run: str
    flagged: int
    new: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    queued: int = 0
    block_file: str | None = None
    webhook: str | None = None
    seconds: float = 0.0


class AlertStore:
    """The alerts table: PostgreSQL beside a PostgreSQL log, else DuckDB in the state folder."""

    def __init__(self, log: str | os.PathLike, state: str | os.PathLike):
        self.postgres = is_database_url(log)
        if self.postgres:
            import psycopg

            try:
                self._db = psycopg.connect(str(log), autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                raise WatchError(f"cannot open the alerts table in {log}: {exc}") from None
        else:
            import duckdb

            Path(state).mkdir(parents=True, exist_ok=True)
            self._db = duckdb.connect(str(Path(state) / "alerts.duckdb"))
        self._db.execute(_SCHEMA)

    def _run(self, sql: str, args: Sequence = ()):
        if self.postgres:
            return self._db.execute(sql.replace("?", "%s"), tuple(args))
        return self._db.execute(sql, list(args))

    def close(self) -> None:
        self._db.close()

    def all(self) -> list[dict]:
        rows = self._run(
            f"SELECT {', '.join(_COLUMNS)} FROM alerts ORDER BY score DESC, account_id"
        ).fetchall()
        return [dict(zip(_COLUMNS, row)) for row in rows]

    def get(self, account: str) -> dict | None:
        row = self._run(
            f"SELECT {', '.join(_COLUMNS)} FROM alerts WHERE account_id = ?", (account,)
        ).fetchone()
        return dict(zip(_COLUMNS, row)) if row else None

    def upsert(self, alert: dict) -> None:
        names = ", ".join(_COLUMNS)
        marks = ", ".join("?" for _ in _COLUMNS)
        update = ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[1:])
        self._run(
            f"INSERT INTO alerts ({names}) VALUES ({marks}) "
            f"ON CONFLICT (account_id) DO UPDATE SET {update}",
            [alert.get(c) for c in _COLUMNS],
        )

    def review(self, account: str, decision: str, *, reviewer: str | None, note: str | None):
        """``confirm`` (blocked) or ``dismiss`` (allow-listed) one alert; the alert as it is now."""
        status = {"confirm": "confirmed", "dismiss": "dismissed", "requeue": "queued"}.get(decision)
        if status is None:
            raise WatchError(f"a review is confirm, dismiss or requeue, not {decision!r}")
        alert = self.get(account)
        if alert is None:
            raise WatchError(f"no alert for account {account!r}: `distillscope alerts` lists them")
        alert.update(status=status, reviewed_at=datetime.now(UTC), reviewer=reviewer, note=note)
        self.upsert(alert)
        return alert


def watch_once(
    log: str | os.PathLike,
    state: str | os.PathLike,
    *,
    block_file: str | os.PathLike | None = None,
    block_above: float = 2.5,
    webhook: str | None = None,
    accounts: str | os.PathLike | None = None,
    events: str | os.PathLike | None = None,
    reference=None,
    config: DetectConfig | None = None,
    now: datetime | None = None,
    incremental: bool = True,
) -> WatchRun:
    """One cycle: detect, keep the alerts, block what clears the stricter bar, notify.

    ``incremental``: the days already digested are kept in ``STATE/digests``
    (``detect.state``), so each cycle reads from the log only what came since the last whole
    day, and flags what a run over the whole log would."""
    if block_above < 1:
        raise WatchError(
            f"--block-above {block_above}: the auto-block bar is a multiple (>= 1) of the flag "
            "threshold, so only flagged accounts are ever blocked"
        )
    began = time.perf_counter()
    now = now or datetime.now(UTC)
    state = Path(state)
    run = state / "runs" / now.strftime("%Y%m%dT%H%M%SZ")
    summary = detect(log, run, accounts=accounts, events=events, reference=reference,
                     config=config, state=state / "digests" if incremental else None)  # fmt: skip
    scored = pq.read_table(run / "accounts.parquet")
    flagged = scored.filter(scored["flagged"])
    store = AlertStore(log, state)
    result = WatchRun(run=str(run), flagged=flagged.num_rows)
    try:
        for row in flagged.to_pylist():
            known = store.get(row["account_id"])
            above = row["score"] >= block_above * summary.threshold
            alert = dict(known) if known else {
                "account_id": row["account_id"], "first_flagged": now, "reviewed_at": None,
                "reviewer": None, "note": None, "auto_blocked": False,
                "status": "blocked" if above else "queued",
            }  # fmt: skip
            if known is None:
                alert["auto_blocked"] = above
                result.new.append(row["account_id"])
            elif known["status"] == "queued" and above:  # crossed the bar since
                alert.update(status="blocked", auto_blocked=True)
            alert.update(
                score=float(row["score"]), threshold=summary.threshold,
                cluster_id=row["cluster_id"] or None, reasons=row["reasons"],
                requests=int(row["requests"]), last_flagged=now,
            )  # fmt: skip
            store.upsert(alert)
        alerts = store.all()
    finally:
        store.close()
    result.blocked = [a["account_id"] for a in alerts if a["status"] in ("blocked", "confirmed")]
    result.queued = sum(a["status"] == "queued" for a in alerts)
    if block_file is not None:
        result.block_file = str(write_blocks(block_file, alerts))
    if webhook and result.new:
        result.webhook = _notify(webhook, [a for a in alerts if a["account_id"] in result.new])
    result.seconds = time.perf_counter() - began
    return result


def write_blocks(path: str | os.PathLike, alerts: list[dict]) -> Path:
    """Rewrite the block list from the alerts that are blocked or confirmed, keeping every line
    the watch did not write (blocks of another source)."""
    path = Path(path)
    ours = {a["account_id"] for a in alerts}
    kept: list[Block] = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            entries = parse_block_list(line)
            if not entries:
                continue
            kind, value = next(iter(entries))
            if _MARK in line and kind == "account" and value in ours:
                continue  # rewritten below from the alert's current state
            kept.append(Block(kind, value, line.split("#", 1)[1].strip() if "#" in line else None))
    mine = [
        Block("account", a["account_id"], f"watch: {a['status']}, score {a['score']:.1f}")
        for a in alerts
        if a["status"] in ("blocked", "confirmed")
    ]
    held = {(b.kind, b.value) for b in mine}
    write_block_list(path, [b for b in kept if (b.kind, b.value) not in held] + mine)
    return path


def _notify(url: str, alerts: list[dict]) -> str:
    import httpx

    body = {"alerts": [_jsonable(a) for a in alerts]}
    try:
        reply = httpx.post(url, json=body, timeout=10)
    except httpx.HTTPError as exc:
        return f"failed: {exc}"
    return f"HTTP {reply.status_code}"


def labels(log: str | os.PathLike, state: str | os.PathLike) -> list[dict]:
    """Reviewed alerts as labels: ``{"account_id", "label"}`` with 1 for confirmed and 0 for
    dismissed (what ``detect-eval`` can score a run against)."""
    store = AlertStore(log, state)
    try:
        reviewed = [a for a in store.all() if a["status"] in ("confirmed", "dismissed")]
    finally:
        store.close()
    return [{"account_id": a["account_id"], "label": int(a["status"] == "confirmed")}
            for a in reviewed]  # fmt: skip


def parse_every(text: str) -> float:
    """Seconds in ``30m``, ``6h``, ``1d`` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise WatchError(f"--every {text!r}: a period like 30m, 6h or 1d")
    return seconds


def _jsonable(alert: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in alert.items()}


def dumps(alerts: list[dict]) -> str:
    return json.dumps([_jsonable(a) for a in alerts], indent=2)
