"""Claims about the batch: regularization (3), batch-size dependence (7), running statistics at
inference (8) and the variants of the family (11)."""

from __future__ import annotations

import copy

import torch

import normkit

from .. import plots
from ..context import Context, record
from ..data import ImageData
from ..framework import Check, Claim, Criterion, Outcome, need
from ..models import available, cnn, missing_note, mlp
from ..train import accuracy, seed_everything, train_classifier
from .common import better_by, mean_of

# ------------------------------------------------------------------------------------------ 3
MARGIN_3 = 0.5  # points of train-test gap
ARMS_3 = (("none", 128), ("bn", 128), ("bn", 16), ("gbn", 128))
VIRTUAL_3 = 16


def _arm_name(norm: str, batch: int) -> str:
    return f"{norm}_b{batch}"


def _run_regularization(ctx: Context) -> Outcome:
    data = ctx.images("mnist")
    data = data.subset(min(1000, len(data.xtr)))
    epochs = ctx.pick(10, 3)
    notes, arms = [], []
    for norm, batch in ARMS_3:
        if available(norm):
            arms.append((norm, batch))
        else:
            notes.append(missing_note(norm))
    res = {a: {"train": [], "test": []} for a in arms}
    with ctx.bar(len(arms) * len(ctx.seeds), "3 regularization") as bar:
        for seed in ctx.seeds:
            for norm, batch in arms:
                g = seed_everything(seed)
                model = mlp(
                    data.n_features, data.n_classes, width=256, depth=2, norm=norm, virtual_batch=VIRTUAL_3
                ).to(ctx.device)
                steps = epochs * (len(data.xtr) // batch)
                h = train_classifier(
                    model, data, steps=steps, batch_size=batch, lr=1e-3, optimizer="adam", generator=g
                )
                res[(norm, batch)]["train"].append(accuracy(model, data.xtr, data.ytr))
                res[(norm, batch)]["test"].append(h.final_acc)
                bar.update()
    m: dict = {"epochs": epochs, "n_train": len(data.xtr), "virtual_batch": VIRTUAL_3}
    for norm, batch in ARMS_3:
        name = _arm_name(norm, batch)
        if (norm, batch) not in res:
            m[f"gap_{name}"] = None
            continue
        r = res[(norm, batch)]
        record(m, f"train_acc_{name}", r["train"])
        record(m, f"test_acc_{name}", r["test"])
        record(m, f"gap_{name}", [a - b for a, b in zip(r["train"], r["test"], strict=False)])

    def plot(fig, m):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        shown = [(n, b) for n, b in ARMS_3 if m.get(f"gap_{_arm_name(n, b)}") is not None]
        names = [f"{plots.label(n)}\nbatch {b}" + (f"/{VIRTUAL_3}" if n == "gbn" else "") for n, b in shown]
        for ax, key, title in (
            (ax1, "gap", "train − test accuracy (points)"),
            (ax2, "test_acc", "test accuracy (%)"),
        ):
            for i, (n, b) in enumerate(shown):
                v = m[f"{key}_{_arm_name(n, b)}"]
                ax.bar(i, sum(v) / len(v), color=plots.color(n))
                ax.plot([i] * len(v), v, ".", color="black")
            ax.set_xticks(range(len(shown)))
            ax.set_xticklabels(names, fontsize=7)
            plots.finish(ax, title, legend=False)
        lo = min(min(m[f"test_acc_{_arm_name(n, b)}"]) for n, b in shown)
        ax2.set_ylim(max(0, lo - 5), 100)

    return Outcome(m, plot, notes)


def _gap_smaller(a: str, b: str):
    return lambda m: better_by(m, f"gap_{b}", f"gap_{a}", MARGIN_3)


REGULARIZATION = Claim(
    id=3,
    title="Regularization",
    claim="Batch Normalization regularizes: the noise of mini-batch statistics narrows the train-test gap, "
    "more so with smaller batches — and ghost batches bring that back to large-batch training.",
    anchor="Ioffe & Szegedy 2015, §3.4 (BN regularizes; Dropout can be reduced); Hoffer et al. 2017, §4: "
    "Ghost BN (statistics over virtual batches of 128 inside batches of 4096) narrows the "
    "generalization gap of large-batch training.",
    criterion=Criterion(
        f"Mean train−test accuracy gap, smaller by at least {MARGIN_3} points: BN (batch 128) vs no norm "
        f"(batch 128); BN at batch 16 vs BN at batch 128; ghost BN (batch 128, virtual {VIRTUAL_3}) vs BN at "
        "batch 128.",
        (
            Check("BN@128 gap < no-norm@128 gap", _gap_smaller("bn_b128", "none_b128")),
            Check("BN@16 gap < BN@128 gap", _gap_smaller("bn_b16", "bn_b128")),
            Check(f"ghost BN@128/{VIRTUAL_3} gap < BN@128 gap", _gap_smaller("gbn_b128", "bn_b128")),
        ),
    ),
    run=_run_regularization,
    setup="1,000 MNIST-5000 training images (to make overfitting visible), 1,000 test images; MLP "
    "784-256-256-10 "
    "with ReLU, Adam at 1e-3 for 10 epochs (3 with --quick) at the arm's batch size; train accuracy in eval "
    "mode on the 1,000 training images.",
)

# ------------------------------------------------------------------------------------------ 7, 11
IMAGES_CNN = (2048, 192)  # training images each run sees (full, quick): the same at every batch size
LR_PER_32 = 0.1  # linear scaling rule (Goyal et al. 2017, as Wu & He train): lr = 0.1 · batch / 32


def cnn_error(ctx: Context, data: ImageData, norm: str, batch: int, seed: int) -> float:
    """Test error (%) of the digits CNN with ``norm`` trained at ``batch`` (claims 7 and 11 share runs)."""
    images = ctx.pick(*IMAGES_CNN)
    steps = max(1, images // batch)

    def compute() -> float:
        g = seed_everything(seed)
        model = cnn(data.shape[0], data.n_classes, width=16, norm=norm, steps=steps).to(ctx.device)
        h = train_classifier(
            model,
            data,
            steps=steps,
            batch_size=batch,
            lr=LR_PER_32 * batch / 32,
            optimizer="momentum",
            generator=g,
        )
        return 100.0 - (0.0 if h.diverged else h.final_acc)

    return ctx.memo(("cnn", data.name, norm, batch, seed, images), compute)


def _run_batch_size(ctx: Context) -> Outcome:
    data = ctx.images("digits")
    sizes = ctx.pick([2, 4, 8, 16, 32, 64], [2, 32])
    notes, norms = [], []
    for norm in ("bn", "gn", "ln", "brn"):
        (norms.append(norm) if available(norm) else notes.append(missing_note(norm)))
    err = {n: [[] for _ in sizes] for n in norms}
    with ctx.bar(len(norms) * len(sizes) * len(ctx.seeds), "7 batch size") as bar:
        for seed in ctx.seeds:
            for norm in norms:
                for i, b in enumerate(sizes):
                    err[norm][i].append(cnn_error(ctx, data, norm, b, seed))
                    bar.update()
    m: dict = {"batch_sizes": sizes, "images_per_run": ctx.pick(*IMAGES_CNN)}
    for norm in ("bn", "gn", "ln", "brn"):
        if norm in err:
            m[f"err_{norm}"] = [list(v) for v in err[norm]]  # batch sizes × seeds
            m[f"err_{norm}_mean"] = [sum(v) / len(v) for v in err[norm]]
            m[f"err_{norm}_b2"] = err[norm][sizes.index(2)]
            m[f"err_{norm}_b32"] = err[norm][sizes.index(32)]
        else:
            m[f"err_{norm}_b2"] = None
    m["bn_minus_gn_mean"] = [b - g for b, g in zip(m["err_bn_mean"], m["err_gn_mean"], strict=False)]

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        for norm in ("bn", "gn", "ln", "brn"):
            if f"err_{norm}" in m:
                plots.band(
                    ax, m["batch_sizes"], [list(r) for r in zip(*m[f"err_{norm}"], strict=False)], norm
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(m["batch_sizes"])
        ax.set_xticklabels([str(b) for b in m["batch_sizes"]])
        plots.finish(
            ax,
            f"CNN on digits, {m['images_per_run']} training images at every batch size",
            "batch size",
            "test error (%)",
        )

    return Outcome(m, plot, notes)


BATCH_SIZE = Claim(
    id=7,
    title="Batch-size dependence",
    claim="Batch Normalization degrades at small batches, where Group Normalization does not; Batch "
    "Renormalization recovers part of the loss.",
    anchor="Wu & He 2018, Table 3 / Fig. 1 (ResNet-50, ImageNet): BN error 23.6% at batch 32 but 34.7% at "
    "batch 2, GN 24.1% and 24.8%; Ioffe 2017, §4.3: with micro-batches of 4, batch renorm 76.5% vs BN "
    "74.2% accuracy (78.3% at batch 32).",
    criterion=Criterion(
        "At batch 2, BN's mean test error is at least 5 points above GN's; at batch 32 BN's error is at "
        "most 2 "
        "points above GN's; at batch 2, batch renorm's error is at least 2 points below BN's.",
        (
            Check("batch 2: BN error >= GN error + 5", lambda m: better_by(m, "err_bn_b2", "err_gn_b2", 5.0)),
            Check(
                "batch 32: BN error <= GN error + 2",
                lambda m: mean_of(m, "err_bn_b32") <= mean_of(m, "err_gn_b32") + 2.0,
            ),
            Check(
                "batch 2: batch renorm error <= BN error − 2",
                lambda m: better_by(m, "err_bn_b2", "err_brn_b2", 2.0),
            ),
        ),
    ),
    run=_run_batch_size,
    setup="digits, CNN conv(16)-norm-ReLU-conv(32, stride 2)-norm-ReLU-pool-linear, SGD with momentum "
    "0.9 and the linear scaling rule lr = 0.1·batch/32, every run seeing the same 2,048 training images (192 "
    "with --quick) at batch sizes 2 ... 64 (2 and 32 with --quick), as Wu & He keep the epochs fixed — so "
    "large batches get few steps (8 at batch 64). GN: 4 groups; LN: over (C, H, W); batch renorm: r_max 3, "
    "d_max 5 after a warm-up of a quarter of the steps, momentum 0.1.",
)

NORMS_11 = ("none", "bn", "gn", "ln", "in")


def _equivalence() -> dict:
    """Max |difference| of GN(1 group) vs LayerNorm over (C, H, W), and GN(C groups) vs InstanceNorm."""
    g = torch.Generator().manual_seed(0)
    x = 3 + 0.5 * torch.randn(5, 6, 5, 7, generator=g)
    gn1 = normkit.GroupNorm(1, 6, affine=False)(x)
    ln = normkit.LayerNorm((6, 5, 7), elementwise_affine=False)(x)
    gnc = normkit.GroupNorm(6, 6, affine=False)(x)
    inn = normkit.InstanceNorm2d(6, affine=False)(x)
    return {
        "max_abs_diff_gn1_vs_ln": float((gn1 - ln).abs().max()),
        "max_abs_diff_gnC_vs_in": float((gnc - inn).abs().max()),
    }


def _run_variants(ctx: Context) -> Outcome:
    data = ctx.images("digits")
    sizes = (32, 2)
    err = {n: {b: [] for b in sizes} for n in NORMS_11}
    with ctx.bar(len(NORMS_11) * len(sizes) * len(ctx.seeds), "11 variants") as bar:
        for seed in ctx.seeds:
            for norm in NORMS_11:
                for b in sizes:
                    err[norm][b].append(cnn_error(ctx, data, norm, b, seed))
                    bar.update()
    m: dict = {"images_per_run": ctx.pick(*IMAGES_CNN), "tolerance": 1e-5, **_equivalence()}
    for norm in NORMS_11:
        for b in sizes:
            record(m, f"err_{norm}_b{b}", err[norm][b])

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        plots.bars(
            ax,
            ["batch 32", "batch 2"],
            list(NORMS_11),
            {n: [m[f"err_{n}_b32"], m[f"err_{n}_b2"]] for n in NORMS_11},
            "test error (%)",
        )
        plots.finish(ax, "CNN on digits (Wu & He 2018: BN 23.6, GN 24.1, LN 25.3, IN 28.4 % at batch 32)")

    return Outcome(m, plot)


def _lowest(m, norm: str, batch: int, among=("bn", "gn", "ln", "in"), tol: float = 0.5) -> bool:
    mine = mean_of(m, f"err_{norm}_b{batch}")
    return all(mine <= mean_of(m, f"err_{o}_b{batch}") + tol for o in among)


def _highest(m, norm: str, batch: int, among=("bn", "gn", "ln", "in"), tol: float = 0.5) -> bool:
    mine = mean_of(m, f"err_{norm}_b{batch}")
    return all(mine >= mean_of(m, f"err_{o}_b{batch}") - tol for o in among)


VARIANTS = Claim(
    id=11,
    title="The variants",
    claim="Among the normalizations, BN is best at a normal batch size and InstanceNorm worst; at batch 2 "
    "GroupNorm beats BN. GroupNorm with one group is LayerNorm over (C, H, W), with C groups InstanceNorm.",
    anchor="Wu & He 2018, Fig. 1 / Table 1: ImageNet error at batch 32 — BN 23.6, GN 24.1, LN 25.3, IN 28.4 "
    "%; "
    "§3.1: GN with G = 1 is LN and with G = C is IN.",
    criterion=Criterion(
        "At batch 32 BN's mean test error is the lowest of BN/GN/LN/IN and IN's the highest (0.5-point "
        "tolerance); at batch 2 GN's error is lower than BN's; GN(1) == LN and GN(C) == IN within 1e-5 on "
        "3 + 0.5·randn input of shape (5, 6, 5, 7).",
        (
            Check("batch 32: BN lowest error", lambda m: _lowest(m, "bn", 32)),
            Check("batch 32: IN highest error", lambda m: _highest(m, "in", 32)),
            Check("batch 2: GN error < BN error", lambda m: better_by(m, "err_bn_b2", "err_gn_b2", 1e-9)),
            Check("GN(1 group) == LayerNorm(C, H, W)", lambda m: need(m, "max_abs_diff_gn1_vs_ln") <= 1e-5),
            Check("GN(C groups) == InstanceNorm", lambda m: need(m, "max_abs_diff_gnC_vs_in") <= 1e-5),
        ),
    ),
    run=_run_variants,
    setup="The CNN and training of claim 7 (runs shared with it), with no norm, BN, GN (4 groups), LN over "
    "(C, H, W) and IN (affine) at batch 32 and 2.",
)

# ------------------------------------------------------------------------------------------ 8
MARGIN_8 = 0.5


@torch.no_grad()
def accuracy_batch_stats(model, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> float:
    """Test accuracy (%) when BN normalizes each test batch of ``batch`` images with its own statistics."""
    probe = copy.deepcopy(model).train()  # a copy: its running statistics may move, the model's do not
    batch = max(2, min(batch, len(x)))  # a small user test set: one batch of all of it
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    correct = 0
    for i in range(0, len(x) - batch + 1, batch):
        idx = order[i : i + batch]
        correct += (probe(x[idx]).argmax(1) == y[idx]).sum().item()
    return 100.0 * correct / (len(x) - len(x) % batch)


def _run_inference(ctx: Context) -> Outcome:
    data = ctx.images("digits")
    plans = {"b64": (64, ctx.pick(150, 50)), "b4": (4, ctx.pick(300, 100))}
    can_recal = hasattr(normkit, "recalibrate")
    notes = (
        []
        if can_recal
        else ["arm 'recalibrated' skipped: normkit.recalibrate is not available in this build of normkit"]
    )
    res: dict[str, list] = {}
    with ctx.bar(len(plans) * len(ctx.seeds), "8 running statistics") as bar:
        for seed in ctx.seeds:
            for name, (batch, steps) in plans.items():
                g = seed_everything(seed)
                model = mlp(data.n_features, data.n_classes, width=128, depth=3, norm="bn").to(ctx.device)
                h = train_classifier(
                    model,
                    data,
                    steps=steps,
                    batch_size=batch,
                    lr=0.05 if batch > 4 else 0.01,
                    optimizer="momentum",
                    generator=g,
                )
                res.setdefault(f"running_{name}", []).append(h.final_acc)
                res.setdefault(f"batchstats64_{name}", []).append(
                    accuracy_batch_stats(model, data.xte, data.yte, 64, seed)
                )
                res.setdefault(f"batchstats2_{name}", []).append(
                    accuracy_batch_stats(model, data.xte, data.yte, 2, seed)
                )
                if can_recal:
                    train_batches = [data.xtr[i : i + 64] for i in range(0, len(data.xtr), 64)]
                    normkit.recalibrate(model, train_batches)
                    res.setdefault(f"recalibrated_{name}", []).append(accuracy(model, data.xte, data.yte))
                bar.update()
    m: dict = {f"steps_{k}": v[1] for k, v in plans.items()}
    for key, v in res.items():
        record(m, f"acc_{key}", v)
    for name in plans:
        m.setdefault(f"acc_recalibrated_{name}", None)

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        modes = ["running", "batchstats64", "batchstats2", "recalibrated"]
        shown = [k for k in modes if m.get(f"acc_{k}_b64") is not None]
        groups = ["trained at batch 64", "trained at batch 4"]
        vals = {k: [m[f"acc_{k}_b64"], m[f"acc_{k}_b4"]] for k in shown}
        names = {
            "running": ("running stats", "#1f77b4"),
            "batchstats64": ("test-batch stats (64)", "#ff7f0e"),
            "batchstats2": ("test-batch stats (2)", "#d62728"),
            "recalibrated": ("recalibrated (exact)", "#2ca02c"),
        }
        plots.bars(ax, groups, shown, vals, "test accuracy (%)", names)
        lo = min(min(min(v) for v in vals[k]) for k in shown)
        ax.set_ylim(max(0, lo - 5), 100)
        plots.finish(ax, "BN MLP on digits: which statistics at inference")

    return Outcome(m, plot, notes)


INFERENCE = Claim(
    id=8,
    title="Running statistics at inference",
    claim="At inference BN should use population (running) statistics: they match batch statistics at a "
    "normal batch size, make the output independent of the test batch, and after small-batch training "
    "an exact recalibration of them helps.",
    anchor="Ioffe & Szegedy 2015, §3.1 and Alg. 2: inference uses E[x] and m/(m−1)·E[σ²_B] over training "
    "mini-batches; Ioffe 2017, §1: small mini-batches make these estimates and the trained model disagree.",
    criterion=Criterion(
        "After training at batch 64, running statistics give at most 1 point less mean test accuracy than "
        "test-batch statistics (batches of 64); test-batch statistics at batch 2 lose at least 2 points "
        "against "
        f"running statistics; after training at batch 4, recalibrated statistics gain at least {MARGIN_8} "
        "points "
        "over the running ones.",
        (
            Check(
                "batch-64 model: running >= test-batch(64) − 1",
                lambda m: mean_of(m, "acc_running_b64") >= mean_of(m, "acc_batchstats64_b64") - 1.0,
            ),
            Check(
                "test-batch statistics at batch 2 lose >= 2 points",
                lambda m: better_by(m, "acc_running_b64", "acc_batchstats2_b64", 2.0),
            ),
            Check(
                f"batch-4 model: recalibrated >= running + {MARGIN_8}",
                lambda m: better_by(m, "acc_recalibrated_b4", "acc_running_b4", MARGIN_8),
            ),
        ),
    ),
    run=_run_inference,
    setup="digits, BN MLP 64-128-128-128-10 with ReLU, SGD with momentum 0.9: at batch 64 for 150 steps (lr "
    "0.05) and at batch 4 for 300 steps (lr 0.01) (50 and 100 with --quick); BN momentum 0.1. Evaluated "
    "with the "
    "running statistics, with each test batch's own statistics (batches of 64 and of 2), and after "
    "normkit.recalibrate over the training set in batches of 64.",
)

CLAIMS = (REGULARIZATION, BATCH_SIZE, INFERENCE, VARIANTS)
