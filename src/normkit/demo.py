"""``normkit demo``: a small CNN on scikit-learn's digits, with and without BatchNorm2d.

Two identical networks (conv-[BN]-ReLU ×2, linear head) train with plain SGD for a few epochs
at a learning rate where the plain network is slow; the demo prints test accuracy per epoch.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import normkit

HELP = "train a small CNN on scikit-learn's digits with and without BatchNorm2d"


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)


def load_digits():
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    data = sk_load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def make_cnn(batch_norm: bool) -> nn.Module:
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(normkit.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        return layers

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(batch_norm: bool, epochs: int, lr: float, seed: int, data) -> list[float]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make_cnn(batch_norm)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    accs = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        accs.append(accuracy(model, xte, yte))
    return accs


def main(args) -> int:
    data = load_digits()
    start = time.perf_counter()
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, SGD lr={args.lr}, {args.epochs} epochs")
    for bn in (False, True):
        accs = train(bn, args.epochs, args.lr, args.seed, data)
        label = "with BatchNorm2d   " if bn else "without BatchNorm2d"
        print(f"{label}  test accuracy per epoch: " + "  ".join(f"{a:.3f}" for a in accs))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0
