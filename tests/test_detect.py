"""The detector on a simulated log (the smoke scenario): it ranks campaign accounts above
legitimate ones, says why, writes what the gateway and detect-eval read, and survives bad logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distillscope.detect import DetectError, detect, evaluate_alerts
from distillscope.gateway.keys import parse_block_list
from distillscope.traffic import load_scenario, simulate


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(load_scenario("smoke"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def alerts(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("alerts")
    summary = detect(
        sim / "traffic.duckdb",
        out,
        accounts=sim / "accounts.parquet",
        events=sim / "events.parquet",
    )
    return out, summary


def test_campaign_accounts_rank_above_legitimate_ones(sim, alerts):
    out, summary = alerts
    figures = evaluate_alerts(out, sim / "truth.parquet", sim / "traffic.parquet")
    assert figures["recall_at_fpr_0.01"] >= 0.9
    assert figures["recall_at_fpr_0.001"] >= 0.9
    # Volume alone cannot do it: legitimate power users out-send campaign accounts.
    assert figures["baseline"]["recall_at_fpr_0.01"] < 0.5
    assert figures["flagged"]["false_positives"] == 0
    assert summary.accounts == pq.read_table(out / "accounts.parquet").num_rows


def test_outputs_explain_every_flag_and_feed_the_gateway(sim, alerts):
    out, summary = alerts
    table = pq.read_table(out / "accounts.parquet").to_pylist()
    flagged = [row for row in table if row["flagged"]]
    assert summary.flagged == len(flagged)
    assert all(row["reasons"] for row in flagged)
    assert {row["account_id"] for row in flagged} == {
        value for kind, value in parse_block_list((out / "blocklist.txt").read_text())
    }
    page = (out / "report.html").read_text()
    listed = page.split('<table id="flagged">')[1].split("</table>")[0]
    assert listed.count("<tr") == len(flagged) + 1  # one row per flagged account + header
    # the analyst's views: the score distribution with its threshold, clusters, evidence
    assert "flag threshold" in page and "<svg" in page and 'class="clusters"' in page
    assert all(row["account_id"] in page for row in flagged)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # self-contained
    assert set(pq.read_table(out / "clusters.parquet").column_names) >= {"cluster_id", "accounts"}
    assert pq.read_table(out / "baseline.parquet").num_rows == len(table)
    # the coordination graph's edges inside each cluster, with what ties each pair
    cluster = {row["account_id"]: row["cluster_id"] for row in table if row["cluster_id"]}
    edges = pq.read_table(out / "edges.parquet").to_pylist()
    assert edges and all(cluster[e["u"]] == cluster[e["v"]] == e["cluster_id"] for e in edges)
    assert all(e["weight"] >= 1 and e["ties"] for e in edges)
    tied = {e["cluster_id"] for e in edges}
    assert tied == {c for c in cluster.values() if list(cluster.values()).count(c) > 1}


def test_a_daily_cut_scores_only_what_came_before(sim, tmp_path):
    start = pc.min(pq.read_table(sim / "traffic.parquet", columns=["ts"])["ts"]).as_py()
    until = start + timedelta(days=2)
    summary = detect(sim / "traffic.parquet", tmp_path / "day2", until=until)
    total = pq.read_metadata(sim / "traffic.parquet").num_rows
    assert 0 < summary.exchanges < total


def test_a_malformed_log_is_reported_and_skipped_not_a_crash(sim, tmp_path):
    rows = pq.read_table(sim / "traffic.parquet").slice(0, 600)
    ts = [str(t) for t in rows.column("ts").to_pylist()]
    ts[:7] = ["not a time"] * 7
    prompts = rows.column("prompt").to_pylist()
    prompts[10:15] = [""] * 5
    broken = rows.drop_columns(["ts", "prompt", "client_ip", "user_agent"])
    broken = broken.append_column("ts", pa.array(ts)).append_column("prompt", pa.array(prompts))
    pq.write_table(broken, tmp_path / "broken.parquet")
    summary = detect(tmp_path / "broken.parquet", tmp_path / "out")
    assert summary.skipped["with a bad timestamp"] == 7
    assert summary.skipped["with an empty prompt"] >= 5
    assert any("client_ip missing" in note for note in summary.notes)
    with pytest.raises(DetectError, match="no account_id column"):
        pq.write_table(rows.drop_columns(["account_id"]), tmp_path / "no-accounts.parquet")
        detect(tmp_path / "no-accounts.parquet", tmp_path / "out2")


def test_cli_detect_then_detect_eval(sim, tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "distillscope.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = cli("detect", "--log", str(sim / "traffic.duckdb"), "--out", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    scored = cli(
        "detect-eval", "--alerts", str(tmp_path / "a"), "--truth", str(sim / "truth.parquet"),
        "--json",
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["recall_at_fpr_0.001"] >= 0.9
    missing = cli("detect", "--log", str(tmp_path / "nope.duckdb"), "--out", str(tmp_path / "b"))
    assert missing.returncode == 2 and "no traffic log" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_daily_replay_records_when_each_account_was_first_flagged(sim, tmp_path):
    from distillscope.detect.detector import daily_first_flags

    detect(sim / "traffic.parquet", tmp_path, events=sim / "events.parquet")
    runs = daily_first_flags(
        sim / "traffic.parquet", tmp_path, every_hours=24, events=sim / "events.parquet"
    )
    days = load_scenario("smoke").days
    assert runs in (days, days + 1, days + 2)
    table = pq.read_table(tmp_path / "accounts.parquet").to_pylist()
    stamped = [row for row in table if row["first_flagged_at"] is not None]
    # A flag from a daily run is never later than the end of the log's last day.
    assert all(row["first_flagged_at"] >= row["first_seen"] for row in stamped)
    figures = evaluate_alerts(tmp_path, sim / "truth.parquet", sim / "traffic.parquet")
    assert figures["detection_delay"] is not None


def test_since_reports_only_the_accounts_active_since_then(sim, tmp_path):
    from datetime import datetime

    traffic = pq.read_table(sim / "traffic.parquet", columns=["account_id", "ts", "prompt"])
    traffic = traffic.filter(
        pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(traffic["prompt"])), 0)
    )
    last = pc.max(traffic["ts"]).as_py()
    since = (last - timedelta(hours=12)).replace(tzinfo=None)  # naive: read as UTC
    summary = detect(sim / "traffic.parquet", tmp_path, since=since)
    reported = set(pq.read_table(tmp_path / "accounts.parquet")["account_id"].to_pylist())
    recent = pc.greater_equal(traffic["ts"], pa.scalar(last - timedelta(hours=12)))
    active = set(pc.filter(traffic["account_id"], recent).to_pylist())
    assert reported == active and 0 < len(active) < len(set(traffic["account_id"].to_pylist()))
    assert summary.accounts == len(active)
    assert isinstance(since, datetime)


def test_detect_eval_puts_the_figures_and_the_volume_baseline_in_the_report(sim, alerts):
    from distillscope.detect.evaluate import write_evaluation

    out, _ = alerts
    figures = evaluate_alerts(out, sim / "truth.parquet", sim / "traffic.parquet")
    write_evaluation(out, figures)
    write_evaluation(out, figures)  # a second evaluation replaces the first
    report = (out / "report.html").read_text()
    assert report.count("volume-only baseline") == 1
    assert f"{100 * figures['baseline']['recall_at_fpr_0.001']:.2f}%" in report
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["recall_at_fpr_0.001"] == figures["recall_at_fpr_0.001"]


def test_robustness_sweep_runs_each_point_once_and_resumes(tmp_path):
    from distillscope.detect.robustness import parse_knobs, robustness

    knobs = parse_knobs("mixing_share=0.05,0.5")
    seen = []
    curves = robustness(
        tmp_path, scenario="smoke", knobs=knobs, scale=1.0,
        on_point=lambda name, value, row: seen.append(value),
    )  # fmt: skip
    rows = curves["mixing_share"]
    assert [row["value"] for row in rows] == [0.05, 0.5] and seen == [0.05, 0.5]
    for row in rows:
        assert 0 <= row["recall_at_fpr_0.001"] <= row["recall_at_fpr_0.01"] <= 1
        assert row["campaigns"] == 2 and row["campaign_accounts"] > 0
    # More camouflage is a different simulation: the campaigns' traffic changed.
    assert rows[0]["exchanges"] != rows[1]["exchanges"]
    assert not (tmp_path / "work").exists()  # the simulated logs are not kept
    # Resuming reads the saved points instead of simulating again.
    (tmp_path / "points" / "mixing_share=0.5.json").write_text(
        json.dumps({**rows[1], "recall_at_fpr_0.001": 0.123})
    )
    again = robustness(tmp_path, scenario="smoke", knobs=knobs, scale=1.0)
    assert again["mixing_share"][1]["recall_at_fpr_0.001"] == 0.123
    assert json.loads((tmp_path / "robustness.json").read_text()) == again


def test_robustness_knobs_are_checked_before_any_work(tmp_path):
    from distillscope.detect.robustness import parse_knobs, robustness
    from distillscope.traffic import ScenarioError

    assert parse_knobs("ip_rotation")["ip_rotation"] == (0.0, 0.3, 0.6, 1.0)
    for bad in ("", "nonsense", "mixing_share=a,b"):
        with pytest.raises(ScenarioError):
            parse_knobs(bad)
    with pytest.raises(ScenarioError):
        robustness(tmp_path, scenario="smoke", knobs={"warp_speed": (1.0,)})
    assert not (tmp_path / "points").exists()


def test_paraphrase_templates_from_embeddings_join_the_detector(sim, tmp_path):
    from distillscope.detect import DetectConfig

    config = DetectConfig(paraphrase=True, paraphrase_per_account=6)
    summary = detect(sim / "traffic.parquet", tmp_path, events=sim / "events.parquet",
                     config=config)  # fmt: skip
    assert any("paraphrase templates" in note for note in summary.notes)
    figures = evaluate_alerts(tmp_path, sim / "truth.parquet", sim / "traffic.parquet")
    assert figures["recall_at_fpr_0.01"] >= 0.9


def test_detect_reads_a_duckdb_log_its_gateway_holds_from_the_hourly_segments(
    sim, alerts, tmp_path
):
    """While a gateway holds its DuckDB file, detect reads the closed hours it writes beside it
    as Parquet, and finds the same accounts, scores and flags."""
    from distillscope.gateway.traffic import open_traffic_log, read_traffic, segments_folder

    path = tmp_path / "traffic.duckdb"
    log = open_traffic_log(path)
    log.start()
    try:
        traffic = pq.read_table(sim / "traffic.parquet")
        for future in [log.submit(row) for row in traffic.to_pylist()]:
            future.result(timeout=120)
        assert log.count() == traffic.num_rows  # loaded
        log.export_segments()  # not at the next once-a-minute export: every closed hour now
        side = {"accounts": sim / "accounts.parquet", "events": sim / "events.parquet"}
        held = detect(path, tmp_path / "held", **side)  # the log is still open for writing
        assert read_traffic(path).num_rows == traffic.num_rows
    finally:
        log.close()
    assert any("held by a running gateway" in note for note in held.notes)
    assert len(list(segments_folder(path).rglob("*.parquet"))) > 24
    expected = pq.read_table(alerts[0] / "accounts.parquet").sort_by("account_id")
    got = pq.read_table(f"{held.out}/accounts.parquet").sort_by("account_id")
    assert held.exchanges == alerts[1].exchanges
    assert got["flagged"].to_pylist() == expected["flagged"].to_pylist()
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), atol=1e-6)


def test_detect_reads_a_postgresql_log_while_it_is_written_and_a_folder_of_segments(
    sim, alerts, postgres_url, tmp_path, cli
):
    """The same accounts, scores and flags from the gateway's DuckDB file, its PostgreSQL log
    (read while the log is still open for writing) and a folder of day-partitioned Parquet."""
    import psycopg

    from distillscope.gateway.traffic import open_traffic_log

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS detect_source")
        conn.execute("CREATE DATABASE detect_source")
    url = postgres_url.rsplit("/", 1)[0] + "/detect_source"
    traffic = pq.read_table(sim / "traffic.parquet")
    log = open_traffic_log(url)
    log.start()
    try:
        for future in [log.submit(row) for row in traffic.to_pylist()]:
            future.result(timeout=120)
        side = {"accounts": sim / "accounts.parquet", "events": sim / "events.parquet"}
        from_pg = detect(url, tmp_path / "pg", **side)  # the writer still holds the log
    finally:
        log.close()
    segments = tmp_path / "segments"
    days = pc.strftime(traffic["ts"], format="%Y-%m-%d")
    for day in sorted(set(days.to_pylist())):
        folder = segments / f"day={day}"
        folder.mkdir(parents=True)
        pq.write_table(traffic.filter(pc.equal(days, day)), folder / "part-0.parquet")
    from_folder = detect(segments, tmp_path / "seg", **side)
    expected = pq.read_table(alerts[0] / "accounts.parquet").sort_by("account_id")
    for summary in (from_pg, from_folder):
        assert summary.exchanges == alerts[1].exchanges
        got = pq.read_table(f"{summary.out}/accounts.parquet").sort_by("account_id")
        assert got["account_id"].to_pylist() == expected["account_id"].to_pylist()
        assert got["flagged"].to_pylist() == expected["flagged"].to_pylist()
        np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), atol=1e-6)
    with pytest.raises(DetectError, match="cannot read the traffic log"):
        detect("postgresql://nobody@127.0.0.1:1/none", tmp_path / "no")
    ran = cli("detect", "--log", url, "--out", tmp_path / "cli")  # the URL survives the CLI
    assert ran.exit_code == 0, ran.stderr
    assert pq.read_table(tmp_path / "cli" / "accounts.parquet").num_rows == expected.num_rows
    # a watch over a PostgreSQL log keeps its alerts beside the traffic, in the same database
    from distillscope.detect.watch import watch_once

    watched = watch_once(url, tmp_path / "watch")
    with psycopg.connect(url) as conn:
        kept = conn.execute("SELECT account_id, status FROM alerts").fetchall()
    assert len(kept) == watched.flagged == sum(expected["flagged"].to_pylist())
    assert not (tmp_path / "watch" / "alerts.duckdb").exists()


def test_watch_keeps_alerts_blocks_the_clearest_and_acts_on_reviews(sim, tmp_path, cli):
    """Two cycles over the same log, reviews in between: the block list follows the decisions,
    a dismissed account is never blocked again, and the gateway refuses a confirmed one."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import openai

    from distillscope.detect.watch import labels, watch_once
    from distillscope.gateway import KeyStore, create_app, serve_in_thread
    from distillscope.teachers import load_teacher

    posted: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            posted.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    blocks = tmp_path / "blocked.txt"
    blocks.write_text("account:someone-else  # blocked by hand\n")
    state, log = tmp_path / "watch", sim / "traffic.parquet"
    first = watch_once(log, state, block_file=blocks, block_above=2.5,
                       webhook=f"http://127.0.0.1:{hook.server_port}/alerts")  # fmt: skip
    hook.shutdown()
    assert first.flagged > 0 and sorted(first.new) == sorted(
        a["account_id"] for a in posted[0]["alerts"]
    )
    threshold = json.loads((Path(first.run) / "summary.json").read_text())["threshold"]
    table = pq.read_table(Path(first.run) / "accounts.parquet").to_pylist()
    flagged = {r["account_id"]: r["score"] for r in table if r["flagged"]}
    assert set(first.new) == set(flagged)
    clear = {a for a, s in flagged.items() if s >= 2.5 * threshold}
    assert set(first.blocked) == clear and first.queued == len(flagged) - len(clear)
    listed = parse_block_list(blocks.read_text())
    assert listed == {("account", a) for a in clear} | {("account", "someone-else")}
    queued = sorted(set(flagged) - clear)
    assert clear and queued, "the smoke world should give both kinds of alert"
    # reviews: dismiss one blocked account, confirm one queued account
    dismissed, confirmed = sorted(clear)[0], queued[0]
    assert cli("alerts", "dismiss", dismissed, "--log", log, "--state", state,
               "--block-file", blocks, "--reviewer", "ana").exit_code == 0  # fmt: skip
    keys = KeyStore(tmp_path / "keys.sqlite", refresh=0.1)
    secret = keys.create(confirmed, "text")[1]
    app = create_app(load_teacher("synthetic"), model_name="m", keys=keys, block_file=str(blocks))
    with serve_in_thread(app) as url:
        user = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        asked = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        user.chat.completions.create(**asked)
        done = cli("alerts", "confirm", confirmed, "--log", log, "--state", state,
                   "--block-file", blocks, "--note", "same template as c0")  # fmt: skip
        assert done.exit_code == 0, done.stderr
        time.sleep(1.2)  # the gateway re-reads its block list within a second
        with pytest.raises(openai.PermissionDeniedError):
            user.chat.completions.create(**asked)
    second = watch_once(log, state, block_file=blocks)
    assert second.new == [] and dismissed not in second.blocked and confirmed in second.blocked
    listed = parse_block_list(blocks.read_text())
    assert ("account", dismissed) not in listed and ("account", confirmed) in listed
    assert ("account", "someone-else") in listed
    assert sorted((x["account_id"], x["label"]) for x in labels(log, state)) == sorted(
        [(dismissed, 0), (confirmed, 1)]
    )
    shown = json.loads(cli("alerts", "list", "--log", log, "--state", state, "--json").stdout)
    by_id = {a["account_id"]: a for a in shown}
    assert by_id[dismissed]["reviewer"] == "ana"
    assert by_id[confirmed]["note"] == "same template as c0"
    missing = cli("alerts", "confirm", "nobody", "--log", log, "--state", state)
    assert missing.exit_code == 2 and "no alert" in missing.stderr
    ran = cli("watch", "--once", "--log", log, "--state", state, "--json")
    assert ran.exit_code == 0 and json.loads(ran.stdout)["new"] == []


