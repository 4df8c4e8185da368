"""The traffic simulator: the gateway's schema, the truth, the campaigns' claimed properties, the
CLI, and a bounded replay against a real gateway. Statistical checks use the smoke scenario at a
fixed seed, with tolerances far from the values it produces (stated beside each)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest

from distillscope.gateway.traffic import EXCHANGE_SCHEMA, open_traffic_log, read_traffic
from distillscope.traffic import (
    ReplayError,
    Scenario,
    ScenarioError,
    keystore_keys,
    load_scenario,
    replay,
    simulate,
)

SEED = 11
FILES = (
    "traffic.duckdb",
    "traffic.parquet",
    "truth.parquet",
    "exchange_truth.parquet",
    "accounts.parquet",
    "events.parquet",
    "scenario.yaml",
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    summary = simulate("smoke", out, seed=SEED, progress=False)
    rows = pq.read_table(out / "traffic.parquet").to_pylist()
    truth = {r["account_id"]: r for r in pq.read_table(out / "truth.parquet").to_pylist()}
    content = pq.read_table(out / "exchange_truth.parquet").to_pylist()
    by_account = defaultdict(list)
    for row in rows:
        by_account[row["account_id"]].append(row)
    return {
        "out": out,
        "summary": summary,
        "rows": rows,
        "truth": truth,
        "content": {r["exchange_id"]: r for r in content},
        "by_account": by_account,
        "release": next(
            e["time"]
            for e in pq.read_table(out / "events.parquet").to_pylist()
            if e["kind"] == "release"
        ),
    }


def campaign_of(sim, row) -> str | None:
    return sim["truth"][row["account_id"]]["campaign_id"]


def test_writes_the_gateway_table_and_the_truth(sim):
    out = sim["out"]
    assert all((out / name).is_file() for name in FILES)
    parquet = pq.read_table(out / "traffic.parquet")
    assert parquet.schema == EXCHANGE_SCHEMA
    logged = read_traffic(out / "traffic.duckdb")
    assert logged.schema == EXCHANGE_SCHEMA
    assert logged.num_rows == parquet.num_rows == sim["summary"].exchanges > 1000
    ids = parquet["exchange_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert logged["exchange_id"].to_pylist() == ids  # both ordered by ts, then exchange_id
    with open_traffic_log(out / "traffic.duckdb") as log:  # the gateway can log into it too
        assert log.count("status = 200") == sum(r["status"] == 200 for r in sim["rows"])
    accounts = {r["account_id"] for r in sim["rows"]}
    assert accounts <= set(sim["truth"])  # every account in the log has its truth
    metadata = pq.read_table(out / "accounts.parquet").to_pydict()
    assert set(metadata["account_id"]) == set(sim["truth"])
    assert set(sim["content"]) == set(ids)
    roles = Counter(t["role"] for t in sim["truth"].values())
    assert set(roles) == {"legitimate", "campaign", "replacement"}
    shapes = Counter(t["shape"] for t in sim["truth"].values())
    assert set(shapes) == {"background", "hydra"}
    assert load_scenario(out / "scenario.yaml").seed == SEED


def test_rows_are_filled_like_the_gateway_fills_them(sim):
    for row in sim["rows"]:
        assert row["ts"].tzinfo is not None and row["endpoint"] in (
            "/v1/chat/completions",
            "/v1/completions",
        )
        if row["status"] == 200:
            assert row["completion"] and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
            assert row["exchange_id"].startswith(("chatcmpl-", "cmpl-"))
            assert row["finish_reason"] in ("stop", "length") and row["error_code"] is None
            assert row["completion_tokens"] <= row["max_tokens"]
        else:
            assert row["exchange_id"].startswith("err-") and row["completion"] is None
            assert row["error_code"] == {429: "rate_limit_exceeded", 403: "blocked"}[row["status"]]
        if row["messages"] is not None:
            messages = json.loads(row["messages"])
            assert messages[-1] == {"role": "user", "content": row["prompt"]}
    people = [
        r
        for r in sim["rows"]
        if r["messages"] and sim["truth"][r["account_id"]]["profile"] in ("individual", "corporate")
    ]
    follow_ups = [r for r in people if '"assistant"' in r["messages"]]
    assert len(follow_ups) > 0.2 * len(people)  # 0.42 at this seed: later ShareGPT turns
    statuses = Counter(r["status"] for r in sim["rows"])
    assert statuses[200] > 0.95 * len(sim["rows"]) and statuses[429] > 0


def test_the_same_seed_writes_the_same_log(sim, tmp_path):
    simulate("smoke", tmp_path / "again", seed=SEED, progress=False)
    for name in ("traffic.parquet", "truth.parquet", "accounts.parquet"):
        assert pq.read_table(tmp_path / "again" / name).equals(pq.read_table(sim["out"] / name))
    other = simulate(load_scenario("smoke"), tmp_path / "other", seed=SEED + 1, progress=False)
    assert other.exchanges != sim["summary"].exchanges


def test_campaign_accounts_each_look_modest(sim):
    """Per-account volume cannot separate them: ~20-35 a day each, some users send more."""
    daily = {}
    for account, rows in sim["by_account"].items():
        ts = [r["ts"].timestamp() for r in rows]
        daily[account] = len(rows) / max(1.0, (max(ts) - min(ts)) / 86400)
    campaign = [v for a, v in daily.items() if sim["truth"][a]["campaign_id"]]
    legit = [v for a, v in daily.items() if not sim["truth"][a]["campaign_id"]]
    assert max(campaign) < 60  # 37 at this seed
    assert 10 < np.median(campaign) < 40  # 19
    assert sum(v > np.median(campaign) for v in legit) >= 3  # 13 users busier than the median


def test_campaigns_share_proxy_pools_and_users_share_office_addresses(sim):
    accounts_on = defaultdict(set)
    for row in sim["rows"]:
        accounts_on[row["client_ip"]].add(row["account_id"])
    for name in ("hydra-coding", "cot-elicitation"):
        members = {a for a, t in sim["truth"].items() if t["campaign_id"] == name}
        ips = {r["client_ip"] for r in sim["rows"] if campaign_of(sim, r) == name}
        assert len(ips) < len(members) / 2
        assert max(len(accounts_on[ip] & members) for ip in ips) >= 4
    offices = [
        ip
        for ip, accounts in accounts_on.items()
        if len(accounts) >= 3 and all(sim["truth"][a]["role"] == "legitimate" for a in accounts)
    ]
    assert offices  # corporate NAT: several users behind one address
    metadata = pq.read_table(sim["out"] / "accounts.parquet").to_pylist()
    cards = Counter(m["payment_fingerprint"] for m in metadata)
    shared = {m["account_id"] for m in metadata if cards[m["payment_fingerprint"]] > 1}
    assert any(sim["truth"][a]["campaign_id"] for a in shared)  # the operator's cards
    assert any(m["org"] for m in metadata if m["account_id"] in shared)  # corporate cards


def test_campaign_prompts_are_concentrated_templates_with_cot(sim):
    cot = re.compile(r"step by step|chain of thought|reasoning", re.IGNORECASE)
    for name, mixing in (("hydra-coding", 0.2), ("cot-elicitation", 0.2)):
        rows = [r for r in sim["rows"] if campaign_of(sim, r) == name and r["status"] == 200]
        content = [sim["content"][r["exchange_id"]] for r in rows]
        templated = Counter(c["template_id"] for c in content if c["content"] == "template")
        share = sum(templated.values()) / len(rows)
        assert abs(share - (1 - mixing)) < 0.07  # 0.81 and 0.78 at this seed
        top3 = sum(n for _, n in templated.most_common(3)) / sum(templated.values())
        assert top3 > 0.5  # 0.60 and 0.86
        assert len(templated) <= 8
        # One template's text opens requests of many accounts.
        openings = defaultdict(set)
        for r in rows:
            openings[r["prompt"][:40]].add(r["account_id"])
        assert max(len(a) for a in openings.values()) >= 5
    legit = [r for r in sim["rows"] if campaign_of(sim, r) is None and r["prompt"]]
    campaign = [r for r in sim["rows"] if campaign_of(sim, r) and r["prompt"]]
    legit_cot = sum(bool(cot.search(r["prompt"])) for r in legit) / len(legit)
    campaign_cot = sum(bool(cot.search(r["prompt"])) for r in campaign) / len(campaign)
    assert campaign_cot > 0.2 and legit_cot < 0.05  # 0.33 and 0.007


def test_automation_is_more_regular_than_people(sim):
    """Coefficient of variation of inter-arrival times: ~0.2 for campaign accounts, >1 for
    bursty humans."""

    def cv(rows):
        gaps = np.diff(sorted(r["ts"].timestamp() for r in rows if r["status"] != 403))
        return gaps.std() / gaps.mean() if len(gaps) >= 9 else None

    cvs = {"campaign": [], "legit": []}
    for account, rows in sim["by_account"].items():
        truth = sim["truth"][account]
        if truth["profile"] == "integration" or (value := cv(rows)) is None:
            continue
        cvs["campaign" if truth["campaign_id"] else "legit"].append(value)
    assert np.median(cvs["campaign"]) < 0.5  # 0.20
    assert np.median(cvs["legit"]) > 1.0  # 2.4
    # Synchronised: a cluster's requests come in waves, so nearly every one has another
    # account's request within a minute; as many requests at random times mostly do not.
    hydra = [r for r in sim["rows"] if campaign_of(sim, r) == "hydra-coding"]
    times = np.array([r["ts"].timestamp() for r in hydra])
    accounts = [r["account_id"] for r in hydra]
    shuffled = np.random.default_rng(0).uniform(times.min(), times.max(), len(times))
    assert together(times, accounts) > 0.75  # 0.87 at this seed
    assert together(shuffled, accounts) < 0.5  # 0.38
    hours = Counter(r["ts"].hour for r in hydra)
    assert len(hours) == 24  # around the clock


def together(times: np.ndarray, accounts: list[str], within_s: float = 60) -> float:
    """Share of requests with another account's request within ``within_s`` seconds."""
    order = np.argsort(times)
    times, accounts = times[order], [accounts[i] for i in order]
    near = 0
    for i, t in enumerate(times):
        lo = np.searchsorted(times, t - within_s, side="left")
        hi = np.searchsorted(times, t + within_s, side="right")
        near += any(accounts[j] != accounts[i] for j in range(lo, hi))
    return near / len(times)


