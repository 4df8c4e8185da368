"""Simulated traffic with ground truth: legitimate populations beside distillation campaigns,
each population a *shape* a scenario file mixes.

``simulate(load_scenario("default"), "sim/")`` writes what a gateway would have logged over a few
weeks, and what nobody watching the gateway knows: which account belongs to which campaign.

- ``traffic.duckdb`` and ``traffic.parquet``: the ``exchanges`` table of the gateway's traffic
  log (``EXCHANGE_SCHEMA``; ``read_traffic`` reads the DuckDB file);
- ``accounts.parquet``: what the gateway's key store knows of each account (creation time,
  payment fingerprint, email domain, organisation, tier, key);
- ``truth.parquet``: each account's campaign (null for legitimate ones), ``shape``
  (``background``, a legitimate population's shape, or a campaign's), role (``legitimate``,
  ``campaign``, ``replacement``), profile, creation and ban times;
- ``exchange_truth.parquet``: each exchange's campaign and content (``legitimate``, ``template``
  with its template id and capability, ``grammar``, ``cot_wrap`` and ``trajectory`` for the
  other campaign shapes' distillation prompts, ``ordinary``: a campaign's camouflage or resold
  traffic, or ``blocked``: a banned account's refused request); legitimate pipelines' rows carry
  their template id too;
- ``events.parquet``: model releases; ``scenario.yaml``: the resolved scenario, seed included.

Shapes (``scenario.py`` documents every knob; ``scenarios/default.yaml`` holds the defaults):
the ``background`` of ordinary ShareGPT users (``legit/background.py``); legitimate traps in
``legit/`` (integration fleets, customers sharing a framework's template, IDE coding agents,
benchmark runners, logprob researchers, a corporate NAT); campaigns in ``campaigns/`` (``hydra``
clusters, ``stealth`` accounts, ``reseller`` accounts, ``slow_drip_cot``, ``tool_trajectory``).
``random_worlds(n, seed)`` samples worlds of random shapes with random knobs.

Completions are filler (running text of real ShareGPT answers, cut to ``completion_chars``);
``completion_tokens`` is what the answer would have cost. Everything is drawn from the scenario's
seed: the same seed writes the same files.

``replay(out, url, keys)`` sends a simulated log's requests, in order and with their relative
timing, to a gateway on this machine, bounded in requests and time.
"""

from distillscope.traffic.replay import ReplayError, ReplaySummary, keystore_keys, replay
from distillscope.traffic.scenario import Scenario, ScenarioError, load_scenario, scenario_names
from distillscope.traffic.simulate import (
    CampaignSummary,
    PopulationSummary,
    SimulationSummary,
    simulate,
)
from distillscope.traffic.worlds import random_worlds

__all__ = [
    "CampaignSummary",
    "PopulationSummary",
    "ReplayError",
    "ReplaySummary",
    "Scenario",
    "ScenarioError",
    "SimulationSummary",
    "keystore_keys",
    "load_scenario",
    "random_worlds",
    "replay",
    "scenario_names",
    "simulate",
]
