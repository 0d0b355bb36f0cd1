"""Claims about optimization: faster training (1), larger learning rates (2), initialization (4),
depth (5) and where BN goes (10)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .. import data as D
from .. import plots
from ..context import Context, record
from ..costs import Cost
from ..framework import (
    FAIL,
    PASS,
    SKIPPED,
    UNDECIDED,
    Check,
    Claim,
    Criterion,
    Outcome,
    Part,
    Result,
    at_least,
    bounds_of,
    censored,
    every_seed,
    need,
    paired,
    within,
)
from ..models import mlp, scale_init
from ..train import batches, seed_everything, train_classifier
from .batch import NORMAL_BATCH, SETTINGS, part_name, small_batch_part
from .common import pad

# ------------------------------------------------------------------------------------------ 1
TARGET_1 = 80.0  # test accuracy (%) the sigmoid MLP must reach on MNIST-5000
LR_1 = 2.0  # plain SGD; a rate at which the sigmoid network without BN does train
STEPS_1 = 300  # the cap, in the full and the quick run alike: "not within it" is recorded as "> 300"
EVERY_1 = 10
PERCENTILES_1 = (15, 50, 85)
PROBE_1 = 500  # test images whose sigmoid inputs are followed (Ioffe & Szegedy Fig. 1(b, c))
COST_1 = Cost(1.5)  # modeled seconds per seed (normkit.lab.costs)


def _sigmoid_input_probe(model: nn.Module, x: torch.Tensor):
    """A function giving the 15/50/85th percentiles over ``x`` of unit 0's input to the last sigmoid
    (eval mode: BN's running statistics), as Ioffe & Szegedy plot a typical unit in Fig. 1(b, c)."""
    last = [m for m in model.modules() if isinstance(m, nn.Sigmoid)][-1]
    seen: list[torch.Tensor] = []
    last.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][:, 0].detach()))
    q = torch.tensor([p / 100 for p in PERCENTILES_1])

    @torch.no_grad()
    def probe() -> list[float]:
        was = model.training
        model.eval()
        seen.clear()
        model(x)
        model.train(was)
        return torch.quantile(seen[-1].double().cpu(), q.double()).tolist()

    return probe


HALF_1 = STEPS_1 // 2


def _faster_seed(ref: str, device: str, seed: int) -> dict:
    """One seed of claim 1: both arms' test-accuracy curves, steps to the target (censored at the cap) and
    the sigmoid-input percentiles over training."""
    data = D.resolve(ref, device)
    out: dict = {}
    for arm in ("none", "bn"):
        g = seed_everything(seed)
        model = mlp(data.n_features, data.n_classes, width=100, depth=3, norm=arm, act="sigmoid").to(device)
        probe = _sigmoid_input_probe(model, data.xte[:PROBE_1])
        trace = [probe()]

        def on_step(step, model, xb, yb, trace=trace, probe=probe):
            if step > 1 and (step - 1) % EVERY_1 == 0:  # the weights after step - 1
                trace.append(probe())

        h = train_classifier(
            model, data, steps=STEPS_1, batch_size=60, lr=LR_1, optimizer="sgd", generator=g,
            eval_every=EVERY_1, on_step=on_step,
        )
        trace.append(probe())
        s = h.steps_to(TARGET_1)
        out[arm] = {
            "to_target": s if s is not None else censored(STEPS_1),
            "curve": h.test_acc,
            "eval_steps": h.steps,
            "acc_half": h.test_acc[h.steps.index(HALF_1)] if HALF_1 in h.steps else h.final_acc,
            "percentiles": trace,
        }
    return out


def _parts_faster(ctx: Context) -> list[Part]:
    return [Part("seed", _faster_seed, (ctx.data_ref("mnist"), ctx.device), cost=COST_1)]


