"""The loss math, pinned: sparse = dense at k = V, T², JSD endpoints, tail bucket, alignment."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillscope.distill.losses import (
    DenseSignal,
    HardSignal,
    SparseSignal,
    draw_sampled_signal,
    forward_kl,
    generalized_jsd,
    hard_ce,
    retemper,
    reverse_kl,
    sampled_kl,
    sparse_kl,
    sparse_kl_renormalized,
)


def _pair(seed: int, batch=2, positions=3, vocab=11, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(batch, positions, vocab, generator=gen) * spread, -1)
    student = torch.randn(batch, positions, vocab, generator=gen) * spread
    mask = torch.ones(batch, positions, dtype=torch.bool)
    return student, teacher, mask


def _sparse(teacher: torch.Tensor, k: int) -> SparseSignal:
    values, ids = torch.topk(teacher, k, dim=-1)
    return SparseSignal(ids, values, (1 - values.double().exp().sum(-1)).clamp_min(0).float())


def _kl_by_hand(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.double().exp() * (p_log.double() - q_log.double())).sum(-1).mean()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_sparse_kl_with_k_equal_to_vocab_is_dense_kl(seed):
    student, teacher, mask = _pair(seed)
    dense = forward_kl(student, DenseSignal(teacher), mask)
    sparse = sparse_kl(student, _sparse(teacher, teacher.shape[-1]), mask)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 20.0])
def test_forward_kl_is_tempered_kl_times_t_squared(temperature):
    student, teacher, mask = _pair(1)
    by_hand = _kl_by_hand(
        torch.log_softmax(teacher / temperature, -1), torch.log_softmax(student / temperature, -1)
    )
    loss = forward_kl(student, DenseSignal(teacher), mask, temperature=temperature)
    assert loss.item() == pytest.approx(temperature**2 * by_hand.item(), rel=1e-4)


def test_t_squared_keeps_gradient_scale_roughly_constant():
    """Hinton's reason for T²: without it soft-target gradients shrink as 1/T²."""
    norms = []
    for temperature in (5.0, 50.0):
        student, teacher, mask = _pair(2, spread=0.5)
        student.requires_grad_(True)
        forward_kl(student, DenseSignal(teacher), mask, temperature=temperature).backward()
        norms.append(student.grad.norm().item())
    assert norms[0] == pytest.approx(norms[1], rel=0.1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), temperature=st.sampled_from([1.0, 3.0]))
def test_jsd_endpoints_are_forward_and_reverse_kl_and_continuous(seed, temperature):
    student, teacher, mask = _pair(seed)
    signal = DenseSignal(teacher)
    fwd = forward_kl(student, signal, mask, temperature=temperature).item()
    rev = reverse_kl(student, signal, mask, temperature=temperature).item()
    assert generalized_jsd(student, signal, mask, beta=0.0, temperature=temperature).item() == fwd
    assert generalized_jsd(student, signal, mask, beta=1.0, temperature=temperature).item() == rev
    near0 = generalized_jsd(student, signal, mask, beta=1e-4, temperature=temperature).item()
    near1 = generalized_jsd(student, signal, mask, beta=1 - 1e-4, temperature=temperature).item()
    assert near0 == pytest.approx(fwd, rel=2e-2, abs=1e-3)
    assert near1 == pytest.approx(rev, rel=2e-2, abs=1e-3)
    assert generalized_jsd(student, signal, mask, beta=0.5, temperature=temperature).item() >= 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 10))
def test_tail_bucket_kl_is_nonnegative(seed, k):
    student, teacher, mask = _pair(seed)
    assert sparse_kl(student, _sparse(teacher, k), mask).item() >= -1e-6


def test_tail_bucket_kl_is_zero_only_when_topk_and_tail_match():
    _, teacher, mask = _pair(3)
    signal = _sparse(teacher, 4)
    # a student equal to the teacher on the top-4 and on total tail mass, different inside the tail
    inside_tail = teacher.clone()
    tail_ids = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, signal.ids, False)
    tail_probs = teacher.exp() * tail_ids
    reshaped = torch.where(
        tail_ids, tail_probs.sum(-1, keepdim=True) / tail_ids.sum(-1, keepdim=True), teacher.exp()
    )
    inside_tail = reshaped.log()
    assert sparse_kl(inside_tail, signal, mask).item() == pytest.approx(0.0, abs=1e-5)
    # same top-4 probabilities but mass moved out of the tail: no longer zero
    moved = teacher.exp().clone()
    moved = torch.where(tail_ids, moved * 0.5, moved)
    assert sparse_kl(moved.log(), signal, mask).item() > 1e-3
    # the renormalised (biased) variant cannot see the tail at all
    assert sparse_kl_renormalized(moved.log(), signal, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_sparse_kl_refuses_temperature_it_cannot_honour():
    student, teacher, mask = _pair(4)
    with pytest.raises(ValueError, match="temperature 1"):
        sparse_kl(student, _sparse(teacher, 3), mask, temperature=2.0)


def test_sampled_kl_is_unbiased_for_forward_kl():
    student, teacher, mask = _pair(5, vocab=7)
    dense = forward_kl(student, DenseSignal(teacher), mask).item()
    gen = torch.Generator().manual_seed(0)
    estimates = [
        sampled_kl(student, draw_sampled_signal(teacher, 12, generator=gen), mask).item()
        for _ in range(400)
    ]
    mean = sum(estimates) / len(estimates)
    sd = torch.tensor(estimates).std().item() / len(estimates) ** 0.5
    assert abs(mean - dense) < 4 * sd + 1e-6


def test_hard_ce_is_the_negative_log_likelihood_of_the_sampled_tokens():
    student, _, mask = _pair(6)
    ids = student.argmax(-1)
    expected = -torch.log_softmax(student, -1).gather(-1, ids[..., None]).mean()
    assert hard_ce(student, HardSignal(ids), mask).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_masked_positions_do_not_count():
    student, teacher, mask = _pair(7)
    mask[:, -1] = False
    changed = student.clone()
    changed[:, -1] += 100.0
    signal = DenseSignal(teacher)
    assert forward_kl(student, signal, mask).item() == pytest.approx(
        forward_kl(changed, signal, mask).item()
    )


def test_retemper_undoes_a_sampling_temperature():
    logits = torch.randn(3, 17)
    at_half = torch.log_softmax(logits / 0.5, -1)
    torch.testing.assert_close(retemper(at_half, 0.5, 1.0), torch.log_softmax(logits, -1))
    torch.testing.assert_close(retemper(at_half, 0.5, 2.0), torch.log_softmax(logits / 2.0, -1))
