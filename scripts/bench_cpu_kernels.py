"""normkit's C++ CPU kernels vs aten's own kernels, kernel level (no module, no custom-op dispatch).

Each case runs the same work both ways — BatchNorm training = aten.native_batch_norm +
native_batch_norm_backward vs the cpu backend's channel_forward + channel_backward, and so on — in
paired interleaved rounds (A B, B A, ...), and prints medians and the median of the per-round
ratios aten_time / normkit_time (> 1: normkit faster) with its p25–p75 spread. These are the
figures for routing between aten and normkit's kernels; layer-level timings add the module and
custom-op overhead of both.

    PYTHONPATH=src python scripts/bench_cpu_kernels.py [ROUNDS [THREADS [NAME_FILTER]]]

NAME_FILTER runs the cases whose name contains it (or one of its "|"-separated parts, e.g.
"train fwd+bwd CL|fused"); "bwd-only" runs the backward kernels alone (row_backward, group_backward vs aten's
native_layer_norm_backward / native_group_norm_backward) at everyday sizes.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from normkit.cpu_backend import CpuBackend

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 9
if len(sys.argv) > 2:
    torch.set_num_threads(int(sys.argv[2]))
ONLY = sys.argv[3] if len(sys.argv) > 3 else ""
B = CpuBackend()
A = torch.ops.aten


def timeit(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def pair(name, f_aten, f_nk, target=0.02):
    if ONLY and not any(part in name for part in ONLY.split("|")):
        return
    for f in (f_aten, f_nk, f_aten, f_nk):
        f()
    n = max(1, int(target / max(timeit(f_aten, 3), 1e-7)))
    ratios, ta, tn = [], [], []
    for r in range(ROUNDS):
        if r % 2:
            a, b = timeit(f_aten, n), timeit(f_nk, n)
        else:
            b, a = timeit(f_nk, n), timeit(f_aten, n)
        ta.append(a)
        tn.append(b)
        ratios.append(a / b)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3  # (one round: no spread)
    print(f"{name:44s} aten {statistics.median(ta) * 1e6:9.1f} us  normkit {statistics.median(tn) * 1e6:9.1f} us  "
          f"ratio {statistics.median(ratios):5.2f} (p25-p75 {q[0]:.2f}-{q[2]:.2f})", flush=True)


def tensor(shape, cl=False, offset=3.0):
    t = offset + torch.randn(shape)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def bn_train(name, shape, cl=False, act="", part=""):
    """part "": forward + backward; "fwd" / "bwd": that half alone (the backward's inputs made once)."""
    x, dy = tensor(shape, cl), tensor(shape, cl, 0.0)
    c = shape[1]
    w, b = torch.ones(c), torch.zeros(c)

    def aten_fwd():
        y, m, rs = A.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
        return (A.relu(y) if act == "relu" else y), m, rs

    def aten_bwd(y, m, rs):
        g = A.threshold_backward(dy, y, 0) if act == "relu" else dy
        A.native_batch_norm_backward(g, x, w, None, None, m, rs, True, 1e-5, [True, True, True])

    def nk_fwd():
        y, m, v = B.channel_forward(x, w, b, 1e-5, None, act)
        rs = torch.rsqrt(v + 1e-5)
        return m, rs, w * rs, b - m * w * rs

    def nk_bwd(m, rs, scale, shift):
        B.channel_backward(x, dy, m, rs, scale, shift, None, act, True, False)

    if part == "fwd":
        pair(name, aten_fwd, nk_fwd)
    elif part == "bwd":
        a_saved, n_saved = aten_fwd(), nk_fwd()
        pair(name, lambda: aten_bwd(*a_saved), lambda: nk_bwd(*n_saved))
    else:
        pair(name, lambda: aten_bwd(*aten_fwd()), lambda: nk_bwd(*nk_fwd()))


def bn_eval(name, shape, cl=False):
    x = tensor(shape, cl)
    c = shape[1]
    w, b, rm, rv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
    scale = w * torch.rsqrt(rv + 1e-5)
    pair(name, lambda: A.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5),
         lambda: B.channel_apply(x, scale, b, None, ""))


def gn_train(name, shape, groups, cl=False):
    x, dy = tensor(shape, cl), tensor(shape, cl, 0.0)
    n, c = shape[:2]
    hw = x.numel() // (n * c)
    w, b = torch.ones(c), torch.zeros(c)

    def aten():
        y, m, rs = A.native_group_norm(x, w, b, n, c, hw, groups, 1e-5)
        A.native_group_norm_backward(dy, x, m, rs, w, n, c, hw, groups, [True, True, True])

    def nk():
        y, m, v = B.group_forward(x, groups, w, b, 1e-5, None, "")
        B.group_backward(x, dy, m, torch.rsqrt(v + 1e-5), groups, w, b, None, "", True, False)

    pair(name, aten, nk)


def ln(name, shape, grad=True):
    x, dy = tensor(shape), tensor(shape, False, 0.0)
    k = shape[-1]
    w, b = torch.ones(k), torch.zeros(k)

    def aten():
        y, m, rs = A.native_layer_norm(x, [k], w, b, 1e-5)
        if grad:
            A.native_layer_norm_backward(dy, x, [k], m, rs, w, b, [True, True, True])

    def nk():
        y, m, rs = B.row_forward(x, w, b, 1e-5, False)
        if grad:
            B.row_backward(x, dy, m, rs, w, False, True)

    pair(name, aten, nk)