def _collect_faster(ctx: Context, res: dict) -> Outcome:
    arms = ("none", "bn")
    runs = res["seed"]
    m: dict = {"target_acc": TARGET_1, "max_steps": STEPS_1, "half_steps": HALF_1, "lr": LR_1,
               "eval_steps": runs[0]["bn"]["eval_steps"], "percentiles": list(PERCENTILES_1),
               "percentile_steps": [0] + list(range(EVERY_1, STEPS_1 + 1, EVERY_1))}
    for arm in arms:
        record(m, f"steps_to_target_{arm}", [r[arm]["to_target"] for r in runs])
        m[f"curve_{arm}"] = pad([r[arm]["curve"] for r in runs])
        record(m, f"final_acc_{arm}", [r[arm]["curve"][-1] for r in runs])
        record(m, f"acc_at_half_{arm}", [r[arm]["acc_half"] for r in runs])
        m[f"sigmoid_input_percentiles_{arm}"] = [r[arm]["percentiles"] for r in runs]  # seeds × steps × (15, 50, 85)
    notes = [_bn_twice_as_fast(m).detail]

    def plot(fig, m):
        ax = fig.add_subplot(1, 3, 1)
        for arm in arms:
            plots.band(ax, m["eval_steps"], m[f"curve_{arm}"], arm)
        ax.axhline(m["target_acc"], color="black", ls="--", lw=0.8, label=f"target {m['target_acc']:.0f}%")
        plots.finish(ax, "(a) Sigmoid MLP 3x100, MNIST-5000", "training step", "test accuracy (%)")
        for i, (arm, title) in enumerate((("none", "(b) without BN"), ("bn", "(c) with BN")), start=2):
            ax = fig.add_subplot(1, 3, i)
            tr = np.asarray(m[f"sigmoid_input_percentiles_{arm}"][0])
            steps = m["percentile_steps"][: len(tr)]
            for k, p in enumerate(m["percentiles"]):
                ax.plot(steps, tr[:, k], color=plots.color(arm), lw=1.5 if p == 50 else 0.9,
                        ls="-" if p == 50 else "--", label=f"{p}th percentile")
            plots.finish(ax, f"{title}: input to a sigmoid (seed 0)", "training step", "value")

    return Outcome(m, plot, notes)


def _bn_twice_as_fast(m) -> Result:
    """Per seed, from the censored steps to the target: does the plain network need at least twice BN's
    steps? (A share-of-seeds test; the report's notes show it next to the paired checks.)"""
    per_seed = []
    for bn, none in zip(need(m, "steps_to_target_bn"), need(m, "steps_to_target_none"), strict=True):
        (bn_lo, bn_hi), (none_lo, none_hi) = bounds_of(bn), bounds_of(none)
        # a censored "> cap" is only a lower bound: the ratio none/bn is known to lie in [lo, hi]
        lo, hi = none_lo / bn_hi, none_hi / bn_lo
        per_seed.append(True if lo >= 2 else False if hi < 2 else None)
    return every_seed(per_seed, "steps without BN >= 2x steps with BN (censored at the cap)")


FASTER = Claim(
    id=1,
    title="Faster training",
    claim="Batch Normalization makes a network reach a given accuracy in far fewer training steps.",
    anchor="Ioffe & Szegedy 2015, Fig. 1 (MNIST, 3 sigmoid layers of 100; (b, c) the 15/50/85th "
    "percentiles of a sigmoid's input over training) and §4.2.2: BN-Inception matched Inception's "
    "accuracy in 14x fewer steps.",
    criterion=Criterion(
        f"With the same plain-SGD rate ({LR_1}), the sigmoid MLP with BN ends its {STEPS_1} steps above "
        f"{TARGET_1:.0f}% test accuracy (lower bound over seeds), and after half of them ({HALF_1}) it is more "
        f"accurate than the network without BN after all {STEPS_1} (paired over seeds): it needs at most half "
        "the steps to get where the plain network gets. Steps to "
        f"{TARGET_1:.0f}% are reported per seed, censored at the cap ('> {STEPS_1}').",
        (
            Check(f"BN >= {TARGET_1:.0f}% test accuracy after {STEPS_1} steps",
                  lambda m: at_least(need(m, "final_acc_bn"), TARGET_1, "%")),
            Check(f"BN after {HALF_1} steps >= no-norm after {STEPS_1} (paired)",
                  lambda m: at_least(paired(need(m, "acc_at_half_bn"), need(m, "final_acc_none")), 0.0,
                                     " points")),
        ),
    ),
    parts=_parts_faster,
    collect=_collect_faster,
    setup=f"MNIST-5000 (4,000 train / 1,000 test), MLP 784-100-100-100-10 with sigmoid, batch 60, plain SGD "
    f"at {LR_1}, test accuracy every {EVERY_1} steps, {STEPS_1} steps in the full and the quick run "
    f"(steps to {TARGET_1:.0f}% are censored at the cap: '> {STEPS_1}'; the notes give the share of seeds "
    "where the plain network needed at least twice BN's steps). The input of unit 0 of the last "
    f"sigmoid layer is followed over training on {PROBE_1} test images (eval mode), as in Fig. 1(b, c).",
)