UNLIMITED = "".join(
    f"  {name}:\n    exposure: {name}\n    requests_per_minute: null\n"
    "    tokens_per_minute: null\n    concurrency: null\n"
    for name in ("text", "top1", "top5", "top20")
)


def test_the_loop_end_to_end_replay_watch_block(sim, postgres_url, redis_url, tmp_path):
    """Two gateway workers on a PostgreSQL log and key store and Redis limits; the simulated world
    replayed through them on loopback; `watch` flags the campaign, which then gets 403 while
    legitimate accounts keep getting 200; the log holds every answer."""
    import psycopg

    from distillscope.detect.watch import watch_once
    from distillscope.gateway import KeyStore
    from distillscope.gateway.loadtest import GatewayProcess
    from distillscope.traffic import keystore_keys, replay

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS loop_e2e")
        conn.execute("CREATE DATABASE loop_e2e")
    url = postgres_url.rsplit("/", 1)[0] + "/loop_e2e"
    (tmp_path / "tiers.yaml").write_text("tiers:\n" + UNLIMITED)
    blocks = tmp_path / "blocked.txt"
    server = GatewayProcess(
        "--workers", "2", "--db", url, "--keys", url, "--limits", redis_url,
        "--tiers", str(tmp_path / "tiers.yaml"), "--block-file", str(blocks),
        log_file=tmp_path / "server.log",
    ).start()  # fmt: skip
    try:
        keys = keystore_keys(KeyStore(url), sim)
        first = replay(sim, server.url, keys, max_requests=100_000, speedup=1e9, max_gap_s=0,
                       concurrency=16, max_tokens=4)  # fmt: skip
        assert set(first.statuses) == {200}, (first.statuses, (tmp_path / "server.log").read_text())
        watched = watch_once(url, tmp_path / "watch", block_file=blocks, block_above=1.0)
        time.sleep(1.5)  # every worker re-reads the block list within a second
        truth = pq.read_table(sim / "truth.parquet").to_pylist()
        campaign = {t["account_id"] for t in truth if t["campaign_id"]}
        legit = {t["account_id"] for t in truth if not t["campaign_id"]}
        caught = campaign & set(watched.blocked)
        assert len(caught) >= 0.9 * len(campaign) and not legit & set(watched.blocked)
        second = replay(sim, server.url, keys, max_requests=400, speedup=1e9, max_gap_s=0,
                        concurrency=8, max_tokens=4)  # fmt: skip
    finally:
        server.stop()
    answered = {(account, status) for _, account, status, _ in second.results}
    assert {s for a, s in answered if a in caught} == {403}
    assert {s for a, s in answered if a in legit} == {200}
    with psycopg.connect(url) as conn:
        logged = dict(conn.execute("SELECT status, count(*) FROM exchanges GROUP BY 1").fetchall())
    assert logged[200] == first.sent + second.statuses.get(200, 0)
    assert logged[403] == second.statuses[403]