def rms(name, shape):
    x, dy = tensor(shape), tensor(shape, False, 0.0)
    k = shape[-1]
    w = torch.ones(k)
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def aten():
        xa.grad = wa.grad = None
        torch.nn.functional.rms_norm(xa, (k,), wa, 1e-5).backward(dy)

    def nk():
        y, _, rs = B.row_forward(x, w, None, 1e-5, True)
        B.row_backward(x, dy, None, rs, w, True, True)

    pair(name, aten, nk)


def row_bwd(name, shape, rms=False, need_dw=True):
    """The backward kernel alone: row_backward vs aten.native_layer_norm_backward with the same
    outputs asked for (RMSNorm has no aten kernel: LayerNorm's backward is the yardstick)."""
    x, dy = tensor(shape), tensor(shape, False, 0.0)
    k = shape[-1]
    w, b = 1 + 0.1 * torch.randn(k), torch.zeros(k)
    _, am, ars = A.native_layer_norm(x, [k], w, b, 1e-5)
    _, m, rs = B.row_forward(x, w, None, 1e-5, rms)
    mask = [True, need_dw, need_dw]
    pair(name, lambda: A.native_layer_norm_backward(dy, x, [k], am, ars, w, b, mask),
         lambda: B.row_backward(x, dy, m, rs, w, rms, need_dw))


def gn_bwd(name, shape, groups, cl=False, affine=True):
    """The backward kernel alone: group_backward vs aten.native_group_norm_backward."""
    x, dy = tensor(shape, cl), tensor(shape, cl, 0.0)
    n, c = shape[:2]
    hw = x.numel() // (n * c)
    w, b = (1 + 0.1 * torch.randn(c), torch.zeros(c)) if affine else (None, None)
    _, am, ars = A.native_group_norm(x, w, b, n, c, hw, groups, 1e-5)
    _, m, v = B.group_forward(x, groups, w, b, 1e-5, None, "")
    rs = torch.rsqrt(v + 1e-5)
    mask = [True, affine, affine]
    pair(name, lambda: A.native_group_norm_backward(dy, x, am, ars, w, n, c, hw, groups, mask),
         lambda: B.group_backward(x, dy, m, rs, groups, w, b, None, "", affine, False))


print("threads", torch.get_num_threads(), "rounds", ROUNDS)
# per call, tiny tensors
bn_eval("tiny BN eval 1x256", (1, 256))
ln("tiny LN eval 16x256", (16, 256), grad=False)
bn_train("tiny BN1d train fwd+bwd 64x256", (64, 256))
gn_train("tiny GN(8) fwd+bwd 32x32x14x14", (32, 32, 14, 14), 8)
# large tensors
S = (32, 64, 56, 56)
bn_train("BN2d train fwd+bwd NCHW 32x64x56x56", S)
bn_train("BN2d train fwd+bwd CL", S, cl=True)
bn_eval("BN2d eval NCHW", S)
bn_eval("BN2d eval CL", S, cl=True)
bn_train("BN+ReLU fused fwd+bwd NCHW (aten BN,relu)", S, act="relu")
bn_train("BN+ReLU fused fwd+bwd CL (aten BN,relu)", S, cl=True, act="relu")
bn_train("BN+ReLU fused fwd CL (aten BN,relu)", S, cl=True, act="relu", part="fwd")
bn_train("BN+ReLU fused bwd CL (aten relu',BN')", S, cl=True, act="relu", part="bwd")
gn_train("GN(32) fwd+bwd CL", S, 32, cl=True)
gn_train("GN(32) fwd+bwd NCHW", S, 32)
bn_train("BN1d train fwd+bwd 8192x1024", (8192, 1024))
ln("LN fwd+bwd 8192x1024", (8192, 1024))
ln("LN fwd 8192x1024", (8192, 1024), grad=False)
rms("RMSNorm fwd+bwd 8192x1024 (aten: F.rms_norm autograd)", (8192, 1024))
# backward kernels alone, everyday sizes (name filter: bwd-only)
for M, K in ((2048, 128), (256, 1024), (8192, 32), (64, 768), (16384, 64)):
    row_bwd(f"bwd-only LN dx+dw+db {M}x{K}", (M, K))
    row_bwd(f"bwd-only LN dx {M}x{K}", (M, K), need_dw=False)
    row_bwd(f"bwd-only RMS dx+dw {M}x{K} vs LN", (M, K), rms=True)
    row_bwd(f"bwd-only RMS dx {M}x{K} vs LN", (M, K), rms=True, need_dw=False)
for (N, C, H, W), G in (((32, 32, 14, 14), 8), ((8, 64, 56, 56), 32), ((64, 128, 7, 7), 32), ((2, 256, 32, 32), 32)):
    for cl in (False, True):
        for affine in (True, False):
            gn_bwd(f"bwd-only GN({G}) {N}x{C}x{H}x{W} {'CL' if cl else 'NCHW'}{'' if affine else ' no affine'}",
                   (N, C, H, W), G, cl, affine)
