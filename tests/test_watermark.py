"""Watermarks: text the real default teacher samples through a watermark is detected with the
account's key and with no other; the p-values are exact (enumeration, Monte Carlo) and calibrated
over random keys; repeated and prompt n-grams are not counted; the gateway hook marks what an
account harvests.

Random draws use fixed seeds; statistical checks state their tolerance.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from distillscope.forensics.watermark import (
    SCHEMES,
    SECRET_ENV,
    Watermark,
    WatermarkError,
    attribute,
    derive_key,
    gateway_watermarks,
    gumbel_log10_p,
    kgw_log10_p,
    scored_ngrams,
)
from distillscope.teachers import SamplingConfig, load_teacher

MASTER = "forensics-test-master-secret"
ACCOUNTS = [f"acct-{i:02d}" for i in range(20)]
MARKED = "acct-07"
PROMPTS = [
    "Write a short story about a cat who learns to swim.",
    "Explain how rainbows form.",
    "Give me three tips for learning Python.",
    "What is the capital of France, and why is it famous?",
    "Describe an ideal weekend in the mountains.",
    "How do I bake bread at home?",
    "Summarise the plot of Hamlet.",
    "Why is the sky blue?",
]


def random_key(rng: np.random.Generator) -> int:
    return int.from_bytes(rng.bytes(32), "big")


def sample(teacher, encoded, processors=()) -> list[np.ndarray]:
    sampling = SamplingConfig(max_new_tokens=40, seed=0)
    completions = teacher.generate_from_ids(encoded, sampling, keys=PROMPTS, processors=processors)
    return [c.signal.token_ids for c in completions]


@pytest.fixture(scope="module")
def encoded(default_teacher) -> list[list[int]]:
    return [default_teacher.encode_prompt(p, 128) for p in PROMPTS]


@pytest.fixture(scope="module")
def clean(default_teacher, encoded) -> list[np.ndarray]:
    return sample(default_teacher, encoded)


@pytest.fixture(scope="module")
def marked(default_teacher, encoded) -> dict[str, list[np.ndarray]]:
    """The teacher's answers to PROMPTS sampled through MARKED's watermark, per scheme."""
    return {
        scheme: sample(
            default_teacher, encoded, [Watermark.for_account(scheme, MASTER, MARKED).processor()]
        )
        for scheme in SCHEMES
    }


# --- generation, detection, attribution -----------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_marked_generation_is_detected_and_attributed(scheme, marked, clean, encoded):
    texts = marked[scheme]
    found = Watermark.for_account(scheme, MASTER, MARKED).detect(texts, encoded)
    print(f"{scheme}: {found}")
    assert found.tokens_scored >= 250  # of 8 x 40 sampled
    assert found.p_value < 1e-4

    watermarks = {a: Watermark.for_account(scheme, MASTER, a) for a in ACCOUNTS}
    attributed = attribute(texts, watermarks, encoded)
    assert attributed.account_id == MARKED
    best_other = min(attributed.detections[a].p_value for a in ACCOUNTS if a != MARKED)
    print(f"  smallest p among the 19 other keys: {best_other:.3f}")
    assert best_other > 1e-4  # no other account's key finds it, even uncorrected
    assert attribute(clean, watermarks, encoded).account_id is None

    # Without the prompts the first tokens lack context and are not scored; still detected.
    assert watermarks[MARKED].detect(texts).log10_p < -4


def test_kgw_marks_only_green_candidates_in_the_top_k():
    wm = Watermark("kgw", derive_key(MASTER, MARKED))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (3, 9), generator=generator)
    scores = torch.randn(3, 1000, generator=generator)
    out = wm.processor()(input_ids, scores)
    changed = out != scores
    top = torch.topk(scores, wm.top_k, dim=-1).indices
    for row in range(3):
        assert set(torch.nonzero(changed[row])[:, 0].tolist()) <= set(top[row].tolist())
        assert torch.allclose((out - scores)[row][changed[row]], torch.tensor(wm.delta))
        alone = wm.processor()(input_ids[row : row + 1], scores[row : row + 1])
        assert torch.equal(alone[0], out[row])  # rows do not depend on their batch
    assert 0 < changed.sum() < 3 * wm.top_k


def test_gumbel_draw_is_an_exact_sample_over_keys():
    """A forced one-hot choice whose frequency over 4,000 keys is p (chi-square, alpha 0.001)."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    scores = torch.log(probs)
    context = torch.tensor([[5, 6, 7, 8]])
    rng = np.random.default_rng(1)
    counts = np.zeros(5)
    for _ in range(4000):
        out = Watermark("gumbel", random_key(rng)).processor()(context, scores)
        assert torch.isinf(out).sum() == 4 and out.max() == 0
        counts[int(out.argmax())] += 1
    assert counts[4] == 0
    assert stats.chisquare(counts[:4], 4000 * probs[0, :4].numpy()).pvalue > 1e-3


