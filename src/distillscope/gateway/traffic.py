"""The gateway's traffic log: every exchange, durable before its response is acknowledged.

A request handler ``await log.record(row)``. The row goes through a bounded queue to one writer
thread, off the request path, which takes whatever rows have arrived (group commit: up to
``batch_size``; ``max_wait_ms`` can hold a batch open longer, which only helps at very high
concurrency) and makes them durable in one go; the handler resumes only then, so a server killed
at any moment has logged every exchange it acknowledged, and only whole rows. Writes are idempotent
on ``exchange_id``; a failed write (a database restarting) is retried with backoff, never dropped;
a full queue makes ``record()`` wait instead of growing without bound.

Two backends hold the same table, ``exchanges`` (columns in ``EXCHANGE_SCHEMA``):

- a DuckDB file (one writing process). A DuckDB commit costs
  milliseconds of CPU whatever its size, so rows are made durable in a journal beside the file
  (``traffic.duckdb.journal/``, fsynced JSON lines, about 0.3 ms a batch) and loaded into DuckDB
  in large transactions every ``load_every_s`` seconds; a journal left by a crash is loaded at the
  next start. ``read()`` and ``count()`` first load everything acknowledged. Other processes
  cannot open the file while the gateway holds it, so the gateway also writes each closed hour
  as a Parquet segment beside it (``traffic.duckdb.segments/day=YYYY-MM-DD/HH.parquet``, five
  minutes after the hour, and the open hour when it stops): ``detect`` and ``watch`` read those
  while it serves.
- PostgreSQL (live reads from anywhere, several gateways), where each group is one transaction.

See docs/traffic-log.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import numbers
import os
import queue
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import duckdb
import psycopg
import pyarrow as pa

from distillscope.errors import DistillscopeError

logger = logging.getLogger(__name__)


class TrafficLogError(DistillscopeError):
    """A traffic log that cannot be opened or read, or a row that does not fit its table."""


_ARROW_TYPES = {
    "TEXT": pa.string(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "SMALLINT": pa.int16(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE PRECISION": pa.float64(),
    "BOOLEAN": pa.bool_(),
}
_INT_BITS = {"SMALLINT": 16, "INTEGER": 32, "BIGINT": 64}
#: Characters neither database can store in text: NUL and unpaired surrogates.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class _Column:
    name: str
    #: The type as DuckDB and PostgreSQL both spell it (DuckDB reads TEXT as VARCHAR).
    sql: str
    required: bool = False

    def clean(self, value: object) -> object:
        """``value`` as the table stores it; TrafficLogError when its type does not fit.

        Naive datetimes are taken as UTC; NUL and unpaired surrogates in text become U+FFFD.
        """
        if isinstance(value, bool):
            if self.sql == "BOOLEAN":
                return value
        elif self.sql == "TEXT":
            if isinstance(value, str):
                return _UNSTORABLE.sub("\ufffd", value)
        elif self.sql == "TIMESTAMPTZ":
            if isinstance(value, datetime):
                return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        elif self.sql == "DOUBLE PRECISION":
            if isinstance(value, numbers.Real):
                return float(value)
        elif self.sql in _INT_BITS and isinstance(value, numbers.Integral):
            limit = 2 ** (_INT_BITS[self.sql] - 1)
            if not -limit <= value < limit:
                raise TrafficLogError(f"traffic row {self.name}={value} does not fit {self.sql}")
            return int(value)
        raise TrafficLogError(
            f"traffic row {self.name} must be {self.sql}, not {type(value).__name__} {value!r:.40}"
        )


_COLUMNS = (
    _Column("exchange_id", "TEXT", required=True),
    _Column("ts", "TIMESTAMPTZ", required=True),
    _Column("account_id", "TEXT"),
    _Column("key_id", "TEXT"),
    _Column("tier", "TEXT"),
    _Column("client_ip", "TEXT"),
    _Column("user_agent", "TEXT"),
    _Column("endpoint", "TEXT", required=True),
    _Column("model", "TEXT"),
    _Column("messages", "TEXT"),
    _Column("prompt", "TEXT"),
    _Column("completion", "TEXT"),
    _Column("prompt_tokens", "INTEGER"),
    _Column("completion_tokens", "INTEGER"),
    _Column("latency_ms", "DOUBLE PRECISION"),
    _Column("stream", "BOOLEAN"),
    _Column("temperature", "DOUBLE PRECISION"),
    _Column("max_tokens", "INTEGER"),
    _Column("seed", "BIGINT"),
    _Column("exposure_requested", "TEXT"),
    _Column("exposure_served", "TEXT"),
    _Column("status", "SMALLINT", required=True),
    _Column("error_code", "TEXT"),
    _Column("finish_reason", "TEXT"),
    # added after the first release: a table made before gets them (``_ADD_COLUMNS``)
    _Column("tools", "TEXT"),
    _Column("tool_calls", "TEXT"),
    _Column("logit_bias", "TEXT"),
)
_NAMES = frozenset(column.name for column in _COLUMNS)
#: Columns added after the first release, in order: a log made before gets them on open, and a
#: journal segment written before is read with nulls for them.
_ADDED = ("tools", "tool_calls", "logit_bias")
_ADD_COLUMNS = [
    f"ALTER TABLE exchanges ADD COLUMN IF NOT EXISTS {c.name} {c.sql}"
    for c in _COLUMNS
    if c.name in _ADDED
]

#: The ``exchanges`` table as Arrow: what ``read()`` returns, column for column.
EXCHANGE_SCHEMA = pa.schema(
    [pa.field(c.name, _ARROW_TYPES[c.sql], nullable=not c.required) for c in _COLUMNS]
)

_CREATE_TABLE = "CREATE TABLE IF NOT EXISTS exchanges ({}, PRIMARY KEY (exchange_id))".format(
    ", ".join(f"{c.name} {c.sql}{' NOT NULL' if c.required else ''}" for c in _COLUMNS)
)
_COUNT_SCHEMA = pa.schema([("count", pa.int64())])
#: Marks the end of the queue: close() puts it after the last row.
_STOP = object()
_FIRST_RETRY_S = 0.05
_MAX_RETRY_S = 5.0
#: read() and count() put one of these in the queue: every row acknowledged before is loaded.
_FLUSH = object()


class _Journal:
    """Rows acknowledged to clients but not yet in the database, in fsynced files on local disk.

    Rows go to the open segment (one JSON array per line); a sealed segment is handed to the
    database in one transaction and deleted once that committed. A segment left by a killed process
    is loaded again at the next start (inserts are idempotent on ``exchange_id``); a torn last line
    was never acknowledged (the fsync had not returned), so it is dropped.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: list[tuple] = []
        self.opened_at = 0.0
        self._file = None
        self._path: Path | None = None

    def leftovers(self) -> list[Path]:
        return sorted(self.folder.glob("segment-*.jsonl")) if self.folder.is_dir() else []

    @staticmethod
    def load(path: Path) -> list[tuple]:
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                values = json.loads(line)
            except json.JSONDecodeError:
                break  # torn by a kill mid-write: never acknowledged
            values[1] = datetime.fromisoformat(values[1])
            values += [None] * (len(_COLUMNS) - len(values))  # a segment from before _ADDED
            rows.append(tuple(values))
        return rows

    def append(self, rows: list[tuple]) -> None:
        """Write and fsync ``rows``: once this returns they survive a crash."""
        if self._file is None:
            self.folder.mkdir(exist_ok=True)
            self._path = self.folder / f"segment-{time.time_ns():020d}.jsonl"
            self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115
            _fsync_folder(self.folder)  # the new file's name is durable too
            self.opened_at = time.monotonic()
        lines = [
            json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in row])
            for row in rows
        ]
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.extend(rows)

    def seal(self) -> tuple[Path | None, list[tuple]]:
        """Close the open segment; its path and rows (``None, []`` when there is none)."""
        if self._file is None:
            return None, []
        self._file.close()
        sealed = (self._path, self.rows)
        self._file, self._path, self.rows = None, None, []
        return sealed


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _row_values(row: Mapping[str, object]) -> tuple:
    """The row's values in column order, checked and cleaned; TrafficLogError if it does not fit."""
    if not isinstance(row, Mapping):
        raise TrafficLogError(f"traffic row must be a dict, not {type(row).__name__}")
    unknown = row.keys() - _NAMES
    if unknown:
        raise TrafficLogError(f"traffic row has unknown fields: {', '.join(sorted(unknown))}")
    values = []
    for column in _COLUMNS:
        value = row.get(column.name)
        if value is not None:
            value = column.clean(value)
        elif column.required:
            raise TrafficLogError(f"traffic row is missing {column.name}")
        values.append(value)
    return tuple(values)


