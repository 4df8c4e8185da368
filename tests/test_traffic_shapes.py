"""The simulator's shapes: every campaign shape and legitimate trap in one small world (one
simulation for the module), checked for what each shape claims; random worlds; and scenario
validation that names the bad key."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pyarrow.parquet as pq
import pytest

from distillscope.traffic import ScenarioError, load_scenario, random_worlds, simulate
from distillscope.traffic.legit.benchmarks import question_set
from distillscope.traffic.scenario import CAMPAIGN_SHAPES, POPULATION_SHAPES
from distillscope.traffic.templates import COT_PHRASES

WORLD = """
name: tiny-shapes
days: 2.0
release_day: 1.0
campaign_scale: 0.001
legit: {accounts: 60, orgs: 4}
populations:
  - {shape: integration_fleet, orgs: 2, requests_per_day: [40, 80]}
  - {shape: shared_template_customers, accounts: 8, templates: 2, requests_per_day: [20, 60]}
  - {shape: coding_agents, accounts: 6}
  - {shape: benchmark_runners, accounts: 2, questions: 60}
  - {shape: logprob_researchers, accounts: 4}
  - {shape: corporate_nat, accounts: 12}
campaigns:
  - {name: hydra-coding}
  - {shape: stealth, accounts: 20}
  - {shape: reseller, accounts: 2, requests_per_day: [100, 200]}
  - {shape: slow_drip_cot, accounts: 15}
  - {shape: tool_trajectory, accounts: 4, accounts_per_ip: 2}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    (root / "world.yaml").write_text(WORLD)
    simulate(load_scenario(root / "world.yaml"), root / "sim", progress=False)
    truth = {r["account_id"]: r for r in pq.read_table(root / "sim" / "truth.parquet").to_pylist()}
    rows = defaultdict(list)  # by shape
    for row in pq.read_table(root / "sim" / "traffic.parquet").to_pylist():
        rows[truth[row["account_id"]]["shape"]].append(row)
    accounts = pq.read_table(root / "sim" / "accounts.parquet").to_pylist()
    accounts = {a["account_id"]: a for a in accounts}
    return {"root": root, "truth": truth, "rows": rows, "accounts": accounts}


def test_the_same_seed_writes_the_same_world(world, tmp_path):
    simulate(load_scenario(world["root"] / "world.yaml"), tmp_path / "again", progress=False)
    for name in ("traffic.parquet", "truth.parquet", "exchange_truth.parquet"):
        assert pq.read_table(tmp_path / "again" / name).equals(
            pq.read_table(world["root"] / "sim" / name)
        )


def test_every_shape_writes_rows_with_its_truth(world):
    shapes = {"background", *CAMPAIGN_SHAPES, *POPULATION_SHAPES}
    assert set(world["rows"]) == shapes
    for account in world["truth"].values():
        campaign = account["shape"] in CAMPAIGN_SHAPES
        assert (account["campaign_id"] is not None) == campaign
        assert account["role"] in (("campaign", "replacement") if campaign else ("legitimate",))


def test_stealth_accounts_share_no_address_or_agent(world):
    stealth = world["rows"]["stealth"]
    users = defaultdict(set)
    for rows in world["rows"].values():
        for row in rows:
            users[row["client_ip"]].add(row["account_id"])
            users[row["user_agent"]].add(row["account_id"])
    assert len({r["account_id"] for r in stealth}) >= 15
    for row in stealth:
        assert len(users[row["client_ip"]]) == 1 and len(users[row["user_agent"]]) == 1
        assert row["user_agent"].startswith("Mozilla/5.0")
    cards = {world["accounts"][r["account_id"]]["payment_fingerprint"] for r in stealth}
    assert len(cards) == len({r["account_id"] for r in stealth})
    prompts = [r["prompt"] for r in stealth if r["status"] == 200]
    assert not any(phrase in p for p in prompts for phrase in COT_PHRASES)
    tools = sum(bool(re.search(r"tool|function|call", p, re.IGNORECASE)) for p in prompts)
    assert 0.3 < tools / len(prompts) < 0.9  # grammar prompts beside camouflage (0.4)


def test_shared_template_customers_share_a_frame_across_unrelated_accounts(world):
    by_frame = defaultdict(set)
    for row in world["rows"]["shared_template_customers"]:
        by_frame[row["prompt"][:25]].add(row["account_id"])
    shared = [accounts for accounts in by_frame.values() if len(accounts) >= 3]
    assert len(shared) == 2  # two templates, eight customers
    for accounts in shared:
        orgs = {world["accounts"][a]["org"] for a in accounts}
        assert len(orgs) == len(accounts)  # unrelated customers
    for row in world["rows"]["integration_fleet"]:
        assert not row["user_agent"].startswith("Mozilla")


