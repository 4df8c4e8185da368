"""Antidistillation sampling: the finite-difference penalty is the directional derivative it claims
to be, padding does not change it, and lam = 0 leaves the teacher alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillscope.forensics.defenses import AntidistillationProcessor, downstream_gradient

PAD = 0


def tiny_model(seed: int, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, initializer_range=init,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def proxy_and_gradient():
    proxy = tiny_model(0)
    generator = torch.Generator().manual_seed(1)
    held_out = [torch.randint(1, 50, (12,), generator=generator).tolist() for _ in range(6)]
    return proxy, downstream_gradient(proxy, held_out, pad_id=PAD)


def test_gradient_is_unit_norm_and_leaves_the_proxy_unchanged(proxy_and_gradient):
    proxy, gradient = proxy_and_gradient
    assert torch.sqrt(sum((g**2).sum() for g in gradient)).item() == pytest.approx(1.0, rel=1e-5)
    assert all(p.grad is None for p in proxy.parameters())


def test_delta_is_the_directional_derivative_of_the_log_probability(proxy_and_gradient):
    proxy, gradient = proxy_and_gradient
    processor = AntidistillationProcessor(proxy, gradient, lam=1.0, pad_id=PAD, eps=1e-3)
    context = torch.tensor([[5, 9, 13, 2, 7]])
    delta = processor.delta(context)[0]
    for token in (3, 17, 41):
        proxy.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logp = torch.log_softmax(proxy(input_ids=context).logits[0, -1], dim=-1)[token]
            logp.backward()
        exact = sum((p.grad * g).sum() for p, g in zip(proxy.parameters(), gradient)).item()
        proxy.zero_grad(set_to_none=True)
        assert delta[token].item() == pytest.approx(exact, rel=0.05, abs=1e-3)


def test_left_padding_does_not_change_the_penalty(proxy_and_gradient):
    proxy, gradient = proxy_and_gradient
    processor = AntidistillationProcessor(proxy, gradient, lam=2.0, pad_id=PAD)
    bare = processor.delta(torch.tensor([[5, 9, 13, 2, 7]]))
    padded = processor.delta(torch.tensor([[PAD, PAD, PAD, 5, 9, 13, 2, 7]]))
    torch.testing.assert_close(bare, padded, atol=1e-3, rtol=1e-3)


def test_lam_scales_the_shift_and_zero_is_the_teacher(proxy_and_gradient):
    proxy, gradient = proxy_and_gradient
    ids = torch.tensor([[4, 8, 15, 16]])
    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    off = AntidistillationProcessor(proxy, gradient, lam=0.0, pad_id=PAD)
    assert torch.equal(off(ids, scores), scores)
    one = AntidistillationProcessor(proxy, gradient, lam=1.0, pad_id=PAD)(ids, scores) - scores
    three = AntidistillationProcessor(proxy, gradient, lam=3.0, pad_id=PAD)(ids, scores) - scores
    torch.testing.assert_close(three, 3 * one, atol=1e-4, rtol=1e-4)
    assert one.abs().max() > 0


def test_the_cached_penalty_equals_a_fresh_pass_at_every_step():
    # larger weights than the default init, so attention depends on positions and a cache
    # misaligned by one position shows (at the default init it moves the penalty by ~1e-3)
    proxy = tiny_model(0, init=0.2)
    generator = torch.Generator().manual_seed(1)
    held_out = [torch.randint(1, 50, (12,), generator=generator).tolist() for _ in range(6)]
    gradient = downstream_gradient(proxy, held_out, pad_id=PAD)
    cached = AntidistillationProcessor(proxy, gradient, lam=1.0, pad_id=PAD)
    rows = torch.tensor([[PAD, PAD, 5, 9, 13], [4, 8, 15, 16, 23]])
    for _ in range(4):
        fresh = cached.scaled(1.0).delta(rows)  # a copy without the cache
        assert fresh.abs().max() > 0.05
        # (float32 log-probabilities differ in the last bits; the difference quotient scales
        # that by 1/eps)
        torch.testing.assert_close(cached.delta(rows), fresh, atol=1e-2, rtol=1e-3)
        rows = torch.cat([rows, torch.randint(1, 50, (2, 1), generator=generator)], dim=1)
    # a new generation (not an extension of the last rows) starts over
    other = torch.tensor([[7, 7, 7]])
    torch.testing.assert_close(
        cached.delta(other), cached.scaled(1.0).delta(other), atol=1e-2, rtol=1e-3
    )


def test_the_downstream_loss_scores_answers_only_when_given_prompt_lengths():
    proxy = tiny_model(2)
    generator = torch.Generator().manual_seed(4)
    sequences = [torch.randint(1, 50, (n,), generator=generator).tolist() for n in (9, 12, 7)]
    lengths = [5, 3, 4]
    answers_only = downstream_gradient(proxy, sequences, pad_id=PAD, prompt_lengths=lengths)
    # the same loss by hand: mean cross-entropy over answer tokens, each predicted from its prefix
    with torch.enable_grad():
        losses = []
        for seq, length in zip(sequences, lengths):
            ids = torch.tensor([seq])
            logp = torch.log_softmax(proxy(input_ids=ids).logits[0], dim=-1)
            losses += [-logp[t - 1, seq[t]] for t in range(length, len(seq))]
        torch.stack(losses).mean().backward()
    by_hand = [p.grad.clone() for p in proxy.parameters()]
    proxy.zero_grad(set_to_none=True)
    norm = torch.sqrt(sum((g**2).sum() for g in by_hand))
    for got, want in zip(answers_only, by_hand):
        torch.testing.assert_close(got, want / norm, atol=1e-5, rtol=1e-3)
    everything = downstream_gradient(proxy, sequences, pad_id=PAD)
    cosine = sum((a * b).sum() for a, b in zip(answers_only, everything)).item()
    assert cosine < 0.99  # scoring the prompts too is a different direction
    with pytest.raises(ValueError, match="no answer tokens"):
        downstream_gradient(proxy, sequences, pad_id=PAD, prompt_lengths=[9, 12, 7])
    with pytest.raises(ValueError, match="one length per sequence"):
        downstream_gradient(proxy, sequences, pad_id=PAD, prompt_lengths=[1])


def test_top_p_keeps_every_draw_inside_the_teachers_own_nucleus(proxy_and_gradient):
    proxy, gradient = proxy_and_gradient
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 46]).clamp_min(1e-12))
    ids = torch.tensor([[4, 8, 15, 16]])
    # lam 0: plain nucleus sampling -- 0.5 + 0.3 < 0.9, so the third token is needed, the fourth not
    plain = AntidistillationProcessor(proxy, gradient, lam=0.0, pad_id=PAD, top_p=0.9)(ids, scores)
    assert torch.isfinite(plain[0]).tolist() == [True, True, True] + [False] * 47
    torch.testing.assert_close(plain[0, :3], scores[0, :3])
    # a strong penalty reorders the nucleus but never reaches past it
    strong = AntidistillationProcessor(proxy, gradient, lam=1e4, pad_id=PAD, top_p=0.9)
    steered = strong(ids, scores)
    assert torch.isfinite(steered[0]).tolist() == [True, True, True] + [False] * 47
    unrestricted = strong.scaled(1e4, top_p=1.0)
    assert torch.isfinite(unrestricted(ids, scores)).all()
    assert steered.argmax().item() == unrestricted(ids, scores)[0, :3].argmax().item()
    with pytest.raises(ValueError, match="top_p"):
        AntidistillationProcessor(proxy, gradient, lam=1.0, pad_id=PAD, top_p=0.0)


def test_a_defended_teacher_caps_rounds_and_noises_what_it_reveals(tiny_teacher):
    from distillscope.errors import TeacherError
    from distillscope.exposure import TopK, tail_mass
    from distillscope.forensics import DefendedTeacher
    from distillscope.teachers import SamplingConfig

    prompts = ["Name a colour.", "Count to three."]
    ask = SamplingConfig(exposure="top5", max_new_tokens=5, seed=1)
    at_cap = SamplingConfig(exposure="top2", max_new_tokens=5, seed=1)
    plain = tiny_teacher.generate(prompts, at_cap)

    capped = DefendedTeacher(tiny_teacher, cap="top2")
    assert capped.max_exposure == TopK(2) and "cap=top2" in capped.id
    for got, want in zip(capped.generate(prompts, ask), plain):
        assert got.signal.exposure == TopK(2)  # asked for top5, served at the cap
        assert got.text == want.text
        np.testing.assert_array_equal(got.signal.topk_logprobs, want.signal.topk_logprobs)

    rounded = DefendedTeacher(tiny_teacher, cap="top2", round_logprobs=1)
    for got, want in zip(rounded.generate(prompts, ask), plain):
        np.testing.assert_array_equal(got.signal.token_ids, want.signal.token_ids)
        tenths = got.signal.topk_logprobs.astype(np.float64) * 10
        np.testing.assert_allclose(tenths, np.round(tenths), atol=1e-4)
        np.testing.assert_allclose(got.signal.topk_logprobs, want.signal.topk_logprobs, atol=0.05)

    noisy = DefendedTeacher(tiny_teacher, cap="top2", logprob_noise=0.5)
    first, again = noisy.generate(prompts, ask), noisy.generate(prompts, ask)
    for got, rerun, want in zip(first, again, plain):
        np.testing.assert_array_equal(got.signal.topk_logprobs, rerun.signal.topk_logprobs)
        assert not np.allclose(got.signal.topk_logprobs, want.signal.topk_logprobs, atol=0.05)
        assert (got.signal.topk_logprobs <= 0).all() and (got.signal.token_logprobs <= 0).all()
        assert (np.diff(got.signal.topk_logprobs, axis=-1) <= 0).all()  # re-sorted
        np.testing.assert_array_equal(got.signal.tail_mass, tail_mass(got.signal.topk_logprobs))
        # each step's alternatives are the same tokens, perhaps in another order
        np.testing.assert_array_equal(
            np.sort(got.signal.topk_ids, axis=-1), np.sort(want.signal.topk_ids, axis=-1)
        )

    with pytest.raises(TeacherError, match="reveals only its answers"):
        noisy.score([np.array([1, 2])], [np.array([3])])
    with pytest.raises(TeacherError, match="round_logprobs"):
        DefendedTeacher(tiny_teacher, round_logprobs=9)
    with pytest.raises(TeacherError, match="logprob_noise"):
        DefendedTeacher(tiny_teacher, logprob_noise=-1)


def test_distortion_counts_tokens_ruled_out_of_the_draw_as_zero(tiny_teacher):
    """Sampling from the teacher's own nucleus q = p / p(N) on N has KL(q || p) = -ln p(N): the
    harness must get that (not nan) although q is -inf outside N."""
    import math

    from transformers import TopPLogitsWarper

    from distillscope.forensics.harness import _kl_rows, teacher_outputs

    half = [TopPLogitsWarper(0.5)]
    outputs = teacher_outputs(
        tiny_teacher, ["Name a colour.", "Count to three."], processors=half, max_new_tokens=4,
        distortion=True,
    )  # fmt: skip
    # the tiny random teacher is close to uniform, so its half-nucleus holds just over half
    assert 0.6 < outputs.distortion <= math.log(2) + 1e-6
    q = np.array([[math.log(0.5), math.log(0.5), -np.inf]])
    p = np.log(np.array([[0.25, 0.25, 0.5]]))
    assert _kl_rows(q, p, 1.0) == pytest.approx(math.log(2))
