"""Simulated traffic with ground truth: legitimate ShareGPT users beside distillation campaigns.

``simulate(load_scenario("default"), "sim/")`` writes what a gateway would have logged over a few
weeks, and what nobody watching the gateway knows: which account belongs to which campaign.

- ``traffic.duckdb`` and ``traffic.parquet``: the ``exchanges`` table of the gateway's traffic
  log (``EXCHANGE_SCHEMA``; ``read_traffic`` reads the DuckDB file);
- ``accounts.parquet``: what the gateway's key store knows of each account (creation time,
  payment fingerprint, email domain, organisation, tier, key);
- ``truth.parquet``: each account's campaign (null for legitimate ones), role (``legitimate``,
  ``hydra``, ``replacement``), profile, creation and ban times;
- ``exchange_truth.parquet``: each exchange's campaign and content (``legitimate``, ``template``
  with its template id and capability, ``ordinary``: a campaign's camouflage, or ``blocked``: a
  banned account's refused request); legitimate pipelines' rows carry their template id too;
- ``events.parquet``: model releases; ``scenario.yaml``: the resolved scenario, seed included.

Realism is the point, volume is not. Legitimate users send real ShareGPT conversations (follow-up
turns carry the earlier ones in ``messages``), at heavy-tailed volumes (lognormal: most send a few
requests a day, power users far more than any campaign account), in diurnal and bursty sessions
in their own time zones, many of them behind shared corporate NAT addresses; a few run pipelines
of their own (templated prompts, regular timing) and a few sit behind the same commercial proxy
ranges campaigns rent. Campaigns follow the brief's table scaled down by ``campaign_scale``: hydra
clusters whose accounts each look modest (tens of requests a day) on a shared proxy pool, driven
by one scheduler (synchronised waves around the clock, with outages), sending templated prompts
with slot variation and paraphrase concentrated on a few capabilities, with chain-of-thought
elicitation and a share of ordinary prompts as camouflage. The provider bans some accounts
mid-run (their next requests get 403) and the operator replaces them with fresh ones; when a new
model is released campaigns move most of their traffic to it within a day, users slowly.

Completions are filler (running text of real ShareGPT answers, cut to ``completion_chars``);
``completion_tokens`` is what the answer would have cost. Everything is drawn from the scenario's
seed: the same seed writes the same files.

``replay(out, url, keys)`` sends a simulated log's requests, in order and with their relative
timing, to a gateway on this machine, bounded in requests and time.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import ipaddress
import itertools
import json
import math
import os
import random
import re
import tempfile
import time
import types
import typing
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from distillscope.errors import DistillscopeError

if typing.TYPE_CHECKING:
    from distillscope.gateway.keys import KeyStore

SCENARIO_DIR = Path(__file__).parent / "scenarios"

#: Capability families of the template bank; a campaign's ``focus`` weighs them.
CAPABILITIES = (
    "agentic_coding",
    "tool_use",
    "reasoning",
    "cot_elicitation",
    "rubric_grading",
    "rewrite",
    "data_analysis",
    "computer_use",
)


class ScenarioError(DistillscopeError):
    """A scenario that does not load: unknown name or key, or a value out of range."""


class ReplayError(DistillscopeError):
    """A replay that cannot run: a target off this machine, or a folder that is no simulation."""


# --- the scenario -----------------------------------------------------------------------------


@dataclass
class LegitTraffic:
    """The provider's ordinary customers. Counts are before the scenario's ``scale``."""

    #: Legitimate accounts.
    accounts: int = 2000
    #: Requests on a day the account is active, for the median account (lognormal across them).
    median_daily: float = 4.0
    #: Lognormal sigma of that rate across accounts: 1.3 puts the top 1% past 80 a day.
    volume_sigma: float = 1.3
    #: Mean chance that an account is active on a weekday.
    active_day_share: float = 0.5
    #: Weekend activity relative to weekdays (individuals; corporate users drop to a third of it).
    weekend_factor: float = 0.6
    #: Accounts that belong to an organisation: shared NAT addresses in its /24, its email
    #: domain, usually its corporate card, business hours in its time zone.
    corporate_share: float = 0.35
    #: Organisations the corporate accounts belong to (sizes are Zipf-like).
    orgs: int = 40
    #: Accounts that run a pipeline of their own: templated prompts, regular timing, a cloud IP,
    #: an automation user agent, heavy volume. Legitimate look-alikes of a campaign account.
    integration_share: float = 0.015
    #: Requests a day of the median pipeline.
    integration_median_daily: float = 90.0
    #: Individuals behind a commercial VPN or proxy: exits in the same ranges campaigns rent.
    vpn_share: float = 0.03
    #: Accounts that sign up during the window (active from then on).
    signup_share: float = 0.05
    #: Chance that a conversation goes on to its next turn (ShareGPT's own follow-ups).
    follow_up: float = 0.55
    #: Accounts on the legacy ``/v1/completions`` endpoint (single-turn prompts).
    completions_share: float = 0.04
    #: Accounts whose client asks for logprobs (most of their requests).
    logprobs_share: float = 0.08
    #: Share of accounts that move to the new model at all, and their mean delay in days.
    adoption: float = 0.4
    adoption_days: float = 4.0
    #: Chance that a request is answered 429 (the client retries after a few seconds).
    rate_limited_share: float = 0.004


@dataclass
class Campaign:
    """One distillation campaign: a hydra cluster of accounts run by one operator.

    ``accounts`` is at the brief's scale; the simulation keeps ``accounts * campaign_scale *
    scale`` of them active at once (at least 2), each sending about
    ``requests_per_account_day``.
    """

    name: str = "campaign"
    #: The row of the brief's table it is modelled on (documentation only).
    modelled_on: str = ""
    accounts: int = 14_000
    requests_per_account_day: float = 26.0
    #: When the operator starts and stops (days from the scenario's start; null: the end).
    start_day: float = 0.0
    end_day: float | None = None
    # -- content
    #: Capability families the templated prompts come from, with weights (see CAPABILITIES).
    focus: dict[str, float] = field(
        default_factory=lambda: {"agentic_coding": 0.55, "tool_use": 0.35, "reasoning": 0.1}
    )
    #: Distinct templates the operator uses; a few carry most of the traffic (Zipf).
    templates: int = 8
    #: Share of requests that are ordinary ShareGPT prompts instead (camouflage; sweep 0.05-0.5).
    mixing_share: float = 0.2
    #: Chance that a templated prompt is paraphrased (another wording, synonyms swapped).
    paraphrase_rate: float = 0.25
    #: Chance that a templated prompt also asks for the full chain of thought.
    cot_rate: float = 0.3
    # -- timing
    #: The scheduler dispatches waves this many minutes apart; each account fires every few.
    wave_minutes: float = 20.0
    #: How far requests stray from the schedule: to a wave ``timing_jitter x every`` waves away
    #: (std), and ``timing_jitter x wave / 2`` off it. 0 is a clock; 0.1 gives regular accounts
    #: and sharp waves; 0.5 and more make accounts irregular and dissolve the waves.
    timing_jitter: float = 0.1
    #: Seconds over which one wave's requests spread.
    sync_spread_s: float = 30.0
    #: Times a week the whole cluster goes quiet for 1-6 hours (operator outages).
    outages_per_week: float = 1.0
    # -- network and accounts
    #: Accounts per address of the proxy pool (the pool is ``accounts / accounts_per_ip``).
    accounts_per_ip: float = 4.0
    #: /24 networks the pool spans: few for datacenter proxies, many for residential ones.
    ip_subnets: int = 12
    #: Chance that a request leaves from another address of the pool than the account's own.
    ip_rotation: float = 0.3
    #: Expected bans per account slot over the window; each banned account is replaced.
    ban_rate: float = 0.35
    #: Mean hours from a ban to the replacement's first request.
    replacement_delay_h: float = 0.5
    #: First-generation accounts bought aged (created months before) rather than fresh.
    aged_share: float = 0.2
    #: Share of accounts that pay with one of the operator's ``shared_fingerprints`` cards (one
    #: main card, the others less used); the rest have a card each.
    shared_fingerprint_share: float = 0.25
    shared_fingerprints: int = 4
    email_domains: list[str] = field(
        default_factory=lambda: ["gmail.com", "outlook.com", "proton.me", "mailbox-relay.net"]
    )
    user_agents: list[str] = field(
        default_factory=lambda: [
            "python-requests/2.31.0",
            "python-httpx/0.27.0",
            "OpenAI/Python 1.35.3",
        ]
    )
    # -- requests
    tier: str = "top20"
    #: What requests ask to see: ``text``, ``logprobs``, ``topK`` or ``full``, with weights.
    exposure_mix: dict[str, float] = field(default_factory=lambda: {"text": 0.3, "top20": 0.7})
    temperature: float | None = 0.7
    max_tokens: int = 4096
    stream_share: float = 0.05
    #: Chance that a request is answered 429 (retried after 1, 2, 4 s).
    rate_limited_share: float = 0.02
    # -- release pivot
    #: Share of traffic on the new model once the pivot is complete.
    pivot_share: float = 0.6
    #: Hours after the release when the move starts, and when it is complete.
    pivot_delay_h: float = 2.0
    pivot_hours: float = 24.0


def _default_campaigns() -> list[Campaign]:
    return [
        Campaign(
            name="hydra-coding",
            modelled_on="MiniMax (Feb 2026): ~14,000 accounts, ~13M exchanges, agentic coding "
            "and tool use; moved about half its traffic to a new model within 24 h",
        ),
        Campaign(
            name="agentic-reasoning",
            modelled_on="Moonshot: ~7,000 accounts, ~3.4M exchanges, agentic reasoning, tool "
            "use, coding, computer use",
            accounts=7000,
            requests_per_account_day=24.0,
            focus={
                "reasoning": 0.3,
                "tool_use": 0.25,
                "agentic_coding": 0.2,
                "computer_use": 0.15,
                "data_analysis": 0.1,
            },
            templates=7,
            mixing_share=0.3,
            paraphrase_rate=0.4,
            cot_rate=0.5,
            wave_minutes=15.0,
            timing_jitter=0.2,
            accounts_per_ip=3.0,
            ip_subnets=20,
            ip_rotation=0.5,
            ban_rate=0.25,
            replacement_delay_h=2.0,
            email_domains=["gmail.com", "outlook.com", "yahoo.com", "inboxkit.io"],
            user_agents=["OpenAI/Python 1.40.6", "python-httpx/0.27.2", "aiohttp/3.9.5"],
            exposure_mix={"text": 0.5, "top20": 0.4, "logprobs": 0.1},
            temperature=1.0,
            pivot_share=0.8,
        ),
        Campaign(
            name="cot-elicitation",
            modelled_on="DeepSeek: ~3,000 accounts, ~150,000 exchanges, chain-of-thought "
            "elicitation, rubric grading, censorship-safe rewrites",
            accounts=3000,
            requests_per_account_day=4.0,
            start_day=2.0,
            focus={"cot_elicitation": 0.55, "rubric_grading": 0.3, "rewrite": 0.15},
            templates=5,
            mixing_share=0.1,
            paraphrase_rate=0.15,
            cot_rate=0.9,
            wave_minutes=30.0,
            timing_jitter=0.05,
            accounts_per_ip=2.0,
            ip_subnets=2,
            ip_rotation=0.05,
            ban_rate=0.2,
            replacement_delay_h=6.0,
            aged_share=0.0,
            shared_fingerprint_share=0.5,
            shared_fingerprints=2,
            email_domains=["proton.me", "tutamail.com", "quietpost.org"],
            user_agents=["python-requests/2.32.3"],
            tier="text",
            exposure_mix={"text": 1.0},
            temperature=0.0,
            stream_share=0.0,
            rate_limited_share=0.005,
            pivot_share=0.9,
            pivot_delay_h=1.0,
            pivot_hours=12.0,
        ),
    ]


@dataclass
class Scenario:
    """Everything a simulation draws from; the defaults are the ``default`` scenario."""

    name: str = "default"
    description: str = (
        "Two weeks of a provider's traffic: 2,000 legitimate accounts and three distillation "
        "campaigns modelled on the brief's table at 1/100 of their size, with bans, "
        "replacements and a model release on day 9.5."
    )
    #: Seeds every draw; ``simulate(seed=...)`` and ``--seed`` override it.
    seed: int = 0
    #: The window's first instant (UTC), and its length in days.
    start: str = "2026-04-20T00:00:00Z"
    days: float = 14.0
    #: Multiplies every account count, legitimate and campaign (``--scale``).
    scale: float = 1.0
    #: Campaign account counts are the brief's, times this.
    campaign_scale: float = 0.01
    #: The model everyone uses at the start, and the one released at ``release_day`` (null: no
    #: release). A release past the window's end never happens.
    base_model: str = "frontier-1"
    new_model: str | None = "frontier-2"
    release_day: float = 9.5
    #: Completion text is cut to this many characters (null: whole); tokens count the whole.
    completion_chars: int | None = 200
    legit: LegitTraffic = field(default_factory=LegitTraffic)
    campaigns: list[Campaign] = field(default_factory=_default_campaigns)

    def for_all_campaigns(self, **settings: object) -> Scenario:
        """The scenario with ``settings`` applied to every campaign (a robustness sweep's knob,
        e.g. ``mixing_share=0.5``, ``paraphrase_rate``, ``timing_jitter``, ``ip_rotation``)."""
        unknown = sorted(set(settings) - {f.name for f in fields(Campaign)})
        if unknown:
            raise ScenarioError(f"campaigns have no setting {', '.join(unknown)}")
        scenario = replace(self, campaigns=[replace(c, **settings) for c in self.campaigns])
        _check_scenario(scenario)
        return scenario

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False, allow_unicode=True, width=100)


def scenario_names() -> list[str]:
    """The built-in scenarios, by name."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str | os.PathLike) -> Scenario:
    """A built-in scenario by name (``default``, ``smoke``), or a YAML file of one.

    A file sets any subset of ``Scenario``'s fields; ``legit:`` is a mapping, ``campaigns:`` a
    list of mappings, and ``campaign_defaults:`` (optional) holds settings every campaign gets
    unless it sets its own. Unknown keys and out-of-range values are a ``ScenarioError``.
    """
    text = os.fspath(name_or_path)
    path = SCENARIO_DIR / f"{text}.yaml" if text in scenario_names() else Path(text)
    if not path.is_file():
        hint = ", ".join(scenario_names())
        raise ScenarioError(f"no scenario {text!r}: give a built-in name ({hint}) or a YAML file")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ScenarioError(f"scenario {path} is not valid YAML{line}") from None
    if not isinstance(document, dict):
        raise ScenarioError(f"scenario {path} must be a mapping of settings")
    document = dict(document)
    defaults = document.pop("campaign_defaults", None) or {}
    if not isinstance(defaults, dict):
        raise ScenarioError(f"scenario {path}: campaign_defaults must be a mapping")
    if "campaigns" in document:
        campaigns = document["campaigns"]
        if not isinstance(campaigns, list):
            raise ScenarioError(f"scenario {path}: campaigns must be a list of mappings")
        document["campaigns"] = [{**defaults, **c} if isinstance(c, dict) else c for c in campaigns]
    scenario = _build(Scenario, document, f"scenario {path.name}")
    _check_scenario(scenario, f"scenario {path.name}")
    return scenario