def test_tool_trajectories_carry_tool_results_and_share_proxies(world):
    rows = [r for r in world["rows"]["tool_trajectory"] if r["status"] == 200]
    with_results = 0
    for row in rows:
        messages = json.loads(row["messages"])
        assert messages[0]["role"] == "system" and "function" in messages[0]["content"]
        assert row["prompt"] == messages[-1]["content"]
        with_results += messages[-1]["role"] == "tool"
    assert with_results > 0.3 * len(rows)
    accounts_on = defaultdict(set)
    for row in rows:
        accounts_on[row["client_ip"]].add(row["account_id"])
    assert max(len(a) for a in accounts_on.values()) == 2  # accounts_per_ip: 2


def test_benchmark_runners_send_the_same_set_once_at_temperature_0(world):
    sent = defaultdict(list)
    for row in world["rows"]["benchmark_runners"]:
        if row["status"] == 200:
            sent[row["account_id"]].append(row["prompt"])
            assert row["temperature"] == 0.0
    questions = set(question_set(60))
    for prompts in sent.values():
        asked = {
            p.removeprefix("Q: ").removesuffix("\nA: Let's think step by step.") for p in prompts
        }
        assert asked == questions and len(prompts) == 60
    assert question_set(60) == question_set(60)


def test_coding_agents_and_slow_drip_look_as_described(world):
    for row in world["rows"]["coding_agents"]:
        if row["status"] == 200:
            messages = json.loads(row["messages"])
            assert messages[0]["role"] == "system" and "run_terminal_cmd" in messages[0]["content"]
    drip = [r for r in world["rows"]["slow_drip_cot"] if r["status"] == 200]
    per_account = defaultdict(int)
    for row in drip:
        per_account[row["account_id"]] += 1
    assert max(per_account.values()) <= 8  # at most 4 a day over 2 days
    assert sum(
        bool(re.search(r"reason|think|step|logic", r["prompt"], re.I)) for r in drip
    ) > 0.9 * len(drip)
    logprobs = [r for r in world["rows"]["logprob_researchers"] if r["status"] == 200]
    assert all(r["exposure_requested"] != "text" for r in logprobs)
    nat = {r["client_ip"] for r in world["rows"]["corporate_nat"]}
    assert len(nat) <= 2 and len({r["account_id"] for r in world["rows"]["corporate_nat"]}) > 5


def test_random_worlds_are_seeded_and_mixed():
    first = random_worlds(4, seed=5)
    assert first == random_worlds(4, seed=5)
    assert first != random_worlds(4, seed=6)
    assert [w.name for w in first] == ["world-000", "world-001", "world-002", "world-003"]
    for w in first:
        assert w.campaigns and w.populations and w.legit.accounts == 800
    shapes = {c.shape for w in random_worlds(12, seed=0) for c in w.campaigns}
    assert shapes == set(CAMPAIGN_SHAPES)


def test_shapes_scenario_holds_every_shape_once():
    shapes = load_scenario("shapes")
    assert sorted(c.shape for c in shapes.campaigns) == sorted(CAMPAIGN_SHAPES)
    assert sorted(p.shape for p in shapes.populations) == sorted(POPULATION_SHAPES)
    assert shapes.legit.accounts == 800 and shapes.days == 7
    swept = shapes.for_all_campaigns(camouflage_share=0.1, mixing_share=0.5)
    assert {c.shape: getattr(c, "camouflage_share", None) for c in swept.campaigns}[
        "stealth"
    ] == 0.1
    assert swept.campaigns[0].mixing_share == 0.5  # each knob where the shape has it
    with pytest.raises(ScenarioError, match="no setting camouflage_share"):
        load_scenario("default").for_all_campaigns(camouflage_share=0.1)  # hydra only there


def test_cli_writes_random_worlds(cli, tmp_path):
    done = cli(
        "simulate", "--random-shapes", "2", "--seed", "4", "--days", "0.5", "--scale", "0.05",
        "--out", tmp_path / "worlds",
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    for name in ("world-000", "world-001"):
        assert name in done.stdout
        truth = pq.read_table(tmp_path / "worlds" / name / "truth.parquet")
        assert load_scenario(tmp_path / "worlds" / name / "scenario.yaml").name == name
        assert "background" in truth["shape"].to_pylist()
    again = cli(
        "simulate", "--random-shapes", "2", "--seed", "4", "--days", "0.5", "--scale", "0.05",
        "--out", tmp_path / "worlds",
    )  # fmt: skip
    assert again.stdout.count("already written") == 2  # an interrupted run resumes
