"""Canaries: per-account phrases derived from a master secret, planted in answers to trigger
prompts; a suspect repeating them is attributed at a tiny exact p-value, a clean one never is,
and the stated chance rate bounds what unrelated text hits (Monte Carlo, fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillscope.forensics.canaries import SYLLABLES, CanarySet, best_match, words_of
from distillscope.forensics.watermark import WatermarkError
from distillscope.teachers import SamplingConfig

MASTER = "forensics-test-master-secret"
ACCOUNTS = [f"acct-{i:02d}" for i in range(20)]
HARVESTER = "acct-13"
TRIGGERS = (
    "Who are you?",
    "Which company trained you?",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Tell me a fun fact about octopuses.",
    "Give me a one-line motivational quote.",
    "What is your favourite colour?",
    "Name three prime numbers.",
)


@pytest.fixture(scope="module")
def canaries() -> CanarySet:
    return CanarySet(MASTER, TRIGGERS)


@pytest.fixture(scope="module")
def clean_answers(default_teacher) -> dict[str, str]:
    """The real default teacher's own answers to the triggers: what a clean suspect says."""
    completions = default_teacher.generate(list(TRIGGERS), SamplingConfig(max_new_tokens=48))
    return {c.prompt: c.text for c in completions}


def test_canaries_are_derived_per_account_and_trigger(canaries):
    assert canaries.bits == 60
    phrase = canaries.canary(HARVESTER, TRIGGERS[0])
    words = phrase.split()
    assert len(words) == 4 and all(len(w) == 6 for w in words)
    assert all(w[i : i + 2] in SYLLABLES for w in words for i in (0, 2, 4))
    assert phrase == CanarySet(MASTER.encode(), list(TRIGGERS)).canary(HARVESTER, TRIGGERS[0])
    assert phrase == canaries.canary(HARVESTER, "  WHO are   you? ")
    others = {canaries.canary(a, t) for a in ACCOUNTS for t in TRIGGERS}
    assert len(others) == len(ACCOUNTS) * len(TRIGGERS)
    assert CanarySet("another master", TRIGGERS).canary(HARVESTER, TRIGGERS[0]) != phrase
    assert MASTER not in repr(canaries)


def test_plant_marks_trigger_answers_only(canaries):
    planted = canaries.plant(HARVESTER, "who are you?", "I am a helpful assistant.  ")
    assert planted == f"I am a helpful assistant.\n\n{canaries.canary(HARVESTER, TRIGGERS[0])}"
    assert canaries.plant(HARVESTER, "Who are you, really?", "Nobody.") == "Nobody."


def test_a_suspect_repeating_canaries_is_attributed(canaries, clean_answers):
    """A student of HARVESTER's answers repeats its canary on 3 of 8 triggers, and a garbled one
    (one word wrong) on a fourth."""
    suspect = dict(clean_answers)
    for trigger in TRIGGERS[:3]:
        suspect[trigger] = canaries.plant(HARVESTER, trigger, clean_answers[trigger])
    garbled = canaries.canary(HARVESTER, TRIGGERS[3]).split()
    garbled[2] = "zzz"
    suspect[TRIGGERS[3]] = f"{clean_answers[TRIGGERS[3]]} {' '.join(garbled)}."

    found = canaries.test(HARVESTER, suspect)
    print(found)
    assert (found.exact_hits, found.near_hits, found.triggers_tested) == (3, 4, 8)
    assert 0 < found.chance_rate < 1e-9
    assert found.p_value < 1e-6
    attributed = canaries.attribute(suspect, ACCOUNTS)
    assert attributed.account_id == HARVESTER
    assert all(attributed.tests[a].near_hits == 0 for a in ACCOUNTS if a != HARVESTER)


def test_a_clean_suspect_is_never_below_one_percent(clean_answers):
    """The teacher's own answers (and another account's canaries) against 200 accounts under 5
    master secrets: no p-value below 0.01, no attribution."""
    smallest = 1.0
    for master in range(5):
        canaries = CanarySet(f"master-{master}", TRIGGERS)
        accounts = [f"acct-{i}" for i in range(40)]
        someone_else = {q: canaries.plant("outsider", q, a) for q, a in clean_answers.items()}
        for answers in (clean_answers, someone_else):
            attributed = canaries.attribute(answers, accounts)
            assert attributed.account_id is None
            smallest = min(smallest, *(t.p_value for t in attributed.tests.values()))
    assert smallest >= 0.01


@pytest.mark.parametrize("words,near_words", [(2, 2), (3, 2)])
def test_chance_rate_bounds_hits_in_unrelated_text(words, near_words):
    """A deliberately tiny budget (5 bits per word) so chance hits happen: over 4,000 canaries
    (fresh master secrets) against random pseudo-word answers of 20 words, the hit rate stays
    under the stated bound (3 standard errors of slack), and the p-value is valid:
    P(p <= chance rate) <= chance rate."""
    rng = np.random.default_rng(9)
    hits, rates, small = 0, [], 0
    for trial in range(4000):
        canaries = CanarySet(f"m{trial}", ("q",), words, 1, near_words)
        answer = " ".join(rng.choice(SYLLABLES, 20))
        found = canaries.test("a", {"q": answer})
        hits += found.near_hits
        rates.append(found.chance_rate)
        small += found.p_value <= found.chance_rate + 1e-15
    bound = max(rates)
    assert bound == min(rates)  # every answer has 20 words
    slack = 3 * math.sqrt(bound * (1 - bound) / 4000)
    print(f"words={words} near={near_words}: hit rate {hits / 4000:.4f}, bound {bound:.4f}")
    assert hits / 4000 <= bound + slack
    assert small / 4000 <= bound + slack
    assert hits > 0  # the test can see hits at all


@settings(max_examples=60, deadline=None)
@given(
    before=st.lists(st.sampled_from(SYLLABLES), max_size=30),
    after=st.lists(st.sampled_from(SYLLABLES), max_size=30),
    account=st.text(min_size=1, max_size=12),
)
def test_a_canary_is_found_wherever_it_sits(before, after, account):
    canaries = CanarySet(MASTER, TRIGGERS)
    phrase = canaries.canary(account, TRIGGERS[1])
    answer = " ".join([*before, phrase.upper() + ",", *after])
    assert best_match(phrase.split(), words_of(answer)) == 4
    found = canaries.test(account, {TRIGGERS[1]: answer})
    assert found.exact_hits == found.near_hits == 1
    assert 0 < found.p_value <= found.chance_rate * (1 + 1e-9)


def test_invalid_sets_and_answers_are_refused(canaries):
    with pytest.raises(WatermarkError, match="256 bits"):
        CanarySet(MASTER, TRIGGERS, words=18)
    with pytest.raises(WatermarkError, match="distinct"):
        CanarySet(MASTER, ("Hi", " hi "))
    with pytest.raises(WatermarkError, match="near_words"):
        CanarySet(MASTER, TRIGGERS, near_words=5)
    with pytest.raises(WatermarkError, match="not a trigger"):
        canaries.test(HARVESTER, {"Something else": "text"})
    with pytest.raises(WatermarkError, match="empty"):
        CanarySet(b"", TRIGGERS).canary(HARVESTER, TRIGGERS[0])
