"""Exposure policy: what each tier of key may see, and how much it may ask.

A tier caps exposure on the ladder of ``distillscope.exposure`` (``text``: no logprobs; ``topK``:
at most K alternatives per token; ``full``: nothing withheld, which over an OpenAI-compatible API
is the most it can carry, ``top_logprobs`` up to 20 plus vLLM's ``prompt_logprobs``), decides what
happens to a request asking for more (``clamp``: served at the cap; ``reject``: 400), may round or
noise the logprobs it reveals, may watermark what it samples or steer it away from what a
distiller learns from (antidistillation sampling), and sets the key's rate limits.

Built-in tiers: ``text``, ``top1``, ``top5``, ``top20`` (named after their cap) and ``research``
(cap ``full``: top-20 and the prompt's logprobs, what evaluation and research users ask for). It
was called ``full`` until that word was kept for the whole distribution; ``full`` is still
accepted as its name (``RENAMED_TIERS``). A YAML file can redefine them or add more::

    tiers:
      partner:
        exposure: top20
        over_limit: reject
        round_logprobs: 2          # decimals
        logprob_noise: 0.05        # std of Gaussian noise added to each reported logprob
        watermark: kgw             # one the gateway offers (forensics.gateway_watermarks)
        antidistill: 0.03          # antidistillation strength lambda (local teachers only)
        antidistill_top_p: 0.9     # ... kept inside the teacher's own nucleus (default 1: off)
        requests_per_minute: 600
        tokens_per_minute: 200000
        concurrency: 16
        max_prompt_tokens: 4096
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, PlainValidator, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from distillscope.errors import DistillscopeError
from distillscope.exposure import Exposure, Full, Text, TopK, parse_exposure
from distillscope.gateway.limits import Limits

#: ``factory(account_id) -> logits processor``: what a tier's ``watermark:`` names. Whoever builds
#: the gateway hands ``create_app`` the ones it offers (``forensics.gateway_watermarks``).
WatermarkFactory = Callable[[str], object]


class TierError(DistillscopeError):
    """A tier definition that cannot be used."""


def _rule(text: str, **constraints: Any) -> Any:
    """A setting's constraints and, in words, what it must be (the error names it)."""
    return Field(description=text, **constraints)


#: A rate or concurrency limit; null: none.
Limit = Annotated[int | None, _rule("a positive integer or null", ge=1)]


@dataclass(frozen=True, config=ConfigDict(strict=True))
class Tier:
    """One tier of keys. Built in Python or from a tier file, it is checked by the same rules:
    strict types (``"2"`` is not a number, ``true`` not a count) and the ranges below."""

    name: str
    exposure: Annotated[
        Exposure, PlainValidator(parse_exposure), _rule("text, topK (K up to 20) or full")
    ] = field(default_factory=Text)
    over_limit: Annotated[Literal["clamp", "reject"], _rule("clamp or reject")] = "clamp"
    round_logprobs: Annotated[int | None, _rule("0..8 decimals or null", ge=0, le=8)] = None
    logprob_noise: Annotated[
        float, _rule("a number >= 0 (a standard deviation)", ge=0, allow_inf_nan=False)
    ] = 0.0
    watermark: Annotated[str | None, _rule("a watermark's name or null")] = None
    antidistill: Annotated[
        float | None, _rule("a number >= 0 (the strength) or null", ge=0, allow_inf_nan=False)
    ] = None
    antidistill_top_p: Annotated[float, _rule("a number in (0, 1]", gt=0, le=1)] = 1.0
    requests_per_minute: Limit = 600
    tokens_per_minute: Limit = 400_000
    concurrency: Limit = 16
    max_prompt_tokens: Annotated[int, _rule("a positive integer", ge=1)] = 4096

    @model_validator(mode="after")
    def _nucleus_needs_a_strength(self) -> Tier:
        if self.antidistill_top_p < 1 and not self.antidistill:
            raise ValueError(
                "antidistill_top_p keeps antidistillation's draw inside the teacher's nucleus; "
                "set antidistill (the strength) too"
            )
        return self

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
    **{name: Tier(name, parse_exposure(name)) for name in ("text", "top1", "top5", "top20")},
    "research": Tier("research", Full()),
}

#: Old tier names, still accepted in key stores, ``keys create --tier`` and tier files, and the
#: tier each now names. ``full`` became ``research``: it serves top-20 and the prompt's logprobs,
#: not the whole distribution ``exposure.Full`` is.
RENAMED_TIERS = {"full": "research"}


def tier_name(name: str) -> str:
    """``name``, or the current name of a renamed tier."""
    return RENAMED_TIERS.get(name, name)


def antidistilled(tiers: dict[str, Tier]) -> list[str]:
    """The names of the tiers that sample under antidistillation (``antidistill`` > 0)."""
    return sorted(name for name, tier in tiers.items() if tier.antidistill)


def tier_from_dict(name: str, spec: object) -> Tier:
    """A tier from its YAML mapping, starting from the built-in of the same name if any."""
    if not isinstance(spec, dict) or not all(isinstance(key, str) for key in spec):
        raise TierError(f"tier {name!r} must be a mapping of settings")
    settings = [f.name for f in fields(Tier) if f.name != "name"]
    unknown = sorted(set(spec) - set(settings))
    if unknown:
        raise TierError(
            f"tier {name!r}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(settings)})"
        )
    try:
        return replace(BUILTIN_TIERS.get(name) or Tier(name), **spec)
    except ValidationError as exc:
        raise TierError(f"tier {name!r}: {_message(exc.errors()[0])}") from None


def _message(error: Mapping[str, Any]) -> str:
    """pydantic's first error as one line: the setting, what it must be, what it was."""
    if not error["loc"]:  # a rule across settings
        return error["msg"].removeprefix("Value error, ")
    setting = str(error["loc"][0])
    rule = Tier.__pydantic_fields__[setting].description
    return f"{setting} must be {rule}, not {error['input']!r}"


def check_watermarks(tiers: Mapping[str, Tier], watermarks: Collection[str]) -> None:
    """Refuse a tier that names a watermark not among ``watermarks`` (those offered)."""
    for tier in tiers.values():
        if tier.watermark is not None and tier.watermark not in watermarks:
            known = ", ".join(sorted(watermarks)) or (
                "none offered: set DISTILLSCOPE_WATERMARK_SECRET to enable kgw and gumbel"
            )
            raise TierError(f"tier {tier.name!r}: unknown watermark {tier.watermark!r} ({known})")


def load_tiers(
    path: str | os.PathLike | None = None, *, watermarks: Collection[str] = ()
) -> dict[str, Tier]:
    """The built-in tiers, with those of a YAML file (``tiers:`` mapping) on top; a tier may name
    only one of ``watermarks``."""
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
    named = [str(name) for name in document["tiers"]]
    for old, new in RENAMED_TIERS.items():
        if old in named and new in named:
            raise TierError(f"{path}: tier {old!r} is the old name of {new!r}; define one of them")
    for name, spec in zip(named, document["tiers"].values(), strict=True):
        tiers[tier_name(name)] = tier_from_dict(tier_name(name), spec or {})
    check_watermarks(tiers, watermarks)
    return tiers
