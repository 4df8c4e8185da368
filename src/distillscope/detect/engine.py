"""Where the detector's relational steps run: DuckDB in this process, or Apache Spark.

Every relational step (loading and cleaning, normalising and shingling, LSH banding, per-account
aggregates, co-hit pairs) is one SQL text, written once, in the subset of SQL that DuckDB and
Spark SQL both read the same way (``CAST``, ``FILTER``, ``GROUP BY ALL``, window functions,
``date_trunc``, ``any_value``...). Where the two spell a thing differently or mean different
things by one spelling (an array's length, slices, splitting into words, a stable 64-bit hash,
seconds since the epoch, ordered aggregation) the text calls a Jinja macro, and each engine
renders it its own way: the approach of dbt's cross-database macros. A transpiler was tried
first: sqlglot's DuckDB-to-Spark output was wrong for six of the twelve constructs the detector
uses (array length as string ``LENGTH``, DuckDB slices left as they were, ``range`` unnested
into an unbound alias, ``epoch`` of an interval, ``time_bucket`` as ``DATE_BIN``, and an ordered
``list`` losing its order), and a macro says in one line what a transpiler rule would hide.

The steps that are Python, not SQL (MinHash, the elicitation classifier), are one function over
Arrow record batches that both engines run: DuckDB on the fetched table in this process, Spark
inside its executors (``mapInArrow``). The small steps (the suspect graph, communities, the
permutation null, the learned scorer) run on the driver over fetched tables.

``hash64`` is the same integer on both engines (the first 60 bits of the MD5 of the text), so
the two engines' templates, catalogues and samples are the same sets, and the detector's flags,
clusters and scores agree (``tests/test_detect_spark.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
from jinja2 import Environment, StrictUndefined

#: A step run over Arrow batches: every batch of its input in, batches of its output out.
BatchFunction = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


class EngineError(Exception):
    """An engine that cannot start (``detect`` turns it into a one-line ``DetectError``)."""


def quote(path: str | os.PathLike) -> str:
    """``path`` inside a single-quoted SQL literal."""
    return str(path).replace("'", "''")


class Engine(ABC):
    """One SQL text, two engines: ``render`` fills its macros, the rest executes it."""

    name = "engine"

    def __init__(self) -> None:
        self._jinja = Environment(undefined=StrictUndefined, autoescape=False)
        self._macros = {
            name[len("m_") :]: getattr(self, name) for name in dir(self) if name.startswith("m_")
        }

    def render(self, sql: str, **values) -> str:
        return self._jinja.from_string(sql).render(**self._macros, **values)

    # -- what each engine implements -------------------------------------------------------
    @abstractmethod
    def create(self, name: str, sql: str, **values) -> None:
        """Materialise ``sql`` as table ``name`` (replacing it; ``sql`` may read the old one)."""

    @abstractmethod
    def fetch(self, sql: str, **values) -> pa.Table: ...

    @abstractmethod
    def register(self, name: str, table: pa.Table) -> None: ...

    @abstractmethod
    def drop(self, name: str) -> None: ...

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def columns(self, name: str) -> dict[str, str]:
        """``{column: type}`` of a table, the type upper-cased as the engine names it."""

    @abstractmethod
    def read_parquet(self, name: str, path: str | os.PathLike) -> None:
        """Table ``name``: a Parquet file, or every Parquet file under a folder (any depth,
        columns united by name)."""

    @abstractmethod
    def read_days(self, name: str, folder: str | os.PathLike, before: date | None) -> bool:
        """View ``name``: the rows of the day partitions under ``folder`` (``day=YYYY-MM-DD/``
        folders of Parquet, what ``write_days`` writes) of days before ``before`` (all days when
        None), with their ``day`` (a DATE) as the last column. False, and nothing made, when
        the folder holds no partition."""

    def write_days(self, name: str, folder: str | os.PathLike, days: Iterable[date]) -> None:
        """Write the rows of table ``name`` (which has a ``day`` DATE column) of each of ``days``
        as partition ``folder/day=YYYY-MM-DD/``, replacing what that partition held; a day
        without rows is left without a partition. Written beside ``folder`` first, then moved
        in: a partition is never half written (a crash while moving can leave a day without
        one: ``detect.state`` lists a day only once all its partitions are in place)."""
        days = sorted(set(days))
        if not days:
            return
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        written = folder.parent / f".{folder.name}.writing"
        shutil.rmtree(written, ignore_errors=True)
        self._write_partitions(name, written, days)
        folder.mkdir(parents=True, exist_ok=True)
        for day in days:
            shutil.rmtree(folder / f"day={day.isoformat()}", ignore_errors=True)
        if written.is_dir():
            for part in written.glob("day=*"):
                part.rename(folder / part.name)
        shutil.rmtree(written, ignore_errors=True)

    @abstractmethod
    def _write_partitions(self, name: str, written: Path, days: list[date]) -> None:
        """The rows of ``name`` of ``days`` as ``day=`` partitions of the new folder
        ``written``."""

    @staticmethod
    def _partitions(folder: str | os.PathLike) -> list[Path]:
        folder = Path(folder)
        return sorted(folder.glob("day=*")) if folder.is_dir() else []

    @abstractmethod
    def map_batches(
        self, name: str, sql: str, function: BatchFunction, schema: pa.Schema, *,
        partition_by: str | None = None, order_by: str | None = None,
    ) -> None:  # fmt: skip
        """Table ``name``: ``function`` over the rows of ``sql``, which reach it hash-partitioned
        by ``partition_by`` and sorted by ``order_by`` within each partition (so every group of
        ``partition_by`` is whole and contiguous within one call)."""

    @abstractmethod
    def close(self) -> None:
        """Let go of what the engine holds (tables, the connection)."""

    def scalar(self, sql: str, **values):
        table = self.fetch(sql, **values)
        return table.column(0)[0].as_py() if table.num_rows else None

    # -- the macros: ``{{ name(args) }}`` in a step's SQL, args as SQL text ------------------
    @abstractmethod
    def m_words(self, text: str) -> str:
        """The words of ``text`` (an array of strings), split on runs of spaces."""

    @abstractmethod
    def m_size(self, array: str) -> str: ...

    @abstractmethod
    def m_slice(self, array: str, start, length) -> str:
        """``length`` elements from the 1-based ``start`` (negative: from the end)."""

    @abstractmethod
    def m_join(self, array: str, sep: str) -> str: ...

    @abstractmethod
    def m_hash64(self, text: str) -> str:
        """A stable non-negative 64-bit hash of ``text``, equal on every engine."""

    @abstractmethod
    def m_epoch_us(self, ts: str) -> str: ...

    @abstractmethod
    def m_idiv(self, a, b) -> str: ...

    @abstractmethod
    def m_row_id(self) -> str:
        """A unique integer per row (not consecutive on Spark)."""

    @abstractmethod
    def m_matches(self, text: str, pattern: str) -> str: ...

    @abstractmethod
    def m_replace_all(self, text: str, pattern: str, by: str) -> str: ...

    @abstractmethod
    def m_extract_all(self, text: str, pattern: str, group: int) -> str: ...

    @abstractmethod
    def m_series(self, start, stop) -> str:
        """In a select list: one row per integer from ``start`` to ``stop``, both included."""

    @abstractmethod
    def m_sorted_set(self, array: str) -> str:
        """The distinct elements of ``array``, sorted."""

    @abstractmethod
    def m_agg_sorted_distinct(self, expr: str, sep: str) -> str:
        """Aggregate: the distinct values of ``expr`` sorted and joined by ``sep``."""

    @abstractmethod
    def m_agg_ordered(self, expr: str, order: str, sep: str | None = None) -> str:
        """Aggregate: the values of ``expr`` ordered by the integer ``order``, as an array (or
        as text joined by ``sep``)."""

    @abstractmethod
    def m_to_timestamp(self, text: str) -> str: ...


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _apply(function: BatchFunction, rows: pa.Table, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_batches(list(function(iter(rows.to_batches()))), schema=schema)


def _in_processes(function, rows: pa.Table, schema: pa.Schema, workers: int) -> pa.Table | None:
    """``function`` over slices of ``rows`` in ``workers`` fresh processes (spawned: this one
    holds DuckDB's threads), in order; None when ``function`` cannot be sent to them (a
    lambda), or when they die starting (a script calling ``detect`` without an ``if __name__ ==
    "__main__":`` guard: each spawned process runs the script again and is refused), and the
    caller runs it here."""
    import multiprocessing
    import pickle
    import warnings
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        pickle.dumps(function)
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    size = -(-rows.num_rows // (4 * workers))
    slices = [rows.slice(start, size) for start in range(0, rows.num_rows, size)]
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = list(pool.map(_apply, [function] * len(slices), slices,
                                  [schema] * len(slices)))  # fmt: skip
    except BrokenProcessPool:
        warnings.warn(
            "the worker processes died (a script calling distillscope without an "
            '`if __name__ == "__main__":` guard runs again in each of them and is refused; or '
            "they ran out of memory); running on one core instead: under that guard, every "
            "core is used",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return pa.concat_tables(parts)


class DuckEngine(Engine):
    """DuckDB in this process (the default): one connection, tables in memory."""

    name = "duckdb"

    def __init__(self, con=None, *, workers: int | None = None, parallel_rows: int = 100_000):
        super().__init__()
        self.con = con if con is not None else duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        #: ``map_batches`` of at least ``parallel_rows`` rows (without ``partition_by``) runs its
        #: Python function in this many processes: the elicitation classifier is the detector's
        #: largest single-core step, while DuckDB's own threads idle
        self.workers = workers or _cores()
        self.parallel_rows = parallel_rows

    def create(self, name, sql, **values):
        self.con.execute(f"CREATE OR REPLACE TABLE {name}__new AS {self.render(sql, **values)}")
        self.con.execute(f"DROP TABLE IF EXISTS {name}")
        self.con.execute(f"ALTER TABLE {name}__new RENAME TO {name}")

    def fetch(self, sql, **values):
        return self.con.sql(self.render(sql, **values)).to_arrow_table()

    def register(self, name, table):
        self.con.register(name, table)

    def drop(self, name):
        self.con.unregister(name)  # a registered Arrow table (nothing when it is not one)
        for kind in ("TABLE", "VIEW"):
            try:
                self.con.execute(f"DROP {kind} IF EXISTS {name}")
            except duckdb.CatalogException:  # the other kind
                pass

    def has(self, name):
        # a table, a view (read_parquet's) or a registered Arrow table alike
        try:
            self.con.execute(f"SELECT 1 FROM {name} LIMIT 0")
        except duckdb.CatalogException:
            return False
        return True

    def columns(self, name):
        return {r[0]: r[1].upper() for r in self.con.execute(f"DESCRIBE {name}").fetchall()}

    def read_parquet(self, name, path):
        path = Path(path)
        glob = f"{path}/**/*.parquet" if path.is_dir() else str(path)
        self.con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet("
            f"'{quote(glob)}', union_by_name = true)"
        )

    def read_days(self, name, folder, before):
        if not self._partitions(folder):
            return False
        cut = f"WHERE day < DATE '{before.isoformat()}'" if before is not None else ""
        self.con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet("
            f"'{quote(Path(folder))}/day=*/*.parquet', hive_partitioning = true, "
            f"hive_types = {{'day': DATE}}) {cut}"
        )
        return True

    def _write_partitions(self, name, written, days):
        listed = ", ".join(f"DATE '{d.isoformat()}'" for d in days)
        self.con.execute(
            f"COPY (SELECT * FROM {name} WHERE day IN ({listed})) TO '{quote(written)}' "
            "(FORMAT PARQUET, PARTITION_BY (day))"
        )

    def map_batches(self, name, sql, function, schema, *, partition_by=None, order_by=None):
        order = f" ORDER BY {order_by}" if order_by else ""
        rows = self.con.sql(f"SELECT * FROM ({self.render(sql)}){order}").to_arrow_table()
        if partition_by is None and self.workers > 1 and rows.num_rows >= self.parallel_rows:
            out = _in_processes(function, rows, schema, self.workers)
            if out is not None:
                self.con.register(name, out)
                return
        out = list(function(iter(rows.to_batches(max_chunksize=1 << 20))))
        self.con.register(name, pa.Table.from_batches(out, schema=schema))

    def close(self):
        self.con.close()

    def m_words(self, text):
        return f"string_split(regexp_replace({text}, ' +', ' ', 'g'), ' ')"

    def m_size(self, array):
        return f"len({array})"

    def m_slice(self, array, start, length):
        # 1-based and inclusive at both ends; [-8:-1] is the last eight
        return f"{array}[{start}:{start} + {length} - 1]"

    def m_join(self, array, sep):
        return f"array_to_string({array}, {sep})"

    def m_hash64(self, text):
        return f"('0x' || md5({text})[1:15])::BIGINT"

    def m_epoch_us(self, ts):
        return f"epoch_us({ts})"

    def m_idiv(self, a, b):
        return f"(({a}) // ({b}))"

    def m_row_id(self):
        return "row_number() OVER ()"

    def m_matches(self, text, pattern):
        return f"regexp_matches({text}, {pattern})"

    def m_replace_all(self, text, pattern, by):
        return f"regexp_replace({text}, {pattern}, {by}, 'g')"

    def m_extract_all(self, text, pattern, group):
        return f"regexp_extract_all({text}, {pattern}, {group})"

    def m_series(self, start, stop):
        return f"unnest(generate_series({start}, {stop}))"

    def m_sorted_set(self, array):
        return f"list_sort(list_distinct({array}))"

    def m_agg_sorted_distinct(self, expr, sep):
        return f"string_agg(DISTINCT {expr}, {sep} ORDER BY {expr})"

    def m_agg_ordered(self, expr, order, sep=None):
        if sep is None:
            return f"list({expr} ORDER BY {order})"
        return f"string_agg(CAST({expr} AS STRING), {sep} ORDER BY {order})"

    def m_to_timestamp(self, text):
        return f"try_cast({text} AS TIMESTAMPTZ)"


class SparkEngine(Engine):
    """Apache Spark: ``local[N]`` on this machine, or a cluster's ``spark://`` (or ``yarn``,
    ``k8s://``) master URL. Tables are temporary views of persisted DataFrames."""

    name = "spark"

    def __init__(self, master: str | None = None, *, partitions: int | None = None,
                 scratch: str | None = None,
                 config: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__()
        # PySpark warns about pandas 3 on every import of its Arrow paths; it uses none of it here
        warnings.filterwarnings(
            "ignore", message="PySpark does not yet fully support pandas", category=FutureWarning
        )
        self._version = 0
        #: where tables are materialised: a local temporary folder by default; on a cluster,
        #: storage every executor reaches (``hdfs://``, ``s3a://``)
        self.scratch = scratch
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise EngineError(
                "the Spark engine needs PySpark: pip install 'distillscope[spark]'"
            ) from None
        master = master or f"local[{os.cpu_count() or 2}]"
        if master.startswith("local"):
            # the executors are this machine's Python workers: this interpreter, which has
            # distillscope (on a cluster, install distillscope[detect] on every executor)
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (
            SparkSession.builder.master(master)
            .appName("distillscope-detect")
            .config("spark.sql.session.timeZone", "UTC")
            # string literals as written (regular expressions keep their backslashes, as in
            # DuckDB): the detector's SQL is one text for both engines
            .config("spark.sql.parser.escapedStringLiterals", "true")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.adaptive.enabled", "true")
            .config("spark.sql.ansi.enabled", "false")
        )
        if master.startswith("local"):
            if partitions is None:
                partitions = 2 * (os.cpu_count() or 2)
            # local mode's executors live in the driver's JVM: its heap is all there is
            builder = builder.config("spark.driver.memory", "6g")
        if partitions:
            builder = builder.config("spark.sql.shuffle.partitions", str(partitions))
        for key, value in (config or {}).items():
            builder = builder.config(key, value)
        try:
            self.spark = builder.getOrCreate()
        except Exception as exc:  # noqa: BLE001 -- no Java, a bad master URL
            raise EngineError(
                f"cannot start Spark at {master}: {str(exc).splitlines()[0]}"
            ) from None
        self.spark.sparkContext.setLogLevel("ERROR")
        self.master = master
        self._frames: dict[str, object] = {}

    def _keep(self, name, frame, persist=True):
        """``frame`` as view ``name``; a persisted table is written to the scratch folder and
        read back, so its lineage ends there (a cached DataFrame keeps its whole plan, and
        replacing a table that the next one was computed from re-plans every table since)."""
        if persist and self.scratch is None:
            frame = frame.localCheckpoint(eager=True)
        elif persist:
            self._version += 1
            path = f"{self.scratch}/{name}-{self._version}"
            frame.write.mode("overwrite").parquet(path)
            frame = self.spark.read.parquet(path)
        self._frames[name] = frame
        frame.createOrReplaceTempView(name)

    def create(self, name, sql, **values):
        self._keep(name, self.spark.sql(self.render(sql, **values)))

    def fetch(self, sql, **values):
        return _utc(self.spark.sql(self.render(sql, **values)).toArrow())

    def register(self, name, table):
        self._keep(name, self.spark.createDataFrame(table), persist=False)

    def drop(self, name):
        self._frames.pop(name, None)
        self.spark.catalog.dropTempView(name)

    def has(self, name):
        return name in self._frames

    def columns(self, name):
        return {f.name: f.dataType.simpleString().upper() for f in self.spark.table(name).schema}

    def read_parquet(self, name, path):
        frame = (
            self.spark.read.option("mergeSchema", "true")
            .option("recursiveFileLookup", "true")
            .parquet(str(path))
        )
        self._keep(name, frame, persist=False)

    def read_days(self, name, folder, before):
        if not self._partitions(folder):
            return False
        frame = self.spark.read.option("basePath", str(folder)).parquet(str(folder))
        frame = frame.withColumn("day", frame["day"].cast("date"))
        if before is not None:
            frame = frame.where(frame["day"] < before)
        self._keep(name, frame, persist=False)
        return True

    def _write_partitions(self, name, written, days):
        frame = self.spark.table(name)
        frame = frame.where(frame["day"].isin(days))
        frame.write.partitionBy("day").mode("overwrite").parquet(str(written))

    def map_batches(self, name, sql, function, schema, *, partition_by=None, order_by=None):
        from pyspark.sql.pandas.types import from_arrow_schema

        frame = self.spark.sql(self.render(sql))
        if partition_by:
            frame = frame.repartition(partition_by)
        if order_by:
            frame = frame.sortWithinPartitions(*[c.strip() for c in order_by.split(",")])
        self._keep(name, frame.mapInArrow(function, from_arrow_schema(schema)))

    def close(self):
        for name in list(self._frames):
            self.drop(name)

    def m_words(self, text):
        return f"split(regexp_replace({text}, ' +', ' '), ' ')"

    def m_size(self, array):
        return f"size({array})"

    def m_slice(self, array, start, length):
        return f"slice({array}, {start}, {length})"

    def m_join(self, array, sep):
        return f"array_join({array}, {sep})"

    def m_hash64(self, text):
        return f"CAST(conv(substr(md5({text}), 1, 15), 16, 10) AS BIGINT)"

    def m_epoch_us(self, ts):
        return f"unix_micros({ts})"

    def m_idiv(self, a, b):
        return f"(({a}) div ({b}))"

    def m_row_id(self):
        return "monotonically_increasing_id()"

    def m_matches(self, text, pattern):
        return f"({text} RLIKE {pattern})"

    def m_replace_all(self, text, pattern, by):
        return f"regexp_replace({text}, {pattern}, {by})"

    def m_extract_all(self, text, pattern, group):
        return f"regexp_extract_all({text}, {pattern}, {group})"

    def m_series(self, start, stop):
        return f"explode(sequence({start}, {stop}))"

    def m_sorted_set(self, array):
        return f"array_sort(array_distinct({array}))"

    def m_agg_sorted_distinct(self, expr, sep):
        return f"array_join(array_sort(collect_set({expr})), {sep})"

    def m_agg_ordered(self, expr, order, sep=None):
        ordered = (
            f"transform(array_sort(collect_list(named_struct('o', {order}, 'v', {expr}))), "
            "e -> e.v)"
        )
        if sep is None:
            return ordered
        return f"array_join(transform({ordered}, e -> CAST(e AS STRING)), {sep})"

    def m_to_timestamp(self, text):
        return f"try_cast({text} AS TIMESTAMP)"


def _utc(table: pa.Table) -> pa.Table:
    """Spark's timestamps as DuckDB gives them: microseconds, UTC."""
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type.tz != "UTC":
            table = table.set_column(i, f.name, table.column(i).cast(pa.timestamp("us", "UTC")))
    return table


ENGINES = ("duckdb", "spark")


def open_engine(name: str = "duckdb", *, master: str | None = None) -> Engine:
    """The engine ``name`` (``duckdb`` or ``spark``; ``master`` only for Spark)."""
    if name == "duckdb":
        if master:
            raise EngineError("--master is a Spark master URL: use it with --engine spark")
        return DuckEngine()
    if name == "spark":
        return SparkEngine(master)
    raise EngineError(f"unknown engine {name!r}: choose {' or '.join(ENGINES)}")