# ------------------------------------------------------------------------------------------ 2
TRAINS_2 = 80.0  # a run "trains" at a rate if it does not diverge and ends above this test accuracy
STEPS_2 = 100  # about 5 epochs of digits at batch 64
LRS_2 = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # the same grid in the full and the quick run
MULTIPLES_2 = (5, 30)  # BN-x5 and BN-x30
COST_2 = Cost(1.9)


def _lr_acc(data, device: str, arm: str, lr: float, seed: int) -> float:
    """Test accuracy after STEPS_2 steps of plain SGD at ``lr`` (0 when the run diverged)."""
    g = seed_everything(seed)
    model = mlp(data.n_features, data.n_classes, width=128, depth=3, norm=arm).to(device)
    h = train_classifier(model, data, steps=STEPS_2, batch_size=64, lr=lr, optimizer="sgd", generator=g)
    return 0.0 if h.diverged else h.final_acc


def _lr_seed(ref: str, device: str, lrs: tuple, seed: int) -> dict:
    """One seed of claim 2: both arms over the grid, then BN at 5x and 30x the plain network's largest rate."""
    data = D.resolve(ref, device)
    acc = {arm: [_lr_acc(data, device, arm, lr, seed) for lr in lrs] for arm in ("none", "bn")}
    trains = [lr for lr, a in zip(lrs, acc["none"], strict=True) if a >= TRAINS_2]
    p = max(trains) if trains else None  # the plain network's largest rate on the grid
    at = {k: (_lr_acc(data, device, "bn", k * p, seed) if p is not None else None) for k in MULTIPLES_2}
    return {"acc": acc, "plain_max_lr": p, "at_multiple": at}


def _parts_lr(ctx: Context) -> list[Part]:
    return [Part("seed", _lr_seed, (ctx.data_ref("digits"), ctx.device, LRS_2), cost=COST_2)]


def _collect_lr(ctx: Context, res: dict) -> Outcome:
    runs = res["seed"]
    lrs = list(LRS_2)
    arms = ("none", "bn")
    base = [r["plain_max_lr"] for r in runs]
    m: dict = {"lrs": lrs, "steps": STEPS_2, "trains_above_acc": TRAINS_2, "plain_max_lr": base}
    for arm in arms:
        m[f"acc_{arm}"] = [r["acc"][arm] for r in runs]
        m[f"max_lr_{arm}"] = [
            max([lr for lr, a in zip(lrs, row, strict=True) if a >= TRAINS_2], default=0.0) for row in m[f"acc_{arm}"]
        ]
    for k in MULTIPLES_2:
        m[f"acc_bn_at_{k}x_plain_max_lr"] = [r["at_multiple"][k] for r in runs]
    idx = [lrs.index(p) if p is not None else None for p in base]
    m["acc_at_plain_max_lr_none"] = [m["acc_none"][s][i] if i is not None else None for s, i in enumerate(idx)]
    m["acc_at_plain_max_lr_bn"] = [m["acc_bn"][s][i] if i is not None else None for s, i in enumerate(idx)]

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        for arm in arms:
            plots.band(ax, m["lrs"], m[f"acc_{arm}"], arm)
        for k, marker in zip(MULTIPLES_2, ("s", "^"), strict=True):
            pts = [(k * p, a) for p, a in zip(m["plain_max_lr"], m[f"acc_bn_at_{k}x_plain_max_lr"], strict=True)
                   if p is not None and a is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, color=plots.color("bn"), label=f"BN-x{k} (per seed)")
        ax.axhline(m["trains_above_acc"], color="black", ls="--", lw=0.8, label="'trains' threshold")
        ax.set_xscale("log")
        plots.finish(
            ax,
            f"ReLU MLP on digits, plain SGD, {m['steps']} steps: accuracy (0 = diverged)",
            "learning rate",
            "test accuracy (%)",
        )

    return Outcome(m, plot)


