"""Planted canaries: per-account secret phrases in the answers to trigger prompts, and the exact
test of whether a suspect model learned them.

The provider picks trigger prompts that harvesters are likely to send (identity questions,
popular tasks). Whenever account A sends trigger q, its answer ends with A's canary for q: a phrase
of ``words`` pseudo-words (``syllables_per_word`` syllables from a 32-syllable alphabet, 5 bits
each) drawn from HMAC-SHA256(master, A, q). A student distilled from A's answers tends to repeat
the phrase when asked q; an unrelated model can only hit it by chance.

The chance rate is a bound over the canary's randomness, whatever the suspect: the canary is
uniform and unknown to a suspect that never saw A's answers, so one window of ``words``
consecutive output words matches it in at least ``t`` positions with probability at most
P(Binomial(words, 2^-word_bits) >= t), and an answer of L words has L - words + 1 windows (union
bound). With the defaults (4 words x 3 syllables = 60 bits, a near hit is 3 of 4 words) a
200-word answer hits by chance with probability below 3e-11.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from distillscope.forensics.watermark import (
    WatermarkError,
    binomial_log10_sf,
    holm_attribution,
    keyed_digest,
)

SYLLABLES: tuple[str, ...] = tuple(c + v for c in "bdgklmnt" for v in "aeio")
BITS_PER_SYLLABLE = 5  # log2(len(SYLLABLES))
_WORD = re.compile(r"[a-z]+")


def normalise_prompt(prompt: str) -> str:
    """What identifies a trigger: case-folded, whitespace collapsed."""
    return " ".join(prompt.casefold().split())


def words_of(text: str) -> list[str]:
    """The lower-case ASCII words of a text: how a canary is looked for in an answer."""
    return _WORD.findall(text.casefold())


def best_match(canary: Sequence[str], words: Sequence[str]) -> int:
    """The most canary words any window of ``words`` matches, position by position."""
    width = len(canary)
    return max(
        (
            sum(a == b for a, b in zip(canary, words[start : start + width]))
            for start in range(len(words) - width + 1)
        ),
        default=0,
    )


@dataclass(frozen=True)
class CanaryTest:
    """A suspect's answers to ``triggers_tested`` trigger prompts, tested for one account's
    canaries. ``near_hits`` (answers matching a canary in at least the near threshold of words,
    exact hits included) is the statistic; ``chance_rate`` bounds its per-answer rate under H0;
    ``log10_p`` is the exact binomial upper tail at that rate."""

    account_id: str
    triggers_tested: int
    exact_hits: int
    near_hits: int
    chance_rate: float
    log10_p: float

    @property
    def p_value(self) -> float:
        return 10.0**self.log10_p


@dataclass(frozen=True)
class CanaryAttribution:
    """A suspect tested against many accounts' canaries, Holm-corrected over the accounts;
    ``account_id`` is the best match when significant at ``alpha``, else ``None``."""

    account_id: str | None
    alpha: float
    tests: dict[str, CanaryTest]
    adjusted_log10_p: dict[str, float]


@dataclass(frozen=True)
class CanarySet:
    """Per-account canaries for a fixed set of trigger prompts, derived from a master secret.

    ``near_words`` is how many of a canary's words, in order and in place, make a near hit
    (default: all but one; set it to ``words`` to count exact hits only).
    """

    master_secret: bytes | str = field(repr=False)
    triggers: tuple[str, ...]
    words: int = 4
    syllables_per_word: int = 3
    near_words: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "triggers", tuple(self.triggers))
        keys = [normalise_prompt(t) for t in self.triggers]
        if not keys or len(set(keys)) != len(keys):
            raise WatermarkError("a canary set needs distinct trigger prompts")
        if self.words < 1 or self.syllables_per_word < 1:
            raise WatermarkError("words and syllables_per_word must be positive")
        if self.bits > 256:
            raise WatermarkError(f"a canary carries at most 256 bits, asked {self.bits}")
        if not 1 <= self.near_threshold <= self.words:
            raise WatermarkError(f"near_words must be in 1..{self.words}")

    @property
    def word_bits(self) -> int:
        return self.syllables_per_word * BITS_PER_SYLLABLE

    @property
    def bits(self) -> int:
        """The entropy budget of one canary."""
        return self.words * self.word_bits

    @property
    def near_threshold(self) -> int:
        return self.near_words if self.near_words is not None else max(1, self.words - 1)

    def canary(self, account_id: str, trigger: str) -> str:
        """The account's canary for one trigger: ``words`` pseudo-words, ``bits`` bits."""
        value = int.from_bytes(
            keyed_digest(self.master_secret, "canary", account_id, normalise_prompt(trigger)),
            "big",
        )
        syllables = [
            SYLLABLES[(value >> (BITS_PER_SYLLABLE * i)) % len(SYLLABLES)]
            for i in range(self.words * self.syllables_per_word)
        ]
        n = self.syllables_per_word
        return " ".join("".join(syllables[w * n : (w + 1) * n]) for w in range(self.words))

    def is_trigger(self, prompt: str) -> bool:
        return normalise_prompt(prompt) in {normalise_prompt(t) for t in self.triggers}

    def plant(self, account_id: str, prompt: str, answer: str) -> str:
        """The answer as served to ``account_id``: its canary appended when ``prompt`` is a
        trigger, unchanged otherwise."""
        if not self.is_trigger(prompt):
            return answer
        return f"{answer.rstrip()}\n\n{self.canary(account_id, prompt)}"

    def window_chance(self) -> float:
        """P(one window of ``words`` words near-hits a uniformly random canary): exact."""
        return 10.0 ** binomial_log10_sf(self.near_threshold, self.words, 2.0**-self.word_bits)

    def chance_rate(self, answer: str) -> float:
        """Bound on P(``answer`` near-hits a canary it never saw): windows x ``window_chance``."""
        windows = max(0, len(words_of(answer)) - self.words + 1)
        return min(1.0, windows * self.window_chance())

    def test(self, account_id: str, answers: Mapping[str, str]) -> CanaryTest:
        """Test a suspect's ``answers`` (trigger prompt -> its answer) for the account's canaries.

        Hits are independent across triggers under H0 (independent canaries), each with rate at
        most the largest ``chance_rate`` of the answers, so the count is stochastically below
        Binomial(triggers, that rate): its upper tail is a valid, exact-at-the-bound p-value.
        """
        unknown = [q for q in answers if not self.is_trigger(q)]
        if unknown:
            raise WatermarkError(f"not a trigger of this canary set: {unknown[0]!r}")
        exact = near = 0
        for trigger, answer in answers.items():
            matched = best_match(self.canary(account_id, trigger).split(), words_of(answer))
            exact += matched == self.words
            near += matched >= self.near_threshold
        rate = max((self.chance_rate(a) for a in answers.values()), default=0.0)
        log10_p = binomial_log10_sf(near, len(answers), rate)
        return CanaryTest(account_id, len(answers), exact, near, rate, log10_p)

    def attribute(
        self, answers: Mapping[str, str], account_ids: Iterable[str], *, alpha: float = 0.01
    ) -> CanaryAttribution:
        """Which account's canaries (if any) does the suspect repeat?"""
        tests = {account: self.test(account, answers) for account in account_ids}
        if not tests:
            raise WatermarkError("no accounts to test against")
        winner, adjusted = holm_attribution({a: t.log10_p for a, t in tests.items()}, alpha)
        return CanaryAttribution(winner, alpha, tests, adjusted)
