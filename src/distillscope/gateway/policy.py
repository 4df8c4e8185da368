"""A tier's exposure policy on one request: what the backend is asked to reveal
(``apply_policy``: the tier's clamp, or a 400 for a ``reject`` tier) and what the answer then
shows (``Reveal``: rounding, and noise seeded per exchange)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from distillscope.exposure import exposure_name, reveal_logprobs
from distillscope.gateway.backends import LOGPROB_FLOOR, Generation
from distillscope.gateway.dependencies import TrafficRow
from distillscope.gateway.tiers import Tier
from distillscope.gateway.wire import APIError


def apply_policy(tier: Tier, asked: int | None, prompt_n: int | None, exchange: TrafficRow):
    """``(top_logprobs, prompt_logprobs)`` to serve under ``tier``; records both exposures.

    ``asked`` is the alternatives per token asked (``None``: no logprobs). Above the tier's cap a
    ``clamp`` tier serves its cap, a ``reject`` tier answers 400.
    """
    exchange.exposure_requested = exposure_name(asked, prompt_n)
    if tier.over_limit == "reject" and tier.exceeded_by(asked, prompt_n):
        raise APIError(
            400,
            f"this key's tier reveals at most {tier.exposure}",
            param="top_logprobs",
            code="exposure_not_allowed",
        )
    asked, prompt_n = tier.clamp(asked, prompt_n)
    exchange.exposure_served = exposure_name(asked, prompt_n)
    return asked, prompt_n


class Reveal:
    """A tier's output policy on reported logprobs: rounding, and noise seeded per exchange."""

    def __init__(self, tier: Tier, exchange_id: str):
        self.decimals = tier.round_logprobs
        self.noise = tier.logprob_noise
        seed = int.from_bytes(hashlib.sha256(exchange_id.encode()).digest()[:8], "little")
        self.rng = np.random.default_rng(seed) if self.noise else None

    def value(self, logprob: float) -> float:
        return float(
            reveal_logprobs(
                logprob,
                noise=self.noise,
                decimals=self.decimals,
                rng=self.rng,
                floor=LOGPROB_FLOOR,
            )  # fmt: skip
        )

    def apply_entries(self, entries: list[dict[str, Any]] | None) -> None:
        if not entries or (self.decimals is None and self.rng is None):
            return
        for entry in entries:
            entry["logprob"] = self.value(entry["logprob"])
            for alt in entry["top_logprobs"]:
                alt["logprob"] = self.value(alt["logprob"])
            entry["top_logprobs"].sort(key=lambda alt: -alt["logprob"])

    def apply(self, generation: Generation) -> None:
        self.apply_entries(generation.logprobs)
        for position in generation.prompt_logprobs or []:
            for item in (position or {}).values():
                item["logprob"] = self.value(item["logprob"])