def _trains_at_multiple(k: int):
    def test(m) -> Result:
        accs = need(m, f"acc_bn_at_{k}x_plain_max_lr")
        return every_seed([a >= TRAINS_2 for a in accs], f"BN trains at {k}x the plain network's largest rate")

    return test


LEARNING_RATES = Claim(
    id=2,
    title="Larger learning rates",
    claim="Batch Normalization lets a network train at much larger learning rates, and that is where its "
    "benefit comes from.",
    anchor="Ioffe & Szegedy 2015, §4.2.1: BN-x5 and BN-x30 trained at 5x and 30x Inception's rate; Bjorck "
    "et al. 2018: at the same (small) rate BN's advantage largely disappears.",
    criterion=Criterion(
        f"A rate 'trains' if the run does not diverge and ends above {TRAINS_2:.0f}% test accuracy after "
        f"{STEPS_2} steps. With p the largest rate of the grid at which the plain network trains (per seed), "
        "BN trains at 5·p and at 30·p (BN-x5, BN-x30), in more than half of the seeds (one-sided 95 % "
        "Clopper-Pearson bound; with 5 seeds: all 5); and at p, BN's accuracy is within 2 "
        "points of the plain network's (paired over seeds, both bounds inside ±2).",
        (
            Check("BN trains at 5x the plain network's largest rate (share of seeds > 1/2)", _trains_at_multiple(5)),
            Check("BN trains at 30x the plain network's largest rate (share of seeds > 1/2)",
                  _trains_at_multiple(30)),
            Check(
                "at the plain network's largest rate, BN within 2 points (Bjorck)",
                lambda m: within(paired(need(m, "acc_at_plain_max_lr_bn"), need(m, "acc_at_plain_max_lr_none")),
                                 2.0, " points"),
            ),
        ),
    ),
    parts=_parts_lr,
    collect=_collect_lr,
    setup=f"digits, MLP 64-128-128-128-10 with ReLU, batch 64, plain SGD for {STEPS_2} steps (about 5 "
    "epochs; the budget within which a rate must train — runs at small rates are not converged by design) "
    "at rates 0.03 ... 30 (in the full and the quick run), then BN at 5x and 30x the plain network's largest "
    "rate.",
)

# ------------------------------------------------------------------------------------------ 4
GOOD_4 = 85.0
STEPS_4 = 100
SCALES_4 = (0.01, 0.1, 1.0, 10.0)  # the same in the full and the quick run: the checks use all of them
COST_4 = Cost(0.6)


def _init_seed(ref: str, device: str, seed: int) -> dict:
    """One seed of claim 4: both arms at every initial weight scale."""
    data = D.resolve(ref, device)
    acc = {}
    for arm in ("none", "bn"):
        row = []
        for scale in SCALES_4:
            g = seed_everything(seed)
            model = scale_init(mlp(data.n_features, data.n_classes, width=128, depth=3, norm=arm), scale)
            h = train_classifier(model.to(device), data, steps=STEPS_4, batch_size=64, lr=0.05,
                                 optimizer="momentum", generator=g)
            row.append(0.0 if h.diverged else h.final_acc)
        acc[arm] = row
    return acc


def _parts_init(ctx: Context) -> list[Part]:
    return [Part("seed", _init_seed, (ctx.data_ref("digits"), ctx.device), cost=COST_4)]


def _collect_init(ctx: Context, res: dict) -> Outcome:
    steps, scales, arms = STEPS_4, list(SCALES_4), ("none", "bn")
    acc = {a: [r[a] for r in res["seed"]] for a in arms}
    m: dict = {"scales": scales, "steps": steps, "good_acc": GOOD_4}
    for arm in arms:
        m[f"acc_{arm}"] = acc[arm]  # seeds × scales
        m[f"acc_{arm}_by_scale_mean"] = np.mean(acc[arm], axis=0).tolist()
        record(m, f"range_{arm}", [max(row) - min(row) for row in acc[arm]])  # per seed, over scales

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