def test_minhashes_in_numpy_equal_the_sql_cross_join_they_replace():
    """The MinHash of each (prompt, view) under each permutation: numpy's per-permutation
    reduceat gives exactly what ``min((a * h + b) % p) FROM sh, perms GROUP BY`` gives."""
    import duckdb

    from distillscope.detect.detector import _PRIME, DetectConfig, _minhashes

    config = DetectConfig()
    rng = np.random.default_rng(3)
    n = 5000
    con = duckdb.connect()
    con.register(
        "raw",
        pa.table({"pid": rng.integers(1, 400, n), "view": rng.integers(0, 3, n),
                  "h": rng.integers(0, _PRIME, n).astype(np.uint64)}),
    )  # fmt: skip
    con.execute("CREATE TABLE sh AS SELECT pid, view, h FROM raw")
    seeds = np.random.default_rng(config.seed)
    con.register(
        "perms",
        pa.table({"i": np.arange(config.permutations),
                  "a": seeds.integers(1, _PRIME, config.permutations),
                  "b": seeds.integers(0, _PRIME, config.permutations)}),
    )  # fmt: skip
    expected = con.execute(
        f"SELECT pid, view, i, min((a * h + b) % {_PRIME}) AS m FROM sh, perms "
        "GROUP BY ALL ORDER BY pid, view, i"
    ).fetchnumpy()
    sh = con.sql("SELECT pid, view, h FROM sh ORDER BY pid, view").to_arrow_table()
    got = pa.Table.from_batches(
        list(_minhashes(iter(sh.to_batches(max_chunksize=1000)), config))
    ).sort_by([("pid", "ascending"), ("view", "ascending"), ("i", "ascending")])
    for column in ("pid", "view", "i", "m"):
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].astype(np.int64))


