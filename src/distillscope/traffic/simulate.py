"""``simulate``: a scenario's world, every population from its own seed, into one folder."""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from distillscope.traffic.campaigns.hydra import Hydra
from distillscope.traffic.campaigns.reseller import Reseller
from distillscope.traffic.campaigns.slow_drip_cot import SlowDripCot
from distillscope.traffic.campaigns.stealth import Stealth
from distillscope.traffic.campaigns.tool_trajectory import ToolTrajectory
from distillscope.traffic.legit.background import Background
from distillscope.traffic.legit.benchmarks import BenchmarkRunners
from distillscope.traffic.legit.people import CodingAgents, CorporateNat, LogprobResearchers
from distillscope.traffic.legit.pipelines import IntegrationFleet, SharedTemplateCustomers
from distillscope.traffic.log import Account, Log, exchanges_table, truth_tables, write
from distillscope.traffic.material import sharegpt
from distillscope.traffic.population import Population, World
from distillscope.traffic.scenario import Scenario, ScenarioError, load_scenario, parse_start

#: Each shape's simulation, by the name a scenario's ``shape:`` gives.
SHAPES: dict[str, type[Population]] = {
    shape.shape: shape
    for shape in (
        Hydra, Stealth, Reseller, SlowDripCot, ToolTrajectory, IntegrationFleet,
        SharedTemplateCustomers, CodingAgents, BenchmarkRunners, LogprobResearchers, CorporateNat,
    )
}  # fmt: skip


@dataclass
class CampaignSummary:
    name: str
    shape: str
    modelled_on: str
    #: Accounts the operator keeps active at once; distinct accounts, replacements included.
    slots: int
    accounts: int
    banned: int
    exchanges: int
    #: Median over the campaign's accounts of requests per day (over the days each was in use).
    per_account_day: float


@dataclass
class PopulationSummary:
    """A legitimate population beside the background."""

    name: str
    shape: str
    accounts: int
    exchanges: int


@dataclass
class SimulationSummary:
    out: Path
    scenario: str
    seed: int
    days: float
    #: Legitimate accounts, the background and every other legitimate population.
    legit_accounts: int
    campaigns: list[CampaignSummary]
    populations: list[PopulationSummary]
    exchanges: int
    campaign_exchanges: int
    #: Percentiles (p50, p90, p99, max) of legitimate accounts' requests per day (active ones).
    legit_daily: dict[str, float]
    #: Legitimate accounts that send more a day than the median campaign account.
    legit_above_campaign_median: int
    wall_s: float

    @property
    def campaign_accounts(self) -> int:
        return sum(c.accounts for c in self.campaigns)

    @property
    def campaign_share(self) -> float:
        return self.campaign_exchanges / self.exchanges if self.exchanges else 0.0


def simulate(
    scenario: Scenario | str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int | None = None,
    progress: bool = True,
) -> SimulationSummary:
    """Simulate ``scenario`` (a Scenario, a built-in name or a YAML file) into the folder ``out``.

    ``seed`` overrides the scenario's. Writes the files ``distillscope.traffic`` lists,
    replacing those of an earlier simulation in the same folder.
    """
    from rich.progress import Progress

    began = time.perf_counter()
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if seed is not None:
        scenario = scenario.replace(seed=seed)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScenarioError(f"cannot write the simulation to {out}: {exc.strerror}") from None
    material = sharegpt()
    start = parse_start(scenario.start)
    release = scenario.release_day * 86400 if scenario.new_model else math.inf
    world = World(scenario, material, start, scenario.days * 86400, release)
    root = np.random.SeedSequence(scenario.seed)
    legit_seed, *campaign_seeds = root.spawn(1 + len(scenario.campaigns))
    population_seeds = root.spawn(len(scenario.populations))
    rows: list[tuple] = []
    truth: list[tuple] = []

    def build(shape: type[Population], settings, seed: np.random.SeedSequence) -> Population:
        r = random.Random(int(np.random.default_rng(seed.spawn(1)[0]).integers(2**63)))
        return shape(world, settings, Log(r, material, scenario, rows, truth), seed)

    background = build(Background, scenario.legit, legit_seed)
    populations = [
        build(SHAPES[p.shape], p, s) for p, s in zip(scenario.populations, population_seeds)
    ]
    campaigns = [build(SHAPES[c.shape], c, s) for c, s in zip(scenario.campaigns, campaign_seeds)]
    everyone = [background, *populations, *campaigns]
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"simulating {scenario.name}", total=sum(p.size for p in everyone) + 1)
        accounts: list[Account] = []
        for population in everyone:
            accounts += population.run(lambda: bar.advance(task))
        table = exchanges_table(rows, start)
        rows.clear()  # the table holds them now
        write(out, scenario, table, truth_tables(accounts, truth, start), start)
        bar.advance(task)
    return _summary(out, scenario, table, accounts, populations, campaigns, began)


def _summary(
    out: Path,
    scenario: Scenario,
    table: pa.Table,
    accounts: list[Account],
    populations: list[Population],
    campaigns: list[Population],
    began: float,
) -> SimulationSummary:
    ts = table["ts"].cast(pa.int64()).to_numpy() / 1e6
    ids = table["account_id"].to_pylist()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: Counter = Counter(ids)
    for account_id, t in zip(ids, ts):
        first.setdefault(account_id, t)
        last[account_id] = t
    campaign_of = {a.account_id: a.campaign_id for a in accounts}
    legit_daily = np.array(
        [n / scenario.days for a, n in count.items() if campaign_of.get(a) is None]
    )
    summaries = []
    campaign_rates = []
    for operator in campaigns:
        members = operator.accounts
        rates = [
            count[a.account_id] / max(1.0, (last[a.account_id] - first[a.account_id]) / 86400)
            for a in members
            if count[a.account_id]
        ]
        campaign_rates += rates
        settings = operator.settings
        summaries.append(
            CampaignSummary(
                name=settings.name,
                shape=settings.shape,
                modelled_on=settings.modelled_on,
                slots=operator.size if members else 0,
                accounts=len(members),
                banned=sum(a.banned_at is not None for a in members),
                exchanges=sum(count[a.account_id] for a in members),
                per_account_day=float(np.median(rates)) if rates else 0.0,
            )
        )
    percentiles = {}
    if len(legit_daily):
        percentiles = {f"p{q}": float(np.percentile(legit_daily, q)) for q in (50, 90, 99)}
        percentiles["max"] = float(legit_daily.max())
    median_campaign = float(np.median(campaign_rates)) if campaign_rates else math.inf
    return SimulationSummary(
        out=out,
        scenario=scenario.name,
        seed=scenario.seed,
        days=scenario.days,
        legit_accounts=sum(a.campaign_id is None for a in accounts),
        campaigns=summaries,
        populations=[
            PopulationSummary(
                name=p.name,
                shape=p.shape,
                accounts=len(p.accounts),
                exchanges=sum(count[a.account_id] for a in p.accounts),
            )
            for p in populations
        ],
        exchanges=table.num_rows,
        campaign_exchanges=sum(c.exchanges for c in summaries),
        legit_daily=percentiles,
        legit_above_campaign_median=int((legit_daily > median_campaign).sum()),
        wall_s=time.perf_counter() - began,
    )
