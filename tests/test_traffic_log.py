"""The gateway's traffic log against a real DuckDB file and a real PostgreSQL server.

The server is the session's ``postgres_url`` fixture (tests/fixtures_services.py, via conftest).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone

import duckdb
import psycopg
import pytest

from distillscope.gateway.traffic import (
    EXCHANGE_SCHEMA,
    NullTrafficLog,
    PostgresTrafficLog,
    TrafficLogError,
    open_traffic_log,
    read_traffic,
)

TS = datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


def make_row(exchange_id: str) -> dict:
    """A row with only the required fields."""
    return {"exchange_id": exchange_id, "ts": TS, "endpoint": "/v1/completions", "status": 200}


def full_row(exchange_id: str) -> dict:
    """A row with every column filled."""
    return {
        "exchange_id": exchange_id,
        "ts": TS,
        "account_id": "acct-1",
        "key_id": "key-1",
        "tier": "free",
        "client_ip": "203.0.113.7",
        "user_agent": "pytest",
        "endpoint": "/v1/chat/completions",
        "model": "default",
        "messages": '[{"role": "user", "content": "hi"}]',
        "prompt": f"prompt of {exchange_id}",
        "completion": f"completion of {exchange_id}",
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "latency_ms": 12.25,
        "stream": False,
        "temperature": 0.7,
        "max_tokens": 16,
        "seed": 2**62,
        "exposure_requested": "top5",
        "exposure_served": "text",
        "status": 200,
        "error_code": None,
        "finish_reason": "stop",
        "tools": '[{"type": "function", "function": {"name": "search", "parameters": {}}}]',
        "tool_calls": '[{"id": "call_1", "type": "function", "function": {"name": "search"}}]',
        "logit_bias": '{"17": -100, "42": 5.5}',
    }


def new_schema(url: str) -> str:
    """``url`` with a new, empty schema first on its search path (lighter than a database)."""
    schema = f"traffic_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{url}?options=-csearch_path%3D{schema}"


def new_database(url: str) -> str:
    """The URL of a new, empty database on the server at ``url``."""
    database = f"traffic_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    return url.rsplit("/", 1)[0] + "/" + database


@pytest.fixture(params=["duckdb", "postgres"])
def target(request, tmp_path) -> str:
    """A fresh, empty traffic log target for each backend."""
    if request.param == "duckdb":
        return str(tmp_path / "traffic.duckdb")
    return new_schema(request.getfixturevalue("postgres_url"))


def record_all(log, rows: list[dict], tasks: int) -> None:
    """``record()`` every row from ``tasks`` concurrent asyncio tasks."""

    async def worker(mine: list[dict]) -> None:
        for row in mine:
            await log.record(row)

    async def main() -> None:
        await asyncio.gather(*(worker(rows[k::tasks]) for k in range(tasks)))

    asyncio.run(main())


def spy_batches(log, monkeypatch) -> list[int]:
    """The size of every batch the log makes durable from now on (one group commit each): the
    journal's appends for DuckDB, the database's transactions for PostgreSQL."""
    sizes: list[int] = []
    owner, name = (log._journal, "append") if log._journal is not None else (log, "_write")
    write = getattr(owner, name)

    def spy(rows):
        sizes.append(len(rows))
        write(rows)

    monkeypatch.setattr(owner, name, spy)
    return sizes


def test_round_trip_keeps_every_column_nulls_unicode_and_time_zones(target):
    india = timezone(timedelta(hours=5, minutes=30))
    full = full_row("chatcmpl-full") | {
        "ts": datetime(2025, 3, 4, 10, 36, 7, 891011, tzinfo=india),  # TS, written in IST
        "prompt": 'naïve café 東京 🚀 "quotes" \\ back\tslash\nnewline',
        "messages": '[{"role": "user", "content": "naïve café 東京 🚀"}]',
        "error_code": "rate_limit_exceeded",
        "stream": True,
        "status": 429,
    }
    sparse = make_row("cmpl-sparse") | {"ts": datetime(2025, 3, 4, 6, 0), "prompt": "a\x00b"}
    with open_traffic_log(target) as log:
        log.submit(sparse).result(timeout=10)
        log.submit(full).result(timeout=10)
        assert log.count() == 2
        assert log.count("status = 429") == 1

    table = read_traffic(target)
    assert table.schema.equals(EXCHANGE_SCHEMA)
    got_full, got_sparse = table.to_pylist()  # ordered by ts: TS < 06:00 UTC
    assert got_full == full | {"ts": TS}
    naive_as_utc = datetime(2025, 3, 4, 6, 0, tzinfo=UTC)
    expected_sparse = dict.fromkeys(EXCHANGE_SCHEMA.names) | sparse | {"ts": naive_as_utc}
    assert got_sparse == expected_sparse | {"prompt": "a\ufffdb"}  # NUL: no database stores it


def test_group_commit_logs_each_concurrent_record_once_in_shared_batches(target, monkeypatch):
    rows = [full_row(f"chatcmpl-{i}") for i in range(640)]
    with open_traffic_log(target, batch_size=64, max_wait_ms=5) as log:
        sizes = spy_batches(log, monkeypatch)
        record_all(log, rows, tasks=32)
        assert log.count() == len(rows)  # each record() returned after its commit
    assert sum(sizes) == len(rows)
    assert max(sizes) > 1 and len(sizes) < len(rows) / 4
    assert max(sizes) <= 64
    ids = read_traffic(target).column("exchange_id").to_pylist()
    assert sorted(ids) == sorted(row["exchange_id"] for row in rows)


def test_same_exchange_id_is_logged_once(target, monkeypatch):
    first = full_row("chatcmpl-same")
    retry = first | {"completion": "a retried batch"}
    with open_traffic_log(target, max_wait_ms=200) as log:
        sizes = spy_batches(log, monkeypatch)
        same_batch = [log.submit(first), log.submit(first)]
        for future in same_batch:
            future.result(timeout=10)
        log.submit(retry).result(timeout=10)
    with open_traffic_log(target) as log:  # and again after reopening
        log.submit(retry).result(timeout=10)
    assert sizes == [2, 1]
    assert read_traffic(target).to_pylist() == [first]


def test_close_commits_everything_queued_and_can_be_called_twice(target):
    log = open_traffic_log(target, batch_size=50, max_wait_ms=1)
    log.start()
    futures = [log.submit(make_row(f"cmpl-{i:04d}")) for i in range(1000)]
    log.close()
    assert all(future.done() for future in futures)
    log.close()
    assert read_traffic(target).column("exchange_id").to_pylist() == [
        f"cmpl-{i:04d}" for i in range(1000)
    ]


def test_record_needs_an_open_log(target):
    log = open_traffic_log(target)
    with pytest.raises(TrafficLogError, match="not started"):
        log.submit(make_row("cmpl-early"))
    with log:
        pass
    with pytest.raises(TrafficLogError, match="closed"):
        asyncio.run(log.record(make_row("cmpl-late")))
    with pytest.raises(TrafficLogError, match="closed"):
        log.submit(make_row("cmpl-late"))
    with pytest.raises(TrafficLogError, match="already started"):
        log.start()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "unknown fields: colour"),
        ({"exchange_id": None}, "missing exchange_id"),
        ({"status": "200"}, "status must be SMALLINT, not str"),
        ({"status": 70_000}, "does not fit SMALLINT"),
        ({"ts": "2025-01-01"}, "ts must be TIMESTAMPTZ"),
        ({"stream": 1}, "stream must be BOOLEAN"),
        ({"prompt_tokens": True}, "prompt_tokens must be INTEGER"),
        ({"messages": [{"role": "user"}]}, "messages must be TEXT, not list"),
    ],
)
def test_bad_rows_are_refused_at_submit(target, change, message):
    bad = make_row("cmpl-bad") | change
    with open_traffic_log(target) as log:
        with pytest.raises(TrafficLogError, match=message):
            log.submit(bad)
        with pytest.raises(TrafficLogError, match=message):
            asyncio.run(log.record(bad))
        log.submit(make_row("cmpl-good")).result(timeout=10)  # the writer is unharmed
    assert read_traffic(target).column("exchange_id").to_pylist() == ["cmpl-good"]


def test_a_full_queue_makes_record_wait_not_fail(target, monkeypatch):
    rows = [make_row(f"cmpl-{i:03d}") for i in range(60)]
    with open_traffic_log(target, batch_size=3, max_wait_ms=1, max_queue=4) as log:
        write, in_memory = log._write, []

        def counting(batch):
            in_memory.append(len(batch) + log._queue.qsize())
            write(batch)

        monkeypatch.setattr(log, "_write", counting)
        record_all(log, rows, tasks=20)
    assert max(in_memory) <= 4
    assert read_traffic(target).num_rows == len(rows)


def test_a_failed_write_is_retried_until_it_commits(target, monkeypatch):
    with open_traffic_log(target) as log:
        write, failures = log._write, [RuntimeError("disk on fire"), OSError("try again")]

        def flaky(rows):
            if failures:
                raise failures.pop()
            write(rows)

        monkeypatch.setattr(log, "_write", flaky)
        log.submit(make_row("cmpl-retried")).result(timeout=10)
        assert log.count() == 1  # loaded, through both failures
        assert not failures
    assert read_traffic(target).num_rows == 1


def test_postgres_reconnects_when_its_connection_is_killed(postgres_url):
    target = new_database(postgres_url)
    with open_traffic_log(target) as log:
        log.submit(make_row("cmpl-before")).result(timeout=10)
        with psycopg.connect(target, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'distillscope-traffic'"
                " AND datname = current_database()"
            ).fetchall()
        assert killed == [(True,)]
        log.submit(make_row("cmpl-after")).result(timeout=10)
    assert read_traffic(target).column("exchange_id").to_pylist() == ["cmpl-after", "cmpl-before"]


_CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from distillscope.gateway.traffic import open_traffic_log

async def worker(log, k):
    for i in range(10**9):
        exchange_id = f"chatcmpl-{k}-{i}"
        await log.record({
            "exchange_id": exchange_id, "ts": datetime.now(UTC), "account_id": f"acct-{k}",
            "endpoint": "/v1/chat/completions", "prompt": "p" * 300 + exchange_id,
            "completion": "c" * 900 + exchange_id, "prompt_tokens": 300, "status": 200,
        })
        print(exchange_id, flush=True)  # acknowledged only once record() returned

async def main():
    with open_traffic_log(sys.argv[1], batch_size=64, max_wait_ms=2) as log:
        await asyncio.gather(*(worker(log, k) for k in range(16)))

asyncio.run(main())
"""