def _build(cls: type, values: object, where: str):
    """An instance of dataclass ``cls`` from a mapping, every value checked against its type."""
    if not isinstance(values, dict):
        raise ScenarioError(f"{where} must be a mapping of settings")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = [str(key) for key in values if key not in known]
    if unknown:
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    return cls(
        **{key: _coerce(value, hints[key], f"{where}: {key}") for key, value in values.items()}
    )


def _coerce(value: object, hint: object, where: str) -> object:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise ScenarioError(f"{where} must be a list")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ScenarioError(f"{where} must be a mapping")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        return _build(hint, value, where)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is str and isinstance(value, datetime):  # YAML reads an unquoted timestamp
        return value.isoformat()
    if hint is bool and isinstance(value, bool):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ScenarioError(f"{where} must be {'a number' if hint is float else name}, not {value!r}")


def _check_scenario(s: Scenario, where: str = "scenario") -> None:
    """Ranges the types cannot say; the first violation, as one line."""
    from distillscope.gateway.tiers import BUILTIN_TIERS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ScenarioError(f"{where}: {message}")

    need(0 < s.days <= 366, f"days must be in (0, 366], not {s.days}")
    need(s.scale > 0 and s.campaign_scale > 0, "scale and campaign_scale must be positive")
    need(_parse_start(s.start) is not None, f"start must be an ISO time, not {s.start!r}")
    need(bool(s.base_model.strip()), "base_model must not be empty")
    need(s.new_model != s.base_model, "new_model must differ from base_model")
    need(s.release_day >= 0, "release_day must be >= 0")
    need(s.completion_chars is None or s.completion_chars >= 1, "completion_chars must be >= 1")
    g = s.legit
    need(g.accounts >= 0 and g.orgs >= 1, "legit.accounts must be >= 0 and legit.orgs >= 1")
    need(g.median_daily > 0 and g.integration_median_daily > 0, "legit rates must be positive")
    need(g.volume_sigma >= 0 and g.adoption_days > 0, "legit.volume_sigma >= 0, adoption_days > 0")
    shares = ("active_day_share", "weekend_factor", "corporate_share", "integration_share")
    shares += ("vpn_share", "signup_share", "follow_up", "completions_share", "logprobs_share")
    for name in (*shares, "adoption", "rate_limited_share"):
        value = getattr(g, name)
        need(0 <= value <= 1, f"legit.{name} must be in [0, 1], not {value}")
    need(
        g.corporate_share + g.integration_share + g.vpn_share <= 1,
        "legit corporate_share + integration_share + vpn_share must not exceed 1",
    )
    names = [c.name for c in s.campaigns]
    need(len(set(names)) == len(names), "campaign names must be unique")
    for c in s.campaigns:
        at = f"campaign {c.name!r}"
        need(bool(c.name.strip()), "a campaign needs a name")
        need(c.accounts >= 1 and c.requests_per_account_day > 0, f"{at}: accounts and rate > 0")
        need(c.start_day >= 0, f"{at}: start_day must be >= 0")
        need(c.end_day is None or c.end_day > c.start_day, f"{at}: end_day must be > start_day")
        need(c.focus and all(k in CAPABILITIES for k in c.focus), _focus_message(at, c.focus))
        need(
            all(w >= 0 for w in c.focus.values()) and sum(c.focus.values()) > 0,
            f"{at}: focus weights must be >= 0 and not all 0",
        )
        need(c.templates >= 1, f"{at}: templates must be >= 1")
        for name in ("mixing_share", "paraphrase_rate", "cot_rate", "ip_rotation", "aged_share"):
            value = getattr(c, name)
            need(0 <= value <= 1, f"{at}: {name} must be in [0, 1], not {value}")
        for name in ("shared_fingerprint_share", "stream_share", "rate_limited_share"):
            value = getattr(c, name)
            need(0 <= value <= 1, f"{at}: {name} must be in [0, 1], not {value}")
        need(0 <= c.pivot_share <= 1, f"{at}: pivot_share must be in [0, 1]")
        need(0 <= c.pivot_delay_h < c.pivot_hours, f"{at}: need 0 <= pivot_delay_h < pivot_hours")
        need(c.wave_minutes > 0 and c.sync_spread_s >= 0, f"{at}: wave_minutes > 0 and spread >= 0")
        need(c.timing_jitter >= 0 and c.outages_per_week >= 0, f"{at}: jitter and outages >= 0")
        need(c.accounts_per_ip > 0 and c.ip_subnets >= 1, f"{at}: accounts_per_ip, ip_subnets > 0")
        need(c.ban_rate >= 0 and c.replacement_delay_h >= 0, f"{at}: ban_rate and delay >= 0")
        need(c.shared_fingerprints >= 1, f"{at}: shared_fingerprints must be >= 1")
        need(
            bool(c.email_domains) and bool(c.user_agents), f"{at}: needs email_domains, user_agents"
        )
        need(c.tier in BUILTIN_TIERS, f"{at}: tier must be one of {', '.join(BUILTIN_TIERS)}")
        need(
            bool(c.exposure_mix) and all(_EXPOSURE.fullmatch(k) for k in c.exposure_mix),
            f"{at}: exposure_mix keys are text, logprobs, top1..top20 or full",
        )
        need(
            all(w >= 0 for w in c.exposure_mix.values()) and sum(c.exposure_mix.values()) > 0,
            f"{at}: exposure_mix weights must be >= 0 and not all 0",
        )
        need(1 <= c.max_tokens <= 4096, f"{at}: max_tokens must be in [1, 4096]")
        need(c.temperature is None or 0 <= c.temperature <= 2, f"{at}: temperature in [0, 2]")


_EXPOSURE = re.compile(r"text|logprobs|full|top(?:[1-9]|1[0-9]|20)")


def _focus_message(at: str, focus: dict[str, float]) -> str:
    unknown = [k for k in focus if k not in CAPABILITIES]
    which = f"unknown capability {unknown[0]!r}" if unknown else "focus must not be empty"
    return f"{at}: {which} (known: {', '.join(CAPABILITIES)})"


def _parse_start(text: str) -> datetime | None:
    try:
        start = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)


# --- ShareGPT material ------------------------------------------------------------------------

#: Turns of a conversation kept, and characters of a human turn (pasted logs run to 100 kB).
_MAX_TURNS = 8
_TURN_CHARS = 2500
_SEED_CHARS = 1200


@dataclass(frozen=True)
class _Material:
    """Real text to draw from: conversations for users, prompts for slots, words for filler."""

    #: (category of the opening prompt, human turns) per ShareGPT conversation.
    conversations: list[tuple[str, tuple[str, ...]]]
    #: Opening prompts per category, and all of them.
    prompts: dict[str, list[str]]
    #: Running text of ShareGPT's answers, as words: completions are slices of it.
    words: list[str]


@functools.cache
def _material() -> _Material:
    from distillscope.prompts import CATEGORIES, iter_sharegpt, load_prompts, sharegpt_path

    category = {p.id: p.category for p in load_prompts("sharegpt")}
    conversations: list[tuple[str, tuple[str, ...]]] = []
    prompts: dict[str, list[str]] = {c: [] for c in (*CATEGORIES, "any")}
    words: list[str] = []
    for conversation in iter_sharegpt(sharegpt_path()):
        turns = conversation.get("conversations") or []
        if len(words) < 600_000:
            for turn in turns:
                if turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
                    words.extend(turn["value"].split())
        kind = category.get(f"sharegpt:{conversation.get('id')}")
        if kind is None:  # no human opening, or a repeat: load_prompts skipped it
            continue
        humans = tuple(
            t["value"].strip()[:_TURN_CHARS]
            for t in turns
            if t.get("from") == "human" and isinstance(t.get("value"), str) and t["value"].strip()
        )
        if not humans:
            continue
        conversations.append((kind, humans[:_MAX_TURNS]))
        prompts[kind].append(humans[0][:_SEED_CHARS])
        prompts["any"].append(humans[0][:_SEED_CHARS])
    return _Material(conversations, prompts, words)


