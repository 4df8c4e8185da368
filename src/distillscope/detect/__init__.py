"""Detect distillation campaigns in traffic logs, measured against simulated ground truth.

``simulate`` writes a realistic traffic log in the gateway's schema (legitimate ShareGPT users
beside hydra clusters of campaign accounts) with the truth about every account; ``replay`` sends a
simulated log's requests to a gateway running on this machine. See ``distillscope.detect.simulate``.
``detect`` scores every account of a log and flags campaigns (``distillscope.detect.detector``);
``fit_reference`` fits its signals on earlier traffic to score new logs against
(``distillscope.detect.signals``); ``evaluate_alerts`` measures the flags against the truth
(``distillscope.detect.evaluate``).
"""

from distillscope.detect.detector import (
    DetectConfig,
    DetectError,
    DetectionSummary,
    detect,
    fit_reference,
)
from distillscope.detect.evaluate import evaluate_alerts
from distillscope.detect.signals import BadReferenceError, Reference
from distillscope.detect.simulate import (
    Campaign,
    CampaignSummary,
    LegitTraffic,
    ReplayError,
    ReplaySummary,
    Scenario,
    ScenarioError,
    SimulationSummary,
    keystore_keys,
    load_scenario,
    replay,
    scenario_names,
    simulate,
)

__all__ = [
    "DetectConfig",
    "DetectError",
    "DetectionSummary",
    "detect",
    "fit_reference",
    "Reference",
    "BadReferenceError",
    "evaluate_alerts",
    "Campaign",
    "CampaignSummary",
    "LegitTraffic",
    "ReplayError",
    "ReplaySummary",
    "Scenario",
    "ScenarioError",
    "SimulationSummary",
    "keystore_keys",
    "load_scenario",
    "replay",
    "scenario_names",
    "simulate",
]