def test_duckdb_keeps_every_acknowledged_row_whole_when_killed(tmp_path):
    path = tmp_path / "traffic.duckdb"
    with open(tmp_path / "child.err", "w") as errors:
        command = [sys.executable, "-c", _CHILD, str(path)]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        watchdog = threading.Timer(60, child.kill)  # a stalled child fails the test, not hangs it
        watchdog.start()
        acknowledged = []
        try:
            for line in child.stdout:
                acknowledged.append(line.strip())
                if len(acknowledged) == 1000:  # the running writer holds the file
                    with pytest.raises(TrafficLogError, match="locks its DuckDB file"):
                        read_traffic(path)
                    with pytest.raises(TrafficLogError, match="cannot open"):
                        open_traffic_log(path).start()
                if len(acknowledged) == 1500:
                    break
        finally:
            watchdog.cancel()
            os.kill(child.pid, signal.SIGKILL)
            acknowledged += [line.strip() for line in child.stdout]  # printed before the kill
            child.wait()
    assert len(acknowledged) >= 1500, (tmp_path / "child.err").read_text()

    table = read_traffic(path)
    ids = table.column("exchange_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert set(acknowledged) <= set(ids)
    for row in table.to_pylist():
        k = row["exchange_id"].split("-")[1]
        assert row["account_id"] == f"acct-{k}"
        assert row["prompt"] == "p" * 300 + row["exchange_id"]
        assert row["completion"] == "c" * 900 + row["exchange_id"]
        assert (row["prompt_tokens"], row["status"]) == (300, 200)


def test_targets_pick_their_backend_and_explain_mistakes(tmp_path):
    for off in (None, "", "off"):
        log = open_traffic_log(off)
        assert isinstance(log, NullTrafficLog)
        with log:
            asyncio.run(log.record({"anything": "goes"}))
            assert log.count() == 0 and log.read().schema.equals(EXCHANGE_SCHEMA)
    url = "postgresql://gateway:s3cret@db.example:5432/traffic?password=s3cret&sslmode=require"
    log = open_traffic_log(url)
    assert isinstance(log, PostgresTrafficLog) and "s3cret" not in log.target
    assert log.target == "postgresql://gateway@db.example:5432/traffic?sslmode=require"
    with pytest.raises(TrafficLogError, match="no folder"):
        open_traffic_log(tmp_path / "missing" / "traffic.duckdb")
    with pytest.raises(TrafficLogError, match="is a folder"):
        open_traffic_log(tmp_path)
    with pytest.raises(TrafficLogError, match="no traffic log at"):
        read_traffic(tmp_path / "never-written.duckdb")
    with pytest.raises(TrafficLogError, match="logging is off"):
        read_traffic("off")
    with pytest.raises(TrafficLogError, match="cannot open postgresql://postgres@127.0.0.1:1/"):
        open_traffic_log("postgresql://postgres:pw@127.0.0.1:1/nothing").start()
    foreign = tmp_path / "foreign.duckdb"
    with duckdb.connect(str(foreign)) as con:
        con.execute("CREATE TABLE exchanges (id INTEGER)")
    with pytest.raises(TrafficLogError, match="exchanges table with other columns"):
        open_traffic_log(foreign).start()


def test_a_log_from_before_the_tool_columns_gains_them(tmp_path):
    """A DuckDB log and a journal segment written before ``tools``/``tool_calls`` existed open,
    the table gains the columns, and old rows read them as null."""
    path = tmp_path / "old.duckdb"
    later = ("tools", "tool_calls", "logit_bias")
    old = [c for c in EXCHANGE_SCHEMA.names if c not in later]
    row = full_row("chatcmpl-old")
    with open_traffic_log(path):  # today's table, less the two columns: the old one
        pass
    with duckdb.connect(str(path)) as con:
        for column in later:
            con.execute(f"ALTER TABLE exchanges DROP COLUMN {column}")
    journal = path.with_name(f"{path.name}.journal")
    journal.mkdir(exist_ok=True)
    values = [row[c].isoformat() if c == "ts" else row[c] for c in old]
    (journal / "segment-00000000000000000001.jsonl").write_text(json.dumps(values) + "\n")
    with open_traffic_log(path) as log:
        log.submit(full_row("chatcmpl-new")).result(timeout=10)
    table = read_traffic(path)
    assert table.schema.equals(EXCHANGE_SCHEMA)
    by_id = {r["exchange_id"]: r for r in table.to_pylist()}
    assert by_id["chatcmpl-old"]["tools"] is None and by_id["chatcmpl-new"]["tools"]
    assert by_id["chatcmpl-old"]["logit_bias"] is None and by_id["chatcmpl-new"]["logit_bias"]


def test_the_open_hour_is_written_when_the_gateway_stops_and_rewritten_after_a_restart(tmp_path):
    """Closed hours are final (recorded in the mark); the hour still open is written as it
    stands when the log closes, and again, whole, when a later run closes."""
    import pyarrow.parquet as pq

    from distillscope.gateway.traffic import COMPLETE_MARK, segments_folder

    path = tmp_path / "traffic.duckdb"
    now = datetime.now(UTC)
    old = now - timedelta(hours=3)
    for run, moments in enumerate([[old, now], [now]]):
        log = open_traffic_log(path)
        log.start()
        for i, moment in enumerate(moments):
            log.submit({**make_row(f"run{run}-{i}"), "ts": moment}).result(timeout=30)
        log.close()
    folder = segments_folder(path)
    hour = lambda t: folder / f"day={t:%Y-%m-%d}" / f"{t:%H}.parquet"  # noqa: E731
    assert pq.read_table(hour(old))["exchange_id"].to_pylist() == ["run0-0"]
    assert sorted(pq.read_table(hour(now))["exchange_id"].to_pylist()) == ["run0-1", "run1-0"]
    complete = int((folder / COMPLETE_MARK).read_text())
    assert int(old.timestamp() // 3600) < complete <= int(now.timestamp() // 3600)