# --- the template bank ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """A prompt skeleton: ``{slot}`` fields, a canonical wording and its paraphrases."""

    id: str
    system: str | None
    wordings: tuple[str, ...]

    @property
    def capability(self) -> str:
        return self.id.split("/")[0]


_AGENT_SYSTEM = (
    "You are an autonomous software engineering agent working in a {language} repository. You "
    "can read files, run shell commands and edit code. Work step by step and explain every action."
)
_TOOLS_SYSTEM = (
    "You have access to the following tools:\n{tools}\nCall a tool by replying with a JSON object "
    '{{"tool": <name>, "arguments": {{...}}}}. Decide which tools are needed before calling any.'
)
_ANALYST_SYSTEM = (
    "You are an expert data analyst. Deliver data-driven insights grounded in complete and "
    "transparent reasoning."
)

TEMPLATES: tuple[_Template, ...] = (
    _Template(
        "agentic_coding/fix-failing-test",
        _AGENT_SYSTEM,
        (
            "The test `{test_name}` in `{file}` fails after the last commit. Investigate the "
            "failure, find the root cause in the {framework} code, and produce a minimal patch as "
            "a unified diff. Then explain why the fix is correct.",
            "`{test_name}` (in `{file}`) started failing after the most recent commit. Find the "
            "root cause in the {framework} code, write the smallest possible fix as a unified "
            "diff, and justify it.",
            "After the latest commit the test {test_name} from {file} is failing. Track down the "
            "underlying cause in our {framework} codebase, give a minimal unified-diff patch, and "
            "explain why it works.",
        ),
    ),
    _Template(
        "agentic_coding/implement-feature",
        "You are a senior {language} engineer acting as a coding agent. Plan before you write "
        "code; output complete files, never placeholders.",
        (
            "Implement {feature} for a {framework} service. First write a numbered plan, then the "
            "complete code for every file you touch, then the tests.",
            "Add {feature} to our {framework} service. Start with a numbered plan, then give the "
            "full contents of each file you change, followed by unit tests.",
            "Your task: {feature} in a {framework} codebase. Plan it as a numbered list, write "
            "every modified file in full, and finish with tests that cover it.",
        ),
    ),
    _Template(
        "agentic_coding/refactor",
        _AGENT_SYSTEM,
        (
            "Refactor the code in the following request for readability and performance without "
            "changing its behaviour, and explain each change:\n\n{seed_coding}",
            "Improve the structure and speed of the code below while keeping its behaviour "
            "identical. Explain every change you make.\n\n{seed_coding}",
        ),
    ),
    _Template(
        "agentic_coding/terminal-step",
        "You are operating a Linux terminal to complete a software task. Respond with your next "
        "shell command inside <cmd></cmd> tags and your reasoning inside <thought></thought> "
        "tags.",
        (
            "Goal: {shell_goal}.\nPrevious output:\n{shell_output}\nWhat is your next command?",
            "Objective: {shell_goal}.\nThe last command printed:\n{shell_output}\nGive the next "
            "command and why.",
            "You are trying to {shell_goal}. Output so far:\n{shell_output}\nDecide the next step.",
        ),
    ),
    _Template(
        "tool_use/function-calling",
        _TOOLS_SYSTEM,
        (
            "{user_request}",
            "Please help: {user_request}",
            "{user_request} Use the tools as needed.",
        ),
    ),
    _Template(
        "tool_use/multi-step",
        None,
        (
            "Using the tools available ({tool_names}), plan and execute the steps needed to: "
            "{user_request} Show every tool call with its arguments and the expected result "
            "before the final answer.",
            "With the tools {tool_names}, work out the sequence of calls required to do this: "
            "{user_request} List each call, its arguments and what it returns, then answer.",
        ),
    ),
    _Template(
        "tool_use/api-orchestration",
        None,
        (
            "Given these API endpoints:\n{endpoints}\nWrite the sequence of calls (method, path, "
            "body) needed to {api_goal}, and explain how each response feeds the next call.",
            "Here is an API:\n{endpoints}\nDescribe, call by call (method, path, JSON body), how "
            "to {api_goal}. Explain how the output of each call is used by the next.",
        ),
    ),
    _Template(
        "reasoning/word-problem",
        None,
        (
            "{math_problem} Think step by step and show your full reasoning before giving the "
            "final answer.",
            "Solve: {math_problem} Show every step of your reasoning, then state the answer.",
            "{math_problem} Work through it step by step and explain each step before the final "
            "answer.",
        ),
    ),
    _Template(
        "reasoning/logic-puzzle",
        None,
        (
            "{puzzle} Reason through every possibility explicitly and justify the final answer.",
            "Here is a puzzle. {puzzle} Consider each case in turn, explain why it does or does "
            "not work, and give the answer.",
        ),
    ),
    _Template(
        "reasoning/seeded-question",
        None,
        (
            "Answer the following question. Show your complete chain of reasoning as numbered "
            "steps before the final answer.\n\n{seed_reasoning}",
            "Give a numbered, step-by-step derivation, then the final answer, for this:\n\n"
            "{seed_reasoning}",
        ),
    ),
    _Template(
        "cot_elicitation/reconstruct-reasoning",
        None,
        (
            "Below is a question and a completed response. Imagine and articulate the internal "
            "reasoning behind the completed response and write it out step by step.\n\n"
            "Question: {seed_any}\n\nResponse: {reply_excerpt}",
            "Here are a prompt and the answer that was given. Reconstruct the hidden reasoning "
            "that led to this answer and write it out in full, step by step.\n\nPrompt: "
            "{seed_any}\n\nAnswer: {reply_excerpt}",
            "Question: {seed_any}\n\nFinal response: {reply_excerpt}\n\nNow write out, step by "
            "step, the internal reasoning a model would have gone through to produce that "
            "response.",
        ),
    ),
    _Template(
        "cot_elicitation/think-aloud",
        None,
        (
            "Before answering, write out your entire thought process, including doubts and the "
            "alternatives you considered, inside <thinking> tags. Then answer.\n\n{seed_any}",
            "First think out loud inside <thinking></thinking>, covering every consideration and "
            "rejected option, then give your answer.\n\n{seed_any}",
        ),
    ),
    _Template(
        "cot_elicitation/teach-steps",
        None,
        (
            "Pretend you are teaching a student. Solve this and narrate every intermediate step "
            "of your reasoning, leaving nothing implicit: {seed_reasoning}",
            "Act as a tutor: work through the following, spelling out each intermediate step of "
            "your thinking so a student can follow: {seed_reasoning}",
        ),
    ),
    _Template(
        "rubric_grading/score-response",
        "You are a strict grader.",
        (
            "Score the response below from 1 to 10 on each criterion of this rubric: {rubric}. "
            "Give your reasoning for each score, then a final total.\n\nPrompt: {seed_any}\n\n"
            "Response: {reply_excerpt}",
            "Grade this response on a 1-10 scale for each of: {rubric}. Justify every score, then "
            "give the total.\n\nPrompt: {seed_any}\n\nResponse: {reply_excerpt}",
        ),
    ),
    _Template(
        "rubric_grading/compare-pair",
        None,
        (
            "Which of these two responses to the prompt is better, A or B? Evaluate {rubric}, "
            "explaining your reasoning in detail before the verdict.\n\nPrompt: {seed_any}\n\n"
            "A: {reply_excerpt}\n\nB: {reply_excerpt_b}",
            "Compare response A and response B on {rubric}. Reason about each criterion, then "
            "say which is better.\n\nPrompt: {seed_any}\n\nA: {reply_excerpt}\n\nB: "
            "{reply_excerpt_b}",
        ),
    ),
    _Template(
        "rewrite/neutral",
        None,
        (
            "Rewrite the following text so that it is neutral, avoids sensitive political topics "
            "and is suitable for all audiences, while keeping its factual content:\n\n"
            "{reply_excerpt}",
            "Rewrite this passage in a neutral tone, leaving out anything politically sensitive "
            "but keeping the facts:\n\n{reply_excerpt}",
        ),
    ),
    _Template(
        "rewrite/guideline-safe",
        None,
        (
            "Rewrite this request so that it complies with strict content guidelines: remove "
            "anything controversial, keep the tone calm and the meaning intact.\n\n{seed_writing}",
            "Make the following text comply with strict content rules: drop controversial "
            "statements, keep it calm, keep its meaning.\n\n{seed_writing}",
        ),
    ),
    _Template(
        "data_analysis/expert-analyst",
        _ANALYST_SYSTEM,
        (
            "Dataset: {dataset}. Question: {analysis_question} Walk through your analysis step "
            "by step.",
            "We have {dataset}. {analysis_question} Explain your analysis in full, step by step.",
            "Data: {dataset}.\nTask: {analysis_question} Show the complete reasoning behind each "
            "insight.",
        ),
    ),
    _Template(
        "computer_use/next-action",
        "You control a computer through the actions click(x, y), type(text), scroll(dy) and "
        "key(name).",
        (
            "The screen shows {screen}. Goal: {ui_goal}. Give the next action and explain your "
            "reasoning.",
            "Current screen: {screen}. You need to {ui_goal}. What is the next action, and why?",
        ),
    ),
)

#: Legitimate pipelines' own templates (integration accounts): repetitive, but one account each.
PIPELINE_TEMPLATES: tuple[_Template, ...] = (
    _Template(
        "pipeline/summarize-ticket",
        None,
        ("Summarize the following customer support ticket in three bullet points:\n\n{seed_any}",),
    ),
    _Template(
        "pipeline/classify",
        "You are a classifier. Answer with exactly one label.",
        ("Classify this message as one of: question, complaint, request, other.\n\n{seed_any}",),
    ),
    _Template(
        "pipeline/translate",
        None,
        ("Translate the following text into {target_language}:\n\n{seed_any}",),
    ),
    _Template(
        "pipeline/extract",
        None,
        (
            "Extract all company names, dates and amounts from this text. Reply with JSON only."
            "\n\n{seed_any}",
        ),
    ),
    _Template(
        "pipeline/product-copy",
        None,
        ("Write a two-sentence product description for: {product}",),
    ),
)