def test_banned_accounts_are_refused_and_replaced(sim):
    truth, by_account = sim["truth"], sim["by_account"]
    banned = [t for t in truth.values() if t["banned_at"] is not None]
    replacements = [t for t in truth.values() if t["role"] == "replacement"]
    assert banned and replacements
    assert all(t["campaign_id"] for t in banned)
    for account in banned:
        after = [r for r in by_account[account["account_id"]] if r["ts"] >= account["banned_at"]]
        assert all(r["status"] == 403 for r in after)
    refused = [r for r in sim["rows"] if r["status"] == 403]
    assert refused and all(truth[r["account_id"]]["banned_at"] for r in refused)
    for new in replacements:
        old = truth[new["replaces"]]
        assert old["campaign_id"] == new["campaign_id"] and old["banned_at"] is not None
        first = min(r["ts"] for r in by_account[new["account_id"]])
        assert first > old["banned_at"] and new["created_at"] < first


def test_campaigns_move_to_a_new_model_within_a_day(sim):
    release = sim["release"]
    day_after = release + timedelta(hours=24)
    assert not any(r["model"] == "frontier-2" for r in sim["rows"] if r["ts"] < release)
    shares = {}
    for who in ("hydra-coding", "cot-elicitation", None):
        rows = [r for r in sim["rows"] if campaign_of(sim, r) == who and r["model"]]
        moved = [r["model"] == "frontier-2" for r in rows if r["ts"] >= day_after]
        shares[who] = sum(moved) / len(moved)
    assert shares["hydra-coding"] > 0.65 and shares["cot-elicitation"] > 0.75  # 0.8, 0.9 set
    assert shares[None] < 0.3  # people move slowly (0.05 at this seed)