def test_the_classifier_gives_the_same_answers_in_several_processes():
    """DuckDB's ``map_batches`` runs a large batch function in spawned processes (the
    elicitation classifier is the detector's largest single-core step): same rows, same order."""
    import functools

    from distillscope.detect.detector import _ELICITED_SCHEMA, _classify
    from distillscope.detect.elicitation import ElicitationClassifier
    from distillscope.detect.engine import DuckEngine

    classifier = ElicitationClassifier.default()
    prompts = [f"explain step by step how you would solve task {i}" if i % 3 else f"hello {i}"
               for i in range(300)]  # fmt: skip
    table = pa.table({"qid": list(range(300)), "prompt": prompts})
    answers = {}
    for workers in (1, 2):
        engine = DuckEngine(workers=workers, parallel_rows=100)
        engine.register("t", table)
        engine.map_batches(
            "out",
            "SELECT qid, prompt FROM t ORDER BY qid",
            functools.partial(_classify, classifier=classifier),
            _ELICITED_SCHEMA,
        )
        answers[workers] = engine.fetch("SELECT * FROM out")
    assert answers[1].equals(answers[2])
    assert 0 < sum(answers[2]["elicits"].to_pylist()) < 300


def test_a_script_without_a_main_guard_still_gets_its_answers(tmp_path):
    """Spawned workers run a guard-less script again, and are refused: the batch function then
    runs in the script's own process, with a warning that says what to change."""
    script = tmp_path / "noguard.py"
    script.write_text(
        "import functools, pyarrow as pa\n"
        "from distillscope.detect.detector import _ELICITED_SCHEMA, _classify\n"
        "from distillscope.detect.elicitation import ElicitationClassifier\n"
        "from distillscope.detect.engine import DuckEngine\n"
        "table = pa.table({'qid': list(range(200)),\n"
        "                  'prompt': [f'think step by step about task {i}' for i in range(200)]})\n"
        "engine = DuckEngine(workers=2, parallel_rows=100)\n"
        "engine.register('t', table)\n"
        "engine.map_batches('out', 'SELECT qid, prompt FROM t ORDER BY qid', functools.partial(\n"
        "    _classify, classifier=ElicitationClassifier.default()), _ELICITED_SCHEMA)\n"
        "print('ROWS', engine.fetch('SELECT count(*) AS n FROM out')['n'][0].as_py())\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("ROWS 200") == 1, done.stdout
    assert 'if __name__ == "__main__":' in done.stderr and "one core" in done.stderr