# fmt: off
_SLOTS: dict[str, tuple[str, ...]] = {
    "language": ("Python", "TypeScript", "Go", "Rust", "Java", "C++", "Kotlin", "Ruby"),
    "framework": (
        "Django", "FastAPI", "React", "Express", "Spring Boot", "Gin", "Actix", "Rails", "Next.js",
        "Flask", "PyTorch", "pandas",
    ),
    "file": (
        "src/api/handlers.py", "lib/parser.ts", "internal/cache/lru.go", "src/main.rs",
        "app/models/user.rb", "services/billing/invoice.py", "pkg/auth/token.go",
        "src/components/Table.tsx", "core/Scheduler.java", "utils/date_utils.py",
    ),
    "test_name": (
        "test_handles_empty_input", "test_concurrent_writes", "test_token_refresh",
        "test_pagination_cursor", "test_unicode_roundtrip", "test_retry_backoff",
        "test_invoice_rounding", "test_timezone_boundaries", "test_cache_eviction",
    ),
    "feature": (
        "rate limiting per API key", "a retry policy with exponential backoff",
        "cursor-based pagination", "an LRU cache with a TTL", "OAuth2 token refresh",
        "CSV export of the reports page", "a background job queue",
        "full-text search over documents", "webhook signature verification", "a plugin system",
        "audit logging of admin actions", "multi-tenant data isolation",
    ),
    "shell_goal": (
        "find why the build fails on CI and fix it",
        "add type hints to the utils module and make mypy pass",
        "profile the slow /search endpoint and speed it up",
        "write a Dockerfile for the service and check it builds",
        "write integration tests for the payment flow",
        "upgrade the project's dependencies and fix what breaks",
    ),
    "shell_output": (
        "$ pytest -x\n....F\nE   AssertionError: expected 200, got 500",
        "$ npm run build\nerror TS2345: Argument of type 'string | undefined' is not assignable "
        "to parameter of type 'string'.",
        "$ cargo test\nerror[E0502]: cannot borrow `self.items` as mutable because it is also "
        "borrowed as immutable",
        "$ go test ./...\n--- FAIL: TestCache (0.00s)\n    cache_test.go:42: got 3 entries, want 2",
        '$ docker build .\nERROR: failed to solve: process "/bin/sh -c pip install -r '
        'requirements.txt" did not complete successfully: exit code: 1',
        '$ mypy src\nsrc/utils.py:17: error: Incompatible return value type (got "str | None", '
        'expected "str")',
    ),
    "person": ("Dana", "Priya", "Marco", "Chen", "Olu", "Sofia", "Tom"),
    "city": ("Lisbon", "Denver", "Osaka", "Nairobi", "Toronto", "Krakow", "Austin", "Melbourne"),
    "math_problem": (
        "A tank holds {n1} liters and drains at {n2} liters per minute while a pump adds {n3} "
        "liters per minute. How long until it is empty?",
        "A store discounts a ${n1} jacket by {p1}% and then adds {p2}% sales tax. What is the "
        "final price?",
        "In how many ways can {n4} people sit around a round table if two of them refuse to sit "
        "next to each other?",
        "A train leaves at {n3}:00 at {n2}0 km/h; a second one leaves the same station an hour "
        "later at {n2}5 km/h on the same track. When does the second catch up?",
        "What is the probability of getting at least {n4} heads in {n2} tosses of a fair coin?",
        "The sum of three consecutive odd integers is {n1}3. Find the integers.",
    ),
    "puzzle": (
        "On an island knights always tell the truth and knaves always lie. A says 'B is a "
        "knave'; B says 'A and C are the same kind'. What is C?",
        "{n4} friends each shake hands with everyone else exactly once. How many handshakes "
        "happen, and why?",
        "You have {n4} coins, one of which is lighter, and a balance scale. What is the fewest "
        "weighings that always finds it?",
        "A farmer must ferry a wolf, a goat and a cabbage across a river in a boat that holds one "
        "item at a time. How?",
    ),
    "rubric": (
        "accuracy, completeness, clarity and safety",
        "correctness of the final answer, quality of the reasoning and concision",
        "helpfulness, honesty and harmlessness",
    ),
    "dataset": (
        "monthly sales for {n2} stores over three years (store_id, month, revenue, footfall, "
        "promo_flag)",
        "a churn table of {n1}0 telecom customers (tenure, plan, monthly_charges, support_calls, "
        "churned)",
        "hourly energy use of {n1} households with weather data",
        "clinical trial results for two arms with {n1} patients (age, dose, outcome, "
        "adverse_events)",
    ),
    "analysis_question": (
        "Which factors best explain the variation, and how confident can we be?",
        "Is the promotion effect statistically significant?",
        "What would you forecast for next quarter, with intervals?",
        "Which segments should we target first, and why?",
    ),
    "target_language": ("French", "German", "Spanish", "Japanese", "Portuguese"),
    "product": (
        "a stainless steel insulated water bottle", "noise-cancelling wireless earbuds",
        "a standing desk with memory presets", "a cast-iron skillet",
    ),
}
# fmt: on
#: Slots that must agree (a toolset and a request it can serve, an API and a goal it allows, a
#: screen and a goal on it): the first use of one sets them all. A tuple is a choice.
_BUNDLES: dict[str, tuple[dict[str, str | tuple[str, ...]], ...]] = {
    "toolset": (
        {
            "tools": '[{"name": "search_web", "parameters": {"query": "string"}}, {"name": '
            '"get_weather", "parameters": {"city": "string", "date": "string"}}, {"name": '
            '"create_event", "parameters": {"title": "string", "start": "datetime", "attendees": '
            '"list"}}]',
            "tool_names": "search_web, get_weather, create_event",
            "user_request": (
                "Check the weather in {city} for Saturday and suggest indoor or outdoor plans.",
                "Find a free 30-minute slot next week for a meeting with {person} and send an "
                "invite.",
                "Book a table for {n4} in {city} tomorrow at 7pm and add it to my calendar.",
                "Find the three most cited papers on retrieval-augmented generation from last "
                "year.",
            ),
        },
        {
            "tools": '[{"name": "run_sql", "parameters": {"query": "string"}}, {"name": '
            '"run_python", "parameters": {"code": "string"}}, {"name": "plot", "parameters": '
            '{"spec": "object"}}]',
            "tool_names": "run_sql, run_python, plot",
            "user_request": (
                "What was the total revenue by region last quarter? Use the sales database.",
                "Compare the average order value in {city} with the national average and plot it.",
                "Which {n4} products lost the most sales since January? Plot their trend.",
            ),
        },
        {
            "tools": '[{"name": "lookup_order", "parameters": {"order_id": "string"}}, {"name": '
            '"issue_refund", "parameters": {"order_id": "string", "amount": "number"}}, {"name": '
            '"send_email", "parameters": {"to": "string", "subject": "string", "body": '
            '"string"}}]',
            "tool_names": "lookup_order, issue_refund, send_email",
            "user_request": (
                "Refund order #{n3}{n2} and email the customer an apology.",
                "{person} says order #{n1}{n4} arrived broken. Check it and make it right.",
            ),
        },
        {
            "tools": '[{"name": "read_file", "parameters": {"path": "string"}}, {"name": '
            '"write_file", "parameters": {"path": "string", "content": "string"}}, {"name": '
            '"run_tests", "parameters": {"selector": "string"}}]',
            "tool_names": "read_file, write_file, run_tests",
            "user_request": (
                "Fix the failing test in tests/test_{n2}.py without changing the test.",
                "Rename parse_date to parse_timestamp everywhere and keep the tests passing.",
            ),
        },
    ),
    "api": (
        {
            "endpoints": "GET /users/{id}\nGET /users/{id}/orders\nPOST /orders/{id}/refunds\n"
            "POST /emails",
            "api_goal": (
                "refund the latest order of the user with the most orders",
                "email every user whose last order is more than a year old",
            ),
        },
        {
            "endpoints": "POST /auth/token\nGET /projects\nPOST /projects/{id}/deployments\n"
            "GET /deployments/{id}",
            "api_goal": (
                "deploy the newest project and wait until the deployment is live",
                "redeploy every project whose last deployment failed",
            ),
        },
        {
            "endpoints": "GET /products?query=\nPOST /carts\nPOST /carts/{id}/items\nPOST "
            "/checkout",
            "api_goal": (
                "buy the cheapest product matching 'usb-c cable'",
                "fill a cart with {n4} different notebooks and check out",
            ),
        },
    ),
    "ui": (
        {
            "screen": "a login form with email and password fields and a blue 'Sign in' button "
            "at (640, 420)",
            "ui_goal": ("log in and download the latest statement", "reset the password"),
        },
        {
            "screen": "a spreadsheet with columns A-F; cell B7 is selected",
            "ui_goal": ("sum column C into C20", "sort the table by column D, largest first"),
        },
        {
            "screen": "a settings page with a 'Privacy' tab at (210, 180) and a search box at "
            "(900, 60)",
            "ui_goal": ("turn off location sharing", "delete the browsing history"),
        },
        {
            "screen": "a file manager showing the Downloads folder with {n3} PDFs",
            "ui_goal": ("rename every invoice to include its date", "move the PDFs to Documents"),
        },
    ),
}
_BUNDLE_OF = {slot: name for name, entries in _BUNDLES.items() for slot in entries[0]}
#: Number slots and their ranges.
_NUMBERS = {
    "n1": (20, 900),
    "n2": (2, 40),
    "n3": (1, 30),
    "n4": (3, 9),
    "p1": (5, 60),
    "p2": (3, 25),
}
#: Paraphrase swaps (outside slots), each applied with probability one half.
_SYNONYMS = (
    ("Investigate", "Look into"),
    ("find the root cause", "identify what causes it"),
    ("explain", "describe"),
    ("Explain", "Describe"),
    ("step by step", "one step at a time"),
    ("complete", "full"),
    ("numbered", "enumerated"),
    ("following", "below"),
    ("Give", "Provide"),
    ("write", "produce"),
    ("needed", "required"),
    ("final answer", "answer at the end"),
    ("in detail", "thoroughly"),
)
#: Chain-of-thought elicitation added to a templated prompt (``cot_rate``).
COT_PHRASES = (
    "Think step by step and show your full reasoning.",
    "Show your full reasoning before the final answer.",
    "Explain your reasoning in detail, step by step.",
    "Write out your complete chain of thought before answering.",
    "Let's think step by step.",
    "Imagine and articulate the internal reasoning behind your answer and write it out step by "
    "step.",
)
_SLOT = re.compile(r"(\{[^{}]*\})")
#: A slot inside a slot's value (JSON braces in a value are left alone).
_NESTED = re.compile(r"\{([a-z_0-9]+)\}")


def _paraphrase(wording: str, r: random.Random) -> str:
    """Swap synonyms in the wording's fixed text, never inside a ``{slot}``."""
    parts = _SLOT.split(wording)
    for i in range(0, len(parts), 2):
        for old, new in _SYNONYMS:
            if old in parts[i] and r.random() < 0.5:
                parts[i] = parts[i].replace(old, new, 1)
    return "".join(parts)


class _Slots(dict):
    """Values for one rendering, drawn on first use (a slot used twice gets the same value)."""

    def __init__(self, r: random.Random, material: _Material, filler: Callable[[int], str]):
        super().__init__()
        self.r, self.material, self.filler = r, material, filler

    def __missing__(self, key: str) -> str:
        r = self.r
        if key in _NUMBERS:
            value = str(r.randint(*_NUMBERS[key]))
        elif key.startswith("seed_"):
            pool = self.material.prompts[key.removeprefix("seed_")] or self.material.prompts["any"]
            value = r.choice(pool)
        elif key.startswith("reply_excerpt"):
            value = self.filler(r.randint(40, 140))
        elif key == "id":  # literal path parameters in ``endpoints``
            return "{id}"
        elif key in _BUNDLE_OF:
            for slot, choice in r.choice(_BUNDLES[_BUNDLE_OF[key]]).items():
                value = r.choice(choice) if isinstance(choice, tuple) else choice
                self[slot] = _NESTED.sub(lambda m: self[m.group(1)], value)
            return self[key]
        else:
            value = _NESTED.sub(lambda m: self[m.group(1)], r.choice(_SLOTS[key]))
        self[key] = value
        return value


