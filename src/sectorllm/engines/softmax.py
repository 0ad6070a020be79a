"""run.c's softmax in float32, with glibc's expf written out in numba so that both vectorize and keep their bits."""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma): the one fused operation glibc's expf performs on a machine with FMA."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return types.float64(types.float64, types.float64, types.float64), codegen


def _pow2_over_32(i: int) -> float:
    """2**(i/32) rounded to the nearest double, in exact integer arithmetic."""
    extra = 16
    target = 1 << ((52 + extra) * 32 + i)
    lo, hi = 1 << (52 + extra), 1 << (53 + extra)
    while hi - lo > 1:  # the integer 32nd root of target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mid ** 32 <= target else (lo, mid)
    return ((lo + (1 << (extra - 1))) >> extra) * 2.0 ** -52


# glibc's expf (the one run.c calls): x/ln2 = k/32 + r/32, exp(x) = 2**(k/32) * a cubic in r, all in double.
# The constants are glibc's; the result equals glibc's expf for all 2**32 inputs (checked exhaustively against it),
# which needs r from one fused multiply-add as glibc's FMA build computes it. Written out here so it vectorizes.
_EXP_INVLN2_32 = float.fromhex("0x1.71547652b82fep+5")
_EXP_SHIFT = float.fromhex("0x1.8p+52")
_EXP_C0 = float.fromhex("0x1.c6af84b912394p-5") / 32 ** 3
_EXP_C1 = float.fromhex("0x1.ebfce50fac4f3p-3") / 32 ** 2
_EXP_C2 = float.fromhex("0x1.62e42ff0c52d6p-1") / 32
_EXP_TABLE = np.array([_pow2_over_32(i) for i in range(32)])
_EXP_POW2_MIN = -160  # 2**(k // 32) for every k the table is reached with
_EXP_POW2 = np.array([2.0 ** e for e in range(_EXP_POW2_MIN, 140)])
_EXP_OVERFLOW = np.float32(float.fromhex("0x1.62e42ep6"))
_EXP_UNDERFLOW = np.float32(-float.fromhex("0x1.9fe368p6"))


@numba.njit(cache=True, fastmath=False, inline="always")
def expf(x: np.float32) -> np.float32:
    """glibc's expf, bit for bit, in operations the compiler can vectorize."""
    if x != x:
        return x + x
    if x > _EXP_OVERFLOW:
        return np.float32(np.inf)
    if x < _EXP_UNDERFLOW:
        return np.float32(0.0)
    xd = np.float64(x)
    kd = (_EXP_INVLN2_32 * xd + _EXP_SHIFT) - _EXP_SHIFT  # the nearest integer k, ties to even
    r = _fma(_EXP_INVLN2_32, xd, -kd)
    k = np.int64(kd)
    s = _EXP_TABLE[k & 31] * _EXP_POW2[(k >> 5) - _EXP_POW2_MIN]
    y = (_EXP_C0 * r + _EXP_C1) * (r * r) + (_EXP_C2 * r + 1.0)
    return np.float32(y * s)



@numba.njit(cache=True, fastmath=False)
def softmax(x: np.ndarray) -> None:
    """In place, float32, in run.c's order: subtract the max, expf, sequential sum, divide."""
    max_val = x[0]
    for i in range(1, x.shape[0]):
        if x[i] > max_val:
            max_val = x[i]
    for i in range(x.shape[0]):
        x[i] = expf(x[i] - max_val)
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i]
    for i in range(x.shape[0]):
        x[i] /= total
