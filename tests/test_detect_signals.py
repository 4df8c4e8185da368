"""The detector's evidence rules, pure: content gates context, shares need the binomial's word
too, the null keeps ordinary volume correlation, and the elicitation classifier generalises to
wordings it never saw."""

from __future__ import annotations

import numpy as np
import pytest

from distillscope.detect.elicitation import (
    ElicitationClassifier,
    char_features,
    held_out_report,
    sentences,
    training_set,
)
from distillscope.detect.signals import (
    CONTENT,
    SIGNALS,
    EmpiricalTail,
    Null,
    combine,
    permutation_null,
    share_lower_bound,
    volume_strata,
)


def _evidence(**values: float) -> dict[str, np.ndarray]:
    return {name: np.array([values.get(name, 0.0)]) for name in SIGNALS}


def test_automation_alone_is_no_evidence():
    """An integration: machine-regular, around the clock, an HTTP library, one template, its own
    few addresses. Every context signal at its most extreme adds nothing without content."""
    automated = _evidence(**{name: 9.0 for name in SIGNALS if name not in CONTENT})
    assert combine(automated)[0] == 0.0
    # With content evidence, context adds at most as much again.
    both = _evidence(**{name: 9.0 for name in SIGNALS})
    content_only = _evidence(**{name: 9.0 for name in CONTENT})
    assert combine(both)[0] == pytest.approx(2 * combine(content_only)[0])


def test_a_harvest_specific_signal_at_its_extreme_flags_an_account_with_context_behind_it():
    """Asking for the reasoning in every request, or sweeping more tool catalogues than any
    reference account offers, each with an automated client's context: flagged on that one
    content signal. The same context with only a capability focus is not."""
    rng = np.random.default_rng(0)
    n = 1000
    # an ordinary reference: nine accounts in ten zero on each signal, the rest spread
    tails = {name: EmpiricalTail(rng.uniform(0, 1, n) * (rng.random(n) < 0.1)) for name in SIGNALS}
    threshold = permutation_null(tails, permutations=20, seed=0).threshold(0.001)
    extreme = float(np.log(n + 1))  # above every reference account
    context = {name: np.log(100) for name in SIGNALS if name not in CONTENT}  # p = 0.01 each
    for name in ("elicitation", "tool_coverage"):
        assert combine(_evidence(**context, **{name: extreme}))[0] > threshold, name
    assert combine(_evidence(**context, concentration=extreme))[0] < threshold


def test_a_small_share_is_no_evidence_even_when_most_accounts_score_zero():
    # 100 reference accounts, 95 never asked; the pooled rate is 1%.
    values = np.r_[np.zeros(95), np.full(5, 0.2)]
    hits = np.r_[np.zeros(95), np.full(5, 20.0)]
    trials = np.full(100, 100.0)
    tail = EmpiricalTail(values, hits, trials)
    assert tail.rate == pytest.approx(0.01)
    # One request in a hundred: the rank alone says p = 6/101; the binomial says ordinary.
    p_rank = EmpiricalTail(values).p(np.array([0.001]))[0]
    p = tail.p(np.array([0.001]), np.array([1.0]), np.array([100.0]))[0]
    assert p_rank == pytest.approx(6 / 101) and p > 0.5
    # Sixty in a hundred: both say rare, and the rank (1/101) is the larger, so it decides.
    p = tail.p(np.array([0.5]), np.array([60.0]), np.array([100.0]))[0]
    assert p == pytest.approx(1 / 101)


def test_a_share_under_its_floor_is_no_evidence_however_many_requests_make_it_significant():
    """An integration whose users' text asks for the steps in 15 of 2,245 requests: rarer than
    most accounts (which never ask) and significant by volume, but not a harvest."""
    hits = np.r_[np.zeros(980), np.full(20, 10.0)]
    trials = np.full(1000, 100.0)
    values = share_lower_bound(hits, trials)
    bound = share_lower_bound(np.array([15.0]), np.array([2245.0]))
    assert 0 < bound[0] < 0.02
    without = EmpiricalTail(values, hits, trials)
    assert without.p(bound, np.array([15.0]), np.array([2245.0]))[0] < 0.1
    floored = EmpiricalTail(values, hits, trials, floor=0.02)
    assert floored.p(bound, np.array([15.0]), np.array([2245.0]))[0] == 1.0
    # a harvest's share is far above it and keeps its evidence
    harvest = share_lower_bound(np.array([30.0]), np.array([100.0]))
    assert floored.p(harvest, np.array([30.0]), np.array([100.0]))[0] < 0.1


