"""Claims about the batch: regularization (3), batch-size dependence and its mechanism (7), running
statistics at inference (8) and the variants of the family (11).

Claims 7, 8, 10 and 11 share one training protocol (:func:`train_small_batch`): digits, SGD with
momentum 0.9 and the linear scaling rule, every run trained until its test accuracy plateaus —
so arms of different batch sizes are compared converged, not after a fixed budget that would
starve the large batches of steps (or the small ones of data).
"""

from __future__ import annotations

import copy

import torch

import normkit

from .. import data as D
from .. import plots
from ..context import Context, record
from ..costs import Cost
from ..data import ImageData
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
    interval,
    need,
    paired,
)
from ..models import available, cnn, missing_note, mlp
from ..train import Plateau, accuracy, seed_everything, train_classifier, train_to_plateau

# ------------------------------------------------------------------------------------------ 3
MARGIN_3 = 0.5  # points of train-test gap
ARMS_3 = (("none", 128), ("bn", 128), ("bn", 16), ("gbn", 128))
VIRTUAL_3 = 16
EPOCHS_3 = 8


def _arm_name(norm: str, batch: int) -> str:
    return f"{norm}_b{batch}"


N_TRAIN_3 = 1000
COST_3 = {("none", 128): Cost(0.22), ("bn", 128): Cost(0.25), ("bn", 16): Cost(0.95), ("gbn", 128): Cost(0.3)}


