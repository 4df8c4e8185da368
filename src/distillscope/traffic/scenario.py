"""Scenario settings: what a simulated world holds, as pydantic models read from YAML.

``scenarios/default.yaml`` is the only source of defaults: a scenario file sets any subset of the
top-level settings over it, ``legit:`` (the background population) merges key by key over the
default's, and each entry of ``campaigns:`` and ``populations:`` takes its shape's defaults
(``campaign_defaults`` for ``hydra``, the shape's block of ``shape_defaults`` for the others; a
file may set either for its own entries) under its own settings. Every entry names its ``shape``
(campaigns without one are ``hydra``); the shape decides which knobs it has. Unknown keys, wrong
types and values out of range are a ``ScenarioError`` of one line naming the key path.
"""

from __future__ import annotations

import functools
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from distillscope.errors import DistillscopeError
from distillscope.exposure import REQUEST_EXPOSURE

SCENARIO_DIR = Path(__file__).parent / "scenarios"

#: Capability families of the hydra template bank (``data/templates.yaml``); ``focus`` weighs them.
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


# --- value types --------------------------------------------------------------------------------


def _share(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError("must be in [0, 1]")
    return value


def _positive(value: float) -> float:
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if not 0 <= pair[0] <= pair[1]:
        raise ValueError("must be [low, high] with 0 <= low <= high")
    return pair


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _iso(value: Any) -> Any:
    """YAML reads an unquoted timestamp as a datetime; the setting is its ISO text."""
    return value.isoformat() if isinstance(value, datetime) else value


def _weights(value: dict[str, float]) -> dict[str, float]:
    if not value or any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
        raise ValueError("must be weights >= 0, not all 0")
    return value


def _exposure_mix(value: dict[str, float]) -> dict[str, float]:
    unknown = [k for k in value if not REQUEST_EXPOSURE.fullmatch(k)]
    if unknown:
        raise ValueError(f"unknown exposure {unknown[0]!r} (text, logprobs, top1..top20, full)")
    return _weights(value)


def _focus(value: dict[str, float]) -> dict[str, float]:
    unknown = [k for k in value if k not in CAPABILITIES]
    if unknown:
        raise ValueError(f"unknown capability {unknown[0]!r} (known: {', '.join(CAPABILITIES)})")
    return _weights(value)


def _tier(value: str) -> str:
    from distillscope.gateway.tiers import BUILTIN_TIERS

    if value not in BUILTIN_TIERS:
        raise ValueError(f"unknown tier {value!r} (known: {', '.join(BUILTIN_TIERS)})")
    return value


Share = Annotated[float, AfterValidator(_share)]
Positive = Annotated[float, AfterValidator(_positive)]
#: ``[low, high]``: a value is drawn uniformly between them (integers for counts).
Range = Annotated[tuple[float, float], BeforeValidator(_as_tuple), AfterValidator(_ordered)]
Count = Annotated[int, Field(ge=0)]
CountRange = Annotated[tuple[int, int], BeforeValidator(_as_tuple), AfterValidator(_ordered)]
ExposureMix = Annotated[dict[str, float], AfterValidator(_exposure_mix)]
TierName = Annotated[str, AfterValidator(_tier)]
Temperature = Annotated[float, Field(ge=0, le=2)]


class Settings(BaseModel):
    """Strict, closed settings: no unknown keys, no silent coercion (``"3"`` is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


# --- the background population ------------------------------------------------------------------


class Background(Settings):
    """The provider's ordinary customers (shape ``background``). Counts are before ``scale``."""

    accounts: Count
    #: Requests on a day the account is active, for the median account (lognormal across them).
    median_daily: Positive
    #: Lognormal sigma of that rate across accounts: 1.3 puts the top 1% past 80 a day.
    volume_sigma: Annotated[float, Field(ge=0)]
    #: Mean chance that an account is active on a weekday.
    active_day_share: Share
    #: Weekend activity relative to weekdays (individuals; corporate users drop to a third of it).
    weekend_factor: Share
    #: Accounts that belong to an organisation: shared NAT addresses in its /24, its email
    #: domain, usually its corporate card, business hours in its time zone.
    corporate_share: Share
    #: Organisations the corporate accounts belong to (sizes are Zipf-like).
    orgs: Annotated[int, Field(ge=1)]
    #: Accounts that run a pipeline of their own: templated prompts, regular timing, a cloud IP,
    #: an automation user agent, heavy volume. Legitimate look-alikes of a campaign account.
    integration_share: Share
    #: Requests a day of the median pipeline.
    integration_median_daily: Positive
    #: Individuals behind a commercial VPN or proxy: exits in the same ranges campaigns rent.
    vpn_share: Share
    #: Accounts that sign up during the window (active from then on).
    signup_share: Share
    #: Chance that a conversation goes on to its next turn (ShareGPT's own follow-ups).
    follow_up: Share
    #: Accounts on the legacy ``/v1/completions`` endpoint (single-turn prompts).
    completions_share: Share
    #: Accounts whose client asks for logprobs (most of their requests).
    logprobs_share: Share
    #: Share of accounts that move to the new model at all, and their mean delay in days (every
    #: legitimate population moves like this).
    adoption: Share
    adoption_days: Positive
    #: Chance that a request is answered 429 (the client retries after a few seconds).
    rate_limited_share: Share

    @model_validator(mode="after")
    def _profiles_fit(self) -> Background:
        if self.corporate_share + self.integration_share + self.vpn_share > 1:
            raise ValueError("corporate_share + integration_share + vpn_share must not exceed 1")
        return self


# --- campaign shapes ----------------------------------------------------------------------------


class CampaignSettings(Settings):
    """What every campaign has: a shape, a name (its ``campaign_id`` in the truth) and a time
    span."""

    #: Which campaign shape (each subclass narrows it to its own name).
    shape: str
    name: Annotated[str, Field(min_length=1)]
    #: What it is modelled on (documentation only).
    modelled_on: str
    #: When the operator starts and stops (days from the scenario's start; null: the end).
    start_day: Annotated[float, Field(ge=0)]
    end_day: float | None

    @model_validator(mode="after")
    def _span(self) -> CampaignSettings:
        if self.end_day is not None and self.end_day <= self.start_day:
            raise ValueError("end_day must be > start_day")
        return self


class Hydra(CampaignSettings):
    """A hydra cluster: many modest accounts on a shared proxy pool driven by one scheduler.

    ``accounts`` is at the brief's scale; the simulation keeps ``accounts * campaign_scale *
    scale`` of them active at once (at least 2), each sending about
    ``requests_per_account_day``.
    """

    shape: Literal["hydra"]
    accounts: Annotated[int, Field(ge=1)]
    requests_per_account_day: Positive
    # -- content
    #: Capability families the templated prompts come from, with weights (see CAPABILITIES).
    focus: Annotated[dict[str, float], AfterValidator(_focus)]
    #: Distinct templates the operator uses; a few carry most of the traffic (Zipf).
    templates: Annotated[int, Field(ge=1)]
    #: Share of requests that are ordinary ShareGPT prompts instead (camouflage; sweep 0.05-0.5).
    mixing_share: Share
    #: Chance that a templated prompt is paraphrased (another wording, synonyms swapped).
    paraphrase_rate: Share
    #: Chance that a templated prompt also asks for the full chain of thought.
    cot_rate: Share
    # -- timing
    #: The scheduler dispatches waves this many minutes apart; each account fires every few.
    wave_minutes: Positive
    #: How far requests stray from the schedule: to a wave ``timing_jitter x every`` waves away
    #: (std), and ``timing_jitter x wave / 2`` off it. 0 is a clock; 0.1 gives regular accounts
    #: and sharp waves; 0.5 and more make accounts irregular and dissolve the waves.
    timing_jitter: Annotated[float, Field(ge=0)]
    #: Seconds over which one wave's requests spread.
    sync_spread_s: Annotated[float, Field(ge=0)]
    #: Times a week the whole cluster goes quiet for 1-6 hours (operator outages).
    outages_per_week: Annotated[float, Field(ge=0)]
    # -- network and accounts
    #: Accounts per address of the proxy pool (the pool is ``accounts / accounts_per_ip``).
    accounts_per_ip: Positive
    #: /24 networks the pool spans: few for datacenter proxies, many for residential ones.
    ip_subnets: Annotated[int, Field(ge=1)]
    #: Chance that a request leaves from another address of the pool than the account's own.
    ip_rotation: Share
    #: Expected bans per account slot over the window; each banned account is replaced.
    ban_rate: Annotated[float, Field(ge=0)]
    #: Mean hours from a ban to the replacement's first request.
    replacement_delay_h: Annotated[float, Field(ge=0)]
    #: First-generation accounts bought aged (created months before) rather than fresh.
    aged_share: Share
    #: Share of accounts that pay with one of the operator's ``shared_fingerprints`` cards (one
    #: main card, the others less used); the rest have a card each.
    shared_fingerprint_share: Share
    shared_fingerprints: Annotated[int, Field(ge=1)]
    email_domains: Annotated[list[str], Field(min_length=1)]
    user_agents: Annotated[list[str], Field(min_length=1)]
    # -- requests
    tier: TierName
    #: What requests ask to see: ``text``, ``logprobs``, ``topK`` or ``full``, with weights.
    exposure_mix: ExposureMix
    temperature: Temperature | None
    max_tokens: Annotated[int, Field(ge=1, le=4096)]
    stream_share: Share
    #: Chance that a request is answered 429 (retried after 1, 2, 4 s).
    rate_limited_share: Share
    # -- release pivot
    #: Share of traffic on the new model once the pivot is complete.
    pivot_share: Share
    #: Hours after the release when the move starts, and when it is complete.
    pivot_delay_h: Annotated[float, Field(ge=0)]
    pivot_hours: Positive

    @model_validator(mode="after")
    def _pivot(self) -> Hydra:
        if self.pivot_delay_h >= self.pivot_hours:
            raise ValueError("need pivot_delay_h < pivot_hours")
        return self


class ShapeCampaign(CampaignSettings):
    """A campaign shape other than hydra: ``accounts`` is its head count before ``scale`` (no
    ``campaign_scale``); each account moves to a new model with chance ``pivot_share`` within
    ``pivot_hours`` of its release."""

    accounts: Annotated[int, Field(ge=1)]
    tier: TierName
    exposure_mix: ExposureMix
    temperature: Temperature | None
    pivot_share: Share
    pivot_hours: Positive


class Stealth(ShapeCampaign):
    """No shared infrastructure: every account looks like one careful person. Its own
    residential address (sometimes a second of its own), its own browser, human diurnal sessions
    in its own time zone, its own signup date and card; ordinary prompts as camouflage, the rest
    from a grammar asking for agentic coding and tool use with the trace narrated."""

    shape: Literal["stealth"]
    #: Requests on an active day, drawn per account.
    requests_per_active_day: Range
    #: Mean chance that an account is active on a given day.
    active_day_share: Share
    #: Share of requests that are ordinary ShareGPT prompts.
    camouflage_share: Share
    #: Accounts that sometimes send from a second address of their own (a phone).
    second_ip_share: Share
    #: Accounts were created independently, up to this many days before the campaign starts.
    signup_spread_days: Positive
    #: Chance that a grammar prompt gets a follow-up turn in the same conversation.
    follow_up: Share


class Reseller(ShapeCampaign):
    """A few accounts each reselling access: many end users' ordinary conversations, plus a share
    of distillation traffic for a hidden buyer, from cloud addresses through an HTTP library."""

    shape: Literal["reseller"]
    #: Requests a day per account (high: an app's worth of users).
    requests_per_day: Range
    #: Share of requests that are the buyer's distillation prompts.
    distill_share: Share
    #: Of those, the share from the narrated-trace grammar (the rest: the template bank).
    grammar_share: Share
    #: Capability families of the templated distillation prompts, with weights.
    focus: Annotated[dict[str, float], AfterValidator(_focus)]
    #: Chance that a templated distillation prompt asks for the chain of thought.
    cot_rate: Share
    #: Cloud addresses per account.
    ips_per_account: CountRange


class SlowDripCot(ShapeCampaign):
    """Many quiet accounts, each a few requests a day: a diverse real ShareGPT prompt wrapped in
    a request to show the whole reasoning, worded many ways, before or after the prompt."""

    shape: Literal["slow_drip_cot"]
    #: Requests on an active day, drawn per day.
    requests_per_active_day: CountRange
    #: Mean chance that an account is active on a given day.
    active_day_share: Share
    #: Accounts that send through a commercial proxy exit (the rest: a residential address).
    proxy_share: Share


class ToolTrajectory(ShapeCampaign):
    """Accounts harvesting tool-use trajectories: a system prompt listing tools, earlier tool
    calls and ``tool`` results in ``messages``, sweeping tasks over a tool catalogue in order."""

    shape: Literal["tool_trajectory"]
    #: Requests a day per account (automation).
    requests_per_account_day: Positive
    #: Steps (requests) per trajectory.
    steps: CountRange
    #: Accounts per proxy address; 1: each account its own address.
    accounts_per_ip: Annotated[float, Field(ge=1)]
    #: Std of the gap between requests relative to its mean (0: a clock).
    timing_jitter: Annotated[float, Field(ge=0)]
    user_agents: Annotated[list[str], Field(min_length=1)]


# --- legitimate trap populations ----------------------------------------------------------------


class PopulationSettings(Settings):
    """What every legitimate population has: a shape and a name (unique in the scenario)."""

    #: Which legitimate shape (each subclass narrows it to its own name).
    shape: str
    name: Annotated[str, Field(min_length=1)]


class IntegrationFleet(PopulationSettings):
    """Organisations running pipelines: per organisation one fixed template wrapping its users'
    text, machine-regular timing around the clock, an HTTP library, its own cloud addresses."""

    shape: Literal["integration_fleet"]
    orgs: Annotated[int, Field(ge=1)]
    #: Accounts (keys) per organisation.
    accounts_per_org: CountRange
    #: Cloud addresses per organisation.
    addresses_per_org: CountRange
    #: Requests a day per account.
    requests_per_day: Range
    #: Share of accounts fed by a queue (bursts of work) rather than a jittered fixed interval.
    queue_share: Share


class SharedTemplateCustomers(PopulationSettings):
    """Unrelated customers (own organisations, own addresses) each wrapping their users' text in
    one popular framework's default prompt: several customers share each template."""

    shape: Literal["shared_template_customers"]
    accounts: Annotated[int, Field(ge=1)]
    #: How many of the framework templates (``data/legit.yaml``) are in use.
    templates: Annotated[int, Field(ge=1)]
    requests_per_day: Range


class CodingAgents(PopulationSettings):
    """IDE coding-agent users: human sessions, IDE user agents, system prompts with tool lists,
    coding tasks over several turns with tool results; they never ask to narrate reasoning."""

    shape: Literal["coding_agents"]
    accounts: Annotated[int, Field(ge=1)]
    #: Requests on an active day, for the median user (lognormal, sigma 0.7).
    median_daily: Positive
    active_day_share: Share
    #: Requests (agent steps) per task.
    steps: CountRange


class BenchmarkRunners(PopulationSettings):
    """Evaluation runs: each account sends the same public test set once, fast, at temperature
    0, often wrapped as ``Q: ... A: Let's think step by step.``"""

    shape: Literal["benchmark_runners"]
    accounts: Annotated[int, Field(ge=1)]
    #: Questions in the test set (generated deterministically: the same set for every runner).
    questions: Annotated[int, Field(ge=1, le=5000)]
    #: Hours a run takes.
    run_hours: Range
    #: Runners that wrap questions in the step-by-step prompt.
    cot_wrap_share: Share


class LogprobResearchers(PopulationSettings):
    """Researchers asking for logprobs and top-k alternatives on diverse prompts, human timing."""

    shape: Literal["logprob_researchers"]
    accounts: Annotated[int, Field(ge=1)]
    median_daily: Positive
    active_day_share: Share


class CorporateNat(PopulationSettings):
    """One organisation whose employees all leave through one or two NAT addresses: office
    hours, ordinary prompts, a corporate browser or SDK."""

    shape: Literal["corporate_nat"]
    #: Employees (one account each).
    accounts: Annotated[int, Field(ge=1)]
    nat_addresses: CountRange
    median_daily: Positive
    active_day_share: Share
    #: Employees calling through the SDK (the rest: the corporate browser).
    sdk_share: Share


CAMPAIGN_SHAPES: dict[str, type[CampaignSettings]] = {
    "hydra": Hydra,
    "stealth": Stealth,
    "reseller": Reseller,
    "slow_drip_cot": SlowDripCot,
    "tool_trajectory": ToolTrajectory,
}
POPULATION_SHAPES: dict[str, type[PopulationSettings]] = {
    "integration_fleet": IntegrationFleet,
    "shared_template_customers": SharedTemplateCustomers,
    "coding_agents": CodingAgents,
    "benchmark_runners": BenchmarkRunners,
    "logprob_researchers": LogprobResearchers,
    "corporate_nat": CorporateNat,
}


def _shape_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("shape", "hydra")
    return getattr(value, "shape", None)


def _union(shapes: dict[str, type[Settings]]) -> Any:
    members = tuple(Annotated[model, Tag(name)] for name, model in shapes.items())
    return Annotated[functools.reduce(lambda a, b: a | b, members), Discriminator(_shape_of)]


Campaign = _union(CAMPAIGN_SHAPES)
Population = _union(POPULATION_SHAPES)


# --- the scenario -------------------------------------------------------------------------------


class Scenario(Settings):
    """Everything a simulation draws from (``load_scenario`` fills it from default.yaml)."""

    name: str
    description: str
    #: Seeds every draw; ``simulate(seed=...)`` and ``--seed`` override it.
    seed: int
    #: The window's first instant (UTC), and its length in days.
    start: Annotated[str, BeforeValidator(_iso)]
    days: Annotated[float, Field(gt=0, le=366)]
    #: Multiplies every account count, legitimate and campaign (``--scale``).
    scale: Positive
    #: Hydra campaigns' account counts are the brief's, times this.
    campaign_scale: Positive
    #: The model everyone uses at the start, and the one released at ``release_day`` (null: no
    #: release). A release past the window's end never happens.
    base_model: Annotated[str, Field(min_length=1)]
    new_model: str | None
    release_day: Annotated[float, Field(ge=0)]
    #: Completion text is cut to this many characters (null: whole); tokens count the whole.
    completion_chars: Annotated[int, Field(ge=1)] | None
    #: Ordinary customers (shape ``background``).
    legit: Background
    #: Legitimate populations of other shapes (traps: automation that is not distillation).
    populations: list[Population]
    campaigns: list[Campaign]

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if parse_start(self.start) is None:
            raise ValueError(f"start must be an ISO time, not {self.start!r}")
        if self.new_model == self.base_model:
            raise ValueError("new_model must differ from base_model")
        names = [c.name for c in self.campaigns] + [p.name for p in self.populations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"campaign and population names must be unique: {repeated[0]!r}")
        return self

    def replace(self, **settings: object) -> Scenario:
        """A validated copy with top-level ``settings`` changed (e.g. ``scale``, ``days``)."""
        return _validate({**self.model_dump(), **settings}, "scenario")

    def for_all_campaigns(self, **settings: object) -> Scenario:
        """The scenario with ``settings`` applied to every campaign whose shape has them (a
        robustness sweep's knob, e.g. ``mixing_share=0.5``, ``paraphrase_rate``,
        ``timing_jitter``, ``ip_rotation``)."""
        shapes = {c.shape for c in self.campaigns}
        known = {name for shape in shapes for name in CAMPAIGN_SHAPES[shape].model_fields}
        unknown = sorted(set(settings) - known)
        if unknown:
            which = ", ".join(sorted(shapes)) or "none"
            raise ScenarioError(
                f"campaigns have no setting {', '.join(unknown)} (campaign shapes here: {which})"
            )
        document = self.model_dump()
        for campaign in document["campaigns"]:
            fields = CAMPAIGN_SHAPES[campaign["shape"]].model_fields
            campaign.update({k: v for k, v in settings.items() if k in fields})
        return _validate(document, "scenario")

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100
        )