# --- exactness and calibration of the p-values ----------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_p_values_are_uniform_over_random_keys(scheme, clean, encoded):
    """300 random keys on unmarked text: KS against U(0, 1), p > 0.01.

    KGW's count is discrete, so its test is on the randomised p-value P(X > g) + U P(X = g),
    exactly uniform when the count is Binomial(n, gamma); the reported p-value is that with
    U = 1 (conservative), checked to be never below the randomised one.
    """
    rng = np.random.default_rng(2)
    ngrams = scored_ngrams(clean, encoded, context=4)
    found = [Watermark(scheme, random_key(rng)).score_ngrams(ngrams) for _ in range(300)]
    reported = np.array([d.p_value for d in found])
    if scheme == "kgw":
        n = len(ngrams)
        green = np.array([d.statistic for d in found])
        tested = stats.binom.sf(green, n, 0.25) + rng.random(300) * stats.binom.pmf(green, n, 0.25)
        assert (reported >= tested - 1e-12).all()
    else:
        tested = reported
    ks = stats.kstest(tested, "uniform").pvalue
    print(f"{scheme}: {len(ngrams)} tokens scored, KS p = {ks:.3f}")
    assert ks > 0.01


def test_kgw_tail_matches_enumeration():
    """Every green/red pattern of 10 tokens, weighted: the exact upper tail, to 1e-12."""
    n = 10
    for gamma in (0.25, 0.5, 0.9):
        patterns = np.array(list(itertools.product([0, 1], repeat=n)))
        greens = patterns.sum(axis=1)
        weights = gamma**greens * (1 - gamma) ** (n - greens)
        for g in range(n + 1):
            brute = weights[greens >= g].sum()
            assert 10 ** kgw_log10_p(g, n, gamma) == pytest.approx(brute, rel=1e-12)
            assert 10 ** kgw_log10_p(g, n, gamma) == pytest.approx(
                stats.binom.sf(g - 1, n, gamma), rel=1e-12
            )


def test_gumbel_tail_matches_monte_carlo():
    """Sums of 3 Exp(1) draws (400,000 of them): the tail within 5 standard errors."""
    sums = np.random.default_rng(3).exponential(size=(400_000, 3)).sum(axis=1)
    for score in (0.5, 2.0, 5.0, 10.0):
        exact = 10 ** gumbel_log10_p(score, 3)
        assert exact == pytest.approx(stats.gamma.sf(score, 3), rel=1e-12)
        error = math.sqrt(exact * (1 - exact) / len(sums))
        assert abs((sums >= score).mean() - exact) < 5 * error


