"""The exposure ladder: parsing, ordering, and exact downgrades."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillscope.errors import ExposureError
from distillscope.exposure import (
    REQUEST_EXPOSURE,
    Full,
    Signal,
    Text,
    TopK,
    exposure_name,
    is_at_least,
    parse_exposure,
    request_logprobs,
    tail_mass,
)


@pytest.mark.parametrize(
    "spec, level",
    [
        ("full", Full()),
        ("text", Text()),
        ("top5", TopK(5)),
        ("topk:5", TopK(5)),
        ("TOP20", TopK(20)),
        (" top1 ", TopK(1)),
        ("topk:20", TopK(20)),
    ],
)
def test_parse_accepts_the_documented_spellings(spec, level):
    assert parse_exposure(spec) == level
    assert parse_exposure(str(level)) == level


@pytest.mark.parametrize(
    "spec", ["top0", "top-3", "topk:abc", "topk:", "top", "fulll", "", "top5.5", "topk:-1", "7"]
)
def test_parse_rejects_nonsense_with_a_clear_error(spec):
    with pytest.raises(ExposureError) as err:
        parse_exposure(spec)
    assert spec.strip() in str(err.value) or "k" in str(err.value)


def test_k_is_capped_at_20_by_default_like_openai():
    with pytest.raises(ExposureError, match="maximum k=20"):
        parse_exposure("top21")
    assert parse_exposure("top50", max_k=None) == TopK(50)


@given(st.text(max_size=12))
def test_parse_never_raises_anything_but_exposure_error(spec):
    try:
        level = parse_exposure(spec)
    except ExposureError:
        return
    assert isinstance(level, (Full, TopK, Text))


def test_ladder_order():
    ladder = [Full(), TopK(20), TopK(5), TopK(1), Text()]
    for richer, poorer in zip(ladder, ladder[1:]):
        assert is_at_least(richer, poorer) and not is_at_least(poorer, richer)


def _random_full_signal(rng: np.random.Generator, positions: int, vocab: int) -> Signal:
    logits = rng.normal(0, 3, size=(positions, vocab)).astype(np.float32)
    full = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    full = full.astype(np.float32)
    ids = np.array(
        [
            rng.choice(
                vocab, p=np.exp(row.astype(np.float64)) / np.exp(row.astype(np.float64)).sum()
            )
            for row in full
        ]
    )
    return Signal(Full(), ids, token_logprobs=full[np.arange(positions), ids], full_logprobs=full)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 20), smaller=st.integers(1, 20))
def test_downgrade_chain_equals_direct_downgrade(seed, k, smaller):
    """full -> topK -> topk' is bit-for-bit full -> topk' (one harvest serves every level)."""
    smaller = min(smaller, k)
    signal = _random_full_signal(np.random.default_rng(seed), positions=6, vocab=50)
    via = signal.downgrade(TopK(k)).downgrade(TopK(smaller))
    direct = signal.downgrade(TopK(smaller))
    np.testing.assert_array_equal(via.topk_ids, direct.topk_ids)
    np.testing.assert_array_equal(via.topk_logprobs, direct.topk_logprobs)
    np.testing.assert_array_equal(via.tail_mass, direct.tail_mass)
    np.testing.assert_array_equal(via.token_ids, signal.token_ids)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 20))
def test_topk_is_the_head_of_the_full_distribution_and_tail_is_the_rest(seed, k):
    signal = _random_full_signal(np.random.default_rng(seed), positions=5, vocab=40)
    top = signal.downgrade(TopK(k))
    probs = np.exp(signal.full_logprobs.astype(np.float64))
    for pos in range(len(signal)):
        expected = np.sort(probs[pos])[::-1][:k]
        np.testing.assert_allclose(np.exp(top.topk_logprobs[pos]), expected, rtol=1e-6)
        assert np.all(np.diff(top.topk_logprobs[pos]) <= 0)
        assert top.tail_mass[pos] == pytest.approx(1 - expected.sum(), abs=1e-6)
        assert 0.0 <= top.tail_mass[pos] <= 1.0


def test_text_keeps_only_the_sampled_tokens():
    signal = _random_full_signal(np.random.default_rng(1), positions=4, vocab=30)
    text = signal.downgrade("top5").downgrade("text")
    assert text.exposure == Text()
    np.testing.assert_array_equal(text.token_ids, signal.token_ids)
    assert text.token_logprobs is None and text.topk_ids is None and text.tail_mass is None


@pytest.mark.parametrize(
    "start, target", [(TopK(5), TopK(6)), (TopK(5), Full()), (Text(), TopK(1))]
)
def test_upgrading_is_refused(start, target):
    signal = _random_full_signal(np.random.default_rng(2), positions=3, vocab=30)
    poorer = signal.downgrade(start)
    with pytest.raises(ExposureError, match="cannot upgrade"):
        poorer.downgrade(target)


def test_tail_mass_is_clipped_and_float32():
    mass = tail_mass(np.log(np.array([[0.6, 0.4000001], [0.5, 0.25]])))
    assert mass.dtype == np.float32
    assert mass[0] == 0.0 and mass[1] == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["text", "logprobs", "top1", "top5", "top20", "full"])
def test_a_logged_request_exposure_names_what_it_asks_for(name):
    assert REQUEST_EXPOSURE.fullmatch(name)
    assert exposure_name(*request_logprobs(name)) == name


@pytest.mark.parametrize("name", ["top0", "top21", "topk:5", "Full", "top"])
def test_the_log_knows_only_its_own_exposure_names(name):
    assert not REQUEST_EXPOSURE.fullmatch(name)


@given(st.one_of(st.none(), st.integers(0, 20)), st.one_of(st.none(), st.integers(1, 5)))
def test_a_logged_name_reads_back_as_the_request_it_names(top, prompt_n):
    name = exposure_name(top, prompt_n)
    assert REQUEST_EXPOSURE.fullmatch(name)
    if prompt_n is None:
        assert request_logprobs(name) == (top, None)
