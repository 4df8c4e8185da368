"""The exposure ladder: what one API query reveals about the teacher's next-token distribution.

``Full`` (the whole distribution) > ``TopK(k)`` (the k most likely tokens and their logprobs, plus
the tail mass they leave) > ``Text`` (the sampled tokens only). A ``Signal`` harvested at a richer
level downgrades exactly to any poorer one, so one harvest serves every level of an audit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from distillscope.errors import ExposureError

#: The largest ``top_logprobs`` the OpenAI API accepts; levels above it need ``max_k`` raised.
DEFAULT_MAX_K = 20


@dataclass(frozen=True, order=False)
class Full:
    """The teacher's whole next-token distribution at every position (white-box access)."""

    def __str__(self) -> str:
        return "full"


@dataclass(frozen=True, order=False)
class TopK:
    """The top-``k`` tokens and logprobs per position, and the tail mass ``1 - sum(p_topk)``."""

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ExposureError(f"top-k exposure needs an integer k >= 1, got {self.k!r}")

    def __str__(self) -> str:
        return f"top{self.k}"


@dataclass(frozen=True, order=False)
class Text:
    """The sampled tokens only: one one-hot target per position."""

    def __str__(self) -> str:
        return "text"


Exposure = Full | TopK | Text

_TOPK = re.compile(r"^top(?:k:)?(.+)$")


def parse_exposure(spec: str | Exposure, *, max_k: int | None = DEFAULT_MAX_K) -> Exposure:
    """Parse ``full``, ``text``, ``top5`` or ``topk:5`` into an exposure level.

    ``max_k`` caps k (20 by default, like OpenAI's ``top_logprobs``); raise it, or pass ``None``
    for no cap, for a local teacher.
    """
    if isinstance(spec, (Full, TopK, Text)):
        exposure = spec
    else:
        text = str(spec).strip().lower()
        if text == "full":
            return Full()
        if text == "text":
            return Text()
        match = _TOPK.match(text)
        if not match:
            raise ExposureError(
                f"unknown exposure {spec!r}: expected 'full', 'text', 'topK' or 'topk:K' "
                "(e.g. top5)"
            )
        raw_k = match.group(1)
        if not re.fullmatch(r"[0-9]+", raw_k):
            raise ExposureError(f"exposure {spec!r}: k must be a positive integer, got {raw_k!r}")
        k = int(raw_k)
        if k < 1:
            raise ExposureError(f"exposure {spec!r}: k must be at least 1")
        exposure = TopK(k)
    if isinstance(exposure, TopK) and max_k is not None and exposure.k > max_k:
        raise ExposureError(
            f"exposure top{exposure.k} exceeds the maximum k={max_k} "
            "(OpenAI-compatible APIs return at most 20 top_logprobs)"
        )
    return exposure


def richness(exposure: Exposure) -> float:
    """A number that orders levels: Full is infinite, TopK is k, Text is 0."""
    if isinstance(exposure, Full):
        return float("inf")
    if isinstance(exposure, TopK):
        return float(exposure.k)
    return 0.0


def is_at_least(exposure: Exposure, other: Exposure) -> bool:
    """Whether ``exposure`` reveals everything ``other`` does (so it can be downgraded to it)."""
    return richness(exposure) >= richness(other)


#: How a request's exposure is named where requests are logged (the traffic log's
#: ``exposure_requested``/``exposure_served``, a scenario's ``exposure_mix``): ``text`` (no
#: logprobs), ``logprobs`` (the sampled token's only), ``topK`` (K alternatives per token, 1..20),
#: ``full`` (20 alternatives and the prompt's logprobs).
REQUEST_EXPOSURE = re.compile(r"text|logprobs|full|top(?:[1-9]|1[0-9]|20)")


def exposure_name(top: int | None, prompt_n: int | None) -> str:
    """The logged name of a request asking ``top`` alternatives per token (``None``: no
    logprobs) and ``prompt_n`` prompt logprobs: ``text``; ``logprobs`` (the sampled token's
    only); ``topK``; ``full`` (prompt logprobs)."""
    if prompt_n is not None:
        return "full"
    if top is None:
        return "text"
    return f"top{top}" if top else "logprobs"