def _arrow_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    """Rows of values in the schema's column order, as an Arrow table."""
    columns = list(zip(*rows)) if rows else [()] * len(schema)
    return pa.Table.from_arrays(
        [pa.array(values, type=field.type) for values, field in zip(columns, schema)],
        schema=schema,
    )


def _select(what: str, where: str | None) -> str:
    return f"SELECT {what} FROM exchanges" + (f" WHERE {where}" if where else "")


def _check_columns(target: str, names: list[str]) -> None:
    """Refuse an ``exchanges`` table made by something else: its inserts would fail forever."""
    if names != EXCHANGE_SCHEMA.names:
        raise TrafficLogError(f"{target} has an exchanges table with other columns: {names}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class TrafficLog:
    """Where a gateway records exchanges; ``open_traffic_log`` picks the backend.

    ``record``/``submit`` return once the row is committed. Subclasses say how to connect
    (``_open``), write one batch in one idempotent transaction (``_write``), query (``_query``)
    and let go of their connections (``_release``).
    """

    target: str

    def __init__(
        self,
        target: str,
        *,
        batch_size: int = 512,
        max_wait_ms: float = 0.0,
        max_queue: int = 100_000,
        journal: Path | None = None,
        load_every_s: float = 0.5,
        load_rows: int = 8192,
    ) -> None:
        if batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise TrafficLogError(
                "traffic log needs batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0"
            )
        self.target = target
        self.batch_size = batch_size
        self.max_wait_ms = max_wait_ms
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        #: One slot per row queued or being written: the bound on memory, and the backpressure.
        self._slots = threading.Semaphore(max_queue)
        self._lock = threading.Lock()
        self._state = "new"
        self._writer: threading.Thread | None = None
        #: With a journal, rows are acknowledged once fsynced there and loaded in large batches.
        self._journal = _Journal(journal) if journal is not None else None
        self.load_every_s = load_every_s
        self.load_rows = load_rows
        self._loads: queue.Queue = queue.Queue()
        self._loader: threading.Thread | None = None

    def __enter__(self) -> TrafficLog:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the table if missing and start the writer thread."""
        with self._lock:
            if self._state != "new":
                raise TrafficLogError(f"traffic log {self.target} was already started")
            self._open()
            if self._journal is not None:
                for segment in self._journal.leftovers():  # acknowledged before a crash
                    self._write(_Journal.load(segment))
                    segment.unlink()
            self._state = "open"
        self._writer = threading.Thread(target=self._write_loop, name="traffic-log", daemon=True)
        self._writer.start()
        if self._journal is not None:
            self._loader = threading.Thread(
                target=self._load_loop, name="traffic-load", daemon=True
            )
            self._loader.start()

    async def record(self, row: dict) -> None:
        """Log one exchange; return once it is committed. Waits while the queue is full."""
        values = _row_values(row)
        delay = 0.001
        while not self._slots.acquire(blocking=False):
            if self._state != "open":
                raise self._refusal()
            await asyncio.sleep(delay)  # polling, unlike a thread, holds no slot if cancelled
            delay = min(2 * delay, 0.05)
        await asyncio.wrap_future(self._enqueue(values))

    def submit(self, row: dict) -> Future:
        """Log one exchange from any thread; the future resolves once it is committed.

        Blocks while the queue is full. Raises TrafficLogError at once for a row that does not
        fit the table, or a log that is not open.
        """
        values = _row_values(row)
        self._take_slot()
        return self._enqueue(values)

    def close(self, timeout: float = 30) -> None:
        """Commit everything queued, then close. Safe to call twice."""
        with self._lock:
            if self._state == "open":
                self._queue.put(_STOP)
            self._state = "closed"
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                raise TrafficLogError(
                    f"traffic log {self.target}: rows still unwritten after {timeout:g} s"
                    " (is the database reachable?)"
                )
        self._release()

    def read(self, where: str | None = None) -> pa.Table:
        """All rows (``where``: a SQL condition), ordered by ts, then exchange_id."""
        self._flush()
        return self._query(_select("*", where) + " ORDER BY ts, exchange_id", EXCHANGE_SCHEMA)

    def count(self, where: str | None = None) -> int:
        """How many rows (``where``: a SQL condition)."""
        self._flush()
        return self._query(_select("count(*) AS count", where), _COUNT_SCHEMA)[0][0].as_py()

    def _flush(self) -> None:
        """Wait until every row acknowledged so far is in the database (journal mode only)."""
        if self._journal is None or self._state != "open":
            return
        done: Future = Future()
        self._queue.put((_FLUSH, done))
        done.result()

    def _take_slot(self) -> None:
        while not self._slots.acquire(timeout=0.1):
            if self._state != "open":
                raise self._refusal()

    def _enqueue(self, values: tuple) -> Future:
        """Queue a row that holds its slot (given back if the log is not open)."""
        future: Future = Future()
        with self._lock:
            if self._state == "open":
                self._queue.put((values, future))
                return future
        self._slots.release()
        raise self._refusal()

    def _refusal(self) -> TrafficLogError:
        if self._state == "closed":
            return TrafficLogError(f"traffic log {self.target} is closed")
        return TrafficLogError(f"traffic log {self.target} is not started (call start() first)")

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch, flushes, stopping = self._next_batch()
            if self._journal is None:
                if batch:
                    self._write_retrying([values for values, _ in batch])
                    self._acknowledge(batch)
                    self._slots.release(len(batch))
                    self._after_write()
                continue
            if batch:
                self._journal.append([values for values, _ in batch])
                self._acknowledge(batch)
            journal = self._journal
            due = journal.rows and time.monotonic() - journal.opened_at >= self.load_every_s
            if flushes or stopping or due or len(journal.rows) >= self.load_rows:
                self._loads.put((*journal.seal(), flushes))
        if self._loader is not None:
            self._loads.put(_STOP)
            self._loader.join()

    def _load_loop(self) -> None:
        """Load sealed journal segments into the database, one transaction each."""
        while (item := self._loads.get()) is not _STOP:
            segment, rows, flushes = item
            if rows:
                self._write_retrying(rows)
                self._slots.release(len(rows))
                self._after_write()
            elif flushes:
                self._after_write()
            if segment is not None:
                segment.unlink()
            for done in flushes:
                done.set_result(None)

    def _next_batch(self) -> tuple[list, list, bool]:
        """Up to batch_size queued rows (waiting at most max_wait_ms after the first), the flush
        requests among them, and whether close() was called. In journal mode an idle wait ends
        when the open segment is due for loading."""
        timeout = None
        if self._journal is not None and self._journal.rows:
            timeout = max(0.0, self._journal.opened_at + self.load_every_s - time.monotonic())
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], [], False
        batch, flushes = [], []
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while True:
            if item is _STOP:
                return batch, flushes, True
            if item[0] is _FLUSH:
                flushes.append(item[1])
            else:
                batch.append(item)
            if len(batch) >= self.batch_size:
                return batch, flushes, False
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, flushes, False

    def _write_retrying(self, rows: list[tuple]) -> None:
        """Write rows in one transaction, retrying until it is committed: never drop them."""
        delay = _FIRST_RETRY_S
        while True:
            try:
                self._write(rows)
                return
            except Exception as error:  # any failure: the rows must not be lost
                logger.warning(
                    "traffic log %s: writing %d rows failed (%s); retrying in %.2f s",
                    self.target,
                    len(rows),
                    _first_line(error),
                    delay,
                )
                time.sleep(delay)
                delay = min(2 * delay, _MAX_RETRY_S)

    @staticmethod
    def _acknowledge(batch: list[tuple[tuple, Future]]) -> None:
        for _, future in batch:
            if future.set_running_or_notify_cancel():  # a cancelled caller is not waiting
                future.set_result(None)

    def _open(self) -> None:
        raise NotImplementedError

    def _write(self, rows: list[tuple]) -> None:
        raise NotImplementedError

    def _query(self, sql: str, schema: pa.Schema) -> pa.Table:
        raise NotImplementedError

    def _after_write(self) -> None:
        """Called by the writing thread after each batch is in the database."""

    def _release(self) -> None:
        raise NotImplementedError


class NullTrafficLog(TrafficLog):
    """Logging off: ``record()`` returns at once and nothing is kept (for benchmarks)."""

    def __init__(self) -> None:
        super().__init__("off")

    def start(self) -> None:
        pass

    async def record(self, row: dict) -> None:
        pass

    def submit(self, row: dict) -> Future:
        future: Future = Future()
        future.set_result(None)
        return future

    def close(self, timeout: float = 30) -> None:
        pass

    def read(self, where: str | None = None) -> pa.Table:
        return EXCHANGE_SCHEMA.empty_table()

    def count(self, where: str | None = None) -> int:
        return 0


class DuckDBTrafficLog(TrafficLog):
    """The log in a DuckDB file, which only one process can hold open for writing.

    Rows are acknowledged from the journal; each load is one ``INSERT ... SELECT`` from an Arrow
    table, a transaction of its own (10-20%
    less CPU than DuckDB's appender through a staging table, measured on this schema). A batch
    holding an ``exchange_id`` already logged fails whole and goes again as ``INSERT OR IGNORE``,
    which would cost 40% more on every batch.
    """

    def __init__(self, path: Path, *, segments: bool = True, **options) -> None:
        super().__init__(str(path), journal=path.with_name(f"{path.name}.journal"), **options)
        self.path = path
        self._con: duckdb.DuckDBPyConnection | None = None
        self._reader_lock = threading.Lock()
        #: where closed hours go as Parquet (``segments_folder``), or None for none
        self.segments = segments_folder(path) if segments else None
        self._next_export = 0.0
        #: the earliest hour of a row written since the last export: a row stamped in an hour
        #: already written (a replay of old traffic, a generation that outlasted the grace)
        #: has its hour written again
        self._written_from: int | None = None

    def export_segments(self) -> None:
        """Write every closed hour's segment now (after the rows acknowledged so far are in the
        database), not at the next once-a-minute export."""
        self._next_export = 0.0
        self._flush()

    def _after_write(self) -> None:
        """Once a minute: write every hour closed for ``SEGMENT_GRACE`` and not yet written, and
        again each earlier hour that rows were written to since."""
        if self.segments is None or time.monotonic() < self._next_export:
            return
        self._next_export = time.monotonic() + 60
        closed = _hour_index(datetime.now(UTC) - SEGMENT_GRACE)
        start, late = self._complete_until(), self._written_from
        if start is not None and late is not None:
            start = min(start, late)
        try:
            self._export_hours(start, closed, final=True)
            self._written_from = None
        except (duckdb.Error, OSError) as error:  # a derived copy: the rows are safe in the file
            logger.warning("cannot write traffic segments to %s: %s", self.segments, error)

    def _complete_until(self) -> int | None:
        mark = self.segments / COMPLETE_MARK
        try:
            return int(mark.read_text().strip())
        except (OSError, ValueError):
            return None

    def _export_hours(self, start: int | None, end: int, *, final: bool) -> None:
        """Write the hours in [start, end) that hold rows (from the first row when ``start`` is
        None), each replacing its file atomically; ``final`` records them as complete."""
        where = "" if start is None else f"WHERE ts >= to_timestamp({start * 3600})"
        hours = [
            int(h)
            for (h,) in self._con.execute(
                f"SELECT DISTINCT floor(epoch(ts) / 3600)::BIGINT AS h FROM exchanges {where} "
                "ORDER BY h"
            ).fetchall()
            if h < end
        ]
        for hour in hours:
            begin = datetime.fromtimestamp(hour * 3600, UTC)
            target = self.segments / f"day={begin:%Y-%m-%d}" / f"{begin:%H}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_name(f".{target.name}.tmp")
            self._con.execute(
                f"COPY (SELECT * FROM exchanges WHERE ts >= to_timestamp({hour * 3600}) AND "
                f"ts < to_timestamp({(hour + 1) * 3600}) ORDER BY ts, exchange_id) "
                f"TO '{_quoted(staging)}' (FORMAT parquet)"
            )
            os.replace(staging, target)
        done = self._complete_until()
        if final and (done is None or end > done):
            self.segments.mkdir(parents=True, exist_ok=True)
            (self.segments / COMPLETE_MARK).write_text(f"{end}\n")

    def _open(self) -> None:
        try:
            self._con = duckdb.connect(self.target)
            self._con.execute(_CREATE_TABLE)
            for statement in _ADD_COLUMNS:
                self._con.execute(statement)
            _check_columns(self.target, self._con.sql("SELECT * FROM exchanges LIMIT 0").columns)
        except duckdb.Error as error:
            raise TrafficLogError(f"cannot open {self.target}: {_first_line(error)}") from None
        #: A second connection to the same database, for read() while the writer runs.
        self._reader = self._con.cursor()

    def _write(self, rows: list[tuple]) -> None:
        if self.segments is not None and rows:
            first = _hour_index(min(row[1] for row in rows))
            if self._written_from is None or first < self._written_from:
                self._written_from = first
        self._con.register("incoming", _arrow_table(rows, EXCHANGE_SCHEMA))
        try:
            try:
                self._con.execute("INSERT INTO exchanges SELECT * FROM incoming")
            except duckdb.ConstraintException:
                self._con.execute("INSERT OR IGNORE INTO exchanges SELECT * FROM incoming")
        finally:
            self._con.unregister("incoming")

    def _query(self, sql: str, schema: pa.Schema) -> pa.Table:
        try:
            with self._reader_lock:
                if self._con is not None:
                    return self._reader.sql(sql).to_arrow_table().cast(schema)
            if not self.path.is_file():
                raise TrafficLogError(f"no traffic log at {self.path}")
            with duckdb.connect(self.target, read_only=True) as con:
                return con.sql(sql).to_arrow_table().cast(schema)
        except duckdb.IOException as error:
            raise TrafficLogError(
                f"cannot read traffic log {self.target} ({_first_line(error)}); a running gateway"
                " locks its DuckDB file: read it after stopping the server, or log to PostgreSQL"
            ) from None
        except duckdb.Error as error:
            raise TrafficLogError(f"cannot read {self.target}: {_first_line(error)}") from None

    def _release(self) -> None:
        with self._reader_lock:
            if self._con is not None:
                if self.segments is not None:  # the open hours too, as they stand
                    try:
                        now = _hour_index(datetime.now(UTC)) + 1
                        self._export_hours(self._complete_until(), now, final=False)
                    except (duckdb.Error, OSError) as error:
                        logger.warning("cannot write traffic segments: %s", error)
                self._reader.close()
                self._con.close()
                self._con = None


#: An hour's segment is written this long after the hour ends (a row's ``ts`` is when its
#: request arrived; a long generation is logged when it ends).
SEGMENT_GRACE = timedelta(minutes=5)
#: The file in the segments folder that records up to which hour (hours since 1970, exclusive)
#: the segments are complete.
COMPLETE_MARK = "_complete_until"


def segments_folder(path: str | os.PathLike) -> Path:
    """Where the gateway writes the hourly Parquet segments of the DuckDB log at ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.segments")


def held_log_segments(path: str | os.PathLike) -> tuple[Path, str] | None:
    """For a DuckDB log another process holds: its segments folder and a note saying up to
    when it is complete, or None when it has no segment yet."""
    folder = segments_folder(path)
    if not folder.is_dir() or not any(folder.rglob("*.parquet")):
        return None
    try:
        until = int((folder / COMPLETE_MARK).read_text().strip())
        upto = f"complete up to {datetime.fromtimestamp(until * 3600, UTC):%Y-%m-%d %H:00} UTC"
    except (OSError, ValueError):
        upto = "as a stopped gateway left them"
    note = f"{path} is held by a running gateway: read its hourly segments in {folder} ({upto})"
    return folder, note


def _quoted(path: str | os.PathLike) -> str:
    """A path inside a single-quoted SQL string literal."""
    return str(path).replace("'", "''")


def _hour_index(moment: datetime) -> int:
    return int(moment.timestamp() // 3600)


class PostgresTrafficLog(TrafficLog):
    """The log in PostgreSQL: binary COPY into a temporary staging table, then ``INSERT ... ON
    CONFLICT DO NOTHING`` in the same transaction. Reads use their own connection."""

    def __init__(self, url: str, **options) -> None:
        super().__init__(_without_password(url), **options)
        self.url = url
        self._conn: psycopg.Connection | None = None

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=10, application_name="distillscope-traffic"
        )

    def _open(self) -> None:
        try:
            self._conn = self._connect()
            self._conn.execute(_CREATE_TABLE)
            for statement in _ADD_COLUMNS:
                self._conn.execute(statement)
            self._conn.execute("CREATE INDEX IF NOT EXISTS exchanges_ts ON exchanges (ts)")
            columns = self._conn.execute("SELECT * FROM exchanges LIMIT 0").description
            _check_columns(self.target, [column.name for column in columns])
            self._prepare_staging(self._conn)
        except psycopg.Error as error:
            raise TrafficLogError(f"cannot open {self.target}: {_first_line(error)}") from None

    @staticmethod
    def _prepare_staging(conn: psycopg.Connection) -> None:
        conn.execute("CREATE TEMP TABLE incoming (LIKE exchanges) ON COMMIT DELETE ROWS")

    def _write(self, rows: list[tuple]) -> None:
        if self._conn is None:
            conn = self._connect()
            self._prepare_staging(conn)
            self._conn = conn
        try:
            with self._conn.transaction(), self._conn.cursor() as cursor:
                with cursor.copy("COPY incoming FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types([column.sql.lower() for column in _COLUMNS])
                    for row in rows:
                        copy.write_row(row)
                cursor.execute(
                    "INSERT INTO exchanges SELECT * FROM incoming ON CONFLICT DO NOTHING"
                )
        except Exception:
            # The connection may be gone (a restarting server): start afresh on the next try.
            self._conn.close()
            self._conn = None
            raise

    def _query(self, sql: str, schema: pa.Schema) -> pa.Table:
        try:
            with psycopg.connect(self.url, connect_timeout=10) as conn:
                rows = conn.execute(sql).fetchall()
        except psycopg.Error as error:
            raise TrafficLogError(f"cannot read {self.target}: {_first_line(error)}") from None
        return _arrow_table(rows, schema)

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _without_password(url: str) -> str:
    """``url`` with any password left out, fit for messages."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    return urlunsplit(
        parts._replace(netloc=userinfo.partition(":")[0] + at + host, query=urlencode(query))
    )


def open_traffic_log(
    target: str | os.PathLike | None,
    *,
    batch_size: int = 512,
    max_wait_ms: float = 0.0,
    max_queue: int = 100_000,
) -> TrafficLog:
    """The traffic log at ``target``, not yet started (use it as a context manager, or start()).

    ``None``, ``""`` or ``"off"``: logging off. ``postgresql://...`` or ``postgres://...``: a
    PostgreSQL database. Anything else: a DuckDB file, created if missing.
    """
    if target is None or os.fspath(target) in ("", "off"):
        return NullTrafficLog()
    options = {"batch_size": batch_size, "max_wait_ms": max_wait_ms, "max_queue": max_queue}
    text = os.fspath(target)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresTrafficLog(text, **options)
    path = Path(text).expanduser()
    if path.is_dir():
        raise TrafficLogError(
            f"traffic log {path} is a folder; give a file, e.g. {path}/traffic.db"
        )
    if not path.parent.is_dir():
        raise TrafficLogError(f"cannot create traffic log {path}: no folder {path.parent}")
    return DuckDBTrafficLog(path, **options)


def read_traffic(target: str | os.PathLike) -> pa.Table:
    """Every row of a traffic log, ordered by ts. A DuckDB file is opened read-only, unless a
    crashed gateway left journal segments: then they are loaded into it first."""
    log = open_traffic_log(target)
    if isinstance(log, NullTrafficLog):
        raise TrafficLogError("traffic logging is off: there is no log to read")
    try:
        table = log.read()  # a gateway still running holds the file: this says so
    except TrafficLogError:
        found = held_log_segments(target) if isinstance(log, DuckDBTrafficLog) else None
        if found is None:
            raise
        logger.info(found[1])
        with duckdb.connect() as con:
            query = (
                f"SELECT * FROM read_parquet('{_quoted(found[0])}/**/*.parquet', "
                "union_by_name = true)"
            )
            return con.sql(f"{query} ORDER BY ts, exchange_id").to_arrow_table()
    if log._journal is None or not log._journal.leftovers():
        return table
    with log:
        return log.read()
