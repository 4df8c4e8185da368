"""The detector on Apache Spark (local mode, one JVM for the module) against DuckDB: one SQL text
rendered for each engine gives the same flags, clusters and scores on the smoke world."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark")

from distillscope.detect import detect  # noqa: E402
from distillscope.detect.detector import DetectConfig, _minhashes  # noqa: E402
from distillscope.detect.engine import DuckEngine, SparkEngine  # noqa: E402
from distillscope.traffic import load_scenario, simulate  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    engine = SparkEngine("local[2]", partitions=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(load_scenario("smoke"), out, progress=False)
    return out


def _clusters(table: pa.Table) -> list[list[str]]:
    found: dict[str, list[str]] = {}
    for account, cluster in zip(table["account_id"].to_pylist(), table["cluster_id"].to_pylist()):
        if cluster:
            found.setdefault(cluster, []).append(account)
    return sorted(sorted(members) for members in found.values())


def test_spark_and_duckdb_give_the_same_flags_clusters_and_scores(sim, spark, tmp_path):
    side = {"accounts": sim / "accounts.parquet", "events": sim / "events.parquet"}
    # a Parquet folder, as a provider's exported log would be; Spark's executors read it
    duck = detect(sim / "traffic.parquet", tmp_path / "duck", **side)
    on_spark = detect(sim / "traffic.parquet", tmp_path / "spark", engine=spark, **side)
    a = pq.read_table(tmp_path / "duck" / "accounts.parquet").sort_by("account_id")
    b = pq.read_table(tmp_path / "spark" / "accounts.parquet").sort_by("account_id")
    assert a["account_id"].to_pylist() == b["account_id"].to_pylist()
    assert duck.exchanges == on_spark.exchanges and duck.flagged == on_spark.flagged
    assert on_spark.flagged > 0 and on_spark.clusters > 0, "the smoke world has campaigns"
    assert a["flagged"].to_pylist() == b["flagged"].to_pylist()
    assert _clusters(a) == _clusters(b)
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), atol=1e-6)
    for column in a.column_names:
        if column.startswith(("signal_", "evidence_")):
            np.testing.assert_allclose(
                b[column].to_numpy(), a[column].to_numpy(), atol=1e-6, err_msg=column
            )
    assert any("spark" in note for note in on_spark.notes)
    # the coordination graph's edges, each kind of tie included (a side table such as the
    # payment fingerprints is found on both engines)
    edges = [pq.read_table(tmp_path / run / "edges.parquet").sort_by([("u", "ascending"),
             ("v", "ascending")]) for run in ("duck", "spark")]  # fmt: skip
    assert edges[0].equals(edges[1])
    assert any("payment fingerprint" in ties for ties in edges[0]["ties"].to_pylist())
    # the report's timeline and the block list come out the same way
    assert (tmp_path / "spark" / "blocklist.txt").read_text() == (
        tmp_path / "duck" / "blocklist.txt"
    ).read_text()


def test_a_cut_off_on_a_gateway_duckdb_file_loads_the_same_exchanges_on_spark(sim, spark):
    """``until`` (a daily job's cut) on a gateway DuckDB file, which the driver reads and hands
    to Spark: the same clean exchanges, normalised the same way, as DuckDB loads."""
    from datetime import timedelta

    import pyarrow.compute as pc

    from distillscope.detect.detector import _load

    until = pc.min(pq.read_table(sim / "traffic.parquet", columns=["ts"])["ts"]).as_py()
    until += timedelta(days=2)
    duck = DuckEngine()
    loaded = {}
    for engine in (duck, spark):
        skipped, absent, _ = _load(engine, sim / "traffic.duckdb", until)
        loaded[engine.name] = (
            engine.fetch("SELECT account_id, ts, norm, catalogue FROM x "
                         "ORDER BY ts, account_id, norm"),
            skipped, absent,
        )  # fmt: skip
    (a, *rest_a), (b, *rest_b) = loaded["duckdb"], loaded["spark"]
    assert 0 < a.num_rows < pq.read_metadata(sim / "traffic.parquet").num_rows
    assert rest_a == rest_b
    assert a.equals(b)


def test_minhash_batches_give_the_same_rows_however_the_groups_are_cut():
    """``_minhashes`` runs over Arrow batches on both engines; a (prompt, view) group split
    across two batches (as Spark's executors hand them) gives the same minimum as whole."""
    rng = np.random.default_rng(5)
    n = 3000
    shingles = pa.table(
        {"pid": np.sort(rng.integers(1, 200, n)), "view": np.zeros(n, dtype=np.int64),
         "h": rng.integers(0, 2**31 - 1, n)}
    )  # fmt: skip
    config = DetectConfig()
    whole = pa.Table.from_batches(list(_minhashes(iter(shingles.to_batches()), config)))
    cut = pa.Table.from_batches(
        list(_minhashes(iter(shingles.to_batches(max_chunksize=37)), config))
    )
    assert whole.num_rows == len(np.unique(shingles["pid"])) * config.permutations
    assert cut.sort_by([("pid", "ascending"), ("i", "ascending")]).equals(
        whole.sort_by([("pid", "ascending"), ("i", "ascending")])
    )


def test_hash64_is_the_same_integer_on_both_engines(spark):
    duck = DuckEngine()
    sql = "SELECT {{ hash64(\"'distillscope' || CAST(41 + 1 AS STRING)\") }} AS h"
    assert duck.scalar(sql) == spark.scalar(sql) > 0
    words = "SELECT {{ join(slice(words(\"'a  b c d'\"), -2, 2), \"'-'\") }} AS w"
    assert duck.scalar(words) == spark.scalar(words) == "c-d"


def test_cli_refuses_an_unknown_engine_and_a_master_without_spark(sim, cli, tmp_path):
    """Two user mistakes, each one line and no traceback: an engine that does not exist, and a
    Spark master URL given to the DuckDB engine."""
    from conftest import one_line_error

    log = sim / "traffic.parquet"
    bad = cli("detect", "--log", log, "--out", tmp_path / "a", "--engine", "polars")
    one_line_error(bad, "--engine", "polars")
    bad = cli("detect", "--log", log, "--out", tmp_path / "b", "--master", "spark://h:7077")
    one_line_error(bad, "--master", "--engine spark")


def test_day_partitions_written_by_one_engine_are_read_by_the_other(spark, tmp_path):
    """The incremental state is Parquet by day (``write_days``/``read_days``): either engine
    reads what the other wrote, a rewritten day replaces its old rows, and ``before`` cuts."""
    from datetime import date

    duck = DuckEngine()
    rows = pa.table({"account_id": ["a", "b", "c", "d"], "n": [1, 2, 3, 4],
                     "day": [date(2026, 1, d) for d in (1, 1, 2, 3)]})  # fmt: skip
    for writer, reader in ((duck, spark), (spark, duck)):
        folder = tmp_path / writer.name
        writer.register("rows", rows)
        writer.write_days("rows", folder, [date(2026, 1, 1), date(2026, 1, 2)])
        writer.register("rows", rows.filter(pa.compute.equal(rows["account_id"], "a")))
        writer.write_days("rows", folder, [date(2026, 1, 1)])  # day 1 again, with one row
        assert reader.read_days("back", folder, date(2026, 1, 3))
        back = reader.fetch("SELECT account_id, n, CAST(day AS STRING) AS day FROM back "
                            "ORDER BY account_id").to_pylist()  # fmt: skip
        assert back == [{"account_id": "a", "n": 1, "day": "2026-01-01"},
                        {"account_id": "c", "n": 3, "day": "2026-01-02"}]  # fmt: skip
        assert reader.read_days("back", folder, date(2026, 1, 2))
        assert reader.scalar("SELECT count(*) FROM back") == 1
        assert not reader.read_days("back", tmp_path / "none", None)