def _bn_good_everywhere(m) -> Result:
    """At every scale, BN's accuracy is at least GOOD_4 (one-sided bound over seeds)."""
    rows = need(m, "acc_bn")
    results = [at_least([row[i] for row in rows], GOOD_4, "%") for i in range(len(m["scales"]))]
    return _all_of([(f"x{s:g}", r) for s, r in zip(m["scales"], results, strict=True)])


def _all_of(named: list[tuple[str, Result]]) -> Result:
    """Several sub-tests that must all pass: fail if one fails, inconclusive if one is."""
    detail = "; ".join(f"{n}: {r.status} ({r.detail})" for n, r in named)
    states = {r.status for _, r in named}
    n = min((r.n for _, r in named if r.n is not None), default=None)
    if FAIL in states:
        return Result(FAIL, detail, n)
    if states == {PASS}:
        return Result(PASS, detail, n)
    return Result(UNDECIDED if UNDECIDED in states else SKIPPED, detail, n)


INIT = Claim(
    id=4,
    title="Less sensitivity to initialization",
    claim="With Batch Normalization, training no longer depends much on the scale of the initial weights.",
    anchor="Ioffe & Szegedy 2015, §3.3: BN makes a layer's output invariant to the scale of its weights, "
    "BN(aWu) = BN(Wu), so training is more resilient to the parameter scale.",
    criterion=Criterion(
        f"Over initial weight scales x0.01 ... x10, the BN network's test accuracy is at least {GOOD_4:.0f}% "
        "at every scale (lower bound over seeds), and its range over scales (max − min, per seed) is at most "
        "half the plain network's (paired over seeds).",
        (
            Check(f"BN >= {GOOD_4:.0f}% at every scale", _bn_good_everywhere),
            Check(
                "BN's range over scales <= half the plain network's",
                lambda m: at_least(paired([0.5 * r for r in need(m, "range_none")], need(m, "range_bn")), 0.0,
                                   " points"),
            ),
        ),
    ),
    parts=_parts_init,
    collect=_collect_init,
    setup=f"digits, MLP 64-128-128-128-10 with ReLU, every Linear weight multiplied by the scale after "
    f"PyTorch's default init, SGD with momentum 0.9 at 0.05, batch 64, {STEPS_4} steps (about 5 epochs), "
    "scales x0.01, x0.1, x1, x10 in the full and the quick run.",
)

# ------------------------------------------------------------------------------------------ 5
YANG_GROWTH = 1.2  # minimum per-layer growth of the squared gradient norm we count as "exploding"
STEPS_5 = 100
DEPTHS_5 = ([2, 4, 8, 16], [2, 16])  # (full, quick): the deepest, which the checks use, in both
INIT_DEPTH_5 = 32
COST_5 = (Cost(0.9), Cost(0.6))  # (full, quick)


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


def _depth_seed(ref: str, device: str, depths: tuple, seed: int) -> dict:
    """One seed of claim 5: both arms trained at every depth, and the gradient growth at initialization."""
    data = D.resolve(ref, device)
    out: dict = {}
    for arm in ("none", "bn"):
        row = []
        for depth in depths:
            g = seed_everything(seed)
            model = mlp(data.n_features, data.n_classes, width=64, depth=depth, norm=arm).to(device)
            h = train_classifier(model, data, steps=STEPS_5, batch_size=64, lr=0.02, optimizer="momentum",
                                 generator=g)
            row.append(0.0 if h.diverged else h.final_acc)
        g = seed_everything(seed)
        model = mlp(data.n_features, data.n_classes, width=64, depth=INIT_DEPTH_5, norm=arm).to(device)
        idx = next(batches(len(data.xtr), 64, 1, g))
        lam, sq = _grad_growth(model, data.xtr[idx], data.ytr[idx])
        out[arm] = {"acc": row, "growth": lam, "grad_sq": sq}
    return out


def _parts_depth(ctx: Context) -> list[Part]:
    depths = tuple(ctx.pick(*DEPTHS_5))
    return [Part("seed", _depth_seed, (ctx.data_ref("digits"), ctx.device, depths),
                 cost=ctx.pick(*COST_5))]


