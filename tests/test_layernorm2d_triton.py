"""LayerNorm2d on the Triton backend (NCHW: kernels/triton/channel_rows.py; channels_last: the row kernels).

Without CUDA the kernels run on CPU tensors under the Triton interpreter, set up by
tests/triton_interpreter.py: ``TRITON_INTERPRET=1`` must be set before triton is first imported, so if
another test module imported triton for the GPU first, this module's tests run in a fresh
process (test_interpreter_suite_in_fresh_process). Accuracy rule (DESIGN.md §4): against the
float64 reference, at most twice the reference backend's own error in the same dtype, plus a
floor of a few units in the last place.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CUDA, fresh_process_test, import_for_interpreter, interpreter_fixture, skip_when_fresh

FRESH_PROCESS = import_for_interpreter("normkit.kernels.triton")
here = skip_when_fresh(FRESH_PROCESS)

import normkit  # noqa: E402
from normkit import backends  # noqa: E402
from normkit.triton_backend import TritonBackend, tuning  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
FLOOR = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

_interpreter = interpreter_fixture(FRESH_PROCESS, lambda: backends.register_backend("triton", TritonBackend))
test_interpreter_suite_in_fresh_process = fresh_process_test(FRESH_PROCESS, __file__)


def _inputs(shape, dtype, layout, offset=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = offset + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = 0.5 + torch.rand(shape[1], generator=gen, dtype=torch.float64)
    b = torch.rand(shape[1], generator=gen, dtype=torch.float64) - 0.5
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return (x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt), w, b)


def _run(backend_name, x, dy, w, b, dtype, affine):
    xs = x.to(DEVICE, dtype).requires_grad_()
    ws = w.to(DEVICE, dtype).requires_grad_() if affine else None
    bs = b.to(DEVICE, dtype).requires_grad_() if affine else None
    with normkit.backend(backend_name):
        y = torch.ops.normkit.layer_norm_2d(xs, ws, bs, 1e-6)[0]
        grads = torch.autograd.grad(y, [xs] + ([ws, bs] if affine else []), dy.to(DEVICE, dtype))
    return (y, *grads)


CASES = [
    # name, shape, dtype, layout, tune block_c, offset, affine
    ("c7_fp32", (2, 7, 5, 3), torch.float32, "nchw", None, 3.0, True),
    ("c33_split_fp32", (3, 33, 4, 6), torch.float32, "nchw", 8, 3.0, True),
    ("c70_split_not_affine", (2, 70, 3, 5), torch.float32, "nchw", 16, 3.0, False),
    ("large_mean_fp32", (2, 33, 3, 3), torch.float32, "nchw", 8, 1e4, True),
    ("c33_fp16", (2, 33, 5, 4), torch.float16, "nchw", None, 3.0, True),
    ("c33_split_bf16", (2, 33, 5, 4), torch.bfloat16, "nchw", 8, 3.0, True),
    ("s_over_block_fp32", (1, 5, 9, 11), torch.float32, "nchw", None, 3.0, True),  # S = 99 > 64 positions
    ("cl_fp32", (2, 7, 5, 3), torch.float32, "channels_last", None, 3.0, True),
    ("cl_fp16", (2, 33, 4, 3), torch.float16, "channels_last", None, 3.0, True),
]


@here
@pytest.mark.parametrize("name,shape,dtype,layout,block_c,offset,affine", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, shape, dtype, layout, block_c, offset, affine):
    x, dy, w, b = _inputs(shape, torch.float64, layout, offset)
    truth = _run("reference", x, dy, w, b, torch.float64, affine)
    ref = _run("reference", x, dy, w, b, dtype, affine)
    with tuning(ln2d_block_c=block_c):
        got = _run("triton", x, dy, w, b, dtype, affine)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    for what, g, r, t in zip(("y", "dx", "dweight", "dbias"), got, ref, truth, strict=False):
        assert g.dtype == dtype
        err = (g.double().cpu() - t.cpu()).abs().max().item()
        err_ref = (r.double().cpu() - t.cpu()).abs().max().item()
        floor = FLOOR[dtype] * max(t.abs().max().item(), 1.0)
        assert err <= 2 * err_ref + floor, f"{what}: triton {err:.3g} vs reference {err_ref:.3g}"


@here
def test_bitwise_deterministic():
    x, dy, w, b = _inputs((3, 33, 5, 7), torch.float64, "nchw")
    with tuning(ln2d_block_c=8):
        first = _run("triton", x, dy, w, b, torch.float32, True)
        second = _run("triton", x, dy, w, b, torch.float32, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@here
def test_opcheck_on_triton():
    x, _, w, b = _inputs((2, 5, 3, 4), torch.float32, "nchw")
    args = (x.float().to(DEVICE).requires_grad_(), w.float().to(DEVICE).requires_grad_(),
            b.float().to(DEVICE).requires_grad_(), 1e-5)
    with normkit.backend("triton"):
        torch.library.opcheck(torch.ops.normkit.layer_norm_2d.default, args)
