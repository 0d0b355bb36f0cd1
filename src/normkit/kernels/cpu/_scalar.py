"""Element access and activations shared by the CPU kernels.

Every kernel reads its tensors as flat 1-D arrays through :func:`ld` and writes through
:func:`st`, so one kernel source serves four storage types:

| array dtype | holds                          | ``ld`` returns | ``st`` rounds          |
|-------------|--------------------------------|----------------|------------------------|
| float32     | float32                        | float32        | —                      |
| float64     | float64                        | float64        | —                      |
| uint16      | IEEE half bits (torch.float16) | float32        | to nearest even (LLVM) |
| int16       | bfloat16 bits (torch.bfloat16) | float32        | to nearest even        |

Numba has no float16 type on the CPU, so half precision travels as its bit pattern and is
converted with LLVM's own ``fpext``/``fptrunc``; bfloat16 is the top half of a float32.
Accumulation therefore happens in float32 for every 16-bit input and in float64 for float64.

Activations take an int code (:data:`ACT_CODES`): 0 identity, 1 ReLU, 2 SiLU, 3 exact GELU.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

ACT_CODES = {"": 0, "relu": 1, "silu": 2, "gelu": 3}

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


@intrinsic
def _half_bits_to_f32(typingctx, bits):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_half_bits(typingctx, value):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_bf16_bits(typingctx, value):
    """Round to nearest even, as torch does; NaN stays a (quiet) NaN."""
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(u, builder.add(ir.Constant(i32, 0x7FFF), lsb))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        quiet = builder.or_(u, ir.Constant(i32, 0x00400000))
        bits = builder.select(is_nan, quiet, rounded)
        return builder.trunc(builder.lshr(bits, ir.Constant(i32, 16)), ir.IntType(16))

    return sig, codegen


def ld(a, i):  # pragma: no cover - replaced by the overload inside jitted code
    """``a[i]`` as the accumulation type."""


def st(a, i, v):  # pragma: no cover
    """``a[i] = v``, rounded to the array's storage type."""


def zero(a):  # pragma: no cover
    """0 in the accumulation type of array ``a``."""


@overload(ld)
def _ld(a, i):
    dt = a.dtype
    # Indices go in as uint64: numba then skips its negative-index wraparound check, which
    # otherwise sits in every inner loop and keeps LLVM from vectorising it (1.5x slower).
    if dt in (types.float32, types.float64):
        return lambda a, i: a[np.uint64(i)]
    if dt == types.uint16:
        return lambda a, i: _half_bits_to_f32(a[np.uint64(i)])
    if dt == types.int16:
        return lambda a, i: _bf16_bits_to_f32(a[np.uint64(i)])
    return None


@overload(st)
def _st(a, i, v):
    dt = a.dtype
    if dt == types.float32:
        def impl(a, i, v):
            a[np.uint64(i)] = np.float32(v)
        return impl
    if dt == types.float64:
        def impl(a, i, v):
            a[np.uint64(i)] = np.float64(v)
        return impl
    if dt == types.uint16:
        def impl(a, i, v):
            a[np.uint64(i)] = _f32_to_half_bits(np.float32(v))
        return impl
    if dt == types.int16:
        def impl(a, i, v):
            a[np.uint64(i)] = _f32_to_bf16_bits(np.float32(v))
        return impl
    return None


@overload(zero)
def _zero(a):
    if a.dtype == types.float64:
        return lambda a: np.float64(0.0)
    return lambda a: np.float32(0.0)


def like(z, v):  # pragma: no cover
    """The Python number ``v`` in ``z``'s float type (keeps float32 math in float32)."""


@overload(like)
def _like(z, v):
    if z == types.float32:
        return lambda z, v: np.float32(v)
    return lambda z, v: np.float64(v)


@njit(cache=True)
def act_fwd(z, act):
    """act(z) for the int code ``act``."""
    one = like(z, 1.0)
    if act == 1:
        return z if z > 0 else like(z, 0.0)
    if act == 2:
        return z / (one + math.exp(-z))
    if act == 3:
        return like(z, 0.5) * z * (one + math.erf(z * like(z, _INV_SQRT2)))
    return z


@njit(cache=True)
def act_grad(z, act):
    """act'(z) for the int code ``act`` (ReLU'(0) = 0, as torch)."""
    one = like(z, 1.0)
    if act == 1:
        return one if z > 0 else like(z, 0.0)
    if act == 2:
        s = one / (one + math.exp(-z))
        return s * (one + z * (one - s))
    if act == 3:
        half = like(z, 0.5)
        return half * (one + math.erf(z * like(z, _INV_SQRT2))) + z * math.exp(-half * z * z) * like(
            z, _INV_SQRT2PI)
    return one