def _render(
    template: _Template,
    r: random.Random,
    material: _Material,
    filler: Callable[[int], str],
    *,
    paraphrase_rate: float = 0.0,
    cot_rate: float = 0.0,
) -> list[dict[str, str]]:
    """Chat messages from a template: slots filled, maybe paraphrased, maybe a CoT phrase."""
    wording = template.wordings[0]
    if len(template.wordings) > 1 and r.random() < paraphrase_rate:
        wording = _paraphrase(r.choice(template.wordings[1:]), r)
    slots = _Slots(r, material, filler)
    user = wording.format_map(slots)
    if r.random() < cot_rate:
        user = (
            f"{user}\n\n{r.choice(COT_PHRASES)}"
            if r.random() < 0.7
            else f"{r.choice(COT_PHRASES)} {user}"
        )
    messages = [{"role": "user", "content": user}]
    if template.system:
        messages.insert(0, {"role": "system", "content": template.system.format_map(slots)})
    return messages


# --- networks, clients, accounts --------------------------------------------------------------

#: First octets of residential ISP ranges, mobile carriers and clouds (addresses are invented).
_RESIDENTIAL = (24, 67, 71, 73, 76, 86, 90, 92, 98, 99, 109, 112, 121, 174, 177, 186, 189, 201)
_MOBILE = (37, 46, 89, 166, 172, 223)
_CLOUD = (3, 13, 18, 34, 35, 52, 54, 104)
_CORPORATE = (12, 63, 64, 128, 130, 141, 144, 192, 198, 204)
#: /16s of commercial proxy and VPN providers: campaigns rent pools here, some users exit here.
_PROXY_16S = ((45, 134), (185, 220), (193, 176), (91, 242), (5, 188), (212, 102), (146, 70))

_SDK_AGENTS = (
    "OpenAI/Python 1.40.6",
    "OpenAI/Python 1.51.0",
    "OpenAI/Python 1.30.1",
    "OpenAI/JS 4.56.0",
    "OpenAI/JS 4.67.3",
    "axios/1.6.7",
    "curl/8.5.0",
    "python-httpx/0.27.0",
    "python-requests/2.31.0",
    "Go-http-client/2.0",
)
_BROWSER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
)
_PIPELINE_AGENTS = ("python-requests/2.31.0", "OpenAI/Python 1.40.6", "python-httpx/0.26.0")
_FREE_MAIL = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me", "hotmail.com")
_ORG_WORDS = (
    ("North", "Blue", "Bright", "Cedar", "Delta", "Harbor", "Iron", "Lumen", "Maple", "Nova"),
    ("wind", "stone", "field", "point", "bridge", "works", "line", "leaf", "gate", "path"),
    ("Labs", "Analytics", "Health", "Logistics", "Capital", "Media", "Systems", "Robotics"),
)
# fmt: off
#: (UTC offset in hours, weight) of legitimate users' time zones.
_TIMEZONES = (
    (-8, 14), (-7, 4), (-6, 6), (-5, 18), (-3, 5), (0, 8), (1, 17), (2, 6), (3, 3), (5.5, 7),
    (8, 7), (9, 5),
)
#: Activity by local hour (0-23): individuals (evenings too) and office hours.
_HOURS_PERSONAL = (4, 2, 1, 1, 1, 1, 2, 4, 7, 9, 10, 10, 9, 10, 10, 10, 9, 9, 10, 12, 12, 10, 8, 6)
_HOURS_OFFICE = (
    0.3, 0.2, 0.1, 0.1, 0.1, 0.2, 0.5, 2, 6, 10, 11, 10, 6, 9, 10, 10, 8, 5, 2.5, 1.5, 1, 1, 0.6,
    0.4,
)
# fmt: on
_LEGIT_TIERS = (("text", 55), ("top1", 10), ("top5", 25), ("top20", 10))
_MAX_TOKENS = (512, 1024, 1024, 2048, 4096)
_TEMPERATURES = (None, None, None, 0.7, 1.0, 0.2, 0.0)


def _ip(r: random.Random, first: int, second: int | None = None, third: int | None = None) -> str:
    second = r.randrange(256) if second is None else second
    third = r.randrange(256) if third is None else third
    return f"{first}.{second}.{third}.{r.randrange(2, 254)}"


def _hex(r: random.Random, chars: int) -> str:
    return f"{r.getrandbits(4 * chars):0{chars}x}"


@dataclass
class _Account:
    """What the key store knows of an account, and the truth about it."""

    account_id: str
    key_id: str
    tier: str
    created_at: float  # seconds from the window's start; negative: before it
    payment_fingerprint: str
    email_domain: str
    org: str | None
    role: str  # legitimate, hydra, replacement
    profile: str  # individual, corporate, vpn, integration; hydra for campaign accounts
    campaign_id: str | None = None
    banned_at: float | None = None
    replaces: str | None = None


# --- the log being built ----------------------------------------------------------------------

_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass
class _Request:
    """What a client sends, and who it is."""

    account: _Account
    ip: str
    user_agent: str
    endpoint: str
    model: str
    messages: list[dict[str, str]]
    stream: bool
    temperature: float | None
    max_tokens: int
    seed: int | None
    exposure: str
    #: How long the answer would be, before ``max_tokens`` cuts it.
    answer_tokens: int
    campaign_id: str | None
    content: str  # legitimate, template, ordinary (blocked rows are logged apart)
    template_id: str | None = None


