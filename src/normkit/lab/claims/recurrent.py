"""Claim 9: Batch Normalization in recurrent networks (Cooijmans et al. 2016; Ba et al. 2016)."""

from __future__ import annotations

import torch
from torch import nn

from .. import data as D
from .. import plots
from ..context import Context, record
from ..costs import Cost
from ..data import ImageData, adding_task
from ..framework import Check, Claim, Criterion, Outcome, Part, at_least, need, paired
from ..models import NormLSTM
from ..train import batches, seed_everything

ARMS_9 = NormLSTM.NORMS
HIDDEN_9 = 32
STEPS_9 = (60, 40)  # digit rows, adding task; the same in the full and the quick run


def rows(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) read row by row: sequences (N, H, C·W)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 1, 3).reshape(n, h, c * w)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, steps: int, g: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for idx in batches(len(x), 64, steps, g):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def _digits_acc(data: ImageData, device: str, norm: str, seed: int, steps: int) -> float:
    g = seed_everything(seed)
    xtr, xte = rows(data.xtr), rows(data.xte)
    model = NormLSTM(xtr.shape[2], HIDDEN_9, data.n_classes, norm=norm, max_steps=xtr.shape[1]).to(device)
    _fit(model, xtr, data.ytr, nn.functional.cross_entropy, steps, g)
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(xte).argmax(1) == data.yte).float().mean().item()


def _adding_mse(device: str, norm: str, seed: int, steps: int, train_len: int, test_lens) -> list[float]:
    g = seed_everything(seed)
    x, y = adding_task(64 * steps, train_len, g)
    model = NormLSTM(2, HIDDEN_9, 1, norm=norm, max_steps=train_len).to(device)
    _fit(
        model,
        x.to(device),
        y.to(device),
        lambda out, t: nn.functional.mse_loss(out[:, 0], t),
        steps,
        g,
    )
    model.eval()
    out = []
    test_g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for length in test_lens:
            xt, yt = adding_task(1000, length, test_g)
            out.append(nn.functional.mse_loss(model(xt.to(device))[:, 0], yt.to(device)).item())
    return out


TRAIN_LEN_9 = 8
TEST_LENS_9 = (TRAIN_LEN_9, 2 * TRAIN_LEN_9, 4 * TRAIN_LEN_9)
COST_9 = {"rows": Cost(1.0), "adding": Cost(0.9)}


def _rows_seed(ref: str, device: str, seed: int) -> dict:
    """One seed of claim 9's digit rows: every arm's test accuracy."""
    data = D.resolve(ref, device)
    return {arm: _digits_acc(data, device, arm, seed, STEPS_9[0]) for arm in ARMS_9}


def _adding_seed(device: str, seed: int) -> dict:
    """One seed of claim 9's adding task: every arm's test MSE at 1x, 2x and 4x the training length."""
    return {arm: _adding_mse(device, arm, seed, STEPS_9[1], TRAIN_LEN_9, TEST_LENS_9) for arm in ARMS_9}


def _parts(ctx: Context) -> list[Part]:
    return [Part("rows", _rows_seed, (ctx.data_ref("digits"), ctx.device), cost=COST_9["rows"]),
            Part("adding", _adding_seed, (ctx.device,), cost=COST_9["adding"])]


def _collect(ctx: Context, res: dict) -> Outcome:
    data = ctx.images("digits")
    train_len, test_lens = TRAIN_LEN_9, list(TEST_LENS_9)
    acc = {a: [r[a] for r in res["rows"]] for a in ARMS_9}
    mse = {a: [r[a] for r in res["adding"]] for a in ARMS_9}
    m: dict = {
        "digit_rows": rows(data.xtr[:1]).shape[1],
        "adding_train_length": train_len,
        "adding_test_lengths": test_lens,
        "adding_baseline_mse": 1 / 6,
    }
    for arm in ARMS_9:
        record(m, f"acc_rows_{arm}", acc[arm])
        m[f"adding_mse_{arm}"] = mse[arm]  # seeds × test lengths
        record(m, f"adding_mse_4x_{arm}", [r[-1] for r in mse[arm]])

    def plot(fig, m):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        plots.bars(
            ax1,
            ["images read row by row"],
            list(ARMS_9),
            {a: [m[f"acc_rows_{a}"]] for a in ARMS_9},
            "test accuracy (%)",
        )
        lo = min(min(m[f"acc_rows_{a}"]) for a in ARMS_9)
        ax1.set_ylim(max(0, lo - 5), 100)
        plots.finish(ax1, "LSTM on digits, one row per step")
        for a in ARMS_9:
            plots.band(ax2, m["adding_test_lengths"], m[f"adding_mse_{a}"], a)
        ax2.axhline(m["adding_baseline_mse"], color="black", ls="--", lw=0.8, label="predict the mean")
        ax2.set_yscale("log")
        plots.finish(
            ax2,
            f"Adding task, trained at length {m['adding_train_length']}",
            "test sequence length",
            "test MSE",
        )

    return Outcome(m, plot)


RECURRENT = Claim(
    id=9,
    title="BN and recurrent networks",
    claim="Batch Normalization helps recurrent networks when it keeps separate statistics per time step "
    "(not shared ones); Layer Normalization, which needs no batch statistics, extends better to "
    "sequences longer than those trained on.",
    anchor="Cooijmans et al. 2016, Table 1 and §4: BN-LSTM with per-time-step statistics and γ = 0.1, "
    "sequential MNIST 99.0% vs LSTM 98.9%, permuted 95.4% vs 90.2%; Ba et al. 2016, §3.1: LayerNorm "
    "in RNNs needs no per-step statistics.",
    criterion=Criterion(
        "Paired over seeds: on digits read row by row, per-step BN's test accuracy is at least 0.5 points "
        "above the plain LSTM's and 0.5 above shared-statistics BN's; on the adding task at 4x the training "
        "length, LayerNorm's test MSE is below per-step BN's.",
        (
            Check(
                "rows: per-step BN >= plain LSTM + 0.5",
                lambda m: at_least(paired(need(m, "acc_rows_bn_step"), need(m, "acc_rows_none")), 0.5, " points"),
                needs=("rows",),
            ),
            Check(
                "rows: per-step BN >= shared BN + 0.5",
                lambda m: at_least(paired(need(m, "acc_rows_bn_step"), need(m, "acc_rows_bn_shared")), 0.5,
                                   " points"),
                needs=("rows",),
            ),
            Check(
                "adding, 4x length: LN MSE < per-step BN MSE",
                lambda m: at_least(paired(need(m, "adding_mse_4x_bn_step"), need(m, "adding_mse_4x_ln")), 0.0),
                needs=("adding",),
            ),
        ),
    ),
    parts=_parts,
    collect=_collect,
    setup="LSTM with 32 hidden units, normalization of W_h·h, W_x·x and the cell (Cooijmans eq. 6-8), "
    f"Adam at 1e-2, batch 64, gradient norm clipped at 1. Digits as 8 rows of 8 pixels, {STEPS_9[0]} steps "
    f"(about 3 epochs; a fixed budget, not a plateau: recurrent BN costs 17 norm calls per step). "
    "Adding task (two marked values in a sequence of uniform numbers), trained at length 8 "
    f"for {STEPS_9[1]} steps on fresh sequences, tested at lengths 8, 16, 32; per-step BN reuses the last "
    "step's statistics beyond length 8. The same budgets in the full and the quick run.",
)

CLAIMS = (RECURRENT,)