@pytest.mark.parametrize("scheme", SCHEMES)
def test_detector_statistic_has_its_null_law_over_keys(scheme):
    """End to end through the keyed hash: 8 scored tokens, 4,000 keys; the green count is
    Binomial(8, 1/4) (chi-square), the Gumbel score Gamma(8, 1) (KS); alpha 0.001."""
    text = np.random.default_rng(4).integers(0, 49152, 12)
    ngrams = scored_ngrams(text, context=4)
    assert len(ngrams) == 8
    rng = np.random.default_rng(5)
    statistic = np.array(
        [Watermark(scheme, random_key(rng)).score_ngrams(ngrams).statistic for _ in range(4000)]
    )
    if scheme == "kgw":
        observed = np.bincount(statistic.astype(int), minlength=9)
        expected = 4000 * stats.binom.pmf(np.arange(9), 8, 0.25)
        merged = [observed[:5].tolist() + [observed[5:].sum()], expected[:5].tolist()]
        merged[1].append(expected[5:].sum())
        assert stats.chisquare(*merged).pvalue > 1e-3
    else:
        assert stats.kstest(statistic, stats.gamma(8).cdf).pvalue > 1e-3


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 600),
    a=st.integers(0, 600),
    b=st.integers(0, 600),
    gamma=st.floats(0.01, 0.99),
)
def test_kgw_p_value_is_a_probability_falling_with_green(n, a, b, gamma):
    low, high = sorted((min(a, n), min(b, n)))
    p_low, p_high = kgw_log10_p(low, n, gamma), kgw_log10_p(high, n, gamma)
    assert -math.inf < p_high <= p_low + 1e-12
    assert p_low <= 0 and 0 <= 10**p_high <= 1


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 2000),
    a=st.floats(0, 5e4, allow_nan=False),
    b=st.floats(0, 5e4, allow_nan=False),
)
def test_gumbel_p_value_is_a_probability_falling_with_score(n, a, b):
    low, high = sorted((a, b))
    p_low, p_high = gumbel_log10_p(low, n), gumbel_log10_p(high, n)
    assert -math.inf < p_high <= p_low + 1e-12
    assert p_low <= 0 and 0 <= 10**p_high <= 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_overwhelming_evidence_keeps_a_finite_exact_log_p(scheme):
    """2,000 tokens forced through the watermark (KGW with delta = 1000: all green): p underflows
    a double, log10 p stays finite and exact."""
    wm = Watermark(scheme, derive_key(MASTER, MARKED), delta=1000.0)
    processor = wm.processor()
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 5000, (1, 4), generator=generator)
    for _ in range(2000):
        scores = torch.randn(1, 5000, generator=generator)
        ids = torch.cat([ids, processor(ids, scores).argmax(-1, keepdim=True)], dim=-1)
    found = wm.detect(ids[0])
    n = found.tokens_scored
    assert n > 1990 and found.p_value == 0.0 and math.isfinite(found.log10_p)
    if scheme == "kgw":
        assert found.statistic == n
        assert found.log10_p == pytest.approx(n * math.log10(0.25), rel=1e-12)
    else:  # the Poisson sum is dominated by its last term, at most n times it
        last = ((n - 1) * math.log(found.statistic) - found.statistic - special.gammaln(n)) / (
            math.log(10)
        )
        assert last <= found.log10_p <= last + math.log10(n)
    print(f"{scheme}: {n} tokens, log10 p = {found.log10_p:.1f}")


# --- what is scored -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_repeated_ngram_is_scored_once(scheme):
    """200 tokens of one 5-token loop are 5 distinct (context, token) pairs. Even under a key
    colouring all five green, KGW's p-value is that of 5 of 5 (0.25^5), not of 196 of 196."""
    text = [11, 22, 33, 44, 55] * 40
    if scheme == "kgw":
        wm = next(
            w
            for w in (Watermark("kgw", key) for key in range(20_000))
            if w.detect(text).statistic == 5
        )
    else:
        wm = Watermark("gumbel", derive_key(MASTER, MARKED))
    found = wm.detect(text)
    assert found.tokens_scored == 5
    if scheme == "kgw":
        assert found.p_value == pytest.approx(0.25**5, rel=1e-12)
    else:
        assert found.p_value == pytest.approx(stats.gamma.sf(found.statistic, 5), rel=1e-12)


