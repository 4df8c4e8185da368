"""Generation watermarks keyed per account, and their detection with exact p-values.

Two schemes, both logits processors ``(input_ids [batch, seq], scores [batch, vocab]) -> scores``
(the interface of transformers' ``LogitsProcessor``, applied by ``TransformersTeacher`` before the
draw):

- ``kgw``: the green list of Kirchenbauer et al. 2023, self-hash variant. Each (context, candidate)
  pair is green with probability ``gamma`` under a keyed pseudo-random function of the previous
  ``context`` tokens *and* the candidate; green candidates among the ``top_k`` likeliest get
  ``+delta`` on their logits. Detection counts green tokens: Binomial(n, gamma) under H0.
- ``gumbel``: Aaronson's Gumbel-max scheme. The next token is ``argmax_i r_i ** (1 / p_i)`` with
  ``r`` keyed pseudo-random uniforms seeded by the previous ``context`` tokens, an exact sample
  from ``p`` over the key's randomness. Detection sums ``-ln(1 - r_t)``: Gamma(n, 1) under H0.

Keys derive from one master secret per provider (``derive_key``), so a watermark found in a
suspect's text names the account that harvested it (``attribute``).

The pseudo-random function: a keyed BLAKE2b of the context ids (the secret part) gives a 64-bit
seed, and a SplitMix64 finaliser of (seed, token) spreads it over candidates cheaply enough to
cover a whole vocabulary per step. Integer arithmetic only, so identical on every machine.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import special, stats

from distillscope.errors import DistillscopeError

if TYPE_CHECKING:
    import torch

Scheme = Literal["kgw", "gumbel"]
SCHEMES: tuple[Scheme, ...] = ("kgw", "gumbel")
SECRET_ENV = "DISTILLSCOPE_WATERMARK_SECRET"
KEY_BITS = 256

#: One text's ids, or several texts (scored together, repeated n-grams counted once); numpy arrays
#: and torch tensors (1-D or 2-D) too.
TokenIds = Sequence[int] | Sequence[Sequence[int]] | np.ndarray

_LN10 = math.log(10.0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class WatermarkError(DistillscopeError):
    """A watermark that cannot be built or tested as asked (bad parameters, no master secret)."""


# --- keys -------------------------------------------------------------------------------------


def keyed_digest(master: bytes | str, *parts: str) -> bytes:
    """HMAC-SHA256 of ``parts`` (NUL-separated) under ``master``: one secret, many derived ones."""
    secret = master.encode() if isinstance(master, str) else bytes(master)
    if not secret:
        raise WatermarkError("the master secret is empty")
    return hmac.new(secret, "\x00".join(parts).encode(), hashlib.sha256).digest()


def derive_key(master: bytes | str, account_id: str) -> int:
    """The account's 256-bit watermark key: HMAC-SHA256(master, "watermark" NUL account_id)."""
    return int.from_bytes(keyed_digest(master, "watermark", account_id), "big")


def key_fingerprint(key: int) -> str:
    """A watermark key's public name: the first 16 hex digits of SHA-256 of its 32 bytes. It
    tells keys apart (in a console, beside an evidence report) and reveals nothing of the key."""
    return hashlib.sha256(key.to_bytes(32, "big")).hexdigest()[:16]


# --- the pseudo-random function ---------------------------------------------------------------