def _regularization_arm(ref: str, device: str, norm: str, batch: int, seed: int) -> dict:
    """One seed of one arm of claim 3: train and test accuracy, and the last epoch's training loss."""
    data = D.resolve(ref, device)
    data = data.subset(min(N_TRAIN_3, len(data.xtr)))
    g = seed_everything(seed)
    model = mlp(data.n_features, data.n_classes, width=256, depth=2, norm=norm, virtual_batch=VIRTUAL_3).to(device)
    steps = EPOCHS_3 * (len(data.xtr) // batch)
    h = train_classifier(model, data, steps=steps, batch_size=batch, lr=1e-3, optimizer="adam", generator=g)
    tail = h.losses[-max(1, len(data.xtr) // batch) :]  # the last epoch's training loss
    return {"train": accuracy(model, data.xtr, data.ytr), "test": h.final_acc, "loss": sum(tail) / len(tail)}


def _parts_regularization(ctx: Context) -> list[Part]:
    ref = ctx.data_ref("mnist")
    return [Part(_arm_name(norm, batch), _regularization_arm, (ref, ctx.device, norm, batch),
                 cost=COST_3[(norm, batch)]) for norm, batch in ARMS_3 if available(norm)]


def _collect_regularization(ctx: Context, res: dict) -> Outcome:
    notes = [missing_note(norm) for norm, _ in ARMS_3 if not available(norm)]
    n_train = min(N_TRAIN_3, len(ctx.images("mnist").xtr))
    res = {(norm, batch): {k: [r[k] for r in res[_arm_name(norm, batch)]] for k in ("train", "test", "loss")}
           for norm, batch in ARMS_3 if _arm_name(norm, batch) in res}
    m: dict = {"epochs": EPOCHS_3, "n_train": n_train, "virtual_batch": VIRTUAL_3}
    for norm, batch in ARMS_3:
        name = _arm_name(norm, batch)
        if (norm, batch) not in res:
            m[f"gap_{name}"] = None
            continue
        r = res[(norm, batch)]
        record(m, f"train_acc_{name}", r["train"])
        record(m, f"test_acc_{name}", r["test"])
        record(m, f"last_epoch_loss_{name}", r["loss"])
        record(m, f"gap_{name}", [a - b for a, b in zip(r["train"], r["test"], strict=True)])

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
    def test(m):
        return at_least(paired(need(m, f"gap_{b}"), need(m, f"gap_{a}")), MARGIN_3, " points")

    return test


REGULARIZATION = Claim(
    id=3,
    title="Regularization",
    claim="Batch Normalization regularizes: the noise of mini-batch statistics narrows the train-test gap, "
    "more so with smaller batches — and ghost batches bring that back to large-batch training.",
    anchor="Ioffe & Szegedy 2015, §3.4 (BN regularizes; Dropout can be reduced); Hoffer et al. 2017, §4: "
    "Ghost BN (statistics over virtual batches of 128 inside batches of 4096) narrows the "
    "generalization gap of large-batch training.",
    criterion=Criterion(
        f"Train−test accuracy gap smaller by at least {MARGIN_3} points (paired over seeds): BN (batch 128) "
        f"vs no norm (batch 128); BN at batch 16 vs BN at batch 128; ghost BN (batch 128, virtual "
        f"{VIRTUAL_3}) vs BN at batch 128.",
        (
            Check("BN@128 gap < no-norm@128 gap", _gap_smaller("bn_b128", "none_b128"),
                  needs=("bn_b128", "none_b128")),
            Check("BN@16 gap < BN@128 gap", _gap_smaller("bn_b16", "bn_b128"), needs=("bn_b16", "bn_b128")),
            Check(f"ghost BN@128/{VIRTUAL_3} gap < BN@128 gap", _gap_smaller("gbn_b128", "bn_b128"),
                  needs=("gbn_b128", "bn_b128")),
        ),
    ),
    parts=_parts_regularization,
    collect=_collect_regularization,
    setup=f"1,000 MNIST-5000 training images (to make overfitting visible), 1,000 test images; MLP "
    f"784-256-256-10 with ReLU, Adam at 1e-3 for {EPOCHS_3} epochs at the arm's batch size, in the full and "
    "the quick run (every arm fits its training set: the last epoch's training loss is in the numbers); "
    "train accuracy in eval mode on the 1,000 training images.",
)

# ------------------------------------------------------------------------------------------ 7, 8, 10, 11
LR_PER_32 = 0.1  # linear scaling rule (Goyal et al. 2017, as Wu & He train): lr = 0.1 · batch / 32
PLATEAU = Plateau(every=0.25, patience=4, min_delta=0.5, min_epochs=2.0, max_epochs=40.0)
NORMAL_BATCH = 32
SETTINGS = {
    "mlp": "MLP 64-128-128-10 (BatchNorm1d: a statistic sees the batch's values of one feature)",
    "cnn": "CNN conv(16)-norm-ReLU-conv(32, stride 2)-norm-ReLU-pool-linear (BatchNorm2d: a statistic "
    "sees batch·H·W values, 8·8 and 4·4 positions)",
}


def values_per_statistic(setting: str, batch: int) -> int:
    """How many values one BN statistic (one channel's mean) sees in the setting's smallest layer."""
    return batch if setting == "mlp" else batch * 4 * 4


def _build(setting: str, data: ImageData, norm: str, placement: str = "before"):
    if setting == "mlp":
        return mlp(data.n_features, data.n_classes, width=128, depth=2, norm=norm, placement=placement,
                   steps=1000)
    return cnn(data.shape[0], data.n_classes, width=16, norm=norm, placement=placement, steps=1000)


@torch.no_grad()
def accuracy_batch_stats(model, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> float:
    """Test accuracy (%) when BN normalizes each test batch of ``batch`` images with its own statistics
    (training mode on a copy: the model's running statistics do not move)."""
    probe = copy.deepcopy(model).train()
    batch = max(2, min(batch, len(x)))  # a small user test set: one batch of all of it
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    correct = 0
    for i in range(0, len(x) - batch + 1, batch):
        idx = order[i : i + batch]
        correct += (probe(x[idx]).argmax(1) == y[idx]).sum().item()
    return 100.0 * correct / (len(x) - len(x) % batch)


def train_small_batch(ref: str, device: str, setting: str, norm: str, batch: int, placement: str,
                      seed: int) -> dict:
    """One converged run of the shared protocol (a pure function of its arguments: it may run in a
    worker process and give the same numbers).

    Returns the plateau test error (mean of the last ``PLATEAU.patience`` evaluations), whether the
    plateau rule stopped it, the epochs and steps, the curve, and for BN: the test accuracy of the final
    weights with running, recalibrated (``normkit.recalibrate`` over the training set) and test-batch
    statistics.
    """
    data = D.resolve(ref, device)
    g = seed_everything(seed)
    model = _build(setting, data, norm, placement)
    for m in model.modules():
        if hasattr(m, "warmup_steps"):  # batch renorm: r_max 1 -> 3, d_max 0 -> 5 over half the first epoch
            m.warmup_steps = max(1, len(data.xtr) // (2 * batch))
    model = model.to(device)
    h = train_to_plateau(
        model, data, batch_size=batch, lr=LR_PER_32 * batch / 32, optimizer="momentum", generator=g,
        plateau=PLATEAU,
    )
    out = {
        "err": 100.0 - h.plateau_acc(PLATEAU.patience),
        "converged": h.converged,
        "diverged": h.diverged,
        "epochs": h.epochs,
        "steps": len(h.losses),
        "evals": len(h.test_acc),
        "curve_epochs": [s / h.steps_per_epoch for s in h.steps],
        "curve_err": [100.0 - a for a in h.test_acc],
    }
    if norm == "bn" and placement == "before" and not h.diverged:
        out["acc_running"] = accuracy(model, data.xte, data.yte)
        out["acc_batch_own"] = accuracy_batch_stats(model, data.xte, data.yte, batch, seed)
        out["acc_batch2"] = accuracy_batch_stats(model, data.xte, data.yte, 2, seed)
        if hasattr(normkit, "recalibrate"):
            normkit.recalibrate(model, [data.xtr[i : i + 256] for i in range(0, len(data.xtr), 256)],
                                progress=False)
            out["acc_recalibrated"] = accuracy(model, data.xte, data.yte)
    return out


# modeled seconds per training step, by setting and norm, and per test evaluation (every quarter epoch),
# by setting (see normkit.lab.costs); the prior estimate of a run assumes 3 epochs
STEP_COST = {"mlp": {"none": 4.0e-4, "bn": 4.6e-4, "gn": 4.3e-4, "ln": 4.2e-4, "brn": 1.06e-3},
             "cnn": {"none": 8.0e-4, "bn": 1.14e-3, "gn": 1.41e-3, "ln": 1.49e-3, "brn": 1.95e-3, "in": 9.0e-4}}
EVAL_COST = {"mlp": 3.5e-3, "cnn": 2.0e-2}
_PRIOR_EPOCHS = 3.0


def small_batch_cost(setting: str, norm: str, batch: int, n_train: int = 1347) -> Cost:
    per_step, per_eval = STEP_COST[setting].get(norm, STEP_COST[setting]["bn"]), EVAL_COST[setting]
    per_epoch = max(1, n_train // batch)
    steps = _PRIOR_EPOCHS * per_epoch
    evals = _PRIOR_EPOCHS / PLATEAU.every
    return Cost(per_step * steps + per_eval * evals, per_step=per_step, per_eval=per_eval)


def part_name(setting: str, norm: str, batch: int, placement: str = "before") -> str:
    """The name of a shared batch-size run inside a claim: ``mlp/bn/b2``, ``cnn/bn/b32/after``."""
    return f"{setting}/{norm}/b{batch}" + ("" if placement == "before" else f"/{placement}")


def small_batch_part(ctx: Context, setting: str, norm: str, batch: int, placement: str = "before",
                     display: bool = False) -> Part:
    """:func:`train_small_batch` as a claim's part: claims 7, 8, 10 and 11 share these runs (same key)."""
    ref = ctx.data_ref("digits")
    return Part(part_name(setting, norm, batch, placement), train_small_batch,
                (ref, ctx.device, setting, norm, batch, placement),
                key=("small_batch", ref, setting, norm, batch, placement),
                cost=small_batch_cost(setting, norm, batch, len(ctx.images("digits").xtr)), display=display)


NORMS_7 = ("bn", "gn", "ln", "brn")
SIZES_7 = ([2, 4, 8, 32], [2, 32])  # (full, quick): batch 2 and the normal batch in both
SMALL = 2


def _compare(diffs: list[float]) -> str:
    """'beats', 'loses' or 'no clear difference' from per-seed differences err(BN) − err(other)."""
    r = at_least(diffs, 0.0)
    if r.status == PASS:
        return "beats BN"
    if at_least([-d for d in diffs], 0.0).status == PASS:
        return "loses to BN"
    return "no clear difference from BN"


# the runs claim 7's checks read; every other (setting, norm, batch) is for the figure and the notes
CHECKED_7 = {("mlp", "bn", SMALL), ("mlp", "bn", NORMAL_BATCH), ("mlp", "gn", SMALL), ("mlp", "brn", SMALL),
             ("cnn", "bn", SMALL), ("cnn", "bn", NORMAL_BATCH), ("cnn", "gn", SMALL)}


def _parts_batch_size(ctx: Context) -> list[Part]:
    sizes = ctx.pick(*SIZES_7)
    return [small_batch_part(ctx, st, n, b, display=(st, n, b) not in CHECKED_7)
            for st in SETTINGS for n in NORMS_7 if available(n) for b in sizes]


def _collect_batch_size(ctx: Context, res: dict) -> Outcome:
    sizes = ctx.pick(*SIZES_7)
    notes, norms = [], []
    for norm in NORMS_7:
        (norms.append(norm) if available(norm) else notes.append(missing_note(norm)))
    m: dict = {"batch_sizes": sizes, "normal_batch": NORMAL_BATCH, "small_batch": SMALL}
    unconverged, n_runs = [], 0
    for setting in SETTINGS:
        m[f"values_per_statistic_{setting}"] = [values_per_statistic(setting, b) for b in sizes]
        for norm in NORMS_7:
            if norm not in norms:
                m[f"err_{setting}_{norm}_b{SMALL}"] = None
                continue
            for b in sizes:
                rs = res[part_name(setting, norm, b)]
                n_runs += len(rs)
                record(m, f"err_{setting}_{norm}_b{b}", [r["err"] for r in rs])
                m[f"epochs_{setting}_{norm}_b{b}"] = [round(r["epochs"], 2) for r in rs]
                unconverged += [f"{setting} {norm} batch {b} seed {s}" for s, r in enumerate(rs) if not r["converged"]]
            first = [res[part_name(setting, norm, b)][0] for b in sizes]
            m[f"curves_{setting}_{norm}"] = [[r["curve_epochs"], r["curve_err"]] for r in first]  # seed 0
        # the mechanism: BN's small-batch models evaluated with running, recalibrated and batch statistics
        for b in sizes:
            rs = res[part_name(setting, "bn", b)]
            if any("acc_running" not in r for r in rs):
                continue
            record(m, f"mech_{setting}_b{b}_err_running", [100 - r["acc_running"] for r in rs])
            record(m, f"mech_{setting}_b{b}_err_batch", [100 - r["acc_batch_own"] for r in rs])
            if all("acc_recalibrated" in r for r in rs):
                record(m, f"mech_{setting}_b{b}_err_recalibrated", [100 - r["acc_recalibrated"] for r in rs])
        ref = m[f"err_{setting}_bn_b{NORMAL_BATCH}"]
        run_b = m.get(f"mech_{setting}_b{SMALL}_err_running")
        bat_b = m.get(f"mech_{setting}_b{SMALL}_err_batch")
        if run_b and bat_b:
            loss = paired(run_b, ref)
            inconsistency = paired(run_b, bat_b)
            record(m, f"loss_{setting}_b{SMALL}", loss)
            record(m, f"inconsistency_{setting}_b{SMALL}", inconsistency)
            total_loss = sum(loss) / len(loss)
            share = sum(inconsistency) / len(inconsistency) / total_loss if total_loss > 1.0 else None
            m[f"inconsistency_share_{setting}_b{SMALL}"] = share
            rec = m.get(f"mech_{setting}_b{SMALL}_err_recalibrated_mean")
            if share is None:
                explained = "BN loses no more than a point here: nothing to explain."
            elif share <= 0:
                explained = ("The train/test inconsistency explains none of it: evaluated with batch statistics, "
                             "as it was trained, the network is worse still — the loss comes from training with "
                             "such statistics, not from the mismatch.")
            else:
                explained = f"The train/test inconsistency explains {100 * min(share, 1.0):.0f} % of it."
            per_stat = (f"{values_per_statistic(setting, SMALL)}" if setting == "mlp"
                        else f"{values_per_statistic(setting, SMALL)}–{4 * values_per_statistic(setting, SMALL)}")
            notes.append(
                f"{setting.upper()}, BN trained at batch {SMALL} ({per_stat} values per statistic): test error "
                f"{m[f'mech_{setting}_b{SMALL}_err_running_mean']:.1f} % with running "
                f"statistics, {'—' if rec is None else f'{rec:.1f} %'} recalibrated, "
                f"{m[f'mech_{setting}_b{SMALL}_err_batch_mean']:.1f} % with each test batch's statistics; "
                f"{m[f'err_{setting}_bn_b{NORMAL_BATCH}_mean']:.1f} % at batch {NORMAL_BATCH}; the loss with "
                f"running statistics is {total_loss:+.1f} points. {explained}"
            )
        for other in ("gn", "ln", "brn"):
            if other not in norms:
                continue
            for b in sizes:
                diffs = paired(m[f"err_{setting}_bn_b{b}"], m[f"err_{setting}_{other}_b{b}"])
                notes.append(
                    f"{setting.upper()}, batch {b}: {plots.label(other)} {_compare(diffs)} "
                    f"(error of BN − {plots.label(other)}: {interval(diffs).text(' points')})"
                )
    if unconverged:
        notes.append(f"not converged within {PLATEAU.max_epochs:g} epochs (reported at the cap): "
                     + ", ".join(unconverged))
    else:
        notes.append(f"every run converged (plateau rule), {n_runs} runs")

    def plot(fig, m):
        axes = [fig.add_subplot(2, 3, i) for i in range(1, 7)]
        for ax, setting in zip(axes[:2], SETTINGS, strict=True):
            for norm in NORMS_7:
                if m.get(f"err_{setting}_{norm}_b{SMALL}") is not None:
                    plots.band_lists(ax, m["batch_sizes"], [m[f"err_{setting}_{norm}_b{b}"] for b in m["batch_sizes"]],
                                     norm)
            ax.set_xscale("log", base=2)
            ax.set_xticks(m["batch_sizes"], [str(b) for b in m["batch_sizes"]])
            plots.finish(ax, f"{setting.upper()} on digits, each run converged", "batch size", "test error (%)")
        ax = axes[2]
        modes = [("running", "running stats"), ("recalibrated", "recalibrated"), ("batch", "test-batch stats")]
        groups = [s for s in SETTINGS if m.get(f"mech_{s}_b{SMALL}_err_running")]
        vals = {k: [m[f"mech_{s}_b{SMALL}_err_{k}"] for s in groups] for k, _ in modes
                if all(m.get(f"mech_{s}_b{SMALL}_err_{k}") for s in groups)}
        names = {k: (n, c) for (k, n), c in zip(modes, ("#1f77b4", "#2ca02c", "#d62728"), strict=True)}
        plots.bars(ax, [f"{s.upper()}" for s in groups], list(vals), vals, "test error (%)", names)
        for i, s in enumerate(groups):
            ax.plot([i - 0.4, i + 0.4], [m[f"err_{s}_bn_b{NORMAL_BATCH}_mean"]] * 2, color="black", ls="--", lw=1)
        plots.finish(ax, f"BN trained at batch {SMALL}, evaluated with...\n(dashed: BN at batch {NORMAL_BATCH})")
        # training curves (seed 0): test error over epochs at the smallest and the normal batch size
        for ax, (setting, b) in zip(axes[3:5], (("mlp", SMALL), ("cnn", SMALL)), strict=True):
            i = m["batch_sizes"].index(b)
            for norm in NORMS_7:
                if f"curves_{setting}_{norm}" in m:
                    ep, err = m[f"curves_{setting}_{norm}"][i]
                    ax.plot(ep, err, color=plots.color(norm), label=plots.label(norm), lw=1)
            ax.set_yscale("log")
            plots.finish(ax, f"{setting.upper()}, batch {b}: test error while training (seed 0)", "epoch",
                         "test error (%)")
        ax = axes[5]
        i = m["batch_sizes"].index(NORMAL_BATCH)
        for setting, ls in (("mlp", "-"), ("cnn", "--")):
            for norm in NORMS_7:
                if f"curves_{setting}_{norm}" in m:
                    ep, err = m[f"curves_{setting}_{norm}"][i]
                    ax.plot(ep, err, color=plots.color(norm), ls=ls, lw=1,
                            label=f"{setting.upper()} {plots.label(norm)}")
        ax.set_yscale("log")
        plots.finish(ax, f"batch {NORMAL_BATCH} (MLP solid, CNN dashed), seed 0", "epoch", "test error (%)")
        axes[5].legend(fontsize=6, ncol=2)

    return Outcome(m, plot, notes, size=(13, 7.5))


_P = part_name


def _degrades(setting: str, margin: float):
    def test(m):
        return at_least(paired(need(m, f"err_{setting}_bn_b{SMALL}"), need(m, f"err_{setting}_bn_b{NORMAL_BATCH}")),
                        margin, " points")
    return test


def _beats_bn(setting: str, other: str, margin: float):
    def test(m):
        return at_least(paired(need(m, f"err_{setting}_bn_b{SMALL}"), need(m, f"err_{setting}_{other}_b{SMALL}")),
                        margin, " points")
    return test


def _degrades_less(m):
    mlp_loss = paired(need(m, f"err_mlp_bn_b{SMALL}"), need(m, f"err_mlp_bn_b{NORMAL_BATCH}"))
    cnn_loss = paired(need(m, f"err_cnn_bn_b{SMALL}"), need(m, f"err_cnn_bn_b{NORMAL_BATCH}"))
    return at_least(paired(mlp_loss, cnn_loss), 3.0, " points")


BATCH_SIZE = Claim(
    id=7,
    title="Batch-size dependence",
    claim="Batch Normalization degrades at small batches, where Group Normalization does not, and Batch "
    "Renormalization recovers part of the loss; how much it degrades depends on how many values each "
    "statistic sees, and part of the loss is the mismatch between the batch statistics of training and "
    "the running statistics of inference.",
    anchor="Wu & He 2018, Table 3 / Fig. 1 (ResNet-50, ImageNet): BN error 23.6% at batch 32 but 34.7% at "
    "batch 2, GN 24.1% and 24.8%; Ioffe 2017, §4.3: with micro-batches of 4, batch renorm 76.5% vs BN "
    "74.2% accuracy; Wu & Johnson 2021 (EvalNorm / 'Rethinking Batch in BatchNorm'): the train/test "
    "inconsistency of small-batch BN.",
    criterion=Criterion(
        "Paired over seeds, each arm trained to its plateau: in the MLP (2 values per statistic at batch 2) "
        "BN's error at batch 2 exceeds its batch-32 error by at least 5 points, GN's and batch renorm's "
        "errors at batch 2 are at least 2 points below BN's; BN's loss from batch 32 to 2 is at least 3 "
        "points larger in the MLP than in the CNN (32-128 values per statistic); in the CNN BN's batch-2 "
        "error exceeds its batch-32 error by at least 1 point and GN's is below BN's at batch 2; in the "
        "MLP at batch 2, evaluating with test-batch statistics instead of running ones removes at least 2 "
        "points of error (the train/test inconsistency).",
        (
            Check("MLP: BN error at batch 2 >= batch 32 + 5", _degrades("mlp", 5.0),
                  needs=(_P("mlp", "bn", SMALL), _P("mlp", "bn", NORMAL_BATCH))),
            Check("MLP, batch 2: GN error <= BN error − 2", _beats_bn("mlp", "gn", 2.0),
                  needs=(_P("mlp", "bn", SMALL), _P("mlp", "gn", SMALL))),
            Check("MLP, batch 2: batch renorm error <= BN error − 2", _beats_bn("mlp", "brn", 2.0),
                  needs=(_P("mlp", "bn", SMALL), _P("mlp", "brn", SMALL))),
            Check("BN's loss at batch 2: MLP's >= CNN's + 3", _degrades_less,
                  needs=(_P("mlp", "bn", SMALL), _P("mlp", "bn", NORMAL_BATCH), _P("cnn", "bn", SMALL),
                         _P("cnn", "bn", NORMAL_BATCH))),
            Check("CNN: BN error at batch 2 >= batch 32 + 1", _degrades("cnn", 1.0),
                  needs=(_P("cnn", "bn", SMALL), _P("cnn", "bn", NORMAL_BATCH))),
            Check("CNN, batch 2: GN error < BN error", _beats_bn("cnn", "gn", 0.0),
                  needs=(_P("cnn", "bn", SMALL), _P("cnn", "gn", SMALL))),
            Check(
                "MLP, batch 2: running − test-batch statistics error >= 2",
                lambda m: at_least(need(m, f"inconsistency_mlp_b{SMALL}"), 2.0, " points"),
                needs=(_P("mlp", "bn", SMALL),),
            ),
        ),
    ),
    parts=_parts_batch_size,
    collect=_collect_batch_size,
    setup="digits (1,347 train / 450 test). Two settings: an MLP 64-128-128-10 with ReLU (BatchNorm1d: "
    "at batch 2 each statistic sees 2 values) and a CNN conv(16)-norm-ReLU-conv(32, stride 2)-norm-ReLU-"
    "pool-linear (BatchNorm2d: at batch 2 a statistic sees 2·8·8 = 128 and 2·4·4 = 32 values). Norms: BN, "
    "GN (4 groups), LN (MLP: over the features; CNN: over (C, H, W)), batch renorm (r_max 3, d_max 5 "
    "after a warm-up of half an epoch, momentum 0.1). SGD with momentum 0.9 and the linear scaling rule "
    "lr = 0.1·batch/32, batch sizes 2, 4, 8, 32 (2 and 32 with --quick). Every run is "
    + PLATEAU.text()
    + "; its error is the mean of the last 4 evaluations (the last epoch, the plateau). The BN models are "
    "also evaluated at their final weights with running statistics, with normkit.recalibrate's exact statistics of the "
    "training set, and with each test batch's own statistics at the training batch size: running − "
    "test-batch is the part of the loss that the train/test inconsistency explains. The report's notes "
    "say per setting and batch size whether GN, LN and batch renorm beat BN (paired test, margin 0).",
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


def _plan_11() -> list[tuple[str, int]]:
    return [(n, NORMAL_BATCH) for n in NORMS_11] + [(n, SMALL) for n in ("bn", "gn")]


def _parts_variants(ctx: Context) -> list[Part]:
    # no norm is for the figure only: no check reads it
    return [small_batch_part(ctx, "cnn", n, b, display=n == "none") for n, b in _plan_11()]


def _collect_variants(ctx: Context, res: dict) -> Outcome:
    err = {(n, b): [r["err"] for r in res[part_name("cnn", n, b)]] for n, b in _plan_11()}
    m: dict = {"tolerance": 1e-5, **_equivalence()}
    for (norm, b), v in err.items():
        record(m, f"err_{norm}_b{b}", v)

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        plots.bars(
            ax,
            [f"batch {NORMAL_BATCH}", f"batch {SMALL}"],
            list(NORMS_11),
            {n: [m[f"err_{n}_b{NORMAL_BATCH}"], m.get(f"err_{n}_b{SMALL}") or []] for n in NORMS_11},
            "test error (%)",
        )
        plots.finish(ax, "CNN on digits, converged (Wu & He 2018: BN 23.6, GN 24.1, LN 25.3, IN 28.4 % at "
                     "batch 32)")

    return Outcome(m, plot)


_NORMAL_11 = tuple(part_name("cnn", n, NORMAL_BATCH) for n in ("bn", "gn", "ln", "in"))


def _order(m, norm: str, others, lowest: bool, tol: float = 0.5) -> Result:
    """Is ``norm``'s error the lowest (highest) at the normal batch, within ``tol``, paired against each other?"""
    results = []
    for o in others:
        mine, theirs = need(m, f"err_{norm}_b{NORMAL_BATCH}"), need(m, f"err_{o}_b{NORMAL_BATCH}")
        diffs = paired(theirs, mine) if lowest else paired(mine, theirs)
        results.append((o, at_least(diffs, -tol, " points")))
    detail = "; ".join(f"vs {o}: {r.status} ({r.detail})" for o, r in results)
    states = {r.status for _, r in results}
    n = min((r.n for _, r in results if r.n is not None), default=None)
    if FAIL in states:
        return Result(FAIL, detail, n)
    if states == {PASS}:
        return Result(PASS, detail, n)
    return Result(UNDECIDED if UNDECIDED in states else SKIPPED, detail, n)


VARIANTS = Claim(
    id=11,
    title="The variants",
    claim="Among the normalizations, BN is best at a normal batch size and InstanceNorm worst; at batch 2 "
    "GroupNorm beats BN. GroupNorm with one group is LayerNorm over (C, H, W), with C groups InstanceNorm.",
    anchor="Wu & He 2018, Fig. 1 / Table 1: ImageNet error at batch 32 — BN 23.6, GN 24.1, LN 25.3, IN 28.4 "
    "%; §3.1: GN with G = 1 is LN and with G = C is IN.",
    criterion=Criterion(
        f"Paired over seeds, each run converged: at batch {NORMAL_BATCH} BN's error is the lowest of "
        "BN/GN/LN/IN and IN's the highest (0.5-point tolerance); at batch 2 GN's error is lower than "
        "BN's; GN(1) == LN and GN(C) == IN within 1e-5 on 3 + 0.5·randn input of shape (5, 6, 5, 7).",
        (
            Check(f"batch {NORMAL_BATCH}: BN lowest error", lambda m: _order(m, "bn", ("gn", "ln", "in"), True),
                  needs=_NORMAL_11),
            Check(f"batch {NORMAL_BATCH}: IN highest error", lambda m: _order(m, "in", ("bn", "gn", "ln"), False),
                  needs=_NORMAL_11),
            Check(
                f"batch {SMALL}: GN error < BN error",
                lambda m: at_least(paired(need(m, f"err_bn_b{SMALL}"), need(m, f"err_gn_b{SMALL}")), 0.0),
                needs=(part_name("cnn", "bn", SMALL), part_name("cnn", "gn", SMALL)),
            ),
            Check("GN(1 group) == LayerNorm(C, H, W)", lambda m: need(m, "max_abs_diff_gn1_vs_ln") <= 1e-5),
            Check("GN(C groups) == InstanceNorm", lambda m: need(m, "max_abs_diff_gnC_vs_in") <= 1e-5),
        ),
    ),
    parts=_parts_variants,
    collect=_collect_variants,
    setup=f"The CNN and protocol of claim 7 (runs shared with it: each trained to its plateau), with no "
    f"norm, BN, GN (4 groups), LN over (C, H, W) and IN (affine) at batch {NORMAL_BATCH}, and BN and GN at "
    f"batch {SMALL}.",
)

# ------------------------------------------------------------------------------------------ 8


def _parts_inference(ctx: Context) -> list[Part]:
    return [small_batch_part(ctx, "mlp", "bn", b) for b in (SMALL, NORMAL_BATCH)]


def _collect_inference(ctx: Context, res: dict) -> Outcome:
    can_recal = hasattr(normkit, "recalibrate")
    notes = (
        []
        if can_recal
        else ["arm 'recalibrated' skipped: normkit.recalibrate is not available in this build of normkit"]
    )
    res_ = {}
    for name, batch in ((f"b{NORMAL_BATCH}", NORMAL_BATCH), (f"b{SMALL}", SMALL)):
        runs = res[part_name("mlp", "bn", batch)]
        for mode in ("running", "batch_own", "batch2", "recalibrated"):
            res_[f"{mode}_{name}"] = [r.get(f"acc_{mode}") for r in runs]
    res = res_
    m: dict = {"normal_batch": NORMAL_BATCH, "small_batch": SMALL}
    for key, v in res.items():
        if any(x is None for x in v):
            m[f"acc_{key}"] = None
        else:
            record(m, f"acc_{key}", v)

    def plot(fig, m):
        ax = fig.add_subplot(1, 1, 1)
        modes = ["running", "batch_own", "batch2", "recalibrated"]
        shown = [k for k in modes if m.get(f"acc_{k}_b{NORMAL_BATCH}") is not None]
        groups = [f"trained at batch {NORMAL_BATCH}", f"trained at batch {SMALL}"]
        vals = {k: [m[f"acc_{k}_b{NORMAL_BATCH}"], m[f"acc_{k}_b{SMALL}"]] for k in shown}
        names = {
            "running": ("running stats", "#1f77b4"),
            "batch_own": ("test-batch stats (training batch size)", "#ff7f0e"),
            "batch2": ("test-batch stats (2)", "#d62728"),
            "recalibrated": ("recalibrated (exact)", "#2ca02c"),
        }
        plots.bars(ax, groups, shown, vals, "test accuracy (%)", names)
        lo = min(min(min(v) for v in vals[k]) for k in shown)
        ax.set_ylim(max(0, lo - 5), 100)
        plots.finish(ax, "BN MLP on digits (claim 7's runs): which statistics at inference")

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
        f"Paired over seeds: after training at batch {NORMAL_BATCH}, running statistics lose at most 1 point "
        f"of test accuracy against test-batch statistics (batches of {NORMAL_BATCH}); test-batch statistics "
        f"at batch 2 lose at least 2 points against running statistics; after training at batch {SMALL}, "
        "recalibrated statistics gain at least 0.5 points over the running ones.",
        (
            Check(
                f"batch-{NORMAL_BATCH} model: running >= test-batch({NORMAL_BATCH}) − 1",
                lambda m: at_least(paired(need(m, f"acc_running_b{NORMAL_BATCH}"),
                                          need(m, f"acc_batch_own_b{NORMAL_BATCH}")), -1.0, " points"),
                needs=(part_name("mlp", "bn", NORMAL_BATCH),),
            ),
            Check(
                "test-batch statistics at batch 2 lose >= 2 points",
                lambda m: at_least(paired(need(m, f"acc_running_b{NORMAL_BATCH}"),
                                          need(m, f"acc_batch2_b{NORMAL_BATCH}")), 2.0, " points"),
                needs=(part_name("mlp", "bn", NORMAL_BATCH),),
            ),
            Check(
                f"batch-{SMALL} model: recalibrated >= running + 0.5",
                lambda m: at_least(paired(need(m, f"acc_recalibrated_b{SMALL}"),
                                          need(m, f"acc_running_b{SMALL}")), 0.5, " points"),
                needs=(part_name("mlp", "bn", SMALL),),
            ),
        ),
    ),
    parts=_parts_inference,
    collect=_collect_inference,
    setup=f"Claim 7's BN MLP 64-128-128-10 on digits (the same converged runs), trained at batch "
    f"{NORMAL_BATCH} and at batch {SMALL}; BN momentum 0.1. The final weights evaluated with the running "
    "statistics, with each test batch's own statistics (batches of the training batch size and of 2), and "
    "after normkit.recalibrate over the training set.",
)

CLAIMS = (REGULARIZATION, BATCH_SIZE, INFERENCE, VARIANTS)
