"""Exposure policy: what each tier of key may see, and how much it may ask.

A tier caps exposure (``text``: no logprobs; ``topK``: at most K alternatives per token; ``full``:
``top_logprobs`` up to 20 plus vLLM's ``prompt_logprobs``), decides what happens to a request
asking for more (``clamp``: served at the cap; ``reject``: 400), may round or noise the logprobs
it reveals, may watermark what it samples or steer it away from what a distiller learns from
(antidistillation sampling), and sets the key's rate limits.

Built-in tiers are named after their cap (``text``, ``top1``, ``top5``, ``top20``, ``full``); a
YAML file can redefine them or add more::

    tiers:
      partner:
        exposure: top20
        over_limit: reject
        round_logprobs: 2          # decimals
        logprob_noise: 0.05        # std of Gaussian noise added to each reported logprob
        watermark: kgw             # a name registered in WATERMARKS
        antidistill: 0.03          # antidistillation strength lambda (local teachers only)
        antidistill_top_p: 0.9     # ... kept inside the teacher's own nucleus (default 1: off)
        requests_per_minute: 600
        tokens_per_minute: 200000
        concurrency: 16
        max_prompt_tokens: 4096
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import yaml

from distillscope.errors import DistillscopeError, ExposureError
from distillscope.exposure import Exposure, Full, Text, TopK, parse_exposure
from distillscope.gateway.limits import Limits

#: Watermark factories by name: ``factory(account_id) -> logits processor``. The forensics module
#: registers its schemes here; a tier naming one gets its processor on every generation.
WATERMARKS: dict[str, Callable[[str], object]] = {}


class TierError(DistillscopeError):
    """A tier definition that cannot be used."""


@dataclass(frozen=True)
class Tier:
    name: str
    exposure: Exposure = field(default_factory=Text)
    over_limit: Literal["clamp", "reject"] = "clamp"
    round_logprobs: int | None = None
    logprob_noise: float = 0.0
    watermark: str | None = None
    antidistill: float | None = None
    antidistill_top_p: float = 1.0
    requests_per_minute: int | None = 600
    tokens_per_minute: int | None = 400_000
    concurrency: int | None = 16
    max_prompt_tokens: int = 4096

    @property
    def limits(self) -> Limits:
        return Limits(self.requests_per_minute, self.tokens_per_minute, self.concurrency)

    @property
    def max_top_logprobs(self) -> int:
        """The most alternatives per token this tier reveals (OpenAI's ceiling is 20)."""
        if isinstance(self.exposure, Full):
            return 20
        return self.exposure.k if isinstance(self.exposure, TopK) else 0

    @property
    def allows_logprobs(self) -> bool:
        return not isinstance(self.exposure, Text)

    @property
    def allows_prompt_logprobs(self) -> bool:
        return isinstance(self.exposure, Full)

    def exceeded_by(self, top: int | None, prompt_n: int | None) -> bool:
        """Whether a request asking ``top`` alternatives per token (``None``: no logprobs) and
        ``prompt_n`` prompt logprobs asks for more than this tier reveals."""
        cap = self.max_top_logprobs if self.allows_logprobs else None
        return (top is not None and (cap is None or top > cap)) or (
            prompt_n is not None and not self.allows_prompt_logprobs
        )

    def clamp(self, top: int | None, prompt_n: int | None) -> tuple[int | None, int | None]:
        """``(top, prompt_n)`` cut to what this tier reveals: at most its cap of alternatives, no
        logprobs at ``text``, prompt logprobs only at ``full``. The gateway serves this (a
        ``clamp`` tier) and the simulator logs it."""
        if top is not None:
            top = min(top, self.max_top_logprobs) if self.allows_logprobs else None
        return top, prompt_n if self.allows_prompt_logprobs else None


BUILTIN_TIERS: dict[str, Tier] = {
    name: Tier(name, parse_exposure(name)) for name in ("text", "top1", "top5", "top20", "full")
}


def antidistilled(tiers: dict[str, Tier]) -> list[str]:
    """The names of the tiers that sample under antidistillation (``antidistill`` > 0)."""
    return sorted(name for name, tier in tiers.items() if tier.antidistill)


def tier_from_dict(name: str, spec: dict) -> Tier:
    """A tier from its YAML mapping, starting from the built-in of the same name if any."""
    if not isinstance(spec, dict):
        raise TierError(f"tier {name!r} must be a mapping of settings")
    known = {f.name for f in fields(Tier)} - {"name"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise TierError(f"tier {name!r}: unknown setting(s) {', '.join(unknown)}")
    base = BUILTIN_TIERS.get(name, Tier(name))
    values = dict(spec)
    if "exposure" in values:
        try:
            values["exposure"] = parse_exposure(str(values["exposure"]))
        except ExposureError as exc:
            raise TierError(f"tier {name!r}: {exc}") from exc
    tier = replace(base, **values)
    _check(tier)
    return tier


def _check(tier: Tier) -> None:
    if tier.over_limit not in ("clamp", "reject"):
        raise TierError(f"tier {tier.name!r}: over_limit must be clamp or reject")
    if tier.round_logprobs is not None and not 0 <= tier.round_logprobs <= 8:
        raise TierError(f"tier {tier.name!r}: round_logprobs must be 0..8 decimals")
    if not tier.logprob_noise >= 0:
        raise TierError(f"tier {tier.name!r}: logprob_noise must be >= 0")
    if tier.watermark is not None and tier.watermark not in WATERMARKS:
        known = ", ".join(sorted(WATERMARKS)) or (
            "none registered: set DISTILLSCOPE_WATERMARK_SECRET to enable kgw and gumbel"
        )
        raise TierError(f"tier {tier.name!r}: unknown watermark {tier.watermark!r} ({known})")
    if tier.antidistill is not None and (
        isinstance(tier.antidistill, bool)
        or not isinstance(tier.antidistill, int | float)
        or not 0 <= tier.antidistill < float("inf")
    ):
        raise TierError(f"tier {tier.name!r}: antidistill must be a number >= 0 (the strength)")
    top_p = tier.antidistill_top_p
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise TierError(f"tier {tier.name!r}: antidistill_top_p must be a number in (0, 1]")
    if top_p < 1 and not tier.antidistill:
        raise TierError(
            f"tier {tier.name!r}: antidistill_top_p keeps antidistillation's draw inside the "
            "teacher's nucleus; set antidistill (the strength) too"
        )
    for limit in ("requests_per_minute", "tokens_per_minute", "concurrency"):
        value = getattr(tier, limit)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise TierError(f"tier {tier.name!r}: {limit} must be a positive integer or null")
    if tier.max_prompt_tokens < 1:
        raise TierError(f"tier {tier.name!r}: max_prompt_tokens must be positive")


def load_tiers(path: str | os.PathLike | None = None) -> dict[str, Tier]:
    """The built-in tiers, with those of a YAML file (``tiers:`` mapping) on top."""
    tiers = dict(BUILTIN_TIERS)
    if path is None:
        return tiers
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TierError(f"no tier file at {path}") from None
    except yaml.YAMLError as exc:
        raise TierError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("tiers"), dict):
        raise TierError(f"{path} must hold a 'tiers:' mapping of tier name to settings")
    for name, spec in document["tiers"].items():
        tiers[str(name)] = tier_from_dict(str(name), spec or {})
    return tiers
