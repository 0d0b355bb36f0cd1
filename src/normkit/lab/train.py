"""Training and evaluation loops shared by the experiments (plain torch; the models hold normkit layers)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import ImageData

DIVERGED_LOSS = 1e4  # a training loss above this (or NaN/Inf) counts as divergence


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generator (initialization, noisy BN) and return a generator for the batch order.

    With :func:`deterministic` set once per run, the same seed gives the same numbers, run after run.
    """
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def deterministic(threads: int) -> None:
    """Fix what a run's numbers may depend on besides the seeds: the intra-op thread count and torch's
    choice of algorithms (``torch.use_deterministic_algorithms``; a warning, not an error, where an op
    has no deterministic version)."""
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches of ``batch_size``, epoch after epoch of a seeded permutation.

    The last partial batch of an epoch is dropped.
    """
    batch_size = min(batch_size, n)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]
            done += 1
            if done == steps:
                return


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Accuracy in eval mode (BN uses its running statistics), in percent."""
    was = model.training
    model.eval()
    correct = sum(
        (model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum().item() for i in range(0, len(x), chunk)
    )
    model.train(was)
    return 100.0 * correct / max(1, len(x))


class LeanSGD:
    """``torch.optim.SGD(params, lr, momentum)`` (no weight decay, dampening or Nesterov) without the
    per-step bookkeeping of ``torch.optim`` (step hooks, profiler ranges, per-group dictionaries),
    which costs about 100 µs a step — a fifth of a step of the lab's smallest models, which take
    thousands of them. The arithmetic is torch's ``_single_tensor_sgd``, operation for operation
    (first step: the buffer is a copy of the gradient; then ``buf.mul_(m).add_(grad)``;
    ``param.add_(buf, alpha=-lr)``), so the weights are bit-identical to torch.optim.SGD's (tested)."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            p.add_(grad, alpha=-self.lr)


def make_optimizer(model: nn.Module, name: str, lr: float):
    """``sgd`` and ``momentum`` (0.9): :class:`LeanSGD`, torch.optim.SGD's numbers; ``adam``: torch.optim.Adam."""
    if name == "sgd":
        return LeanSGD(model.parameters(), lr=lr)
    if name == "momentum":
        return LeanSGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"optimizer: expected sgd, momentum or adam, got {name!r}")


@dataclass
class History:
    steps: list[int] = field(default_factory=list)  # steps at which the test accuracy was measured
    test_acc: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # training loss per step
    diverged: bool = False
    converged: bool = False  # stopped by the plateau rule (train_to_plateau), not by its cap
    steps_per_epoch: int = 0

    @property
    def epochs(self) -> float:
        """Epochs trained (steps / steps per epoch)."""
        return self.steps[-1] / self.steps_per_epoch if self.steps and self.steps_per_epoch else math.nan

    def plateau_acc(self, window: int) -> float:
        """Mean test accuracy over the last ``window`` evaluations: the level of the plateau."""
        tail = self.test_acc[-window:]
        return sum(tail) / len(tail) if tail else math.nan

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else math.nan

    def steps_to(self, target: float) -> int | None:
        """The first measured step with test accuracy >= target, or None."""
        return next((s for s, a in zip(self.steps, self.test_acc, strict=False) if a >= target), None)


def _sgd_step(model: nn.Module, opt, xb: torch.Tensor, yb: torch.Tensor,
              hist: History) -> bool:
    """One cross-entropy step, its loss appended to ``hist``; False, and ``hist.diverged`` set, without
    stepping when the loss is not finite or above :data:`DIVERGED_LOSS`."""
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(xb), yb)
    value = loss.item()
    hist.losses.append(value)
    if not math.isfinite(value) or value > DIVERGED_LOSS:
        hist.diverged = True
        return False
    loss.backward()
    opt.step()
    return True


