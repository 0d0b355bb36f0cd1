"""The measurements behind normkit.ops_inplace.INVERT_LIMIT and ELU_Z_ERROR (docs/inplace-abn.md).

InPlace-ABN's backward reads x̂ back from the stored output, x̂ = (a⁻¹(y) − β)/γ, which amplifies the output's
rounding by about |β|/|γ| (and, for ELU, by e^{−z} near saturation). This script compares the gradients of the
inverted backward (the C++ kernels, forced to invert) with torch's own BatchNorm → activation in the same dtype,
both against the float64 truth computed from the same rounded inputs, and prints the ratio of their errors
(median over seeds; max-norm error of dx, dγ, dβ, each relative to the largest true value):

* leaky ReLU(0.01) over |β|/|γ| ∈ {0 … 256} (β's sign random per channel), float32 and bfloat16, zero-mean and
  3 + 0.5·randn input, dy noise or y + noise (a gradient correlated with the output);
* ELU(1) over β = −s·|γ| (so the smallest pre-activation z_lo moves into saturation), γ scale 1 and 3.

    python scripts/iabn_inversion_error.py            # about two minutes on one core
"""

from __future__ import annotations

import statistics

import normkit._C  # noqa: F401  (the extension: torch.ops.normkit_cpu)
import torch
import torch.nn.functional as F

K = torch.ops.normkit_cpu


def _act(z, kind, p):
    return [z, F.leaky_relu(z, p), F.elu(z, p)][kind]


def _errors(x, w, b, dy, kind, p):
    """(ours, torch's) max-norm relative errors of (dx, dγ, dβ) against float64, and the smallest z."""
    xt, wt, bt = (t.double().requires_grad_() for t in (x, w, b))
    zt = F.batch_norm(xt, None, None, wt, bt, True, 0.0, 1e-5)
    yt = _act(zt, kind, p)
    truth = torch.autograd.grad(yt, [xt, wt, bt], dy.double())
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    own = torch.autograd.grad(_act(F.batch_norm(xr, None, None, wr, br, True, 0.0, 1e-5), kind, p), [xr, wr, br], dy)
    y, mean, var = K.iabn_forward(x.clone(), w, b, 1e-5, kind, p, True)
    dx, sdz, sdzx = K.iabn_backward(y, dy, mean, torch.rsqrt(var + 1e-5), w, b, kind, p, True, True)

    def err(a, t):
        return (a.double() - t).abs().max().item() / t.abs().max().item()

    return ([err(o, t) for o, t in zip((dx, sdzx, sdz), truth, strict=True)],
            [err(o, t) for o, t in zip(own, truth, strict=True)], zt.detach().amin().item())


def _case(seed, dtype, offset, beta_of, corr, gscale=1.0, kind=1, p=0.01):
    g = torch.Generator().manual_seed(seed)
    c, shape = 16, (8, 16, 16, 16)
    x = (offset + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    w = gscale * (0.5 + torch.rand(c, generator=g, dtype=torch.float64))
    w = w * torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double() if kind == 1 else w
    b = beta_of(w, g)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    if corr:  # dy = y + noise, y of the float64 forward
        y = _act(F.batch_norm(x.double(), None, None, w, b, True, 0.0, 1e-5), kind, p)
        noise = noise + y
    return _errors(x, w.float(), b.float(), noise.to(dtype), kind, p)


def leaky_table():
    print("leaky ReLU(0.01): error of the inverted gradients / torch's own error (median of 5 seeds): dx dγ dβ")
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0.0, 3.0):
            for corr in (False, True):
                print(f"  {str(dtype)[6:]:9} input {'3 + 0.5·randn' if offset else 'randn·0.5':13} "
                      f"dy {'y + noise' if corr else 'noise'}")
                for r in (0, 1, 2, 4, 8, 16, 64, 256):
                    rows = []
                    for seed in range(5):
                        ours, own, _ = _case(seed, dtype, offset, lambda w, g, r=r: r * w.abs() * torch.where(
                            torch.rand(16, generator=g) < 0.5, -1.0, 1.0).double(), corr)
                        rows.append([a / max(b, 1e-12) for a, b in zip(ours, own, strict=True)])
                    med = [statistics.median(col) for col in zip(*rows, strict=True)]
                    print(f"    |β|/|γ| = {r:4}: " + "  ".join(f"{m:8.2f}" for m in med))


def elu_table():
    print("ELU(1), β = −s·|γ| (dy = y + noise): smallest z, then the worst of 3 seeds of error / torch's: dx dγ dβ")
    for dtype in (torch.float32, torch.bfloat16):
        for gscale in (1.0, 3.0):
            print(f"  {str(dtype)[6:]:9} γ scale {gscale}")
            for s in (0, 0.5, 1, 2, 3, 4, 6, 8):
                rows, zlo = [], 0.0
                for seed in range(3):
                    ours, own, z = _case(seed, dtype, 3.0, lambda w, g, s=s: -s * w.abs(), True, gscale, 2, 1.0)
                    rows.append([a / max(b, 1e-12) for a, b in zip(ours, own, strict=True)])
                    zlo = min(zlo, z)
                worst = [max(col) for col in zip(*rows, strict=True)]
                print(f"    s = {s:3}: z_lo {zlo:7.2f}  " + "  ".join(f"{m:10.2f}" for m in worst))


if __name__ == "__main__":
    torch.set_num_threads(1)
    leaky_table()
    elu_table()