def _collect_depth(ctx: Context, res: dict) -> Outcome:
    steps, depths, init_depth, arms = STEPS_5, list(ctx.pick(*DEPTHS_5)), INIT_DEPTH_5, ("none", "bn")
    acc = {a: [r[a]["acc"] for r in res["seed"]] for a in arms}
    growth = {a: [r[a]["growth"] for r in res["seed"]] for a in arms}
    grads = {a: [r[a]["grad_sq"] for r in res["seed"]] for a in arms}
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
        "At the deepest trained depth the BN network reaches at least 80% test accuracy and at least 10 "
        "points more than the plain network (paired); and at initialization the squared gradient norm of "
        f"the BN network grows by at least {YANG_GROWTH} per layer towards the input (bounds over seeds).",
        (
            Check("BN >= 80% at the deepest depth", lambda m: at_least(need(m, "acc_deepest_bn"), 80.0, "%")),
            Check(
                "BN >= plain + 10 points at the deepest depth",
                lambda m: at_least(paired(need(m, "acc_deepest_bn"), need(m, "acc_deepest_none")), 10.0,
                                   " points"),
            ),
            Check(
                f"BN gradient growth per layer at init >= {YANG_GROWTH} (Yang)",
                lambda m: at_least(need(m, "grad_growth_per_layer_bn"), YANG_GROWTH),
            ),
        ),
    ),
    parts=_parts_depth,
    collect=_collect_depth,
    setup=f"digits, ReLU MLPs of width 64 and 2, 4, 8, 16 hidden layers (2 and 16 with --quick), no skip "
    f"connections, SGD with momentum 0.9 at 0.02, batch 64, {STEPS_5} steps (about 5 epochs). Gradient "
    f"growth: one batch of 64 through an untrained {INIT_DEPTH_5}-layer network, log-linear fit of "
    "‖∂L/∂W_l‖² over l.",
)

# ------------------------------------------------------------------------------------------ 10
MARGIN_10 = 0.5


def _parts_placement(ctx: Context) -> list[Part]:
    return [small_batch_part(ctx, k, "bn", NORMAL_BATCH, placement=p) for k in SETTINGS for p in ("before", "after")]


def _collect_placement(ctx: Context, res: dict) -> Outcome:
    err = {(k, p): [r["err"] for r in res[part_name(k, "bn", NORMAL_BATCH, p)]]
           for k in SETTINGS for p in ("before", "after")}
    m: dict = {"batch": NORMAL_BATCH}
    for (k, p), v in err.items():
        record(m, f"acc_{k}_{p}", [100.0 - e for e in v])

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
        plots.finish(ax, "BN before vs after the ReLU, digits, each run converged")

    return Outcome(m, plot)


def _before_better(setting: str):
    return lambda m: at_least(
        paired(need(m, f"acc_{setting}_before"), need(m, f"acc_{setting}_after")), MARGIN_10, " points"
    )


PLACEMENT = Claim(
    id=10,
    title="Placement",
    claim="Batch Normalization belongs before the nonlinearity, as the paper places it, rather than after.",
    anchor="Ioffe & Szegedy 2015, §3.2: BN is applied to x = Wu + b immediately before the nonlinearity, "
    "since Wu + b is 'more likely to have a symmetric, non-sparse distribution'.",
    criterion=Criterion(
        f"BN before the ReLU gives at least {MARGIN_10} points more test accuracy than BN after it (paired "
        "over seeds), for an MLP and for a CNN.",
        (
            Check(f"MLP: before >= after + {MARGIN_10}", _before_better("mlp"),
                  needs=(part_name("mlp", "bn", NORMAL_BATCH), part_name("mlp", "bn", NORMAL_BATCH, "after"))),
            Check(f"CNN: before >= after + {MARGIN_10}", _before_better("cnn"),
                  needs=(part_name("cnn", "bn", NORMAL_BATCH), part_name("cnn", "bn", NORMAL_BATCH, "after"))),
        ),
    ),
    parts=_parts_placement,
    collect=_collect_placement,
    setup=f"Claim 7's protocol and models (the 'before' runs are shared with it): digits, MLP 64-128-128-10 "
    f"and the 2-conv CNN, BN before or after each ReLU, batch {NORMAL_BATCH}, SGD with momentum 0.9 at 0.1, "
    "each run trained until its test accuracy plateaus; accuracy = the plateau's mean.",
)

CLAIMS = (FASTER, LEARNING_RATES, INIT, DEPTH, PLACEMENT)