def request_logprobs(name: str) -> tuple[int | None, int | None]:
    """``(top_logprobs, prompt_logprobs)`` a request logged as ``name`` asked for: the inverse
    of ``exposure_name`` (``full`` asks 20 alternatives and one prompt logprob)."""
    if name.startswith("top"):
        return int(name[3:]), None
    return {"text": (None, None), "logprobs": (0, None), "full": (20, 1)}[name]


def tail_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """``1 - sum(exp(topk_logprobs))`` over the last axis, in float64, clipped at 0, as float32.

    One definition for every path (harvest, downgrade, remote servers), so a top-20 record cut to
    top-5 has bit-for-bit the tail mass of a record harvested at top-5.
    """
    mass = np.exp(np.asarray(topk_logprobs, dtype=np.float64)).sum(axis=-1)
    return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)


def reveal_logprobs(
    logprobs, *, noise: float = 0.0, decimals: int | None = None,
    rng: np.random.Generator | None = None, floor: float = float("-inf"),
) -> np.ndarray:  # fmt: skip
    """Logprobs as an output defence reveals them: Gaussian noise of std ``noise`` drawn from
    ``rng`` (clipped at 0), then rounding to ``decimals``. Values at or below ``floor`` (a token too
    unlikely to represent, or -inf) are not noised. Gateway tiers (``round_logprobs``,
    ``logprob_noise``) and ``forensics.DefendedTeacher`` both apply this, so they agree."""
    values = np.asarray(logprobs, dtype=np.float64)
    if noise:
        noisy = np.minimum(0.0, values + rng.normal(0.0, noise, values.shape))
        values = np.where(values > floor, noisy, values)
    if decimals is not None:
        values = np.round(values, decimals)
    return values


@dataclass
class Signal:
    """What the teacher revealed about one completion of T tokens, at one exposure level.

    Arrays are over completion positions: ``token_ids`` (T,) are the sampled tokens;
    ``token_logprobs`` (T,) the teacher's raw logprob of each sampled token (absent at ``text``);
    ``topk_ids``/``topk_logprobs`` (T, k) sorted by descending logprob and ``tail_mass`` (T,) at
    ``topK``; ``full_logprobs`` (T, V) at ``full``.
    """

    exposure: Exposure
    token_ids: np.ndarray
    token_logprobs: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    tail_mass: np.ndarray | None = None
    full_logprobs: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(len(self.token_ids))

    def downgrade(self, exposure: Exposure | str) -> Signal:
        """This signal as seen at a poorer (or equal) exposure level; exact, never estimated."""
        target = parse_exposure(exposure, max_k=None)
        if not is_at_least(self.exposure, target):
            raise ExposureError(f"cannot upgrade a {self.exposure} signal to {target}")
        if target == self.exposure:
            return self
        if isinstance(target, Text):
            return Signal(target, self.token_ids)
        assert isinstance(target, TopK)
        if isinstance(self.exposure, Full):
            assert self.full_logprobs is not None
            full = np.asarray(self.full_logprobs, dtype=np.float32)
            # argsort with a stable sort on negated values: ties resolve to the lower token id,
            # the same rule torch.topk follows on CPU for the harvest path.
            order = np.argsort(-full, axis=-1, kind="stable")[:, : target.k]
            ids = order.astype(np.int64)
            lps = np.take_along_axis(full, order, axis=-1)
        else:
            ids = self.topk_ids[:, : target.k]
            lps = self.topk_logprobs[:, : target.k]
        return Signal(
            target,
            self.token_ids,
            token_logprobs=self.token_logprobs,
            topk_ids=np.ascontiguousarray(ids),
            topk_logprobs=np.ascontiguousarray(lps, dtype=np.float32),
            tail_mass=tail_mass(lps),
        )