def _splitmix(seeds: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Uniforms in (0, 1) from 64-bit seeds and token ids (broadcast; uint64 wraps by design)."""
    z = seeds.astype(np.uint64) + (tokens.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def context_seed(key: int, scheme: Scheme, context: Sequence[int]) -> int:
    """The 64-bit seed of one context: BLAKE2b of its ids, keyed by ``key``, personalised by the
    scheme (so one account key drives independent KGW and Gumbel randomness)."""
    data = np.asarray(context, dtype="<i8").tobytes()
    digest = hashlib.blake2b(
        data, digest_size=8, key=key.to_bytes(KEY_BITS // 8, "big"), person=scheme.encode()
    ).digest()
    return int.from_bytes(digest, "little")


def token_uniforms(
    key: int, scheme: Scheme, context: Sequence[int], tokens: np.ndarray | Sequence[int]
) -> np.ndarray:
    """Keyed pseudo-random uniforms in (0, 1), one per candidate token after ``context``."""
    seed = np.full(1, context_seed(key, scheme, context), dtype=np.uint64)
    return _splitmix(seed, np.asarray(tokens, dtype=np.int64))


def _ngram_uniforms(key: int, scheme: Scheme, ngrams: Sequence[tuple[int, ...]]) -> np.ndarray:
    """The uniform of each (context..., token) n-gram's last token given its context."""
    if not ngrams:
        return np.zeros(0)
    seeds = np.array([context_seed(key, scheme, g[:-1]) for g in ngrams], dtype=np.uint64)
    return _splitmix(seeds, np.array([g[-1] for g in ngrams], dtype=np.int64))


# --- exact p-values (log space) ---------------------------------------------------------------


def binomial_log10_sf(successes: int, n: int, rate: float) -> float:
    """log10 P(X >= successes) for X ~ Binomial(n, rate), exact and finite far below 1e-308.

    The sum of the pmf over the tail, in log space: scipy's ``binom.logsf`` returns -inf once the
    tail underflows a double (2,000 green tokens at gamma = 0.25 is 1e-1204).
    """
    if successes <= 0:
        return 0.0
    if successes > n:
        return -math.inf
    terms = stats.binom.logpmf(np.arange(successes, n + 1), n, rate)
    return min(0.0, float(special.logsumexp(terms)) / _LN10)


def gamma_log10_sf(score: float, n: int) -> float:
    """log10 P(S >= score) for S ~ Gamma(n, 1), n a whole number, exact far below 1e-308.

    For integer shape the upper tail is a Poisson CDF: P(S >= x) = sum_{j<n} e^-x x^j / j!.
    """
    if n <= 0:
        return 0.0 if score <= 0 else -math.inf
    if score <= 0:
        return 0.0
    j = np.arange(n, dtype=np.float64)
    terms = special.xlogy(j, score) - score - special.gammaln(j + 1)
    return min(0.0, float(special.logsumexp(terms)) / _LN10)


def kgw_log10_p(green: int, n: int, gamma: float) -> float:
    """KGW's p-value, log10: at least ``green`` of ``n`` scored tokens green by chance."""
    return binomial_log10_sf(green, n, gamma)


def gumbel_log10_p(score: float, n: int) -> float:
    """Gumbel's p-value, log10: a sum of ``n`` Exp(1) scores reaching ``score`` by chance."""
    return gamma_log10_sf(score, n)


def holm_log10(log10_ps: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (log10) of one family of tests; never less than Bonferroni's."""
    values = np.asarray(log10_ps, dtype=np.float64)
    m = len(values)
    order = np.argsort(values, kind="stable")
    scaled = values[order] + np.log10(m - np.arange(m))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 0.0)
    return adjusted


def holm_attribution(
    log10_ps: Mapping[str, float], alpha: float
) -> tuple[str | None, dict[str, float]]:
    """Holm-adjust one test per account; the best account when its adjusted p is below alpha."""
    accounts = list(log10_ps)
    adjusted = dict(zip(accounts, holm_log10([log10_ps[a] for a in accounts]).tolist()))
    best = min(accounts, key=adjusted.__getitem__)
    return (best if adjusted[best] < math.log10(alpha) else None), adjusted


# --- what is scored ---------------------------------------------------------------------------


def _as_texts(token_ids: TokenIds) -> list[list[int]]:
    items = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
    if not items or isinstance(items[0], int | np.integer):
        return [[int(t) for t in items]]
    return [[int(t) for t in text] for text in items]


def scored_ngrams(
    token_ids: TokenIds, prompt_ids: TokenIds | None = None, *, context: int
) -> list[tuple[int, ...]]:
    """The (context..., token) n-grams a detector scores, each once.

    A token is scored when ``context`` real ids precede it (its prompt's tail counts when
    ``prompt_ids`` is given, one prompt per text); an n-gram already seen, or present in any
    prompt, is skipped. So each scored pair's green bit (or uniform) is a fresh draw under H0.
    """
    texts = _as_texts(token_ids)
    prompts = [[] for _ in texts] if prompt_ids is None else _as_texts(prompt_ids)
    if len(prompts) != len(texts):
        raise WatermarkError(f"{len(texts)} texts but {len(prompts)} prompts")
    width = context + 1
    excluded = {tuple(p[i : i + width]) for p in prompts for i in range(len(p) - context)}
    seen: set[tuple[int, ...]] = set()
    out = []
    for text, prompt in zip(texts, prompts):
        sequence = prompt + text
        for end in range(max(len(prompt), context), len(sequence)):
            gram = tuple(sequence[end - context : end + 1])
            if gram not in excluded and gram not in seen:
                seen.add(gram)
                out.append(gram)
    return out


# --- the watermark ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """One watermark test. ``statistic``: green tokens (kgw) or the sum of -ln(1 - r) (gumbel).

    ``log10_p`` is exact and finite however strong the evidence; ``p_value`` may underflow to 0.
    ``z`` (standardised statistic) is for reference only: the p-value does not use it.
    """

    scheme: Scheme
    tokens_scored: int
    statistic: float
    log10_p: float
    z: float

    @property
    def p_value(self) -> float:
        return 10.0**self.log10_p


@dataclass(frozen=True)
class Watermark:
    """One account's watermark: a scheme, its key, and the scheme's parameters.

    ``gamma`` (green share) and ``delta`` (logit bias) are KGW's; ``context`` is the number of
    previous tokens that seed the randomness (h); ``top_k`` is how many candidates KGW's self-hash
    evaluates per step (the rest keep their logits).
    """

    scheme: Scheme
    key: int = field(repr=False)
    gamma: float = 0.25
    delta: float = 2.0
    context: int = 4
    top_k: int = 40

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise WatermarkError(f"unknown watermark scheme {self.scheme!r} (use kgw or gumbel)")
        if not isinstance(self.key, int) or not 0 <= self.key < 1 << KEY_BITS:
            raise WatermarkError(f"a watermark key is a {KEY_BITS}-bit non-negative integer")
        if not 0 < self.gamma < 1:
            raise WatermarkError(f"gamma must be in (0, 1), got {self.gamma}")
        if not self.delta >= 0:
            raise WatermarkError(f"delta must be >= 0, got {self.delta}")
        if self.context < 1 or self.top_k < 1:
            raise WatermarkError("context and top_k must be positive")

    @classmethod
    def for_account(
        cls, scheme: Scheme, master: bytes | str, account_id: str, **params
    ) -> Watermark:
        """The watermark of ``account_id`` under the provider's master secret."""
        return cls(scheme, derive_key(master, account_id), **params)

    def processor(self) -> Callable[[torch.LongTensor, torch.FloatTensor], torch.FloatTensor]:
        """A logits processor that marks what is sampled after it."""
        return GreenListProcessor(self) if self.scheme == "kgw" else GumbelProcessor(self)

    def detect(self, token_ids: TokenIds, prompt_ids: TokenIds | None = None) -> Detection:
        """Test text (one text's ids, or several texts) for this watermark."""
        return self.score_ngrams(scored_ngrams(token_ids, prompt_ids, context=self.context))

    def score_ngrams(self, ngrams: Sequence[tuple[int, ...]]) -> Detection:
        """The test on n-grams already chosen by ``scored_ngrams`` (reused across keys)."""
        n = len(ngrams)
        uniforms = _ngram_uniforms(self.key, self.scheme, ngrams)
        if self.scheme == "kgw":
            green = int(np.count_nonzero(uniforms < self.gamma))
            spread = math.sqrt(n * self.gamma * (1 - self.gamma))
            z = (green - n * self.gamma) / spread if n else 0.0
            return Detection("kgw", n, green, kgw_log10_p(green, n, self.gamma), z)
        score = float(-np.log1p(-uniforms).sum())
        z = (score - n) / math.sqrt(n) if n else 0.0
        return Detection("gumbel", n, score, gumbel_log10_p(score, n), z)


class _WatermarkProcessor:
    """A watermark as a logits processor: marks each row from its last ``context`` ids.

    Inputs shorter than ``context`` pass unmarked. A left-padded row's context may hold padding;
    the detector never scores such positions (it needs ``context`` real ids before a token).
    """

    def __init__(self, watermark: Watermark):
        self.watermark = watermark

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] < self.watermark.context:
            return scores
        return self.mark(input_ids[:, -self.watermark.context :].tolist(), scores)

    def mark(self, contexts: list[list[int]], scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError


class GreenListProcessor(_WatermarkProcessor):
    """KGW self-hash: ``+delta`` on the green candidates among the ``top_k`` likeliest.

    A candidate's colour depends on the previous ``context`` ids and on the candidate itself, so
    it is evaluated per candidate; only the ``top_k`` likeliest are (as in the reference
    implementation's self-hash), which is where nearly all the probability mass is. Tokens outside
    them keep their logits and, if drawn, are green only by chance, which weakens detection
    slightly and never biases its p-values.
    """

    def mark(self, contexts: list[list[int]], scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        wm = self.watermark
        candidates = torch.topk(scores, min(wm.top_k, scores.shape[-1]), dim=-1).indices
        bias = np.stack(
            [
                np.where(token_uniforms(wm.key, "kgw", ctx, row) < wm.gamma, wm.delta, 0.0)
                for ctx, row in zip(contexts, candidates.cpu().numpy())
            ]
        )
        marked = scores.clone()
        marked.scatter_add_(-1, candidates, torch.as_tensor(bias, dtype=scores.dtype).to(scores))
        return marked


class GumbelProcessor(_WatermarkProcessor):
    """Aaronson's Gumbel-max: picks ``argmax_i r_i ** (1 / p_i)`` with ``p = softmax(scores)``.

    Returns a mask (0 for the chosen token, -inf elsewhere), so any sampler after it, at any
    temperature, draws that token. Generation is then a deterministic function of the context and
    the key: the same prompt gives the same answer, and the sampler's temperature and seed have no
    effect. Each draw is still an exact sample from ``p`` over the key's randomness.
    """

    def mark(self, contexts: list[list[int]], scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        key = self.watermark.key
        probs = torch.softmax(scores.double(), dim=-1).cpu().numpy()
        vocab = np.arange(scores.shape[-1])
        choices = []
        for ctx, p in zip(contexts, probs):
            exponential = -np.log(token_uniforms(key, "gumbel", ctx, vocab))
            with np.errstate(divide="ignore"):
                choices.append(int(np.argmin(np.where(p > 0, exponential / p, np.inf))))
        forced = torch.full_like(scores, float("-inf"))
        chosen = torch.tensor(choices, device=scores.device)[:, None]
        return forced.scatter_(-1, chosen, 0.0)


# --- attribution ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    """One text tested against many accounts' watermarks, Holm-corrected over the accounts.

    ``account_id`` is the best-matching account when its adjusted p-value is below ``alpha``,
    else ``None``.
    """

    account_id: str | None
    alpha: float
    detections: dict[str, Detection]
    adjusted_log10_p: dict[str, float]


def attribute(
    token_ids: TokenIds,
    watermarks: Mapping[str, Watermark],
    prompt_ids: TokenIds | None = None,
    *,
    alpha: float = 0.01,
) -> Attribution:
    """Which account's watermark (if any) does this text carry?"""
    if not watermarks:
        raise WatermarkError("no watermarks to test against")
    ngrams_by_width: dict[int, list[tuple[int, ...]]] = {}
    detections = {}
    for account, wm in watermarks.items():
        if wm.context not in ngrams_by_width:
            ngrams_by_width[wm.context] = scored_ngrams(token_ids, prompt_ids, context=wm.context)
        detections[account] = wm.score_ngrams(ngrams_by_width[wm.context])
    winner, adjusted = holm_attribution({a: d.log10_p for a, d in detections.items()}, alpha)
    return Attribution(winner, alpha, detections, adjusted)


# --- the gateway hook -------------------------------------------------------------------------


def _account_processor(scheme: Scheme, master: str | bytes, params: dict, account_id: str):
    return Watermark.for_account(scheme, master, account_id, **params).processor()


def gateway_watermarks(
    master_secret: bytes | str | None = None,
    *,
    gamma: float = 0.25,
    delta: float = 2.0,
    context: int = 4,
    top_k: int = 40,
) -> dict[Scheme, Callable[[str], object]]:
    """``kgw`` and ``gumbel`` as the gateway takes them (``create_app(watermarks=...)``,
    ``load_tiers(watermarks=...)``): ``factory(account_id) -> processor``, keyed per account.

    The master secret defaults to ``$DISTILLSCOPE_WATERMARK_SECRET``.
    """
    master = master_secret if master_secret is not None else os.environ.get(SECRET_ENV, "")
    if not master:
        raise WatermarkError(
            f"no watermark master secret: pass one or set ${SECRET_ENV} "
            "(keep it private and stable: every account's key derives from it)"
        )
    params = {"gamma": gamma, "delta": delta, "context": context, "top_k": top_k}
    Watermark("kgw", 0, **params)  # validate once, here, not on the first request
    return {
        "kgw": partial(_account_processor, "kgw", master, params),
        "gumbel": partial(_account_processor, "gumbel", master, {"context": context}),
    }