def train_classifier(
    model: nn.Module,
    data: ImageData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    optimizer: str = "momentum",
    generator: torch.Generator,
    eval_every: int = 0,
    on_step: Callable[[int, nn.Module, torch.Tensor, torch.Tensor], None] | None = None,
) -> History:
    """Cross-entropy training on ``data.xtr``; test accuracy every ``eval_every`` steps and at the end.

    Stops early, marking ``diverged``, when the loss is not finite or above :data:`DIVERGED_LOSS`;
    the test accuracy is still measured then (non-finite parameters count as chance level).
    """
    opt = make_optimizer(model, optimizer, lr)
    hist = History()
    model.train()
    step = 0
    for step, idx in enumerate(batches(len(data.xtr), batch_size, steps, generator), start=1):
        xb, yb = data.xtr[idx], data.ytr[idx]
        if on_step is not None:
            on_step(step, model, xb, yb)
        if not _sgd_step(model, opt, xb, yb, hist):
            break
        if eval_every and step % eval_every == 0 and step != steps:
            hist.steps.append(step)
            hist.test_acc.append(accuracy(model, data.xte, data.yte))
    if hist.diverged:
        hist.steps.append(step)
        hist.test_acc.append(
            accuracy(model, data.xte, data.yte)
            if all(torch.isfinite(p).all() for p in model.parameters())
            else 100.0 / data.n_classes
        )
    elif step:
        hist.steps.append(step)
        hist.test_acc.append(accuracy(model, data.xte, data.yte))
    return hist


@dataclass(frozen=True)
class Plateau:
    """When a run has converged: its test accuracy, measured every ``every`` epochs, has not beaten its
    best so far by ``min_delta`` points for ``patience`` evaluations, after at least ``min_epochs``;
    ``max_epochs`` is the cap (a run stopped there is reported as not converged)."""

    every: float = 0.25
    patience: int = 4
    min_delta: float = 0.5
    min_epochs: float = 2.0
    max_epochs: float = 40.0

    def text(self) -> str:
        return (
            f"trained until its test accuracy (every {self.every:g} epoch) stopped improving by "
            f"{self.min_delta:g} points for {self.patience} evaluations, after at least {self.min_epochs:g} "
            f"and at most {self.max_epochs:g} epochs"
        )


def train_to_plateau(
    model: nn.Module,
    data: ImageData,
    *,
    batch_size: int,
    lr: float,
    optimizer: str = "momentum",
    generator: torch.Generator,
    plateau: Plateau = Plateau(),
) -> History:
    """Train until the test accuracy plateaus (:class:`Plateau`); ``History.converged`` says whether it did.

    Arms of different batch sizes then differ in epochs (small batches take more steps per epoch and
    usually need fewer epochs), not in how far each got: the comparison is between converged networks.
    """
    n = len(data.xtr)
    batch_size = min(batch_size, n)
    per_epoch = max(1, n // batch_size)
    every = max(1, round(per_epoch * plateau.every))
    min_steps = math.ceil(plateau.min_epochs * per_epoch)
    max_steps = max(min_steps, math.ceil(plateau.max_epochs * per_epoch))
    opt = make_optimizer(model, optimizer, lr)
    hist = History(steps_per_epoch=per_epoch)
    model.train()
    step = 0
    for step, idx in enumerate(batches(n, batch_size, max_steps, generator), start=1):
        if not _sgd_step(model, opt, data.xtr[idx], data.ytr[idx], hist):
            break
        if step % every == 0 or step == max_steps:
            hist.steps.append(step)
            hist.test_acc.append(accuracy(model, data.xte, data.yte))
            k = plateau.patience
            if step >= min_steps and len(hist.test_acc) > k:
                if max(hist.test_acc[-k:]) < max(hist.test_acc[:-k]) + plateau.min_delta:
                    hist.converged = True
                    break
    if hist.diverged:
        hist.steps.append(step)
        hist.test_acc.append(100.0 / data.n_classes)  # a diverged network counts as chance level
    return hist
