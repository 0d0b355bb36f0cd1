"""Claim 6: internal covariate shift is not why BN works (Santurkar et al. 2018)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .. import data as D
from .. import plots
from ..context import Context, record
from ..costs import Cost
from ..framework import Check, Claim, Criterion, Outcome, Part, at_least, need, paired, within
from ..models import mlp
from ..train import seed_everything, train_classifier

LR_6 = 0.2
STEPS_6 = 150  # about 7 epochs, in the full and the quick run
EVERY_6 = 15
FACTORS_6 = (0.5, 1.0, 2.0, 4.0)  # step sizes along the gradient, in units of the learning rate


def landscape_probe(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, factors=FACTORS_6
) -> tuple[float, float, float]:
    """Santurkar et al. §3.1 at the current weights w, on batch (x, y), moving along the gradient g:

    * loss variation = max − min of L(w − η·g) over η ∈ factors·lr;
    * gradient change = max over η of ‖∇L(w − η·g) − ∇L(w)‖₂ (small = the gradient is predictive);
    * effective β-smoothness = max over η of ‖∇L(w − η·g) − ∇L(w)‖₂ / ‖η·g‖₂.

    The model (weights and BN buffers) is restored afterwards.
    """
    state = copy.deepcopy(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    g0 = [p.grad.detach().clone() for p in params]
    gnorm = math.sqrt(sum(float(g.pow(2).sum()) for g in g0))
    losses, changes, betas = [], [], []
    for f in factors:
        with torch.no_grad():
            for p, g in zip(params, g0, strict=False):
                p.sub_(f * lr * g)
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        changes.append(
            math.sqrt(sum(float((p.grad - g).pow(2).sum()) for p, g in zip(params, g0, strict=False)))
        )
        betas.append(changes[-1] / max(f * lr * gnorm, 1e-12))
        model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    finite = [v for v in losses if math.isfinite(v)]
    variation = max(finite) - min(finite) if len(finite) == len(losses) else math.inf
    return variation, max(changes), max(betas)


COST_6 = Cost(0.5)


def _ics_seed(ref: str, device: str, seed: int) -> dict:
    """One seed of claim 6: no norm, BN and noisy BN trained; the landscape probed for no norm and BN."""
    data = D.resolve(ref, device)
    steps, every = STEPS_6, EVERY_6
    out: dict = {}
    for arm in ("none", "bn", "noisy_bn"):
        g = seed_everything(seed)
        model = mlp(data.n_features, data.n_classes, width=128, depth=3, norm=arm).to(device)
        probes: list[tuple[float, float, float]] = []
        probed = arm in ("none", "bn")

        def on_step(step, model, xb, yb, probes=probes, probed=probed):
            if probed and step % every == 0:
                probes.append(landscape_probe(model, xb, yb, LR_6))

        h = train_classifier(model, data, steps=steps, batch_size=64, lr=LR_6, optimizer="sgd", generator=g,
                             eval_every=every, on_step=on_step)
        r = {"acc": 0.0 if h.diverged else h.final_acc, "curve": h.test_acc, "eval_steps": h.steps}
        if probed:
            r.update(variation=sum(p[0] for p in probes) / len(probes), change=sum(p[1] for p in probes) / len(probes),
                     beta=sum(p[2] for p in probes) / len(probes))
        out[arm] = r
    return out


def _parts(ctx: Context) -> list[Part]:
    return [Part("seed", _ics_seed, (ctx.data_ref("digits"), ctx.device), cost=COST_6)]


def _collect(ctx: Context, res: dict) -> Outcome:
    runs = res["seed"]
    arms = ("none", "bn", "noisy_bn")
    acc = {a: [r[a]["acc"] for r in runs] for a in arms}
    curves = {a: [r[a]["curve"] for r in runs] for a in arms}
    variation = {a: [r[a]["variation"] for r in runs] for a in ("none", "bn")}
    change = {a: [r[a]["change"] for r in runs] for a in ("none", "bn")}
    beta = {a: [r[a]["beta"] for r in runs] for a in ("none", "bn")}
    x_steps = runs[0]["bn"]["eval_steps"]
    m: dict = {"lr": LR_6, "step_factors": list(FACTORS_6), "eval_steps": x_steps}
    for arm in arms:
        record(m, f"acc_{arm}", acc[arm])
        m[f"curve_{arm}"] = curves[arm]
    for arm in variation:
        record(m, f"loss_variation_{arm}", variation[arm])
        record(m, f"grad_change_{arm}", change[arm])
        record(m, f"beta_smoothness_{arm}", beta[arm])

    def plot(fig, m):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for arm in arms:
            plots.band(ax1, m["eval_steps"], m[f"curve_{arm}"], arm)
        plots.finish(ax1, "Noisy BN: random shift/scale after every BN", "training step", "test accuracy (%)")
        ax1.set_ylim(max(0, min(min(c) for a in arms for c in m[f"curve_{a}"]) - 5), 100)
        plots.bars(
            ax2,
            ["loss variation", "gradient change", "β-smoothness"],
            ["none", "bn"],
            {
                a: [m[f"loss_variation_{a}"], m[f"grad_change_{a}"], m[f"beta_smoothness_{a}"]]
                for a in ("none", "bn")
            },
            "mean over training (log scale)",
        )
        ax2.set_yscale("log")
        plots.finish(ax2, "Along the gradient, steps 0.5x ... 4x the rate")

    return Outcome(m, plot)


def _smaller(m, name: str):
    """BN's landscape quantity below the plain network's: log-ratio < 0, paired over seeds."""
    ratios = [math.log(max(n, 1e-300) / max(b, 1e-300))
              for b, n in zip(need(m, f"{name}_bn"), need(m, f"{name}_none"), strict=True)]
    return at_least(ratios, 0.0)


ICS = Claim(
    id=6,
    title="Internal covariate shift is not the reason",
    claim="BN does not work by reducing internal covariate shift: BN with injected distribution shift trains "
    "about as well as BN, and what BN changes is the smoothness of the loss landscape.",
    anchor="Santurkar et al. 2018, Fig. 2: 'noisy' BN (random non-zero mean, non-unit variance injected "
    "after BN "
    "every step) matches standard BN; Fig. 4: with BN the loss varies less, the gradient is more "
    "predictive and the effective β-smoothness is lower along the gradient direction.",
    criterion=Criterion(
        "Paired over seeds: noisy BN's final test accuracy is within 2 points of BN's (both bounds inside ±2) "
        "and at least 0.5 above no norm's; averaged over training, BN's loss variation, gradient change and "
        "effective β-smoothness along the gradient (steps 0.5x ... 4x the rate) are smaller than without BN "
        "(log of the ratio plain/BN above 0).",
        (
            Check(
                "noisy BN within 2 points of BN",
                lambda m: within(paired(need(m, "acc_noisy_bn"), need(m, "acc_bn")), 2.0, " points"),
            ),
            Check(
                "noisy BN >= no norm + 0.5",
                lambda m: at_least(paired(need(m, "acc_noisy_bn"), need(m, "acc_none")), 0.5, " points"),
            ),
            Check("BN loss variation < no norm", lambda m: _smaller(m, "loss_variation")),
            Check("BN gradient change < no norm", lambda m: _smaller(m, "grad_change")),
            Check("BN β-smoothness < no norm", lambda m: _smaller(m, "beta_smoothness")),
        ),
    ),
    parts=_parts,
    collect=_collect,
    setup="digits, MLP 64-128-128-128-10 with ReLU, plain SGD at 0.2 (a rate at which the plain network "
    "trains), batch 64, 150 steps (about 7 epochs; the curves show the plateau) in the full and the quick run. "
    "Noisy "
    "BN: after each BN, per channel and per step, s ~ U(0.5, 2), m ~ U(−1, 1), output s·BN(x) + m. "
    "Landscape probed every 15 steps on the current batch.",
)

CLAIMS = (ICS,)