def test_the_null_keeps_the_correlation_that_volume_gives_every_share():
    """Busy accounts score on every share signal at once for no bad reason; a null that shuffles
    them apart underestimates how high an ordinary busy account scores."""
    rng = np.random.default_rng(0)
    n = 2000
    requests = rng.lognormal(2, 1.5, n)
    busy = requests > np.quantile(requests, 0.9)
    tails = {}
    for name in SIGNALS:
        quiet = rng.uniform(0, 0.5, n) * (rng.random(n) < 0.3)
        values = np.where(busy, rng.uniform(0.5, 1, n), quiet)
        tails[name] = EmpiricalTail(values)
    plain = permutation_null(tails, permutations=20, seed=0).threshold(0.001)
    strata = volume_strata(requests)
    stratified = permutation_null(tails, permutations=20, seed=0, strata=strata).threshold(0.001)
    assert stratified > plain
    evidence = {name: tail.reference_evidence() for name, tail in tails.items()}
    observed = np.quantile(combine(evidence), 0.999)
    assert abs(stratified - observed) < abs(plain - observed)


@pytest.fixture(scope="module")
def classifier():
    return ElicitationClassifier().fit()


def test_elicitation_is_found_in_wordings_and_families_never_trained_on(classifier):
    report = held_out_report()
    assert report.recall_unseen >= 0.85 and report.false_positive_rate <= 0.01
    # Phrasings written for this test, not drawn from the training grammar.
    asks = [
        "Fix the failing test in utils.py. As you go, keep a running commentary of what you try "
        "and why, including the output of each command.",
        "Solve 3x + 7 = 22. Lay bare every inference you make on the way to x.",
        "Here is a finished answer. Recreate the deliberation that must have produced it, "
        "one step at a time.",
        "Let's think about this step by step.",
    ]
    ordinary = [
        "Summarize the following in 2 bullet points: the meeting moved to Tuesday.",
        "Write a haiku about autumn.",
        "What is the capital of Australia?",
        "Step 1: preheat the oven. Step 2: mix the flour. What did I get wrong?",
    ]
    assert (classifier.predict_proba(asks) >= 0.5).sum() >= 3
    assert (classifier.predict_proba(ordinary) < 0.5).all()


def test_sentences_are_the_first_and_last_three_of_two_words_or_more():
    import re

    def every(prompt):  # the definition: split all, keep those of two words, then the ends
        parts = [s.strip().lower()[:240] for s in re.split(r"(?<=[.!?])\s+|\n+", prompt or "")]
        parts = [s for s in parts if len(s.split()) >= 2]
        return (parts[:3] + parts[-3:] if len(parts) > 6 else parts) or [""]

    rng = np.random.default_rng(0)
    pieces = ["One two.", "three", "Four five!", "\n\n", "  ", "Six seven?", "x", "Eight nine ten."]
    prompts = ["", None, "word", "a b", "A.. B c.\n\nd", "x y. " * 7, "x y. " * 6]
    prompts += [" ".join(rng.choice(pieces, size=rng.integers(1, 20))) for _ in range(300)]
    for prompt in prompts:
        assert sentences(prompt) == every(prompt), prompt


def test_char_features_are_the_vectorisers_matrix_to_the_last_bit():
    from sklearn.feature_extraction.text import HashingVectorizer

    texts = training_set(n=600)[0] + [
        "", "x", "  two\t spaces\n\nand lines ", "ΟΔΟΣ ΣΟΦΟΣ İstanbul STRASSE straße",
        "日本語のテキスト です", "emoji 😀😀 ok", "a" * 300, "the the the the",
    ]  # fmt: skip
    expected = HashingVectorizer(
        analyzer="char_wb", ngram_range=(3, 5), n_features=2**18, alternate_sign=False
    ).transform(texts)
    ours = char_features(texts)
    assert ours.shape == expected.shape
    assert np.array_equal(ours.indptr, expected.indptr)
    assert np.array_equal(ours.indices, expected.indices)
    assert np.array_equal(ours.data, expected.data)
    assert char_features(["", " \n "]).shape == (2, 2**18)
    assert char_features(["", " \n "]).nnz == 0


def test_an_instruction_wrapped_around_a_long_document_is_still_found(classifier):
    document = " ".join(f"Paragraph {i} of the report says sales grew." for i in range(80))
    prompt = f"{document}\n\nWrite out your complete reasoning about the report, step by step."
    assert classifier.predict_proba([prompt])[0] >= 0.5
    assert classifier.predict_proba([document])[0] < 0.5


def test_a_community_is_judged_by_its_size_and_what_its_members_ask():
    rng = np.random.default_rng(0)
    content = rng.exponential(5.0, 100_000)
    null = Null(np.sort(content), content, content > 3.0)
    typical = float(np.median(content[content > 3.0]))
    # Members chosen for having a content reason, asking no more than such accounts do: ordinary.
    assert null.community_p(typical, 100) > 0.1
    # Five at the 5% point of such accounts: three of five that high happens (about 1 in 1,000).
    assert null.community_p(float(np.quantile(content[content > 3.0], 0.95)), 5) > 1e-4
    high = float(np.quantile(content[content > 3.0], 0.99))
    # A hundred of them: never by chance.
    assert null.community_p(high, 100) < 1e-9
