"""What every Numba kernel of this backend shares: the numba import, the tiling constants, the
token chunking, the 16-bit float codecs and the element load / store by storage kind.

Storage kinds (what a kernel sees): ``uint16`` = bfloat16 bits, ``int16`` = float16 bits (Numba
has no CPU float16), anything else = a native float. Codecs use integer arithmetic only, so
fastmath never touches a rounding. Design notes: ``docs/numba.md``.
"""
from __future__ import annotations

import threading

import numpy as np

try:  # numba is optional: importing this module must work without it
    import numba
    from llvmlite import ir as _ir
    from numba import njit, types
    from numba.extending import intrinsic, overload
    IMPORT_ERROR: str | None = None
except Exception as _exc:  # pragma: no cover - exercised only without numba
    numba = None
    IMPORT_ERROR = f"numba is not installed ({type(_exc).__name__}: {_exc})"

#: Tokens per group, FIXED at 8: the forward's projection loop and the backward's dphi update
#: are written out by hand for exactly 8 tokens (accumulators a0..a7, coefficients c0..c7), and
#: the backward's w = dm @ phi takes them 4 at a time. It is not a tuning knob.
TB = 8
SB = 64          # tokens per super-block: phi / dphi tiles stay cached across it
KT = 512         # column tile: TB x KT activations in L1, F x KT of phi / dphi in L2
PT = 512         # post operator: column tile per token
MAX_CHUNKS = 16  # tokens are cut into at most this many chunks, a function of T only
# SB, KT, PT and MAX_CHUNKS set the order of the sums, so changing one changes result bits.
assert TB == 8, "TB is fixed by the hand-unrolled kernels (pre_forward.py, pre_backward.py)"
assert SB % TB == 0, "a super-block holds whole token groups"

#: fastmath flags of the float kernels: ``reassoc`` lets LLVM vectorise the reductions,
#: ``contract`` lets it fuse multiply-adds; integer code (the codecs) is untouched by either.
FASTMATH = {"reassoc", "contract"}

# Numba calls from several Python threads are serialised: the parallel region already uses
# every core, and this keeps any threading layer (workqueue included) safe.
LOCK = threading.Lock()


def chunking(T: int) -> tuple[int, int]:
    """(chunk size, chunk count) for T tokens: a function of T only, never of the thread
    count, so the per-chunk partial sums and their reduction are the same on every machine."""
    if T == 0:
        return TB, 0
    blocks = -(-T // TB)
    per = -(-blocks // MAX_CHUNKS)
    csize = per * TB
    return csize, -(-T // csize)


def storage(a: np.ndarray) -> np.ndarray:
    """The array as the kernels read it: fp16 travels as int16 bits, bf16 already as uint16."""
    if a.dtype == np.float16:
        return a.view(np.int16)
    return a


def compute_dtype(x_dtype, p_dtype):
    """fp64 as soon as x or the parameters are fp64, else fp32."""
    return np.float64 if (x_dtype == np.float64 or p_dtype == np.float64) else np.float32


if numba is not None:
    # -----------------------------------------------------------------------------------------
    # bit casts and 16-bit float codecs (integer arithmetic only: immune to fastmath)

    @intrinsic
    def _u32_as_f32(typingctx, v):
        sig = types.float32(types.uint32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.FloatType())
        return sig, codegen

    @intrinsic
    def _f32_as_u32(typingctx, v):
        sig = types.uint32(types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.IntType(32))
        return sig, codegen

    @njit(inline="always", cache=True)
    def _bf16_to_f32(h):
        return _u32_as_f32(np.uint32(h) << np.uint32(16))

    @njit(inline="always", cache=True)
    def _f16_to_f32(h):
        hu = np.uint32(np.uint16(h))
        a = hu & np.uint32(0x7FFF)
        sign = (hu & np.uint32(0x8000)) << np.uint32(16)
        # normal or subnormal: exact rescale by 2**112; inf / nan: force the exponent
        fin = _f32_as_u32(_u32_as_f32(a << np.uint32(13)) * np.float32(5.192296858534828e33))
        nonfin = (a << np.uint32(13)) | np.uint32(0x7F800000)
        mask = np.uint32(0) - np.uint32(a >= np.uint32(0x7C00))  # all ones for inf / nan
        return _u32_as_f32((nonfin & mask) | (fin & ~mask) | sign)

    @njit(inline="always", cache=True)
    def _f32_to_bf16(f):
        w = _f32_as_u32(np.float32(f))
        rnd = (w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        mask = np.uint32(0) - np.uint32((w & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000))
        return np.uint16((np.uint32(0x7FC0) & mask) | (rnd & ~mask))  # branch-free: vectorises

    @njit(inline="always", cache=True)
    def _f32_to_f16(f):
        w = _f32_as_u32(np.float32(f))
        sign = (w >> np.uint32(16)) & np.uint32(0x8000)
        a = w & np.uint32(0x7FFFFFFF)
        if a > np.uint32(0x7F800000):
            h = np.uint32(0x7E00)
        elif a >= np.uint32(0x477FF000):  # rounds to >= 65520: infinity
            h = np.uint32(0x7C00)
        elif a >= np.uint32(0x38800000):  # normal half
            r = a - np.uint32(0x38000000)
            h = (r + np.uint32(0xFFF) + ((r >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        elif a < np.uint32(0x33000000):  # below half the smallest subnormal (ties to 0)
            h = np.uint32(0)
        else:  # subnormal half: shift the full significand, round to nearest even
            mant = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
            sh = np.uint32(126) - (a >> np.uint32(23))
            q = mant >> sh
            rem = mant & ((np.uint32(1) << sh) - np.uint32(1))
            half = np.uint32(1) << (sh - np.uint32(1))
            if rem > half or (rem == half and (q & np.uint32(1)) == np.uint32(1)):
                q += np.uint32(1)
            h = q
        return np.int16(np.uint16(h | sign))

    # -----------------------------------------------------------------------------------------
    # element load / store a[i, k] by storage kind: _ld decodes to fp32 (or returns the native
    # float), _st rounds once to the array's encoding

    def _ld(a, i, k):
        pass

    @overload(_ld, inline="always")
    def _ld_ol(a, i, k):
        if a.dtype == types.uint16:
            return lambda a, i, k: _bf16_to_f32(a[i, k])
        if a.dtype == types.int16:
            return lambda a, i, k: _f16_to_f32(a[i, k])
        return lambda a, i, k: a[i, k]

    def _st(a, i, k, v):
        pass

    @overload(_st, inline="always")
    def _st_ol(a, i, k, v):
        if a.dtype == types.uint16:
            def impl(a, i, k, v):
                a[i, k] = _f32_to_bf16(v)
            return impl
        if a.dtype == types.int16:
            def impl(a, i, k, v):
                a[i, k] = _f32_to_f16(v)
            return impl

        def impl(a, i, k, v):
            a[i, k] = v
        return impl

    # Inner loops of the kernels run over unsigned column indices (``ku0 + k`` with both
    # uint64): numba then emits no negative-index wrap-around select, and LLVM vectorises the
    # loop. (1-D views would do the same but cost a reference-count update each, which adds up
    # in tiled loops.)