def test_prompt_ngrams_are_excluded_and_prompt_tail_gives_context():
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, 49152, 40).tolist()
    new = rng.integers(0, 49152, 30).tolist()
    text = prompt[10:30] + new  # an answer quoting 20 prompt tokens, then 30 of its own
    # The first 4 quoted tokens follow the prompt's tail (scored); the next 16 repeat prompt
    # 5-grams (excluded); the 30 new ones are scored.
    assert len(scored_ngrams(text, prompt, context=4)) == 4 + 30
    assert len(scored_ngrams(text, context=4)) == len(text) - 4
    assert scored_ngrams([text, text], [prompt, prompt], context=4) == scored_ngrams(
        text, prompt, context=4
    )
    with pytest.raises(WatermarkError, match="2 texts but 1 prompts"):
        scored_ngrams([text, text], [prompt], context=4)


# --- keys and the gateway hook --------------------------------------------------------------------


def test_derive_key_is_deterministic_and_account_specific():
    key = derive_key(MASTER, MARKED)
    assert key == derive_key(MASTER.encode(), MARKED)
    expected = hmac.new(MASTER.encode(), b"watermark\x00" + MARKED.encode(), hashlib.sha256)
    assert key == int.from_bytes(expected.digest(), "big")
    assert len({derive_key(MASTER, a) for a in ACCOUNTS}) == len(ACCOUNTS)
    assert derive_key("another master", MARKED) != key
    assert 0 <= key < 1 << 256
    with pytest.raises(WatermarkError):
        derive_key(b"", MARKED)
    with pytest.raises(WatermarkError):
        Watermark("kgw", key, gamma=1.0)


def test_gateway_watermarks_need_a_secret(monkeypatch, tmp_path):
    from distillscope.gateway.tiers import load_tiers

    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(WatermarkError, match=SECRET_ENV):
        gateway_watermarks()
    monkeypatch.setenv(SECRET_ENV, MASTER)
    watermarks = gateway_watermarks()
    assert set(watermarks) == {"kgw", "gumbel"}
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers:\n  marked:\n    exposure: top5\n    watermark: kgw\n")
    assert load_tiers(path, watermarks=watermarks)["marked"].watermark == "kgw"
    generator = torch.Generator().manual_seed(8)
    ids, scores = torch.randint(0, 1000, (2, 6), generator=generator), torch.randn(2, 1000)
    for scheme in SCHEMES:
        expected = Watermark.for_account(scheme, MASTER, MARKED).processor()(ids, scores)
        assert torch.equal(watermarks[scheme](MARKED)(ids, scores), expected)


def test_a_harvest_through_a_watermarked_tier_is_attributed(default_teacher, tmp_path):
    """A real gateway serving the default teacher with a ``kgw`` tier: what an account harvests
    over HTTP (ids recovered from the logprob bytes) names that account among 20."""
    from distillscope.gateway import BUILTIN_TIERS, KeyStore, Tier, create_app, serve_in_thread

    store = KeyStore(tmp_path / "keys.sqlite")
    tiers = {"marked": Tier("marked", BUILTIN_TIERS["top1"].exposure, watermark="kgw")}
    secret = store.create(MARKED, "marked")[1]
    app = create_app(
        default_teacher, model_name="teacher", keys=store, tiers=tiers,
        watermarks=gateway_watermarks(MASTER),
    )  # fmt: skip
    with serve_in_thread(app) as url:
        harvester = load_teacher(
            f"openai:{url}/v1", model="teacher", tokenizer="default", api_key=secret
        )
        sampling = SamplingConfig(exposure="top1", max_new_tokens=40, seed=1)
        harvested = harvester.generate(PROMPTS[:2], sampling)
    texts = [c.signal.token_ids for c in harvested]
    assert all((t >= 0).all() for t in texts)
    watermarks = {a: Watermark.for_account("kgw", MASTER, a) for a in ACCOUNTS}
    attributed = attribute(texts, watermarks)
    print(f"gateway: {attributed.detections[MARKED]}")
    assert attributed.account_id == MARKED
    assert attributed.adjusted_log10_p[MARKED] < -3
