"""Incremental detection (``detect(..., state=)``): a job that reads one day of the log plus the
stored digests flags, clusters and scores exactly as one run over the whole log at the same
cut-off; a state built otherwise is refused, not silently mixed."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distillscope.detect import DetectConfig, DetectError, detect
from distillscope.traffic import load_scenario, simulate


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(load_scenario("smoke"), out, progress=False)
    return out


def _midnights(sim):
    ts = pq.read_table(sim / "traffic.parquet", columns=["ts"])["ts"]
    first, last = pc.min(ts).as_py(), pc.max(ts).as_py()
    start = first.replace(hour=0, minute=0, second=0, microsecond=0)
    days = (last - start).days + 1
    return [start + timedelta(days=k) for k in range(1, days + 1)]


def _scored(out):
    table = pq.read_table(out / "accounts.parquet").sort_by("account_id")
    return {c: table[c].to_pylist() for c in ("account_id", "flagged", "cluster_id", "score")}


def _read_from_log(summary) -> int:
    note = next(n for n in summary.notes if n.startswith("incremental:"))
    return int(note.split(", ")[1].split(" exchanges")[0].replace(",", ""))


def test_day_by_day_runs_flag_what_one_run_over_the_whole_log_flags(sim, tmp_path):
    side = dict(accounts=sim / "accounts.parquet", events=sim / "events.parquet")
    cuts = _midnights(sim)
    assert len(cuts) >= 3
    per_day = pq.read_table(sim / "traffic.parquet", columns=["ts"])["ts"]
    seen = 0
    for k, until in enumerate(cuts):
        inc = detect(sim / "traffic.duckdb", tmp_path / f"inc{k}", until=until,
                     state=tmp_path / "state", **side)  # fmt: skip
        # the job read only its own day from the log (less its unusable rows): what it added
        after = pa.scalar(until - timedelta(days=1), per_day.type)
        before = pa.scalar(until, per_day.type)
        day = pc.sum(pc.and_(pc.greater_equal(per_day, after), pc.less(per_day, before))).as_py()
        assert _read_from_log(inc) == inc.exchanges - seen
        assert 0.95 * day <= _read_from_log(inc) <= day
        seen = inc.exchanges
        if k == len(cuts) - 1:
            full = detect(sim / "traffic.duckdb", tmp_path / f"full{k}", until=until, **side)
            assert inc.exchanges == full.exchanges
            a, b = _scored(tmp_path / f"full{k}"), _scored(tmp_path / f"inc{k}")
            assert a["account_id"] == b["account_id"]
            assert a["flagged"] == b["flagged"] and sum(a["flagged"]) > 0
            assert a["cluster_id"] == b["cluster_id"]
            assert np.allclose(a["score"], b["score"], atol=1e-6, rtol=0)
    held = json.loads((tmp_path / "state" / "state.json").read_text())
    assert len(held["days"]) == len(cuts)
    # a run at a cut the state already holds reads nothing from the log, and agrees
    again = detect(sim / "traffic.duckdb", tmp_path / "again", until=cuts[-1],
                   state=tmp_path / "state", **side)  # fmt: skip
    assert _read_from_log(again) == 0
    assert _scored(tmp_path / "again") == _scored(tmp_path / f"inc{len(cuts) - 1}")
    # an earlier cut mid-day uses only the state's days before it, and changes nothing
    mid = cuts[1] + timedelta(hours=12)
    before = sorted(p.name for p in (tmp_path / "state").rglob("*.parquet"))
    early = detect(sim / "traffic.duckdb", tmp_path / "early", until=mid,
                   state=tmp_path / "state", **side)  # fmt: skip
    usable = pc.sum(pc.less(per_day, pa.scalar(mid, per_day.type))).as_py()
    assert 0.95 * usable <= early.exchanges <= usable < again.exchanges
    assert any("read, not changed" in n for n in early.notes)
    assert sorted(p.name for p in (tmp_path / "state").rglob("*.parquet")) == before
    assert json.loads((tmp_path / "state" / "state.json").read_text())["days"] == held["days"]


def test_a_state_built_with_other_settings_is_refused_and_rebuilt_on_request(sim, tmp_path):
    state = tmp_path / "state"
    until = _midnights(sim)[1]
    detect(sim / "traffic.duckdb", tmp_path / "a", until=until, state=state)
    other = DetectConfig(window_minutes=30)
    with pytest.raises(DetectError, match="--rebuild"):
        detect(sim / "traffic.duckdb", tmp_path / "b", until=until, state=state, config=other)
    rebuilt = detect(sim / "traffic.duckdb", tmp_path / "b", until=until, state=state,
                     config=other, rebuild=True)  # fmt: skip
    assert _read_from_log(rebuilt) == rebuilt.exchanges > 0
    # a folder of something else is never emptied
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for rebuild in (False, True):
        with pytest.raises(DetectError, match="no state.json"):
            detect(sim / "traffic.duckdb", tmp_path / "c", state=foreign, rebuild=rebuild)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(DetectError, match="--state"):
        detect(sim / "traffic.duckdb", tmp_path / "d", rebuild=True)


def test_cli_detect_with_a_state(sim, cli, tmp_path):
    """``--state`` from the command line (``--daily`` replays use a state too: test_detect)."""
    from conftest import one_line_error

    state = tmp_path / "state"
    args = ["detect", "--log", str(sim / "traffic.duckdb"), "--out", str(tmp_path / "out"),
            "--state", str(state), "--json"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert any(n.startswith("incremental: 0 day(s)") for n in summary["notes"])
    assert len(json.loads((state / "state.json").read_text())["days"]) == len(_midnights(sim))
    result = cli("detect", "--log", str(sim / "traffic.duckdb"), "--rebuild")
    one_line_error(result, "--state")
