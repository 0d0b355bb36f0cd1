"""Claims about optimization: faster training (1), larger learning rates (2), initialization (4),
depth (5) and where BN goes (10)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .. import plots
from ..context import Context, record
from ..framework import Check, Claim, Criterion, Outcome, need
from ..models import cnn, mlp, scale_init
from ..train import batches, seed_everything, train_classifier
from .common import better_by, mean_of, pad

# ------------------------------------------------------------------------------------------ 1
TARGET_1 = 80.0  # test accuracy (%) the sigmoid MLP must reach on MNIST-5000
LR_1 = 2.0  # plain SGD; a rate at which the sigmoid network without BN does train


def _run_faster(ctx: Context) -> Outcome:
    data = ctx.images("mnist")
    steps, every = ctx.pick(300, 100), 10
    arms = ("none", "bn")
    curves: dict[str, list] = {a: [] for a in arms}
    reached: dict[str, list] = {a: [] for a in arms}
    to_target: dict[str, list] = {a: [] for a in arms}
    with ctx.bar(len(arms) * len(ctx.seeds), "1 faster training") as bar:
        for seed in ctx.seeds:
            for arm in arms:
                g = seed_everything(seed)
                model = mlp(data.n_features, data.n_classes, width=100, depth=3, norm=arm, act="sigmoid")
                h = train_classifier(
                    model.to(ctx.device),
                    data,
                    steps=steps,
                    batch_size=60,
                    lr=LR_1,
                    optimizer="sgd",
                    generator=g,
                    eval_every=every,
                )
                s = h.steps_to(TARGET_1)
                reached[arm].append(int(s is not None))
                to_target[arm].append(s if s is not None else steps)
                curves[arm].append(h.test_acc)
                x_steps = h.steps
                bar.update()
    m: dict = {"target_acc": TARGET_1, "max_steps": steps, "lr": LR_1, "eval_steps": x_steps}
    for arm in arms:
        m[f"reached_{arm}"] = reached[arm]
        record(m, f"steps_to_target_{arm}", to_target[arm])
        m[f"curve_{arm}"] = pad(curves[arm])
        record(m, f"final_acc_{arm}", [c[-1] for c in curves[arm]])
    # unreached counts as the budget, so this is a lower bound when the plain net never gets there
    record(m, "speedup", [n / b for n, b in zip(to_target["none"], to_target["bn"], strict=False)])

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        for arm in arms:
            plots.band(ax, m["eval_steps"], m[f"curve_{arm}"], arm)
        ax.axhline(m["target_acc"], color="black", ls="--", lw=0.8, label=f"target {m['target_acc']:.0f}%")
        plots.finish(
            ax,
            "Sigmoid MLP 3x100 on MNIST-5000 (Ioffe & Szegedy Fig. 1)",
            "training step",
            "test accuracy (%)",
        )

    return Outcome(m, plot)


def _bn_twice_as_fast(m) -> bool:
    ok = []
    for bn, none, none_reached in zip(
        need(m, "steps_to_target_bn"), need(m, "steps_to_target_none"), need(m, "reached_none"), strict=False
    ):
        # if the plain net never reached the target, its steps are only known to exceed the budget
        ok.append(2 * bn <= none if none_reached else 2 * bn <= m["max_steps"])
    return all(ok)


FASTER = Claim(
    id=1,
    title="Faster training",
    claim="Batch Normalization makes a network reach a given accuracy in far fewer training steps.",
    anchor="Ioffe & Szegedy 2015, Fig. 1 (MNIST, 3 sigmoid layers of 100) and §4.2.2: BN-Inception "
    "matched Inception's accuracy in 14x fewer steps.",
    criterion=Criterion(
        f"With the same plain-SGD rate ({LR_1}), the sigmoid MLP with BN reaches {TARGET_1:.0f}% test "
        "accuracy "
        "in every seed, and in at most half the steps of the network without BN, in every seed.",
        (
            Check(f"BN reaches {TARGET_1:.0f}% in every seed", lambda m: all(need(m, "reached_bn"))),
            Check("BN needs at most half the steps of no-norm, every seed", _bn_twice_as_fast),
        ),
    ),
    run=_run_faster,
    setup="MNIST-5000 (4,000 train / 1,000 test), MLP 784-100-100-100-10 with sigmoid, batch 60, plain SGD, "
    "test accuracy every 10 steps; 300 steps (100 with --quick).",
)

# ------------------------------------------------------------------------------------------ 2
TRAINS_2 = 80.0  # a run "trains" at a rate if it does not diverge and ends above this test accuracy


def _run_lr(ctx: Context) -> Outcome:
    data = ctx.images("digits")
    steps = ctx.pick(80, 40)
    lrs = ctx.pick([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], [0.03, 0.3, 3.0, 30.0])
    arms = ("none", "bn")
    acc = {a: [] for a in arms}
    with ctx.bar(len(arms) * len(ctx.seeds) * len(lrs), "2 learning rates") as bar:
        for seed in ctx.seeds:
            for arm in arms:
                row = []
                for lr in lrs:
                    g = seed_everything(seed)
                    model = mlp(data.n_features, data.n_classes, width=128, depth=3, norm=arm).to(ctx.device)
                    h = train_classifier(
                        model, data, steps=steps, batch_size=64, lr=lr, optimizer="sgd", generator=g
                    )
                    row.append(0.0 if h.diverged else h.final_acc)
                    bar.update()
                acc[arm].append(row)
    m: dict = {"lrs": lrs, "steps": steps, "trains_above_acc": TRAINS_2}
    best_plain_lr = []
    for arm in arms:
        m[f"acc_{arm}"] = acc[arm]
        max_lr = [
            max([lr for lr, a in zip(lrs, row, strict=False) if a >= TRAINS_2], default=0.0)
            for row in acc[arm]
        ]
        m[f"max_lr_{arm}"] = max_lr
        m[f"n_lrs_that_train_{arm}"] = [sum(a >= TRAINS_2 for a in row) for row in acc[arm]]
        if arm == "none":
            best_plain_lr = max_lr
    # accuracy of both at the largest rate where the plain network still trains (per seed)
    at = [lrs.index(lr) if lr in lrs else None for lr in best_plain_lr]
    m["acc_at_plain_max_lr_none"] = [acc["none"][s][i] if i is not None else None for s, i in enumerate(at)]
    m["acc_at_plain_max_lr_bn"] = [acc["bn"][s][i] if i is not None else None for s, i in enumerate(at)]
    m["lr_ratio"] = [b / n if n > 0 else None for b, n in zip(m["max_lr_bn"], m["max_lr_none"], strict=False)]

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        for arm in arms:
            plots.band(ax, m["lrs"], m[f"acc_{arm}"], arm)
        ax.axhline(m["trains_above_acc"], color="black", ls="--", lw=0.8, label="'trains' threshold")
        ax.set_xscale("log")
        plots.finish(
            ax,
            "ReLU MLP on digits, plain SGD: accuracy after training (0 = diverged)",
            "learning rate",
            "test accuracy (%)",
        )

    return Outcome(m, plot)


def _ratio_at_least(k: float):
    def test(m):
        ok = []
        for bn, plain in zip(need(m, "max_lr_bn"), need(m, "max_lr_none"), strict=False):
            # a plain network that trains at no rate: any rate at which BN trains is "infinitely" larger
            ok.append(bn > 0 if plain == 0 else bn >= k * plain * 0.999)
        return all(ok)

    return test


LEARNING_RATES = Claim(
    id=2,
    title="Larger learning rates",
    claim="Batch Normalization lets a network train at much larger learning rates, and that is where its "
    "benefit comes from.",
    anchor="Ioffe & Szegedy 2015, §4.2.1: BN-x5 and BN-x30 trained at 5x and 30x Inception's rate; Bjorck "
    "et al. "
    "2018: at the same (small) rate BN's advantage largely disappears.",
    criterion=Criterion(
        f"A rate 'trains' if the run does not diverge and ends above {TRAINS_2:.0f}% test accuracy. The "
        "largest "
        "rate that trains with BN is at least 5x (and at least 30x) the largest without BN, in every seed; "
        "and at "
        "the largest rate where the plain network trains, BN's mean accuracy is within 2 points of it.",
        (
            Check("largest BN rate >= 5x the plain one, every seed", _ratio_at_least(5.0)),
            Check("largest BN rate >= 30x the plain one, every seed", _ratio_at_least(30.0)),
            Check(
                "at the plain network's largest rate, BN within 2 points (Bjorck)",
                lambda m: (
                    abs(mean_of(m, "acc_at_plain_max_lr_bn") - mean_of(m, "acc_at_plain_max_lr_none")) <= 2.0
                ),
            ),
        ),
    ),
    run=_run_lr,
    setup="digits, MLP 64-128-128-128-10 with ReLU, batch 64, plain SGD for 80 steps (40 with --quick) at "
    "rates "
    "0.01 ... 30 (4 rates with --quick).",
)

# ------------------------------------------------------------------------------------------ 4
GOOD_4 = 85.0


def _run_init(ctx: Context) -> Outcome:
    data = ctx.images("digits")
    steps = ctx.pick(100, 50)
    scales = ctx.pick([0.01, 0.1, 1.0, 10.0], [0.01, 1.0, 10.0])
    arms = ("none", "bn")
    acc = {a: [] for a in arms}
    with ctx.bar(len(arms) * len(ctx.seeds) * len(scales), "4 initialization") as bar:
        for seed in ctx.seeds:
            for arm in arms:
                row = []
                for scale in scales:
                    g = seed_everything(seed)
                    model = scale_init(
                        mlp(data.n_features, data.n_classes, width=128, depth=3, norm=arm), scale
                    )
                    h = train_classifier(
                        model.to(ctx.device),
                        data,
                        steps=steps,
                        batch_size=64,
                        lr=0.05,
                        optimizer="momentum",
                        generator=g,
                    )
                    row.append(0.0 if h.diverged else h.final_acc)
                    bar.update()
                acc[arm].append(row)
    m: dict = {"scales": scales, "steps": steps, "good_acc": GOOD_4}
    for arm in arms:
        m[f"acc_{arm}"] = acc[arm]
        means = np.mean(acc[arm], axis=0)
        m[f"acc_{arm}_mean"] = means.tolist()
        m[f"range_{arm}"] = float(means.max() - means.min())
        m[f"min_acc_{arm}"] = float(means.min())

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        for arm in arms:
            plots.band(ax, m["scales"], m[f"acc_{arm}"], arm)
        ax.set_xscale("log")
        plots.finish(
            ax,
            "ReLU MLP on digits: every weight multiplied by the scale at initialization",
            "initial weight scale (x default init)",
            "test accuracy (%)",
        )

    return Outcome(m, plot)


INIT = Claim(
    id=4,
    title="Less sensitivity to initialization",
    claim="With Batch Normalization, training no longer depends much on the scale of the initial weights.",
    anchor="Ioffe & Szegedy 2015, §3.3: BN makes a layer's output invariant to the scale of its weights, "
    "BN(aWu) = BN(Wu), so training is more resilient to the parameter scale.",
    criterion=Criterion(
        "Over initial weight scales x0.01 ... x10, the BN network's mean test accuracy is at least "
        f"{GOOD_4:.0f}% "
        "at every scale, and its range over scales (max − min of the means) is at most half the plain "
        "network's.",
        (
            Check(f"BN >= {GOOD_4:.0f}% at every scale", lambda m: need(m, "min_acc_bn") >= GOOD_4),
            Check(
                "BN's range over scales <= half the plain network's",
                lambda m: need(m, "range_bn") <= 0.5 * need(m, "range_none"),
            ),
        ),
    ),
    run=_run_init,
    setup="digits, MLP 64-128-128-128-10 with ReLU, every Linear weight multiplied by the scale after "
    "PyTorch's "
    "default init, SGD with momentum 0.9 at 0.05, batch 64, 100 steps (50 with --quick).",
)

# ------------------------------------------------------------------------------------------ 5
YANG_GROWTH = 1.2  # minimum per-layer growth of the squared gradient norm we count as "exploding"


def _grad_growth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    """Per-layer growth factor of ‖∂L/∂W_l‖² from the last hidden layer back to the first (log-linear fit)."""
    model.train()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]  # hidden layers, first to last
    sq = [float(m.weight.grad.pow(2).sum()) for m in linears]
    depth = np.arange(len(sq))
    slope = np.polyfit(depth, np.log(np.maximum(sq, 1e-300)), 1)[0]
    model.zero_grad()
    return float(math.exp(-slope)), sq  # growth per layer going backwards (towards the input)


def _run_depth(ctx: Context) -> Outcome:
    data = ctx.images("digits")
    steps = ctx.pick(100, 50)
    depths = ctx.pick([2, 4, 8, 16], [2, 8])
    init_depth = ctx.pick(32, 16)
    arms = ("none", "bn")
    acc = {a: [] for a in arms}
    growth = {a: [] for a in arms}
    grads: dict[str, list] = {a: [] for a in arms}
    with ctx.bar(len(arms) * len(ctx.seeds) * (len(depths) + 1), "5 depth") as bar:
        for seed in ctx.seeds:
            for arm in arms:
                row = []
                for depth in depths:
                    g = seed_everything(seed)
                    model = mlp(data.n_features, data.n_classes, width=64, depth=depth, norm=arm).to(
                        ctx.device
                    )
                    h = train_classifier(
                        model, data, steps=steps, batch_size=64, lr=0.02, optimizer="momentum", generator=g
                    )
                    row.append(0.0 if h.diverged else h.final_acc)
                    bar.update()
                acc[arm].append(row)
                g = seed_everything(seed)
                model = mlp(data.n_features, data.n_classes, width=64, depth=init_depth, norm=arm).to(
                    ctx.device
                )
                idx = next(batches(len(data.xtr), 64, 1, g))
                lam, sq = _grad_growth(model, data.xtr[idx], data.ytr[idx])
                growth[arm].append(lam)
                grads[arm].append(sq)
                bar.update()
    m: dict = {"depths": depths, "steps": steps, "init_depth": init_depth}
    for arm in arms:
        m[f"acc_{arm}"] = acc[arm]
        m[f"acc_deepest_{arm}"] = [row[-1] for row in acc[arm]]
        record(m, f"grad_growth_per_layer_{arm}", growth[arm])
        m[f"grad_sq_by_layer_{arm}"] = grads[arm]
    m["grad_sq_first_over_last_bn"] = [s[0] / s[-1] for s in grads["bn"]]

    def plot(fig, m):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for arm in arms:
            plots.band(ax1, m["depths"], m[f"acc_{arm}"], arm)
            plots.band(ax2, list(range(1, m["init_depth"] + 1)), np.log10(m[f"grad_sq_by_layer_{arm}"]), arm)
        ax1.set_xscale("log", base=2)
        ax1.set_xticks(m["depths"], [str(d) for d in m["depths"]])
        plots.finish(ax1, "Plain ReLU MLPs (width 64) on digits", "hidden layers", "test accuracy (%)")
        plots.finish(
            ax2,
            f"At initialization, depth {m['init_depth']} (Yang et al. 2019)",
            "hidden layer",
            "log10 ‖∂L/∂W‖²",
        )

    return Outcome(m, plot)


DEPTH = Claim(
    id=5,
    title="Deeper networks",
    claim="Batch Normalization makes deep networks without skip connections trainable — although at "
    "initialization their gradients grow exponentially with depth.",
    anchor="Ioffe & Szegedy 2015 (deep Inception with BN); Yang et al. 2019, Thm 3.9: in a deep BN network "
    "at "
    "initialization ‖∇‖² grows by a factor λ per layer, λ → π/(π−1) ≈ 1.47 for ReLU.",
    criterion=Criterion(
        "At the deepest trained depth the BN network reaches at least 80% mean test accuracy and at least 10 "
        "points more than the plain network; and at initialization the squared gradient norm of the BN "
        "network "
        f"grows by at least {YANG_GROWTH} per layer towards the input (mean over seeds).",
        (
            Check("BN >= 80% at the deepest depth", lambda m: mean_of(m, "acc_deepest_bn") >= 80.0),
            Check(
                "BN >= plain + 10 points at the deepest depth",
                lambda m: better_by(m, "acc_deepest_bn", "acc_deepest_none", 10.0),
            ),
            Check(
                f"BN gradient growth per layer at init >= {YANG_GROWTH} (Yang)",
                lambda m: need(m, "grad_growth_per_layer_bn_mean") >= YANG_GROWTH,
            ),
        ),
    ),
    run=_run_depth,
    setup="digits, ReLU MLPs of width 64 and 2, 4, 8, 16 hidden layers (2, 8 with --quick), no skip "
    "connections, SGD with momentum 0.9 at 0.02, batch 64, 100 steps (50). Gradient growth: one batch "
    "of 64 through an untrained 32-layer network (16 with --quick), log-linear fit of ‖∂L/∂W_l‖² over l.",
)

# ------------------------------------------------------------------------------------------ 10
MARGIN_10 = 0.5


def _run_placement(ctx: Context) -> Outcome:
    data = ctx.images("digits")
    steps = ctx.pick(100, 40)
    models = {
        "mlp": lambda p: mlp(data.n_features, data.n_classes, width=128, depth=3, norm="bn", placement=p),
        "cnn": lambda p: cnn(data.shape[0], data.n_classes, width=16, norm="bn", placement=p),
    }
    acc = {(k, p): [] for k in models for p in ("before", "after")}
    with ctx.bar(len(acc) * len(ctx.seeds), "10 placement") as bar:
        for seed in ctx.seeds:
            for k, p in acc:
                g = seed_everything(seed)
                h = train_classifier(
                    models[k](p).to(ctx.device),
                    data,
                    steps=steps,
                    batch_size=64,
                    lr=0.05,
                    optimizer="momentum",
                    generator=g,
                )
                acc[(k, p)].append(h.final_acc)
                bar.update()
    m: dict = {"steps": steps}
    for (k, p), v in acc.items():
        record(m, f"acc_{k}_{p}", v)

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        plots.bars(
            ax,
            ["MLP", "CNN"],
            ["before", "after"],
            {p: [m[f"acc_mlp_{p}"], m[f"acc_cnn_{p}"]] for p in ("before", "after")},
            "test accuracy (%)",
        )
        lo = min(min(m[f"acc_{k}_{p}"]) for k in ("mlp", "cnn") for p in ("before", "after"))
        ax.set_ylim(max(0, lo - 5), 100)
        plots.finish(ax, "BN before vs after the ReLU, digits")

    return Outcome(m, plot)


PLACEMENT = Claim(
    id=10,
    title="Placement",
    claim="Batch Normalization belongs before the nonlinearity, as the paper places it, rather than after.",
    anchor="Ioffe & Szegedy 2015, §3.2: BN is applied to x = Wu + b immediately before the nonlinearity, "
    "since Wu + b is 'more likely to have a symmetric, non-sparse distribution'.",
    criterion=Criterion(
        f"BN before the ReLU gives at least {MARGIN_10} points more mean test accuracy than BN after it, "
        "for an MLP and for a CNN.",
        (
            Check(
                f"MLP: before >= after + {MARGIN_10}",
                lambda m: better_by(m, "acc_mlp_before", "acc_mlp_after", MARGIN_10),
            ),
            Check(
                f"CNN: before >= after + {MARGIN_10}",
                lambda m: better_by(m, "acc_cnn_before", "acc_cnn_after", MARGIN_10),
            ),
        ),
    ),
    run=_run_placement,
    setup="digits; MLP 64-128-128-128-10 and a 2-conv CNN (16, 32 channels), BN before or after each ReLU, "
    "SGD with momentum 0.9 at 0.05, batch 64, 100 steps (40 with --quick).",
)

CLAIMS = (FASTER, LEARNING_RATES, INIT, DEPTH, PLACEMENT)