class _Log:
    """The exchanges table as rows of values in ``EXCHANGE_SCHEMA`` order, plus their truth."""

    def __init__(
        self,
        r: random.Random,
        material: _Material,
        scenario: Scenario,
        rows: list[tuple],
        truth: list[tuple],
    ):
        from distillscope.gateway.tiers import BUILTIN_TIERS

        self.r = r
        self.words = material.words
        self.chars = scenario.completion_chars
        self.end = scenario.days * 86400
        self.tiers = BUILTIN_TIERS
        self.rows, self.truth = rows, truth
        self._served: dict[tuple[str, str], str] = {}

    def filler(self, tokens: int) -> str:
        """Answer-like text of about ``tokens`` tokens (cut to ``completion_chars``)."""
        words = max(1, round(tokens / 1.3))
        if self.chars is not None:
            words = min(words, self.chars // 4 + 1)
        start = self.r.randrange(len(self.words) - words)
        text = " ".join(self.words[start : start + words])
        return text if self.chars is None else text[: self.chars]

    def send(
        self, t: float, q: _Request, *, rate_limited: float, automated: bool
    ) -> tuple[str, float]:
        """Log ``q`` at ``t``, after up to three 429s and their retries; the answer and when it
        ended. Requests outside the window are not logged (the answer is still made up, for a
        conversation that goes on)."""
        r = self.r
        for attempt in range(3):
            if r.random() >= rate_limited:
                break
            self._row(t, q, status=429, latency_ms=r.uniform(1.0, 8.0))
            t += 2**attempt + r.uniform(0, 0.3) if automated else r.uniform(3, 40)
        tokens = min(q.answer_tokens, q.max_tokens)
        answer = self.filler(tokens)
        latency = r.lognormvariate(math.log(0.35), 0.35)  # to the first token
        latency += tokens * r.lognormvariate(math.log(0.018), 0.15)
        finish = "length" if q.answer_tokens >= q.max_tokens else "stop"
        self._row(t, q, status=200, latency_ms=latency * 1000, answer=answer, tokens=tokens,
                  finish=finish)  # fmt: skip
        return answer, t + latency

    def blocked(self, t: float, account: _Account, ip: str, user_agent: str, campaign: str) -> None:
        """A banned account's request: refused with 403 before its body is read."""
        if not 0 <= t < self.end:
            return
        exchange_id = f"err-{_hex(self.r, 32)}"
        self.rows.append((
            exchange_id, t, account.account_id, account.key_id, account.tier, ip, user_agent,
            _CHAT, None, None, None, None, None, None, self.r.uniform(1.0, 5.0), False, None,
            None, None, None, None, 403, "blocked", None,
        ))  # fmt: skip
        self.truth.append((exchange_id, account.account_id, campaign, "blocked", None, None))

    def _row(self, t, q: _Request, *, status, latency_ms, answer=None, tokens=None, finish=None):
        if not 0 <= t < self.end:
            return
        account = q.account
        chat = q.endpoint == _CHAT
        if status == 200:
            exchange_id = f"{'chatcmpl' if chat else 'cmpl'}-{_hex(self.r, 32)}"
        else:
            exchange_id = f"err-{_hex(self.r, 32)}"
        prompt = q.messages[-1]["content"]
        prompt_tokens = round(1.3 * sum(len(m["content"].split()) for m in q.messages))
        prompt_tokens += 4 * len(q.messages) if chat else 1
        self.rows.append((
            exchange_id, t, account.account_id, account.key_id, account.tier, q.ip, q.user_agent,
            q.endpoint, q.model, json.dumps(q.messages, ensure_ascii=False) if chat else None,
            prompt, answer, prompt_tokens if status == 200 else None, tokens, latency_ms,
            q.stream, q.temperature, q.max_tokens, q.seed, q.exposure,
            self._serve(q.exposure, account.tier), status,
            None if status == 200 else "rate_limit_exceeded", finish,
        ))  # fmt: skip
        capability = q.template_id.split("/")[0] if q.template_id else None
        self.truth.append(
            (exchange_id, account.account_id, q.campaign_id, q.content, q.template_id, capability)
        )

    def _serve(self, requested: str, tier_name: str) -> str:
        """What the tier lets through of what was asked, in the gateway's terms (clamp)."""
        key = (requested, tier_name)
        if key not in self._served:
            from distillscope.gateway.traffic import exposure_name

            tier = self.tiers[tier_name]
            asked = _top_logprobs(requested)
            prompt_n = 1 if requested == "full" and tier.allows_prompt_logprobs else None
            if asked is not None:
                asked = min(asked, tier.max_top_logprobs) if tier.allows_logprobs else None
            self._served[key] = exposure_name(asked, prompt_n)
        return self._served[key]


def _top_logprobs(exposure: str) -> int | None:
    """Alternatives per token a request at ``exposure`` asks for (None: no logprobs; ``full``
    asks 20 and prompt logprobs)."""
    if exposure.startswith("top"):
        return int(exposure[3:])
    return {"text": None, "logprobs": 0, "full": 20}[exposure]


# --- legitimate traffic -----------------------------------------------------------------------


class _LegitSimulation:
    """Legitimate accounts and their requests."""

    def __init__(
        self, scenario: Scenario, log: _Log, material: _Material, seed: np.random.SeedSequence
    ):
        self.s, self.g, self.log, self.material = scenario, scenario.legit, log, material
        self.rng = np.random.default_rng(seed)
        self.r = random.Random(int(self.rng.integers(2**63)))
        self.start = _parse_start(scenario.start)
        self.release = scenario.release_day * 86400 if scenario.new_model else math.inf
        #: How often each (conversation, turn) was sent, to vary a reused prompt a little.
        self.uses: Counter = Counter()

    def accounts(self) -> list[tuple[_Account, dict]]:
        """Every legitimate account with its behaviour."""
        g, r = self.g, self.r
        n = round(g.accounts * self.s.scale)
        counts = {
            "integration": round(n * g.integration_share),
            "corporate": round(n * g.corporate_share),
            "vpn": round(n * g.vpn_share),
        }
        profiles = [p for p, k in counts.items() for _ in range(k)]
        profiles += ["individual"] * (n - len(profiles))
        r.shuffle(profiles)
        orgs: list[dict] = []
        for i in range(max(1, round(g.orgs * min(1.0, self.s.scale)))):
            orgs.append(self._org(i, {org["name"] for org in orgs}))
        org_weights = list(itertools.accumulate(1 / (i + 1) for i in range(len(orgs))))
        zones, zone_weights = zip(*_TIMEZONES)
        accounts = []
        for profile in profiles:
            org = r.choices(orgs, cum_weights=org_weights)[0] if profile == "corporate" else None
            behaviour = {
                "tz": org["tz"] if org else r.choices(zones, weights=zone_weights)[0],
                "rate": g.median_daily * r.lognormvariate(0, g.volume_sigma),
                "org": org,
            }
            created = -r.uniform(20, 900) * 86400
            if r.random() < g.signup_share:
                created = r.uniform(0, self.s.days) * 86400
            card = f"pm_{_hex(r, 14)}"
            email = r.choice(_FREE_MAIL)
            if org:
                email = org["domain"] if r.random() < 0.9 else email
                card = org["card"] if r.random() < 0.8 else card
            elif profile == "integration":
                email = f"{_hex(r, 6)}.dev" if r.random() < 0.5 else email
            tier = r.choices(*zip(*_LEGIT_TIERS))[0]
            account = _Account(
                account_id=f"acct-{_hex(r, 12)}",
                key_id=_hex(r, 12),
                tier=tier,
                created_at=created,
                payment_fingerprint=card,
                email_domain=email,
                org=org["name"] if org else None,
                role="legitimate",
                profile=profile,
            )
            accounts.append((account, behaviour))
        return accounts

    def _org(self, i: int, taken: set[str]) -> dict:
        r = self.r
        name = f"{r.choice(_ORG_WORDS[0])}{r.choice(_ORG_WORDS[1])} {r.choice(_ORG_WORDS[2])}"
        name = f"{name} {i}" if name in taken else name
        subnet = (r.choice(_CORPORATE), r.randrange(256), r.randrange(256))
        zones, weights = zip(*_TIMEZONES)
        return {
            "name": name,
            "domain": name.lower().replace(" ", "") + ".com",
            "tz": r.choices(zones, weights=weights)[0],
            "nat": [_ip(r, *subnet) for _ in range(r.randint(1, 3))],
            "card": f"pm_{_hex(r, 14)}",
        }

    def traffic(self, account: _Account, behaviour: dict) -> None:
        """Log every request of one account over the window."""
        if account.profile == "integration":
            self._pipeline(account, behaviour)
        else:
            self._person(account, behaviour)

    def _client(self, account: _Account, behaviour: dict) -> dict:
        """The account's client: user agents, addresses, endpoint and request defaults."""
        r, g = self.r, self.g
        browser = r.random() < 0.35
        agents = [r.choice(_BROWSER_AGENTS if browser else _SDK_AGENTS)]
        if r.random() < 0.25:
            agents.append(r.choice(_SDK_AGENTS))
        if behaviour["org"]:
            ips = behaviour["org"]["nat"]
        elif account.profile == "vpn":
            ips = [_ip(r, *r.choice(_PROXY_16S)) for _ in range(6)]
        else:
            ips = [_ip(r, r.choice(_RESIDENTIAL))]
            if r.random() < 0.3:
                ips.append(_ip(r, r.choice(_MOBILE)))
        exposure = "text"
        if r.random() < g.logprobs_share:
            exposure = r.choice(("logprobs", "top5", "top20"))
        switch = math.inf
        if r.random() < g.adoption:
            # Gamma(2): few switch on release day, most within a week or two.
            switch = self.release + r.gammavariate(2, g.adoption_days * 86400 / 2)
        return {
            "agents": agents,
            "ips": ips,
            "endpoint": _COMPLETIONS if r.random() < g.completions_share else _CHAT,
            "stream": browser or r.random() < 0.3,
            "temperature": r.choice(_TEMPERATURES),
            "max_tokens": r.choice(_MAX_TOKENS),
            "seed": 42 if r.random() < 0.02 else None,
            "exposure": exposure,
            "switch": switch,
        }

    def _model(self, t: float, client: dict) -> str:
        if t >= client["switch"] and self.r.random() < 0.9:
            return self.s.new_model
        return self.s.base_model

    def _request(
        self, account, client, t, messages, *, answer_tokens, content="legitimate", template_id=None
    ) -> _Request:
        r = self.r
        ips = client["ips"]
        ip = ips[0] if len(ips) == 1 or r.random() < 0.7 else r.choice(ips)
        exposure = client["exposure"] if r.random() < 0.7 else "text"
        return _Request(
            account=account,
            ip=ip,
            user_agent=client["agents"][0] if r.random() < 0.8 else r.choice(client["agents"]),
            endpoint=client["endpoint"],
            model=self._model(t, client),
            messages=messages,
            stream=client["stream"],
            temperature=client["temperature"],
            max_tokens=client["max_tokens"],
            seed=client["seed"],
            exposure=exposure,
            answer_tokens=answer_tokens,
            campaign_id=None,
            content=content,
            template_id=template_id,
        )

    def _person(self, account: _Account, behaviour: dict) -> None:
        """A human: active on some days, in sessions of conversations, in local daytime."""
        r, g = self.r, self.g
        client = self._client(account, behaviour)
        corporate = account.profile == "corporate"
        hours = list(itertools.accumulate(_HOURS_OFFICE if corporate else _HOURS_PERSONAL))
        weekend = g.weekend_factor / 3 if corporate else g.weekend_factor
        rate = behaviour["rate"]
        # Heavier users come back on more days.
        active = min(
            0.98,
            max(
                0.03,
                r.betavariate(2, 2) * 2 * g.active_day_share
                + 0.08 * math.log(rate / g.median_daily),
            ),
        )
        single = client["endpoint"] == _COMPLETIONS
        for day in range(math.ceil(self.s.days)):
            day_start = day * 86400
            if day_start + 86400 < max(0.0, account.created_at):
                continue
            weekday = (self.start + timedelta(days=day)).weekday()
            if r.random() > active * (weekend if weekday >= 5 else 1.0):
                continue
            remaining = max(1, int(self.rng.poisson(rate)))
            while remaining > 0:
                hour = bisect.bisect(hours, r.random() * hours[-1])
                t = day_start + (hour - behaviour["tz"]) * 3600 + r.random() * 3600
                t = max(t, account.created_at)
                while remaining > 0:
                    t, sent = self._conversation(account, client, t, remaining, single)
                    remaining -= sent
                    if r.random() > 0.45:
                        break
                    t += r.lognormvariate(math.log(150), 1.0)  # to the next conversation

    def _conversation(self, account, client, t, budget, single) -> tuple[float, int]:
        """Consecutive turns of one ShareGPT conversation; (time after, requests sent)."""
        r, log = self.r, self.log
        index = r.randrange(len(self.material.conversations))
        _, humans = self.material.conversations[index]
        first = 0 if single or len(humans) == 1 or r.random() < 0.75 else r.randrange(len(humans))
        messages: list[dict[str, str]] = []
        for turn in humans[:first]:  # the conversation began before this session
            messages.append({"role": "user", "content": turn})
            messages.append({"role": "assistant", "content": log.filler(self._answer_tokens())})
        sent = 0
        for j in range(first, len(humans)):
            text = self._vary(humans[j], (index, j))
            messages = [*messages, {"role": "user", "content": text}]
            q = self._request(account, client, t, messages, answer_tokens=self._answer_tokens())
            answer, t = log.send(t, q, rate_limited=self.g.rate_limited_share, automated=False)
            sent += 1
            if single or sent >= budget or r.random() > self.g.follow_up:
                break
            messages.append({"role": "assistant", "content": answer})
            t += r.lognormvariate(math.log(40), 0.9)  # reading, then typing the follow-up
        return t, sent

    def _vary(self, text: str, key: tuple[int, int]) -> str:
        """A prompt as a different user writes it: the first sender's verbatim, later ones a
        little different (a greeting, a request framing, casing), as people phrase alike asks."""
        self.uses[key] += 1
        if self.uses[key] == 1:
            return text
        r = self.r
        roll = r.random()
        if roll < 0.25:
            return f"{r.choice(('hi, ', 'hey ', 'Hello! ', 'hi '))}{text}"
        if roll < 0.5:
            return (
                f"{r.choice(('Can you help me with this: ', 'Please help: ', 'Question: '))}{text}"
            )
        if roll < 0.65:
            return text.lower()
        if roll < 0.8:
            return f"{text}{r.choice((' thanks', ' Thank you!', ' pls', '?'))}"
        return text

    def _answer_tokens(self) -> int:
        return max(5, int(self.r.lognormvariate(math.log(220), 0.8)))

    def _pipeline(self, account: _Account, behaviour: dict) -> None:
        """A customer's own automation: one or two templates, a cloud address, cron timing."""
        r, rng, log = self.r, self.rng, self.log
        client = self._client(account, behaviour)
        client.update(
            agents=[r.choice(_PIPELINE_AGENTS)],
            ips=[_ip(r, r.choice(_CLOUD))],
            stream=False,
            temperature=0.0,
            max_tokens=r.choice((256, 512)),
            exposure=r.choice(("text", "text", "top5", "logprobs")),
        )
        templates = r.sample(PIPELINE_TEMPLATES, r.randint(1, 2))
        rate = self.g.integration_median_daily * r.lognormvariate(0, 0.5)
        kind = r.choice(("office", "around-the-clock", "nightly"))
        begin = max(0.0, account.created_at)
        end = self.s.days * 86400
        if kind == "nightly":  # one batch a night, fast
            times = []
            for day in range(math.ceil(self.s.days)):
                at = day * 86400 + (2 - behaviour["tz"]) % 24 * 3600 + r.uniform(0, 600)
                times.extend(at + np.cumsum(rng.exponential(1.5, int(rng.poisson(rate)))))
        else:
            hours = 10 if kind == "office" else 24
            period = hours * 3600 / rate
            grid = np.arange(begin + r.uniform(0, period), end, period)
            times = grid + rng.normal(0, 0.15 * period, len(grid))
            if kind == "office":
                local = (times / 3600 + behaviour["tz"]) % 24
                weekday = np.array(
                    [(self.start + timedelta(seconds=float(t))).weekday() < 5 for t in times],
                    dtype=bool,
                )
                times = times[(local >= 8) & (local < 18) & weekday]
        for t in sorted(float(t) for t in times if t >= begin):
            template = r.choice(templates)
            messages = _render(template, r, self.material, log.filler)
            q = self._request(
                account,
                client,
                t,
                messages,
                answer_tokens=max(3, int(r.lognormvariate(math.log(80), 0.5))),
                template_id=template.id,
            )
            log.send(t, q, rate_limited=self.g.rate_limited_share, automated=True)


# --- campaigns --------------------------------------------------------------------------------


class _CampaignSimulation:
    """One operator: a scheduler driving account slots on a proxy pool, bans and replacements."""

    def __init__(
        self,
        scenario: Scenario,
        campaign: Campaign,
        log: _Log,
        material: _Material,
        seed: np.random.SeedSequence,
    ):
        self.s, self.c, self.log, self.material = scenario, campaign, log, material
        self.rng = np.random.default_rng(seed)
        self.r = random.Random(int(self.rng.integers(2**63)))
        self.begin = campaign.start_day * 86400
        end_day = (
            scenario.days if campaign.end_day is None else min(campaign.end_day, scenario.days)
        )
        self.end = end_day * 86400
        self.release = scenario.release_day * 86400 if scenario.new_model else math.inf
        self.slots = max(2, round(campaign.accounts * scenario.campaign_scale * scenario.scale))
        r = self.r
        subnets = [
            (a, b, r.randrange(256)) for a, b in r.choices(_PROXY_16S, k=campaign.ip_subnets)
        ]
        size = max(1, math.ceil(self.slots / campaign.accounts_per_ip))
        self.pool = [_ip(r, *r.choice(subnets)) for _ in range(size)]
        self.cards = [f"pm_{_hex(r, 14)}" for _ in range(campaign.shared_fingerprints)]
        #: One main card, the others less used; ``_phase`` spreads the sharing accounts evenly.
        self.card_weights = list(itertools.accumulate(1 / (i + 1) for i in range(len(self.cards))))
        self._phase = r.random()
        self.batch_hour = r.uniform(0, 24)  # when the operator registers accounts
        self.templates, self.template_weights = self._templates()
        self.exposures = list(campaign.exposure_mix)
        self.exposure_weights = list(itertools.accumulate(campaign.exposure_mix.values()))
        self.accounts: list[_Account] = []
        #: Each account's own pool address and client.
        self.sticky: dict[str, str] = {}
        self.agent: dict[str, str] = {}

    def _templates(self) -> tuple[list[_Template], list[float]]:
        """The operator's few templates; within a capability the first carries the most."""
        c, r = self.c, self.r
        total = sum(c.focus.values())
        chosen, weights = [], []
        for capability, weight in c.focus.items():
            if weight <= 0:
                continue
            bank = [t for t in TEMPLATES if t.capability == capability]
            picked = r.sample(bank, min(len(bank), max(1, round(c.templates * weight / total))))
            zipf = [1 / (rank + 1) for rank in range(len(picked))]
            chosen += picked
            weights += [weight * z / sum(zipf) for z in zipf]
        return chosen, list(itertools.accumulate(weights))

    def _waves(self) -> tuple[np.ndarray, np.ndarray]:
        """The scheduler's wave times, and which of them ran (outages silence the cluster)."""
        c, rng, r = self.c, self.rng, self.r
        interval = c.wave_minutes * 60
        waves = np.arange(self.begin + r.uniform(0, interval), self.end, interval)
        waves = waves + rng.normal(0, 0.01 * interval, len(waves))
        running = np.ones(len(waves), dtype=bool)
        span_weeks = (self.end - self.begin) / (7 * 86400)
        for _ in range(int(rng.poisson(c.outages_per_week * span_weeks))):
            down = r.uniform(self.begin, self.end)
            running &= ~((waves >= down) & (waves < down + r.uniform(1, 6) * 3600))
        return waves, running

    def run(self, advance: Callable[[], None]) -> list[_Account]:
        if self.begin >= self.end:
            return []
        waves, running = self._waves()
        for _ in range(self.slots):
            self._slot(waves, running)
            advance()
        return self.accounts

    def _slot(self, waves: np.ndarray, running: np.ndarray) -> None:
        """One account slot: its account fires every few waves; banned, it is replaced."""
        c, r, rng = self.c, self.r, self.rng
        interval = c.wave_minutes * 60
        every = max(
            1, round(86400 / c.requests_per_account_day / interval * r.lognormvariate(0, 0.2))
        )
        index = np.arange(r.randrange(every), len(waves), every)
        # Jitter moves a request to a neighbouring wave (the account stays on the cluster's
        # clock) and off the wave by a little; large jitter dissolves both the period and waves.
        shift = np.rint(rng.normal(0, c.timing_jitter * every, len(index))).astype(int)
        index = np.clip(index + shift, 0, len(waves) - 1)
        index = index[running[index]]
        times = waves[index] + rng.uniform(0, c.sync_spread_s, len(index))
        times = times + rng.normal(0, c.timing_jitter * interval / 2, len(index))
        times = np.sort(times[(times >= self.begin) & (times < self.end)]).tolist()
        span = self.end - self.begin
        bans = sorted(
            r.uniform(self.begin + 0.1 * span, self.end)
            for _ in range(int(rng.poisson(c.ban_rate)))
        )
        first_use = times[0] if times else self.begin
        aged = r.random() < c.aged_share
        created = (
            first_use - r.uniform(60, 700) * 86400
            if aged
            else self._registered(self.begin - r.uniform(0.5, 7) * 86400)
        )
        account = self._account(min(created, first_use - 60), "hydra")
        i, resume = 0, -math.inf
        for ban in bans:
            if ban < resume:  # the replacement is not in use yet
                continue
            while i < len(times) and times[i] < ban:
                self._send(account, times[i])
                i += 1
            account.banned_at = ban
            for t in times[i : i + 1 + int(rng.poisson(1.5))]:  # until the operator notices
                self.log.blocked(
                    t, account, self._ip(account), self.agent[account.account_id], c.name
                )
                i += 1
                resume = t
            resume = max(resume + 1, ban + r.expovariate(1 / max(c.replacement_delay_h * 3600, 1)))
            while i < len(times) and times[i] < resume:
                i += 1
            if i >= len(times):
                return
            created = self._registered(times[i] - r.uniform(1800, 2 * 86400))
            account = self._account(min(created, times[i] - 60), "replacement", account.account_id)
        for t in times[i:]:
            self._send(account, t)

    def _registered(self, t: float) -> float:
        """Registration happens in daily batches at the operator's hour: the batch before ``t``."""
        batch = math.floor(t / 86400) * 86400 + self.batch_hour * 3600 + self.r.uniform(0, 1200)
        return batch - 86400 if batch > t else batch

    def _account(self, created: float, role: str, replaces: str | None = None) -> _Account:
        c, r = self.c, self.r
        # Exactly ``shared_fingerprint_share`` of the accounts pay with the operator's cards.
        n, share = len(self.accounts), c.shared_fingerprint_share
        shared = math.floor((n + 1) * share + self._phase) > math.floor(n * share + self._phase)
        card = r.choices(self.cards, cum_weights=self.card_weights)[0]
        account = _Account(
            account_id=f"acct-{_hex(r, 12)}",
            key_id=_hex(r, 12),
            tier=c.tier,
            created_at=created,
            payment_fingerprint=card if shared else f"pm_{_hex(r, 14)}",
            email_domain=r.choice(c.email_domains),
            org=None,
            role=role,
            profile="hydra",
            campaign_id=c.name,
            replaces=replaces,
        )
        self.accounts.append(account)
        self.sticky[account.account_id] = r.choice(self.pool)
        self.agent[account.account_id] = r.choice(c.user_agents)
        return account

    def _ip(self, account: _Account) -> str:
        if self.r.random() < self.c.ip_rotation:
            return self.r.choice(self.pool)
        return self.sticky[account.account_id]

    def _model(self, t: float) -> str:
        c = self.c
        moved = (t - self.release - c.pivot_delay_h * 3600) / (
            (c.pivot_hours - c.pivot_delay_h) * 3600
        )
        share = c.pivot_share * min(1.0, max(0.0, moved))
        return self.s.new_model if self.r.random() < share else self.s.base_model

    def _send(self, account: _Account, t: float) -> None:
        c, r = self.c, self.r
        template = None
        if r.random() < c.mixing_share:  # camouflage: an ordinary prompt
            messages = [{"role": "user", "content": r.choice(self.material.prompts["any"])}]
            answer_tokens = max(5, int(r.lognormvariate(math.log(220), 0.8)))
        else:
            template = r.choices(self.templates, cum_weights=self.template_weights)[0]
            messages = _render(
                template,
                r,
                self.material,
                self.log.filler,
                paraphrase_rate=c.paraphrase_rate,
                cot_rate=c.cot_rate,
            )
            answer_tokens = max(20, int(r.lognormvariate(math.log(650), 0.5)))
        q = _Request(
            account=account,
            ip=self._ip(account),
            user_agent=self.agent[account.account_id],
            endpoint=_CHAT,
            model=self._model(t),
            messages=messages,
            stream=r.random() < c.stream_share,
            temperature=c.temperature,
            max_tokens=c.max_tokens,
            seed=None,
            exposure=r.choices(self.exposures, cum_weights=self.exposure_weights)[0],
            answer_tokens=answer_tokens,
            campaign_id=c.name,
            content="template" if template else "ordinary",
            template_id=template.id if template else None,
        )
        self.log.send(t, q, rate_limited=c.rate_limited_share, automated=True)


# --- the simulation ---------------------------------------------------------------------------


@dataclass
class CampaignSummary:
    name: str
    modelled_on: str
    #: Accounts the operator keeps active at once; distinct accounts, replacements included.
    slots: int
    accounts: int
    banned: int
    exchanges: int
    #: Median over the campaign's accounts of requests per day (over the days each was in use).
    per_account_day: float


@dataclass
class SimulationSummary:
    out: Path
    scenario: str
    seed: int
    days: float
    legit_accounts: int
    campaigns: list[CampaignSummary]
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

    ``seed`` overrides the scenario's. Writes the files the module docstring lists, replacing
    those of an earlier simulation in the same folder.
    """
    from rich.progress import Progress

    began = time.perf_counter()
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if seed is not None:
        scenario = replace(scenario, seed=seed)
    _check_scenario(scenario)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScenarioError(f"cannot write the simulation to {out}: {exc.strerror}") from None
    material = _material()
    legit_seed, *campaign_seeds = np.random.SeedSequence(scenario.seed).spawn(
        1 + len(scenario.campaigns)
    )
    rows: list[tuple] = []
    truth: list[tuple] = []

    def log_for(seed_sequence: np.random.SeedSequence) -> _Log:
        r = random.Random(int(np.random.default_rng(seed_sequence).integers(2**63)))
        return _Log(r, material, scenario, rows, truth)

    legit = _LegitSimulation(scenario, log_for(legit_seed.spawn(1)[0]), material, legit_seed)
    people = legit.accounts()
    operators = [
        _CampaignSimulation(scenario, c, log_for(s.spawn(1)[0]), material, s)
        for c, s in zip(scenario.campaigns, campaign_seeds)
    ]
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(
            f"simulating {scenario.name}", total=len(people) + sum(o.slots for o in operators) + 1
        )
        for account, behaviour in people:
            legit.traffic(account, behaviour)
            bar.advance(task)
        accounts = [account for account, _ in people]
        for operator in operators:
            accounts += operator.run(lambda: bar.advance(task))
        start = _parse_start(scenario.start)
        table = _exchanges_table(rows, start)
        rows.clear()  # the table holds them now
        _write(out, scenario, table, _truth_tables(accounts, truth, start), start)
        bar.advance(task)
    return _summary(out, scenario, table, accounts, operators, time.perf_counter() - began)


def _exchanges_table(rows: list[tuple], start: datetime) -> pa.Table:
    from distillscope.gateway.traffic import EXCHANGE_SCHEMA

    columns = list(zip(*rows)) if rows else [()] * len(EXCHANGE_SCHEMA)
    origin = int(start.timestamp() * 1_000_000)
    columns[1] = [origin + round(t * 1_000_000) for t in columns[1]]
    table = pa.Table.from_arrays(
        [pa.array(values, type=f.type) for values, f in zip(columns, EXCHANGE_SCHEMA)],
        schema=EXCHANGE_SCHEMA,
    )
    order = pc.sort_indices(table, sort_keys=[("ts", "ascending"), ("exchange_id", "ascending")])
    return table.take(order)


#: Columns of ``exchange_truth.parquet``, in the order ``_Log`` records them.
_CONTENT_COLUMNS = (
    "exchange_id", "account_id", "campaign_id", "content", "template_id", "capability"
)  # fmt: skip


def _truth_tables(
    accounts: list[_Account], truth: list[tuple], start: datetime
) -> dict[str, pa.Table]:
    def when(seconds: float | None) -> datetime | None:
        return None if seconds is None else start + timedelta(seconds=seconds)

    accounts = sorted(accounts, key=lambda a: a.account_id)
    stamp = pa.timestamp("us", tz="UTC")
    return {
        "accounts": pa.table(
            {
                "account_id": [a.account_id for a in accounts],
                "created_at": pa.array([when(a.created_at) for a in accounts], stamp),
                "payment_fingerprint": [a.payment_fingerprint for a in accounts],
                "email_domain": [a.email_domain for a in accounts],
                "org": pa.array([a.org for a in accounts], pa.string()),
                "tier": [a.tier for a in accounts],
                "key_id": [a.key_id for a in accounts],
            }
        ),
        "truth": pa.table(
            {
                "account_id": [a.account_id for a in accounts],
                "campaign_id": pa.array([a.campaign_id for a in accounts], pa.string()),
                "role": [a.role for a in accounts],
                "profile": [a.profile for a in accounts],
                "created_at": pa.array([when(a.created_at) for a in accounts], stamp),
                "banned_at": pa.array([when(a.banned_at) for a in accounts], stamp),
                "replaces": pa.array([a.replaces for a in accounts], pa.string()),
            }
        ),
        "exchange_truth": pa.table(
            {
                name: pa.array(values, pa.string())
                for name, values in zip(_CONTENT_COLUMNS, zip(*truth) if truth else [()] * 6)
            }
        ).sort_by("exchange_id"),
    }


def _write(
    out: Path, scenario: Scenario, table: pa.Table, extra: dict[str, pa.Table], start: datetime
) -> None:
    import duckdb

    from distillscope.gateway.traffic import open_traffic_log

    pq.write_table(table, out / "traffic.parquet", compression="zstd")
    for name, extra_table in extra.items():
        pq.write_table(extra_table, out / f"{name}.parquet", compression="zstd")
    releases = [("available", scenario.base_model, start)]
    if scenario.new_model and scenario.release_day < scenario.days:
        releases.append(
            ("release", scenario.new_model, start + timedelta(days=scenario.release_day))
        )
    kinds, names, times = zip(*releases)
    events = pa.table(
        {
            "name": list(names),
            "time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "kind": list(kinds),
        }
    )
    pq.write_table(events, out / "events.parquet")
    (out / "scenario.yaml").write_text(scenario.to_yaml(), encoding="utf-8")
    database = out / "traffic.duckdb"
    database.unlink(missing_ok=True)
    with open_traffic_log(database):  # the gateway's own table, created the gateway's way
        pass
    with duckdb.connect(str(database)) as con:
        con.execute("SET enable_progress_bar = false")
        con.register("simulated", table)
        con.execute("INSERT INTO exchanges SELECT * FROM simulated")
        con.unregister("simulated")


def _summary(
    out: Path,
    scenario: Scenario,
    table: pa.Table,
    accounts: list[_Account],
    operators: list[_CampaignSimulation],
    wall_s: float,
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
    campaigns = []
    campaign_rates = []
    for operator in operators:
        members = operator.accounts
        rates = [
            count[a.account_id] / max(1.0, (last[a.account_id] - first[a.account_id]) / 86400)
            for a in members
            if count[a.account_id]
        ]
        campaign_rates += rates
        campaigns.append(
            CampaignSummary(
                name=operator.c.name,
                modelled_on=operator.c.modelled_on,
                slots=operator.slots if members else 0,
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
        campaigns=campaigns,
        exchanges=table.num_rows,
        campaign_exchanges=sum(c.exchanges for c in campaigns),
        legit_daily=percentiles,
        legit_above_campaign_median=int((legit_daily > median_campaign).sum()),
        wall_s=wall_s,
    )


# --- replay against our own gateway -----------------------------------------------------------

#: The most requests one replay sends.
MAX_REPLAY_REQUESTS = 100_000


@dataclass
class ReplaySummary:
    sent: int
    #: Requests per HTTP status the gateway answered (0: no answer, e.g. a timeout).
    statuses: dict[int, int]
    wall_s: float
    #: Per request, in dispatch order: (simulated exchange id, account id, status, the gateway's
    #: response id or None).
    results: list[tuple[str, str, int, str | None]]


def keystore_keys(store: KeyStore, out: str | os.PathLike) -> Callable[[str], str]:
    """API keys for a simulation's accounts, created in the gateway's ``KeyStore`` on first use
    at each account's simulated tier (a key's secret is only known when it is created)."""
    try:
        columns = pq.read_table(Path(out) / "accounts.parquet", columns=["account_id", "tier"])
    except (OSError, pa.ArrowException):
        raise ReplayError(f"{out} holds no simulation (no accounts.parquet)") from None
    tiers = dict(zip(columns["account_id"].to_pylist(), columns["tier"].to_pylist()))

    @functools.cache
    def key(account_id: str) -> str:
        return store.create(account_id, tiers.get(account_id, "text"), name="simulated")[1]

    return key


def replay(
    source: Scenario | str | os.PathLike,
    url: str,
    api_key_for_account: Callable[[str], str] | Mapping[str, str],
    *,
    max_requests: int = 200,
    speedup: float = 3600.0,
    max_gap_s: float = 1.0,
    concurrency: int = 8,
    model: str | None = None,
    max_tokens: int | None = 16,
    accounts: Collection[str] | None = None,
    timeout_s: float = 60.0,
) -> ReplaySummary:
    """Send a simulation's first ``max_requests`` requests to a gateway on this machine.

    ``source`` is a simulation folder, or a Scenario simulated first into a temporary folder.
    Requests go in the log's order, each account with its own key (``api_key_for_account``) and
    user agent, at their simulated times divided by ``speedup``, with any longer pause cut to
    ``max_gap_s``; at most ``concurrency`` are in flight. The gateway serves one model: every
    request asks for ``model`` (default: the gateway's first). ``max_tokens`` caps generation
    (None: as simulated). Refused requests (403 in the log) are not replayed. Only loopback
    targets are accepted: this plays simulated campaigns against our own gateway, never against
    a real service.
    """
    base = _loopback_base(url)
    if not 1 <= max_requests <= MAX_REPLAY_REQUESTS:
        raise ReplayError(f"max_requests must be 1..{MAX_REPLAY_REQUESTS}, not {max_requests}")
    if not speedup > 0 or concurrency < 1 or max_gap_s < 0:
        raise ReplayError("replay needs speedup > 0, concurrency >= 1 and max_gap_s >= 0")
    if isinstance(source, Scenario):
        with tempfile.TemporaryDirectory(prefix="distillscope-replay-") as folder:
            simulate(source, folder, progress=False)
            table = _replay_rows(Path(folder), accounts)
    else:
        table = _replay_rows(Path(source), accounts)
    rows = table.slice(0, max_requests).to_pylist()
    if not rows:
        return ReplaySummary(0, {}, 0.0, [])
    keys: dict[str, str] = {}
    for row in rows:
        account = row["account_id"]
        if account not in keys:
            try:
                keys[account] = (
                    api_key_for_account(account)
                    if callable(api_key_for_account)
                    else api_key_for_account[account]
                )
            except KeyError:
                raise ReplayError(f"no API key for simulated account {account}") from None
    model = model or _served_model(base, keys[rows[0]["account_id"]], timeout_s)
    schedule, at, previous = [], 0.0, rows[0]["ts"]
    for row in rows:
        at += min((row["ts"] - previous).total_seconds() / speedup, max_gap_s)
        previous = row["ts"]
        schedule.append((at, row, _replay_body(row, model, max_tokens), keys[row["account_id"]]))
    began = time.perf_counter()
    results = asyncio.run(_dispatch(base, schedule, concurrency, timeout_s))
    return ReplaySummary(
        sent=len(results),
        statuses=dict(Counter(status for _, _, status, _ in results)),
        wall_s=time.perf_counter() - began,
        results=results,
    )


def _loopback_base(url: str) -> str:
    """The gateway's base URL (without ``/v1``), if it is on this machine."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise ReplayError(f"replay needs the http:// URL of a gateway on this machine, not {url!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ReplayError(
            f"replay only targets a gateway on this machine (127.0.0.1, ::1 or localhost), not "
            f"{host}: it plays simulated campaigns against our own gateway, never a real service"
        )
    path = parts.path.rstrip("/").removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def _replay_rows(folder: Path, accounts: Collection[str] | None) -> pa.Table:
    try:
        table = pq.read_table(folder / "traffic.parquet")
    except (OSError, pa.ArrowException):
        raise ReplayError(f"{folder} holds no simulation (no traffic.parquet)") from None
    keep = pc.not_equal(table["status"], 403)
    if accounts is not None:
        keep = pc.and_(keep, pc.is_in(table["account_id"], pa.array(list(accounts), pa.string())))
    return table.filter(keep)