def parse_start(text: str) -> datetime | None:
    """The scenario's ``start`` as an aware UTC datetime (None: not an ISO time)."""
    try:
        start = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)


# --- loading ------------------------------------------------------------------------------------


def scenario_names() -> list[str]:
    """The built-in scenarios, by name."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str | os.PathLike) -> Scenario:
    """A built-in scenario by name (``default``, ``smoke``, ``shapes``), or a YAML file of one.

    See the module docstring for how a file's settings combine with ``default.yaml``'s.
    """
    text = os.fspath(name_or_path)
    path = SCENARIO_DIR / f"{text}.yaml" if text in scenario_names() else Path(text)
    if not path.is_file():
        hint = ", ".join(scenario_names())
        raise ScenarioError(f"no scenario {text!r}: give a built-in name ({hint}) or a YAML file")
    return scenario_from_mapping(_read(path), f"scenario {path.name}")


def scenario_from_mapping(document: object, where: str = "scenario") -> Scenario:
    """A scenario from a mapping laid out like a scenario file (over ``default.yaml``)."""
    if not isinstance(document, dict):
        raise ScenarioError(f"{where} must be a mapping of settings")
    base = _defaults()
    document = dict(document)
    campaign_defaults = _mapping(
        document.pop("campaign_defaults", None), "campaign_defaults", where
    )
    shape_defaults = _mapping(document.pop("shape_defaults", None), "shape_defaults", where)
    merged = {**base["scenario"], **document}
    merged["legit"] = {**base["scenario"]["legit"], **_mapping(merged["legit"], "legit", where)}
    defaults = {"hydra": {**base["campaign_defaults"], **campaign_defaults}}
    for shape in (*CAMPAIGN_SHAPES, *POPULATION_SHAPES):
        if shape != "hydra":
            own = _mapping(shape_defaults.get(shape), f"shape_defaults.{shape}", where)
            defaults[shape] = {**base["shape_defaults"].get(shape, {}), **own}
    for key, shapes, default_shape in (
        ("campaigns", CAMPAIGN_SHAPES, "hydra"),
        ("populations", POPULATION_SHAPES, None),
    ):
        entries = merged[key]
        if not isinstance(entries, list):
            raise ScenarioError(f"{where}: {key} must be a list of mappings")
        merged[key] = [
            _entry(entry, f"{key}[{i}]", shapes, default_shape, defaults, where)
            for i, entry in enumerate(entries)
        ]
    return _validate(merged, where)


def _entry(entry, at, shapes, default_shape, defaults, where) -> object:
    if not isinstance(entry, dict):
        return entry  # pydantic names the type error
    shape = entry.get("shape", default_shape)
    if shape not in shapes:
        known = ", ".join(shapes)
        raise ScenarioError(f"{where}: {at}.shape: unknown shape {shape!r} (known: {known})")
    return {"shape": shape, "name": shape, **defaults[shape], **entry}


def _mapping(value: object, key: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: {key} must be a mapping")
    return value


def _read(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ScenarioError(f"scenario {path} is not valid YAML{line}") from None


@functools.cache
def _defaults() -> dict:
    """default.yaml split into the scenario, ``campaign_defaults`` and ``shape_defaults``."""
    document = dict(_read(SCENARIO_DIR / "default.yaml"))
    return {
        "campaign_defaults": document.pop("campaign_defaults"),
        "shape_defaults": document.pop("shape_defaults"),
        "scenario": document,
    }


def _validate(document: dict, where: str) -> Scenario:
    try:
        return Scenario.model_validate(document)
    except ValidationError as exc:
        raise ScenarioError(f"{where}: {_message(exc.errors()[0])}") from None


_SHAPES = {**CAMPAIGN_SHAPES, **POPULATION_SHAPES}


def _message(error: dict) -> str:
    """One line for pydantic's first error, naming the key path (``campaigns[1].cot_rate``)."""
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part in _SHAPES)]
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc]
    path = "".join(parts).lstrip(".")
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        parent = "".join(parts[:-1]).lstrip(".")
        known = _known_keys(error["loc"][:-1])
        hint = f" (known: {', '.join(known)})" if known else ""
        return f"{parent + ': ' if parent else ''}unknown key {str(loc[-1])!r}{hint}"
    text = error["msg"].removeprefix("Value error, ")
    if kind in ("float_type", "float_parsing"):
        text = "must be a number"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        text = "must be an integer"
    elif kind in ("string_type", "dict_type", "list_type", "tuple_type", "bool_type"):
        text = "must be " + {"string_type": "text", "dict_type": "a mapping"}.get(
            kind, {"list_type": "a list", "tuple_type": "[low, high]"}.get(kind, "true or false")
        )
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        bound = next(iter(error["ctx"].values()))
        text = f"must be {sign} {bound}"
    elif kind == "union_tag_not_found":
        text = "must be a mapping of settings"
    elif kind == "too_short":
        text = "must not be empty"
    if text.startswith("must"):
        shown = "" if isinstance(value, dict | list) else f", not {value!r}"
        return f"{path or 'scenario'} {text}{shown}"
    return f"{path}: {text}" if path else text


def _known_keys(loc: tuple) -> list[str]:
    """The keys the model at ``loc`` accepts (for an unknown-key message)."""
    model: type[BaseModel] = Scenario
    for part in loc:
        if isinstance(part, str) and part in _SHAPES:
            model = _SHAPES[part]
        elif isinstance(part, str) and part in model.model_fields:
            annotation = model.model_fields[part].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model = annotation
    return list(model.model_fields)
