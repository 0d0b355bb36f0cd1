"""Compile every kernel variant the launchers use to NVIDIA machine code — no GPU needed.

The Triton interpreter (``TRITON_INTERPRET=1``, how the tests run on a CPU) executes kernels with
NumPy and forgives what the compiler does not (a loop-carried value changing type, a non-constexpr
global, a bad layout). This script runs the launchers over representative shapes, dtypes, layouts
and flags with every ``[grid](...)`` launch *recorded* instead of executed, then compiles each
distinct (kernel, signature, constexpr values) to a cubin for ``--arch`` (default 90 = H100/H200)
with Triton's bundled ptxas::

    python -m normkit.kernels.triton.compile_check --arch 90        # exit 0: all compiled

Exit status: 0 all compiled, 1 a compile failed (printed), 2 run under TRITON_INTERPRET (the
kernels are then interpreter objects and cannot be compiled), 3 Triton's NVIDIA backend or
ptxas is not available here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` is logged, not run."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel, args, kwargs))
        return launch


def _signature(kernel, args, kwargs):
    """(signature, constexprs, options) of one recorded launch, as ``triton.compile`` takes them."""
    import torch

    values = dict(zip(kernel.arg_names, args, strict=False))
    options = {}
    for k, v in kwargs.items():
        (values if k in kernel.arg_names else options)[k] = v
    sig, consts = {}, {}
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _DTYPE_NAMES[str(v.dtype).removeprefix("torch.")]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {p.name}={v!r}")
    return sig, consts, options


def _scenarios(full: bool):
    """Launcher calls covering every constexpr flag of every kernel (``full``: the whole product)."""
    import torch

    from . import channel, channel_rows, group, row

    def t(*shape, dtype=torch.float32, cl=False):
        x = torch.empty(*shape, dtype=dtype)
        return x.to(memory_format=torch.channels_last) if cl else x

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    acts = tuple(range(13))  # the activation kinds (_common.py; a code without parameter bits: parameter 0)
    combos = ([(d, cl, a, r) for d in dtypes for cl in (False, True) for a in acts for r in (False, True)]
              if full else
              [(torch.float32, False, 0, False), (torch.float16, True, 1, True),
               (torch.bfloat16, True, 2, False), (torch.float16, False, 3, True)]
              + [(torch.float32, a % 2 == 0, a, a % 3 == 0) for a in acts[4:]])
    v = t(8)
    for dtype, cl, act, has_res in combos:
        x = t(4, 6, 5, 7, dtype=dtype, cl=cl)
        res = t(4, 6, 5, 7, dtype=dtype, cl=cl) if has_res else None
        channel.channel_stats(x, programs=8)
        channel.channel_apply(x, v[:6], v[:6], res, act)
        channel.channel_backward_reduce(x, x, res, v[:6], v[:6], v[:6], v[:6], act, programs=8)
        for need_dz in (False, True):
            channel.channel_backward_dx(x, x, res, v[:6], v[:6], v[:6], v[:6], act, v[:6], v[:6], need_dz)
        w = v[:6] if act != 2 else None  # affine and not
        group.group_forward(x, 2, w, w, 1e-5, res, act)
        for need_dw in (False, True):
            stat = v[:8].view(4, 2)
            group.group_backward(x, x, stat, stat, 2, w, w, res, act, need_dw, has_res)
    rows = ([(d, k, b, rms, aff) for d in dtypes for k, b in ((33, 8192), (70, 16)) for rms in (False, True)
             for aff in (False, True)] if full else
            [(torch.float32, 33, 8192, False, True), (torch.bfloat16, 70, 16, False, False),
             (torch.float16, 33, 8192, True, True), (torch.float32, 70, 16, True, True)])
    for dtype, k, max_block, rms, affine in rows:  # max_block 16 < k: rows split over blocks
        x2 = t(3, k, dtype=dtype)
        wk = torch.empty(k, dtype=dtype) if affine else None
        row.row_forward(x2, wk, None if rms else wk, 1e-5, rms, max_block=max_block)
        for need_dw in (False, True):
            row.row_backward(x2, x2, None if rms else v[:3], v[:3], wk, rms, need_dw, programs=2,
                             max_block=max_block)
    for dtype in dtypes:  # LayerNorm2d on NCHW input: one and several channel tiles, affine or not
        x = t(2, 33, 5, 7, dtype=dtype)
        stat = t(2, 5, 7)
        for block_c, w in ((None, t(33, dtype=dtype)), (8, None)):
            channel_rows.ln2d_forward(x, w, w, 1e-6, block_c=block_c)
            for need_dw in (False, True):
                channel_rows.ln2d_backward(x, x, stat, stat, w, need_dw, block_c=block_c)

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90 = Hopper)")
    parser.add_argument("--full", action="store_true", help="every dtype × layout × act × residual")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on"):
        print("compile_check: unset TRITON_INTERPRET (the kernels were built for the interpreter)")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(args.arch)
    except Exception as err:  # noqa: BLE001 - any failure here means "no NVIDIA toolchain"
        print(f"compile_check: Triton's NVIDIA backend / ptxas is not available here ({err})")
        return 3

    from . import _common, channel, channel_rows, group, row

    log = []
    for mod in (_common, channel, channel_rows, group, row):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, _Recorder(obj, log))
    _scenarios(args.full)

    seen, failures, t0 = set(), 0, time.time()
    for kernel, a, kw in log:
        sig, consts, opts = _signature(kernel, a, kw)
        key = (kernel.__name__, tuple(sorted(sig.items())),
               tuple(sorted((k, str(v)) for k, v in consts.items())), tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            target = GPUTarget("cuda", args.arch, 32)
            triton.compile(ASTSource(kernel, sig, consts), target=target, options=opts)
        except Exception:  # noqa: BLE001 - report every failing variant, then fail
            failures += 1
            print(f"FAILED {kernel.__name__} {consts} {opts}")
            traceback.print_exc(limit=3)
    print(f"compile_check: {len(seen) - failures}/{len(seen)} kernel variants compiled for sm_{args.arch} "
          f"in {time.time() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
