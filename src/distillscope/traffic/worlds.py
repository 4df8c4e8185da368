"""Many worlds instead of one: ``random_worlds(n, seed)`` samples scenarios, each a background
population plus a random subset of the campaign shapes and legitimate traps, every drawn shape's
knobs drawn from ``RANGES`` (the knobs not named there keep their defaults).

In ``RANGES`` a tuple ``(low, high)`` is drawn uniformly (an integer when both are integers) and
a list is a choice among its items.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

from distillscope.traffic.scenario import (
    CAMPAIGN_SHAPES,
    POPULATION_SHAPES,
    Scenario,
    ScenarioError,
    load_scenario,
    scenario_from_mapping,
)
from distillscope.traffic.simulate import SimulationSummary, simulate

#: The documented ranges of every shape's drawn knobs (see the module docstring).
RANGES: dict[str, dict[str, tuple | list]] = {
    "hydra": {
        "accounts": (2000, 14000),  # x campaign_scale 0.002: 4 to 28 accounts at once
        "requests_per_account_day": (4.0, 30.0),
        "focus": [
            {"agentic_coding": 0.55, "tool_use": 0.35, "reasoning": 0.1},
            {"reasoning": 0.4, "computer_use": 0.3, "data_analysis": 0.3},
            {"cot_elicitation": 0.6, "rubric_grading": 0.3, "rewrite": 0.1},
        ],
        "mixing_share": (0.05, 0.5),
        "paraphrase_rate": (0.0, 0.75),
        "cot_rate": (0.1, 0.9),
        "timing_jitter": (0.05, 1.0),
        "ip_rotation": (0.0, 1.0),
        "accounts_per_ip": (1.5, 6.0),
        "ban_rate": (0.0, 0.6),
    },
    "stealth": {
        "accounts": (40, 200),
        "requests_per_active_day": [[5, 20], [10, 40], [20, 60]],
        "active_day_share": (0.3, 0.9),
        "camouflage_share": (0.1, 0.7),
        "follow_up": (0.0, 0.6),
    },
    "reseller": {
        "accounts": (2, 8),
        "requests_per_day": [[100, 300], [300, 900], [500, 1200]],
        "distill_share": (0.1, 0.5),
        "grammar_share": (0.0, 1.0),
        "cot_rate": (0.2, 0.9),
    },
    "slow_drip_cot": {
        "accounts": (40, 200),
        "requests_per_active_day": [[1, 2], [1, 4], [2, 6]],
        "active_day_share": (0.4, 0.95),
        "proxy_share": (0.0, 0.8),
    },
    "tool_trajectory": {
        "accounts": (8, 40),
        "requests_per_account_day": (15.0, 120.0),
        "steps": [[1, 3], [2, 6], [4, 12]],
        "accounts_per_ip": (1.0, 6.0),
        "timing_jitter": (0.05, 1.0),
    },
    "integration_fleet": {
        "orgs": (3, 12),
        "accounts_per_org": [[1, 3], [1, 6], [2, 8]],
        "requests_per_day": [[20, 200], [50, 500], [100, 800]],
        "queue_share": (0.0, 1.0),
    },
    "shared_template_customers": {
        "accounts": (15, 60),
        "templates": (2, 8),
        "requests_per_day": [[10, 100], [20, 300], [50, 500]],
    },
    "coding_agents": {"accounts": (20, 100), "median_daily": (10.0, 60.0)},
    "benchmark_runners": {
        "accounts": (2, 8),
        "questions": (100, 600),
        "run_hours": [[0.5, 2], [1, 6], [4, 12]],
        "cot_wrap_share": (0.0, 1.0),
    },
    "logprob_researchers": {"accounts": (5, 30), "median_daily": (5.0, 40.0)},
    "corporate_nat": {"accounts": (50, 250), "nat_addresses": [[1, 1], [1, 2], [2, 3]]},
}


def _draw(r: random.Random, spec: tuple | list) -> object:
    if isinstance(spec, list):
        return r.choice(spec)
    low, high = spec
    if isinstance(low, int) and isinstance(high, int):
        return r.randint(low, high)
    return round(r.uniform(low, high), 3)


def random_worlds(
    n: int, seed: int = 0, *, days: float = 7.0, background: int = 800
) -> list[Scenario]:
    """``n`` scenarios drawn from ``seed`` (the same seed, the same worlds): each ``days`` long
    with ``background`` ordinary accounts, at least one campaign shape and one legitimate trap,
    and every drawn shape's knobs from ``RANGES``."""
    r = random.Random(seed)
    worlds = []
    for i in range(n):
        campaigns = r.sample(list(CAMPAIGN_SHAPES), r.randint(1, len(CAMPAIGN_SHAPES)))
        traps = r.sample(list(POPULATION_SHAPES), r.randint(1, len(POPULATION_SHAPES)))

        def entry(shape: str) -> dict:
            knobs = {knob: _draw(r, spec) for knob, spec in RANGES[shape].items()}
            return {"shape": shape, "name": shape, **knobs}

        document = {
            "name": f"world-{i:03d}",
            "description": f"Random world {i} of seed {seed}: campaigns {', '.join(campaigns)}; "
            f"legitimate traps {', '.join(traps)}.",
            "seed": r.randrange(2**31),
            "days": days,
            "release_day": round(r.uniform(1.0, days), 2),
            "campaign_scale": 0.002,
            "legit": {"accounts": background, "orgs": max(1, background // 40)},
            "populations": [entry(shape) for shape in traps],
            "campaigns": [entry(shape) for shape in campaigns],
        }
        worlds.append(scenario_from_mapping(document, f"random world {i}"))
    return worlds


def simulate_worlds(
    worlds: list[Scenario], out: str | os.PathLike, *, progress: bool = True
) -> Iterator[tuple[Scenario, SimulationSummary | None]]:
    """Simulate each world into ``out/<its name>/``; (world, summary) as each is done, or
    (world, None) for a world already complete there (the same scenario.yaml), so an
    interrupted run resumes."""
    for world in worlds:
        folder = Path(out) / world.name
        try:
            if load_scenario(folder / "scenario.yaml") == world:
                yield world, None
                continue
        except ScenarioError:  # absent, or another scenario: simulate it
            pass
        yield world, simulate(world, folder, progress=progress)
