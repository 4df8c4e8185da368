"""Hinton et al. 2015, section 3 (MNIST) reproduction: quick runs on the real data, no mocks.

The runs use ``threads=1``: on two CPU cores shared with other jobs, two spinning OpenMP threads
made these small steps 8-40x slower than one thread (measured); the full benchmark keeps torch's
default thread count.
"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from distillscope.papers import HintonMnistConfig, run_hinton_mnist
from distillscope.papers.hinton_mnist import (
    QUICK_TEST,
    QUICK_TRAIN,
    distillation_loss,
    format_table,
    load_mnist,
    prior_matching_bias,
)


def quick(**kwargs) -> dict:
    return run_hinton_mnist(HintonMnistConfig(quick=True, threads=1, **kwargs), progress=False)


@pytest.fixture(scope="module")
def result() -> dict:
    return quick(seed=0)


@pytest.fixture(scope="module")
def omit3() -> dict:
    return quick(seed=0, omit_classes=(3,))


def test_data_is_train_plus_valid_and_test():
    x_train, y_train, x_test, y_test = load_mnist()
    assert x_train.shape == (60_000, 784) and y_train.shape == (60_000,)
    assert x_test.shape == (10_000, 784) and y_test.shape == (10_000,)
    assert int((y_test == 3).sum()) == 1010  # the paper's "1010 threes in the test set"


def test_quick_runs_end_to_end(result):
    assert json.loads(json.dumps(result)) == result  # JSON-able
    for key in ("paper", "config", "effective", "device", "n_train", "n_transfer", "n_test",
                "train_class_counts", "transfer_class_counts", "test_class_counts", "nets",
                "omitted", "seconds"):  # fmt: skip
        assert key in result
    assert result["n_train"] == result["n_transfer"] == QUICK_TRAIN
    assert result["n_test"] == QUICK_TEST
    assert result["omitted"] is None
    paper = {"big": 67, "small_hard": 146, "small_soft": 74}
    for name, figure in paper.items():
        net = result["nets"][name]
        assert net["paper_test_errors"] == figure
        assert 0 <= net["test_errors"] <= QUICK_TEST
        assert sum(net["per_class_errors"]) == net["test_errors"]
        assert net["test_error_rate"] == net["test_errors"] / QUICK_TEST
    # One epoch on 4,000 examples is far from the paper, but every net must have learnt something.
    assert all(result["nets"][n]["test_error_rate"] < 0.6 for n in paper)


def test_table_shows_ours_beside_the_paper(result):
    console = Console(record=True, width=120)
    console.print(format_table(result))
    text = console.export_text()
    for figure in ("67", "146", "74", str(result["nets"]["small_soft"]["test_errors"])):
        assert figure in text


def test_soft_loss_is_t_squared_times_tempered_kl():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=gen) * 3
    teacher_logits = torch.randn(6, 10, generator=gen) * 5
    labels = torch.randint(0, 10, (6,), generator=gen)
    T = 20.0
    p = torch.softmax(teacher_logits.double() / T, dim=-1)
    q = torch.softmax(student.double() / T, dim=-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1)  # raw, T=1, as the runner passes
    soft = distillation_loss(student, teacher_logprobs, labels, temperature=T, alpha=0.0)
    assert float(soft) == pytest.approx(400.0 * float(kl), rel=1e-4)
    ce = torch.nn.functional.cross_entropy(student.double(), labels)
    mixed = distillation_loss(student, teacher_logprobs, labels, temperature=T, alpha=0.25)
    assert float(mixed) == pytest.approx(0.75 * 400.0 * float(kl) + 0.25 * float(ce), rel=1e-4)


def test_omit_classes_removes_them_from_the_transfer_set(omit3):
    train, transfer = omit3["train_class_counts"], omit3["transfer_class_counts"]
    assert transfer[3] == 0 and train[3] > 0
    assert [c for i, c in enumerate(transfer) if i != 3] == [
        c for i, c in enumerate(train) if i != 3
    ]
    assert omit3["n_transfer"] == omit3["n_train"] - train[3]
    om = omit3["omitted"]
    assert om["classes"] == [3]
    assert om["test_counts"] == {"3": omit3["test_class_counts"][3]}
    assert om["class_errors"]["3"] == omit3["nets"]["small_soft"]["per_class_errors"][3]
    assert om["paper"]["test_errors"] == 206 and om["paper"]["adjusted_omitted_class_errors"] == 14
    # The rule: after the shift, the mean predicted frequency of 3 equals its training prior.
    assert om["mean_predicted_after"]["3"] == pytest.approx(om["prior"]["3"], abs=1e-5)
    assert 0 <= om["adjusted_class_errors"]["3"] <= om["test_counts"]["3"]


def test_transfer_fraction_subsamples_the_transfer_set():
    half = quick(seed=0, transfer_fraction=0.5, omit_classes=(7, 8))
    assert half["transfer_class_counts"][7] == half["transfer_class_counts"][8] == 0
    assert sum(half["transfer_class_counts"]) == half["n_transfer"]
    kept = [c for i, c in enumerate(half["train_class_counts"]) if i not in (7, 8)]
    assert half["n_transfer"] < sum(kept)  # a subset of the non-omitted examples
    assert abs(half["n_transfer"] - 0.5 * sum(kept)) < 0.1 * sum(kept)


def test_same_seed_same_errors(result):
    again = quick(seed=0)
    for name in ("big", "small_hard", "small_soft"):
        assert again["nets"][name]["test_errors"] == result["nets"][name]["test_errors"]
        assert again["nets"][name]["per_class_errors"] == result["nets"][name]["per_class_errors"]


def test_prior_matching_bias_matches_several_priors():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 10, generator=gen) * 2
    logits[:, [2, 5]] -= 4.0  # a student that rarely predicts the omitted classes
    prior = torch.full((10,), 0.1, dtype=torch.float64)
    shift = prior_matching_bias(logits, (2, 5), prior)
    assert shift[[0, 1, 3, 4, 6, 7, 8, 9]].abs().max() == 0
    assert bool((shift[[2, 5]] > 0).all())
    mean = torch.softmax(logits.double() + shift.double(), dim=1).mean(0)
    assert mean[[2, 5]].tolist() == pytest.approx([0.1, 0.1], abs=1e-8)


def test_config_validation():
    with pytest.raises(ValueError):
        HintonMnistConfig(omit_classes=tuple(range(10)))
    with pytest.raises(ValueError):
        HintonMnistConfig(transfer_fraction=0.0)
    assert HintonMnistConfig(omit_classes=(3, 3, 1)).omit_classes == (1, 3)