def test_scenarios_load_and_refuse_mistakes(tmp_path):
    default = load_scenario("default")
    names = ["hydra-coding", "agentic-reasoning", "cot-elicitation"]
    assert [c.name for c in default.campaigns] == names
    assert {c.shape for c in default.campaigns} == {"hydra"} and default.populations == []
    (tmp_path / "resolved.yaml").write_text(default.to_yaml())
    assert load_scenario(tmp_path / "resolved.yaml") == default  # the resolved file round-trips
    assert isinstance(default, Scenario)
    smoke = load_scenario("smoke")
    assert smoke.campaigns[1].ban_rate == 0.6  # from campaign_defaults
    swept = smoke.for_all_campaigns(mixing_share=0.5, timing_jitter=0.4)
    assert {c.mixing_share for c in swept.campaigns} == {0.5}
    cases = {
        "days: 3\nfoo: 1\n": "unknown key 'foo'",
        "legit: {acounts: 3}\n": "unknown key 'acounts'",
        "days: many\n": "days must be a number",
        "campaigns:\n  - name: a\n    mixing_share: 1.5\n": "mixing_share must be in [0, 1]",
        "campaigns:\n  - name: a\n    focus: {poetry: 1}\n": "unknown capability 'poetry'",
        "days: [\n": "not valid YAML",
        "campaigns:\n  - {shape: stealth, camouflage_share: 2}\n": (
            "campaigns[0].camouflage_share must be in [0, 1], not 2"
        ),
        "campaigns:\n  - {shape: stealth, waves: 3}\n": "campaigns[0]: unknown key 'waves'",
        "populations:\n  - {shape: coding_agents, steps: [5, 2]}\n": "populations[0].steps must",
        "populations:\n  - {shape: payroll}\n": "populations[0].shape: unknown shape 'payroll'",
        "populations:\n  - {shape: corporate_nat, accounts: many}\n": (
            "populations[0].accounts must be an integer, not 'many'"
        ),
        "shape_defaults: {stealth: {accounts: 0}}\ncampaigns:\n  - {shape: stealth}\n": (
            "campaigns[0].accounts must be >= 1"
        ),
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(ScenarioError, match=re.escape(message)) as error:
            load_scenario(path)
        assert "\n" not in str(error.value)
    with pytest.raises(ScenarioError, match="no scenario"):
        load_scenario("no-such-scenario")
    with pytest.raises(ScenarioError, match="no setting"):
        smoke.for_all_campaigns(mixing=0.5)


def run_cli(*args, cwd):
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "distillscope.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_cli_simulates_and_refuses_a_bad_scenario_in_one_line(tmp_path):
    done = run_cli(
        "simulate", "--scenario", "smoke", "--out", "sim", "--seed", "2", "--days", "1.5",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "hydra-coding" in done.stdout and "exchanges" in done.stdout
    assert all((tmp_path / "sim" / name).is_file() for name in FILES)
    assert load_scenario(tmp_path / "sim" / "scenario.yaml").days == 1.5
    (tmp_path / "bad.yaml").write_text("campaigns:\n  - name: a\n    tempo: 3\n")
    bad = run_cli("simulate", "--scenario", "bad.yaml", "--out", "sim2", cwd=tmp_path)
    assert bad.returncode == 2
    assert "unknown key 'tempo'" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sim2").exists()


def test_replay_reaches_a_real_gateway_with_each_accounts_key(sim, tmp_path):
    from distillscope.gateway import KeyStore, create_app, serve_in_thread
    from distillscope.teachers import load_teacher

    store = KeyStore(tmp_path / "keys.sqlite")
    log = open_traffic_log(tmp_path / "gateway.duckdb")
    log.start()
    app = create_app(
        load_teacher("synthetic"), model_name="distillscope-synthetic", keys=store, log=log
    )
    with serve_in_thread(app) as url:
        summary = replay(
            sim["out"],
            f"{url}/v1",
            keystore_keys(store, sim["out"]),
            max_requests=40,
            speedup=1e5,
            max_gap_s=0.05,
            concurrency=4,
            max_tokens=4,
        )
    log.close()
    assert summary.sent == 40 and set(summary.statuses) <= {200, 413, 429}
    assert summary.statuses.get(200, 0) >= 35
    logged = {r["exchange_id"]: r for r in read_traffic(tmp_path / "gateway.duckdb").to_pylist()}
    assert len(logged) == 40
    simulated = {r["exchange_id"]: r for r in sim["rows"]}
    replayed = [simulated[exchange_id] for exchange_id, *_ in summary.results]
    assert [r["ts"] for r in replayed] == sorted(r["ts"] for r in replayed)  # the log's order
    assert Counter(r["account_id"] for r in logged.values()) == Counter(
        r["account_id"] for r in replayed
    )
    for exchange_id, account, status, response_id in summary.results:
        if status == 200:
            row = logged[response_id]
            assert row["account_id"] == account
            assert row["user_agent"] == simulated[exchange_id]["user_agent"]
            assert row["tier"] == simulated[exchange_id]["tier"]
            assert row["exposure_requested"] == simulated[exchange_id]["exposure_requested"]


def test_replay_refuses_targets_off_this_machine(sim):
    for url in ("http://example.com:8000", "https://api.openai.com/v1", "http://10.0.0.1:80"):
        with pytest.raises(ReplayError, match="only targets a gateway on this machine"):
            replay(sim["out"], url, {})
    with pytest.raises(ReplayError, match="max_requests"):
        replay(sim["out"], "http://127.0.0.1:9", {}, max_requests=0)
    with pytest.raises(ReplayError, match="no simulation"):
        replay(sim["out"] / "nowhere", "http://127.0.0.1:9", {})