def _replay_body(row: dict, model: str, max_tokens: int | None) -> dict:
    """The request a simulated row stands for, as the gateway's API takes it."""
    body: dict[str, object] = {"model": model, "stream": False}
    asked = row["max_tokens"]
    body["max_tokens"] = min(asked or max_tokens, max_tokens) if max_tokens else asked
    for name in ("temperature", "seed"):
        if row[name] is not None:
            body[name] = row[name]
    exposure = row["exposure_requested"] or "text"
    top = _top_logprobs(exposure)
    if row["endpoint"] == _CHAT:
        body["messages"] = json.loads(row["messages"])
        if top is not None:
            body["logprobs"] = True
            if top:
                body["top_logprobs"] = top
    else:
        body["prompt"] = row["prompt"]
        if top is not None:
            body["logprobs"] = top
    if exposure == "full":
        body["prompt_logprobs"] = 1
    return body


def _served_model(base: str, key: str, timeout_s: float) -> str:
    import httpx

    try:
        answer = httpx.get(
            f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s
        )
        answer.raise_for_status()
        return answer.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ReplayError(f"cannot list the models of the gateway at {base}: {exc}") from None


async def _dispatch(base: str, schedule: list, concurrency: int, timeout_s: float) -> list:
    import httpx

    results: list = [None] * len(schedule)
    slots = asyncio.Semaphore(concurrency)

    async def send(i: int, row: dict, body: dict, key: str) -> None:
        status, response_id = 0, None
        try:
            answer = await client.post(
                row["endpoint"],
                json=body,
                headers={
                    "Authorization": f"Bearer {key}",
                    "User-Agent": row["user_agent"] or "distillscope-replay",
                },
            )
            status = answer.status_code
            if status == 200:
                response_id = answer.json().get("id")
        except httpx.TimeoutException:
            pass
        except httpx.TransportError as exc:
            raise ReplayError(f"lost the gateway at {base}: {exc}") from None
        finally:
            slots.release()
        results[i] = (row["exchange_id"], row["account_id"], status, response_id)

    async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as client:
        loop = asyncio.get_running_loop()
        origin = loop.time()
        tasks = []
        for i, (at, row, body, key) in enumerate(schedule):
            delay = origin + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()  # in order: request i starts before request i + 1
            tasks.append(asyncio.create_task(send(i, row, body, key)))
        await asyncio.gather(*tasks)
    return results
