"""What every backend shares and no backend owns: output allocation, the few-element rules.

Backends allocate their outputs here. With ``POISON`` set (the test suite sets it; so does
``MHC_MULTI_POISON=1``) outputs start as NaN (bf16 words: a NaN pattern) instead of whatever
the allocator returns, so an element a kernel never writes cannot pass a comparison.
"""
from __future__ import annotations

import os

import numpy as np

POISON = os.environ.get("MHC_MULTI_POISON") == "1"

#: Rows with n*D <= SMALL_ND take a float64 path for dx (numba: fp32 x; triton: every x, as its
#: 16-bit paths carry fewer bf16 pieces). In
#: dx = r*u - x * r^3 <u, x> / nD (u = g * dm@phi / r) the two parts cancel for short rows, to
#: eps*r^2 of their size at n*D = 1, so fp32 arithmetic there misses the fp32 bound (11 of 400
#: random (1,1,1,1) cases did). Beyond a few elements such cancellation needs u nearly parallel
#: to x, which random rows almost never are; 16 leaves a wide margin at negligible cost.
SMALL_ND = 16

#: Below this many h_res entries (T*n*n) the forward computes m = v @ (phi*g)^T more precisely
#: than fp32 arithmetic gives (triton: phi*g in 3 bf16 pieces, products added in fp32; numba:
#: float64). h_res = a_res*r*m + bias can cancel (|h_res| << |a_res*r*m|), which multiplies the
#: relative error of m, and when a handful of entries make up the whole norm nothing averages it
#: out (test_cancelling_h_res). Over many entries the error averages out, so large batches keep
#: the cheaper arithmetic.
FEW_RES = 256

#: Where x has at most this many elements (T*n*D) the post operator sums x_next, dx and df_out
#: in float64. Each element of x_next (h_res @ x + h_post * f_out) and of its dx and df_out is a sum
#: of a few terms with random signs that can cancel; where a handful of elements make up the
#: whole norm nothing averages that out, and fp32 arithmetic misses the fp32 bound: x_next of a
#: (1,1,1,1) fp32 x was past 1e-5 in 6.7e-4 of simulated draws (5e-6 at two elements, none of
#: 2e5 from four on). 16 leaves a wide margin at no cost (test_cancelling_post).
FEW_POST = 16
_BF16_NAN = 0x7FC0


def empty(shape, dtype) -> np.ndarray:
    """An output numpy array (``np.uint16`` holds bfloat16 words)."""
    a = np.empty(shape, dtype)
    if POISON:
        a.fill(_BF16_NAN if a.dtype == np.uint16 else np.nan)
    return a


def empty_torch(shape, dtype, device):
    """An output torch tensor."""
    import torch
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t
