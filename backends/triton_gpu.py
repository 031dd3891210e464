"""Triton backend: the mHC pre operator, fused forward and backward (CONTRACT.md).

Same interface as ``numpy_ref`` (see its docstring), on torch tensors: CUDA tensors on a GPU, or
CPU tensors when ``TRITON_INTERPRET=1`` runs the same kernels on Triton's CPU interpreter.

Kernels (design and precision choices in docs/triton.md):

* ``_prep_phi_kernel``   forward: phi*g -> bf16 hi/mid/lo pieces, F padded.
* ``_pre_fwd_kernel``    one program per BLOCK_T tokens: pass 1 over the row accumulates the sum
                         of squares and m = v @ (phi*g)^T on the tensor cores; gates; pass 2 over
                         D (reverse order, so the most recently read x is re-read from L2) writes
                         h_in.  Nothing bigger than [T, F] is written besides the outputs.
* ``_pre_bwd_row_kernel`` persistent; per token block: dh_pre = sum_d dh_in*x, the gate
                         derivatives, dm = r*e and the coefficient dr*r^3/(nD) -> [T, F_PAD] and
                         [T] scratch; per-program partial sums for dbias and dalpha.
* ``_pre_fwd_part_kernel``, ``_pre_fwd_fin_kernel``  the split forward (16-bit x: n <= 4 at
                         T >= 2048, n >= 5 at every T; fp32 x at every T): pass 1 over a share
                         of the row -> partials; gates, h_in.
* ``_pre_bwd_col_kernel`` grid (stream i, D chunk, token split): its slice of phi split into bf16
                         pieces once; per token block w = dm @ phi, dx, and the partial
                         P = dm^T @ v of dphi/g held in registers for the program's whole token
                         range, written once to a [splits, F, nD] workspace.
* ``_reduce_partials_kernel`` fixed-order sums of the workspaces: dphi = g*P, dgamma = sum_f phi*P,
                         dbias, dalpha.  No atomics anywhere: results are bitwise repeatable.

fp32 accuracy on the tensor cores: every fp32 operand is split into bf16 pieces
(a = a0 + a1 + a2, each the bf16 rounding of what is left) and the dot is the sum of the piece
products a_i @ b_j with i + j < max(pieces) — two or three bf16 dots reach ~2^-17 relative, six
reach fp32.  bf16 x is exact in one piece.  See docs/triton.md for the measurements.
"""
from __future__ import annotations

import functools
import math
import os

from ._common import FEW_RES, SMALL_ND, empty_torch

try:  # importing this module must never fail where triton is missing
    import triton
    import triton.language as tl
    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_ERROR = exc

try:
    import torch
except Exception:  # pragma: no cover
    torch = None

ARRAY_KIND = "torch"
SUPPORTS_SINKHORN = True
X_DTYPES = ("bf16", "fp16", "fp32")  # the front end refuses others before we run
PARAM_DTYPES = ("fp32",)
#: The most tokens T = B*S the kernels take (the front end refuses more).  They number tokens
#: in int32 (rows = block * BLOCK_T + arange(BLOCK_T), the token loops' counters), which reach
#: T + BLOCK_T - 1 in the last block; 2^16 below 2^31 leaves room for any token block up to
#: 2^16 (the rules' largest is 64).  Offsets of token * row length are int64 (rows64).
MAX_TOKENS = 2**31 - 2**16

#: CUDA's grid limits: programs along axis 0, and along axes 1 and 2 (_checked).
_MAX_GRID0 = 2**31 - 1
_MAX_GRID12 = 65535


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def availability() -> str | None:
    """None when this backend can run here, else the reason it cannot."""
    if torch is None:
        return "torch is not installed"
    if triton is None:
        return f"triton is not installed ({_TRITON_ERROR})"
    if _interpret():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
    return None


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv is a JIT function: ~7 us per call from the host)."""
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Precision: number of bf16 pieces per operand, by x dtype (measured; docs/triton.md).
#   fwd: m = x @ (phi*g)^T                     (A = x, B = phi*g)
#   w:   w = dm @ phi          (only feeds dx)  (A = dm, B = phi)
#   P:   P = dm^T @ x          (dphi, dgamma)   (A = dm, B = x)
_PIECES = {
    #            fwd (A,B)  w (A,B)  P (A,B)
    "bf16":     ((1, 2),   (2, 2),  (3, 1)),
    "fp16":     ((2, 2),   (2, 2),  (3, 2)),
    "fp32":     ((3, 3),   (3, 3),  (3, 3)),
}


#: bf16 x with rows of n*D >= LONG_ROW_ND: w and P take two pieces of dm and one of phi / x
#: (H200, bench/gpu_pieces.py: column kernel 0.523 -> 0.479 ms at (4,4096,4,4096); errors in
#: docs/triton.md).  Shorter rows keep _PIECES: with few elements one token's rounding of dm
#: is the whole error.
LONG_ROW_ND = 256
_PIECES_LONG_BF16 = ((2, 1), (2, 1))
#: fp16 x at n >= 5 (F_PAD >= 64), the same rows: P takes two pieces of dm as well (x's two
#: pieces are exact, so the error is bf16's: dm to 16 bits; bench/pieces_emulation.py
#: --x-dtype fp16 --w 2,2 --p 2,2, 100-300 draws per shape at T <= 37, n*D = 256..520: dphi /
#: dgamma at most 1.0e-5 against 2e-5, bf16's P (2, 1) 6.8e-6 on the same shapes; the H200
#: accuracy suite 3.8e-6); w keeps 2 x 2 (fp16's dx bound is 1e-3).  H200 column kernel
#: (bench/results/gpu_quick-h200-fp16-p22.json): 1.314 -> 0.655 ms at (2,4096,6,4096); at
#: n = 4 slower, 0.620 -> 0.666 at (4,4096,4,4096), so n <= 4 keeps three pieces.
_PIECES_LONG_FP16 = ((2, 2), (2, 2))
#: At n >= 5 (F_PAD >= 64) rows of n*D >= LONGER_ROW_ND take one piece of dm for w too: dx at
#: most 2.5e-3 against 6e-3 over 360 draws at n*D = 1024..4096, T <= 3, of
#: bench/pieces_emulation.py (2.3e-3 with two pieces; at n*D = 256..400 one piece reached
#: 3.8e-3).  H200: column kernel 0.52 -> 0.40 ms at (2,4096,6,4096); at n = 4 one piece took
#: 148 registers instead of 128 and was slower (0.443 -> 0.458 ms at (4,4096,4,4096)).
LONGER_ROW_ND = 4096


def _dtype_name(dt) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]


if triton is not None:

    # -----------------------------------------------------------------------------------------
    @triton.jit
    def _bf16(a, INTERP: tl.constexpr):
        """fp32 -> bf16, round to nearest even.  Under the interpreter (whose casts truncate and
        whose dot multiplies bf16 bit patterns as integers) the value stays an fp32 that holds
        the bf16 number exactly, rounded with integer arithmetic."""
        if INTERP:
            b = a.to(tl.uint32, bitcast=True)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            r = b.to(tl.float32, bitcast=True)
        else:
            r = a.to(tl.bfloat16)
        return r

    @triton.jit
    def _dot(a, b, acc, INTERP: tl.constexpr):
        """acc + a @ b for bf16-valued operands (exact products, fp32 accumulation)."""
        if INTERP:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            r = tl.dot(a, b, acc)
        return r

    @triton.jit
    def _mm_link(a, b, part, SEP: tl.constexpr, INTERP: tl.constexpr):
        """part + a @ b, one link of _mm_core's chain: through the tensor cores' accumulator,
        or (SEP) a dot of its own from zero added in fp32."""
        if SEP:
            r = part + _opaque(_dot(a, b, tl.zeros(part.shape, dtype=tl.float32), INTERP),
                               INTERP)
        else:
            r = _dot(a, b, part, INTERP)
        return r

    @triton.jit
    def _mm_core(a0, a1, a2, b0, b1, b2, acc, NA: tl.constexpr, NB: tl.constexpr,
                 INTERP: tl.constexpr, SEP: tl.constexpr = False):
        """acc + a @ b from bf16 pieces a = a0 + a1 + a2, b = b0 + b1 + b2 (unused pieces are
        ignored).  The products a_i @ b_j with i + j < max(NA, NB) are summed, smallest first.

        The dots start from zero and their sum is added to ``acc`` with an ordinary fp32 add:
        the tensor cores truncate when they add the running accumulator, and over a long K loop
        (n*D/16 or T/16 steps) that bias reached 1e-4 relative on the H200 (docs/triton.md).
        Within the chunk the products chain through that accumulator (a few ulps over five
        dots); SEP makes every product a dot of its own, added in fp32 (round to nearest), for
        the few-h_res-entries forward (FEW_RES), where a cancelling h_res amplifies those ulps:
        the H200 missed 2e-5 in a rare draw of test_cancelling_h_res at (1,1,1,1) fp16.
        """
        NMAX: tl.constexpr = NA if NA > NB else NB
        part = tl.zeros(acc.shape, dtype=tl.float32)
        if NMAX > 2:
            if NA > 2:
                part = _mm_link(a2, b0, part, SEP, INTERP)
            if NB > 2:
                part = _mm_link(a0, b2, part, SEP, INTERP)
            if NA > 1:
                if NB > 1:
                    part = _mm_link(a1, b1, part, SEP, INTERP)
        if NA > 1:
            part = _mm_link(a1, b0, part, SEP, INTERP)
        if NB > 1:
            part = _mm_link(a0, b1, part, SEP, INTERP)
        part = _mm_link(a0, b0, part, SEP, INTERP)
        # With one chained dot, Triton folds "acc + dot(a, b, 0)" into "dot(a, b, acc)" and the
        # whole loop accumulates on the tensor cores (post backward at D = 65536: 8e-5 instead
        # of 2e-7).  An opaque copy of the product keeps the add in fp32.  With several dots
        # the last one's accumulator is not zero and nothing folds (checked in the TTGIR).
        if NMAX == 1 and not SEP:
            part = _opaque(part, INTERP)
        return acc + part

    @triton.jit
    def _opaque(v, INTERP: tl.constexpr):
        """v, through an instruction the compiler cannot see into (see _mm_core)."""
        if INTERP:
            r = v
        else:
            r = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                          is_pure=True, pack=1)
        return r

    @triton.jit
    def _split3(a, N: tl.constexpr, INTERP: tl.constexpr):
        """a -> (a0, a1, a2) bf16 pieces, a_k = bf16(a - a0 - ... - a_{k-1}); N pieces kept."""
        af = a.to(tl.float32)
        a0 = _bf16(af, INTERP)
        a1 = a0
        a2 = a0
        if N > 1:
            ar = af - a0.to(tl.float32)
            a1 = _bf16(ar, INTERP)
            if N > 2:
                a2 = _bf16(ar - a1.to(tl.float32), INTERP)
        return a0, a1, a2

    @triton.jit
    def _load_pieces(ptr, off, stride, mask, NP: tl.constexpr):
        """The NP bf16 pieces stored ``stride`` apart at ``ptr + off`` (masked lanes 0); pieces
        past NP alias the first, as _mm_core ignores them."""
        a0 = tl.load(ptr + off, mask=mask, other=0.0)
        a1 = a0
        a2 = a0
        if NP > 1:
            a1 = tl.load(ptr + stride + off, mask=mask, other=0.0)
        if NP > 2:
            a2 = tl.load(ptr + 2 * stride + off, mask=mask, other=0.0)
        return a0, a1, a2

    @triton.jit
    def _fwd_step(x_ptr, pg_ptr, rows64, rmask, i, d, ff, acc, ss2, ND: tl.constexpr,
                  D: tl.constexpr, F_PAD: tl.constexpr, NPA: tl.constexpr, NPB: tl.constexpr,
                  INTERP: tl.constexpr, SEP: tl.constexpr = False, CAT: tl.constexpr = False):
        """One (stream i, D chunk d) step of the forward's pass 1: the x tile's squares into
        ss2 and its products with the phi*g pieces (B tile [BLOCK_D, F_PAD]) into acc.

        CAT (one x piece and two phi*g pieces, i.e. bf16 x, and F_PAD <= 32; chosen by the
        wrapper): the two pieces are one B tile [BLOCK_D, 2 * F_PAD] (they are stored one after
        the other) and one dot; acc is then [BLOCK_T, 2 * F_PAD], the pieces' products side by
        side, summed by _fwd_acc_sum."""
        xv, ss2 = _fwd_x(x_ptr, rows64, rmask, i, d, ss2, ND, D)
        if CAT:
            dmask = d < D
            fc = tl.arange(0, 2 * F_PAD)
            b = tl.load(pg_ptr + fc[None, :] * ND + i * D + d[:, None], mask=dmask[:, None],
                        other=0.0)
            acc = _mm_core(xv, xv, xv, b, b, b, acc, 1, 1, INTERP)
        else:
            acc = _fwd_dot(xv, pg_ptr, i, d, ff, acc, ND, D, F_PAD, NPA, NPB, INTERP, SEP)
        return acc, ss2

    @triton.jit
    def _fwd_x(x_ptr, rows64, rmask, i, d, ss2, ND: tl.constexpr, D: tl.constexpr):
        """The x tile of (stream i, D chunk d), and ss2 plus its squares."""
        xv = tl.load(x_ptr + rows64[:, None] * ND + i * D + d[None, :],
                     mask=rmask[:, None] & (d < D)[None, :], other=0.0)
        xf = xv.to(tl.float32)
        return xv, ss2 + xf * xf

    @triton.jit
    def _fwd_dot(xv, pg_ptr, i, d, ff, acc, ND: tl.constexpr, D: tl.constexpr,
                 F_PAD: tl.constexpr, NPA: tl.constexpr, NPB: tl.constexpr,
                 INTERP: tl.constexpr, SEP: tl.constexpr = False):
        """acc + the x tile @ the phi*g pieces' columns ff (B tile [BLOCK_D, len(ff)])."""
        b0, b1, b2 = _load_pieces(pg_ptr, ff[None, :] * ND + i * D + d[:, None], F_PAD * ND,
                                  (d < D)[:, None], NPB)
        return _mm_pieces(xv, b0, b1, b2, acc, NPA, NPB, INTERP, SEP)

    @triton.jit
    def _fwd_acc_sum(acc, F_PAD: tl.constexpr, CAT: tl.constexpr):
        """m [BLOCK_T, F_PAD] from pass 1's accumulator: with CAT the two pieces' columns
        added."""
        if CAT:
            m = tl.sum(tl.reshape(acc, [acc.shape[0], 2, F_PAD]), axis=1)
        else:
            m = acc
        return m

    @triton.jit
    def _mm_pieces(a, b0, b1, b2, acc, NA: tl.constexpr, NB: tl.constexpr,
                   INTERP: tl.constexpr, SEP: tl.constexpr = False):
        """acc + a @ b, b given as bf16 pieces, a split here into NA pieces."""
        a0, a1, a2 = _split3(a, NA, INTERP)
        return _mm_core(a0, a1, a2, b0, b1, b2, acc, NA, NB, INTERP, SEP)

    @triton.jit
    def _round_out(v, dtype: tl.constexpr, INTERP: tl.constexpr):
        """Round the fp32 result once to the output dtype (round to nearest even)."""
        if INTERP and dtype == tl.bfloat16:
            r = _bf16(v, INTERP)
        else:
            r = v.to(dtype)
        return r


    # -----------------------------------------------------------------------------------------
    # Sinkhorn-Knopp on per-token [BLOCK_T, NP, NP] tiles (NP = pow2(n); entries outside the
    # n x n block are zero in P and ignored).  K is a constexpr: K = 0 compiles none of this.
    @triton.jit
    def _sk_p0(L, valid):
        """P0 = exp(L - max(L)) per token (the max over the n x n entries), zero outside."""
        Lm = tl.where(valid[None, :, :], L, float("-inf"))
        mx = tl.max(tl.max(Lm, axis=2), axis=1)
        return tl.where(valid[None, :, :], tl.exp(Lm - mx[:, None, None]), 0.0)

    @triton.jit
    def _sk_iterate(P, steps):
        """``steps`` Sinkhorn iterations: divide each row by its sum, then each column (as a
        multiply by the reciprocal of the sum)."""
        for _ in range(steps):
            r = tl.sum(P, axis=2)
            P = P * (1.0 / tl.where(r > 0, r, 1.0))[:, :, None]
            c = tl.sum(P, axis=1)
            P = P * (1.0 / tl.where(c > 0, c, 1.0))[:, None, :]
        return P

    @triton.jit
    def _sk_vjp(L, dH, valid, K: tl.constexpr):
        """d(logits) from d(SK_K(logits)): the K iterations backward, each reverse step
        recomputing its forward state from the logits, nothing stored in memory.  The replay is
        checkpointed in registers: segments of SEG steps, walked backward, each starting from the
        state at the segment's start (recomputed once per segment), so K = 20 costs ~70
        iterations of replay instead of K(K-1)/2 = 190."""
        SEG: tl.constexpr = 5 if K > 8 else K
        NSEG: tl.constexpr = (K + SEG - 1) // SEG
        P0 = _sk_p0(L, valid)
        dP = tl.where(valid[None, :, :], dH, 0.0)
        for sg in range(NSEG):
            a = (NSEG - 1 - sg) * SEG
            b = tl.minimum(a + SEG, K)
            C = _sk_iterate(P0, a)                    # state before row step a
            for t in range(b - a):
                P = _sk_iterate(C, b - 1 - t - a)     # state before row step s = b-1-t
                r = tl.sum(P, axis=2)
                ri = 1.0 / tl.where(r > 0, r, 1.0)
                Q = P * ri[:, :, None]                # state before column step s
                c = tl.sum(Q, axis=1)
                ci = 1.0 / tl.where(c > 0, c, 1.0)
                Qc = Q * ci[:, None, :]
                dP = (dP - tl.sum(dP * Qc, axis=1)[:, None, :]) * ci[:, None, :]
                dP = (dP - tl.sum(dP * Q, axis=2)[:, :, None]) * ri[:, :, None]
                dP = tl.where(valid[None, :, :], dP, 0.0)
        return dP * P0

    # -----------------------------------------------------------------------------------------
    @triton.jit
    def _gates_epilogue(acc, ss, rows, rows64, rmask, ff, alpha_ptr, bias_ptr, rms_ptr, hmix_ptr,
                        hpre_ptr, hpost_ptr, hres_ptr, norm_eps, hc_eps, N: tl.constexpr,
                        F: tl.constexpr, ND: tl.constexpr, K: tl.constexpr, NP: tl.constexpr):
        """From a token block's raw projections ``acc`` [BLOCK_T, F_PAD] (= h_mix) and sums of
        squares ``ss``: inv_rms, the gates (h_pre, h_post, h_res logits, or SK_K of them), all
        stored; returns the gate row [BLOCK_T, F_PAD] (h_pre in columns 0..N-1)."""
        r, gate = _gates(acc, ss, ff, alpha_ptr, bias_ptr, norm_eps, hc_eps, N, F, ND)
        _gates_store(acc, r, gate, rows, rows64, rmask, ff, rms_ptr, hmix_ptr, hpre_ptr,
                     hpost_ptr, hres_ptr, N, F, K, NP)
        return gate

    @triton.jit
    def _gates(acc, ss, ff, alpha_ptr, bias_ptr, norm_eps, hc_eps, N: tl.constexpr,
               F: tl.constexpr, ND: tl.constexpr):
        """(inv_rms [BLOCK_T], gate row [BLOCK_T, F_PAD]: h_pre, h_post, h_res logits) from the
        raw projections ``acc`` and the sums of squares ``ss``."""
        r = 1.0 / tl.sqrt_rn(ss / ND + norm_eps)
        a_pre = tl.load(alpha_ptr)
        a_post = tl.load(alpha_ptr + 1)
        a_res = tl.load(alpha_ptr + 2)
        fmask = ff < F
        is_pre = ff < N
        is_post = (ff >= N) & (ff < 2 * N)
        bias = tl.load(bias_ptr + ff, mask=fmask, other=0.0)
        a_col = tl.where(is_pre, a_pre, tl.where(is_post, a_post, a_res))
        z = a_col[None, :] * (r[:, None] * acc) + bias[None, :]
        sig = 1.0 / (1.0 + tl.exp(-z))
        gate = tl.where(is_pre[None, :], sig + hc_eps, tl.where(is_post[None, :], 2.0 * sig, z))
        return r, gate

    @triton.jit
    def _gates_store(acc, r, gate, rows, rows64, rmask, ff, rms_ptr, hmix_ptr, hpre_ptr,
                     hpost_ptr, hres_ptr, N: tl.constexpr, F: tl.constexpr, K: tl.constexpr,
                     NP: tl.constexpr):
        """Stores inv_rms, h_mix, h_pre, h_post and h_res (the logits, or SK_K of them) of the
        rows in ``rmask``."""
        fmask = ff < F
        is_pre = ff < N
        is_post = (ff >= N) & (ff < 2 * N)
        tl.store(rms_ptr + rows, r, mask=rmask)
        rm2 = rmask[:, None]
        tl.store(hmix_ptr + rows64[:, None] * F + ff[None, :], acc, mask=rm2 & fmask[None, :])
        tl.store(hpre_ptr + rows64[:, None] * N + ff[None, :], gate, mask=rm2 & is_pre[None, :])
        tl.store(hpost_ptr + rows64[:, None] * N + (ff[None, :] - N), gate,
                 mask=rm2 & is_post[None, :])
        is_res = (ff >= 2 * N) & fmask
        tl.store(hres_ptr + rows64[:, None] * (N * N) + (ff[None, :] - 2 * N), gate,
                 mask=rm2 & is_res[None, :])
        if K > 0:
            # Sinkhorn: the logits just written are re-read per token as an [NP, NP] tile (the
            # barrier makes this program's stores visible to all its threads), projected in
            # registers and written over (h_res = SK_K(logits), CONTRACT.md).
            tl.debug_barrier()
            kk = tl.arange(0, NP)
            valid = (kk < N)[:, None] & (kk < N)[None, :]
            off3 = rows64[:, None, None] * (N * N) + kk[None, :, None] * N + kk[None, None, :]
            m3 = rmask[:, None, None] & valid[None, :, :]
            L = tl.load(hres_ptr + off3, mask=m3, other=0.0)
            P = _sk_iterate(_sk_p0(L, valid), K)
            tl.debug_barrier()
            tl.store(hres_ptr + off3, P, mask=m3)

    @triton.jit
    def _prep_phi_kernel(
        phi_ptr,     # [F, ND] fp32
        g_ptr,       # [ND] fp32 (unused unless HAS_G)
        out_ptr,     # [NPIECE, F_PAD, ND] bf16: pieces of phi (* g), rows >= F zero
        F: tl.constexpr, ND: tl.constexpr, F_PAD: tl.constexpr,
        NPIECE: tl.constexpr, HAS_G: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
    ):
        # p = phi[f, k] * g[k]; p0 = bf16(p); p1 = bf16(p - p0); p2 = bf16(p - p0 - p1)
        f = tl.program_id(1)
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        km = k < ND
        fv = f + tl.zeros([BLOCK], dtype=tl.int32)
        p = tl.load(phi_ptr + f * ND + k, mask=km & (fv < F), other=0.0).to(tl.float32)
        if HAS_G:
            p = p * tl.load(g_ptr + k, mask=km, other=0.0).to(tl.float32)
        p0 = _bf16(p, INTERP)
        tl.store(out_ptr + f * ND + k, p0, mask=km)
        if NPIECE > 1:
            r = p - p0.to(tl.float32)
            p1 = _bf16(r, INTERP)
            tl.store(out_ptr + F_PAD * ND + f * ND + k, p1, mask=km)
            if NPIECE > 2:
                p2 = _bf16(r - p1.to(tl.float32), INTERP)
                tl.store(out_ptr + 2 * F_PAD * ND + f * ND + k, p2, mask=km)

    # -----------------------------------------------------------------------------------------
    # Forward, per token t (CONTRACT.md):
    #   r = 1/sqrt(mean(v*v) + norm_eps);  m = v @ (phi*g)^T;  u = r*m
    #   h_pre = sigmoid(a0*u[:n] + b[:n]) + hc_eps;  h_post = 2*sigmoid(a1*u[n:2n] + b[n:2n])
    #   h_res = a2*u[2n:] + b[2n:];  h_in = sum_i h_pre[i] * x[i, :]
    @triton.jit(do_not_specialize=["T"])
    def _pre_fwd_kernel(
        x_ptr,       # [T, n, D] x dtype
        pg_ptr,      # [NPB, F_PAD, ND] bf16 pieces of phi*g
        alpha_ptr,   # [3] fp32
        bias_ptr,    # [F] fp32
        hin_ptr,     # [T, D] x dtype          (out)
        hpost_ptr,   # [T, n] fp32             (out)
        hres_ptr,    # [T, n*n] fp32           (out)
        rms_ptr,     # [T] fp32                (out)
        hmix_ptr,    # [T, F] fp32             (out)
        hpre_ptr,    # [T, n] fp32             (out)
        T, norm_eps, hc_eps,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
        NPA: tl.constexpr, NPB: tl.constexpr, INTERP: tl.constexpr,
        K: tl.constexpr = 0, NP: tl.constexpr = 1, SEP: tl.constexpr = False,
        CAT: tl.constexpr = False,
    ):
        ND: tl.constexpr = N * D
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        dd = tl.arange(0, BLOCK_D)
        ff = tl.arange(0, F_PAD)

        W: tl.constexpr = 2 * F_PAD if CAT else F_PAD   # see _fwd_step
        acc = tl.zeros([BLOCK_T, W], dtype=tl.float32)
        ss2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)   # sum of squares, reduced once
        # pass 1: D chunks outer, streams inner (so pass 2 can walk back over the freshest x);
        # one flat loop so that one x tile and its B tiles are in flight per stage
        for j in range(NCH * N):
            c = j // N
            i = j - c * N
            acc, ss2 = _fwd_step(x_ptr, pg_ptr, rows64, rmask, i, c * BLOCK_D + dd, ff, acc,
                                 ss2, ND, D, F_PAD, NPA, NPB, INTERP, SEP, CAT)
        acc = _fwd_acc_sum(acc, F_PAD, CAT)

        ss = tl.sum(ss2, axis=1)
        _gates_epilogue(acc, ss, rows, rows64, rmask, ff, alpha_ptr, bias_ptr, rms_ptr,
                        hmix_ptr, hpre_ptr, hpost_ptr, hres_ptr, norm_eps, hc_eps, N, F, ND, K,
                        NP)

        # pass 2: h_in = sum_i h_pre[i] * x[i, :], D chunks (of BLOCK_D2) in reverse order.
        # h_pre[i] is re-read from the h_pre just stored (L1; the barrier makes the program's
        # stores visible to all its threads) rather than pulled out of the gate tile by a
        # cross-thread reduction per chunk and stream.
        tl.debug_barrier()
        NCH2: tl.constexpr = (D + BLOCK_D2 - 1) // BLOCK_D2
        dd2 = tl.arange(0, BLOCK_D2)
        for cc in range(NCH2):
            c = NCH2 - 1 - cc
            d = c * BLOCK_D2 + dd2
            dmask = d < D
            m2 = rmask[:, None] & dmask[None, :]
            h = tl.zeros([BLOCK_T, BLOCK_D2], dtype=tl.float32)
            for i in tl.static_range(N):
                hp = tl.load(hpre_ptr + rows64 * N + i, mask=rmask, other=0.0)
                xv = tl.load(x_ptr + rows64[:, None] * ND + (i * D) + d[None, :], mask=m2,
                             other=0.0)
                h += hp[:, None] * xv.to(tl.float32)
            tl.store(hin_ptr + rows64[:, None] * D + d[None, :],
                     _round_out(h, hin_ptr.dtype.element_ty, INTERP), mask=m2)

    # -----------------------------------------------------------------------------------------
    # Forward, split variant (the rule in _fwd_splits, or set_config(fwd_split=S)): S programs
    # per token block (more programs when T is small), pass 1 and pass 2 apart.  Two launches:
    #   _pre_fwd_part_kernel  grid (T/BT, S): pass 1 over the program's share of the D chunks
    #                         (all n streams) -> fp32 partials [S, T, F] of m and [S, T] of the
    #                         sum of squares (S > 1 only at small T: T < 1.5 * 64 * SMs)
    #   _pre_fwd_fin_kernel   grid (T/BT2 * D/BD2,): fixed-order sum over s, r, gates (in every
    #                         program; stored, with Sinkhorn, by the first D chunk's),
    #                         h_in = sum_i h_pre[i] x[i, :]
    @triton.jit(do_not_specialize=["T", "S"])
    def _pre_fwd_part_kernel(
        x_ptr, pg_ptr, mpart_ptr, spart_ptr, T, S,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        NPA: tl.constexpr, NPB: tl.constexpr, INTERP: tl.constexpr,
        FA: tl.constexpr, FB: tl.constexpr,   # gate columns in one or two blocks (_f_blocks)
        CAT: tl.constexpr = False,
        ILV: tl.constexpr = False,   # shares interleaved: share s takes D chunks s, s + S, ...
        SEP: tl.constexpr = False,   # separate dots, added in fp32 (few h_res entries, _mm_core)
    ):
        ND: tl.constexpr = N * D
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        pid = tl.program_id(0)
        s = tl.program_id(1)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        dd = tl.arange(0, BLOCK_D)
        ff = tl.arange(0, FA)
        W: tl.constexpr = 2 * FA if CAT else FA   # see _fwd_step (CAT only with one block)
        acc = tl.zeros([BLOCK_T, W], dtype=tl.float32)
        if FB > 0:
            fb = FA + tl.arange(0, FB)
            accb = tl.zeros([BLOCK_T, FB], dtype=tl.float32)
        ss2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if ILV:
            c_lo = s
            c_step = S
            nj = ((NCH - s + S - 1) // S) * N
        else:
            CPS = (NCH + S - 1) // S     # D chunks per share (S a runtime value: no recompile)
            c_lo = s * CPS
            c_step = 1
            nj = (tl.minimum(c_lo + CPS, NCH) - c_lo) * N
        for j in range(0, nj):
            cl = j // N
            i = j - cl * N
            d = (c_lo + cl * c_step) * BLOCK_D + dd
            if FB > 0:
                xv, ss2 = _fwd_x(x_ptr, rows64, rmask, i, d, ss2, ND, D)
                acc = _fwd_dot(xv, pg_ptr, i, d, ff, acc, ND, D, F_PAD, NPA, NPB, INTERP, SEP)
                accb = _fwd_dot(xv, pg_ptr, i, d, fb, accb, ND, D, F_PAD, NPA, NPB, INTERP, SEP)
            else:
                acc, ss2 = _fwd_step(x_ptr, pg_ptr, rows64, rmask, i, d, ff, acc, ss2, ND, D,
                                     F_PAD, NPA, NPB, INTERP, SEP, CAT)
        acc = _fwd_acc_sum(acc, FA, CAT)
        sT = tl.cast(s, tl.int64) * T   # int64: S * T can pass 2^31
        tl.store(mpart_ptr + (sT + rows64[:, None]) * F + ff[None, :], acc,
                 mask=rmask[:, None] & (ff < F)[None, :])
        if FB > 0:
            tl.store(mpart_ptr + (sT + rows64[:, None]) * F + fb[None, :], accb,
                     mask=rmask[:, None] & (fb < F)[None, :])
        tl.store(spart_ptr + sT + rows64, tl.sum(ss2, axis=1), mask=rmask)

    @triton.jit(do_not_specialize=["T", "S"])
    def _pre_fwd_fin_kernel(
        x_ptr, mpart_ptr, spart_ptr, alpha_ptr, bias_ptr, hin_ptr, hpost_ptr, hres_ptr, rms_ptr,
        hmix_ptr, hpre_ptr, T, S, norm_eps, hc_eps,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr,
        K: tl.constexpr = 0, NP: tl.constexpr = 1,
        ORDER: tl.constexpr = "rev",   # programs' order over (token blocks, D chunks), _l2_reuse
        EV: tl.constexpr = "",         # eviction policy of the x loads
    ):
        ND: tl.constexpr = N * D
        # one grid axis of NBLK token blocks x NCH D chunks (_split_grids: a 2-D grid with the
        # token blocks on axis 1 fails to launch past 65535 blocks); the programs take their
        # (block, chunk) in the order a 2-D grid's axis 0 fastest would run them
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        pid = tl.program_id(0)
        nblk = tl.num_programs(0) // NCH
        if ORDER == "rev":   # D chunks fastest, token blocks last first: the x that pass 1
            #                  read last is still in L2 when it is read again here
            blk = nblk - 1 - pid // NCH
            c = pid % NCH
        elif ORDER == "dlast":   # token blocks fastest, D chunks last first
            blk = pid % nblk
            c = NCH - 1 - pid // nblk
        else:     # token blocks fastest
            blk = pid % nblk
            c = pid // nblk
        rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        ff = tl.arange(0, F_PAD)
        rm2 = rmask[:, None]
        # the block's projections and sums of squares: its S partials, in a fixed order
        acc = tl.zeros([BLOCK_T, F_PAD], dtype=tl.float32)
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        for s in range(S):
            sT = tl.cast(s, tl.int64) * T   # int64: S * T can pass 2^31
            acc += tl.load(mpart_ptr + (sT + rows64[:, None]) * F + ff[None, :],
                           mask=rm2 & (ff < F)[None, :], other=0.0)
            ss += tl.load(spart_ptr + sT + rows64, mask=rmask, other=0.0)
        # every D chunk's program computes the gates (a few hundred flops per token); the
        # first one stores them
        r, gate = _gates(acc, ss, ff, alpha_ptr, bias_ptr, norm_eps, hc_eps, N, F, ND)
        if c == 0:
            _gates_store(acc, r, gate, rows, rows64, rmask, ff, rms_ptr, hmix_ptr, hpre_ptr,
                         hpost_ptr, hres_ptr, N, F, K, NP)
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        m2 = rm2 & (d < D)[None, :]
        h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(N):
            hp = tl.sum(tl.where(ff[None, :] == i, gate, 0.0), axis=1)   # h_pre[:, i]
            xv = tl.load(x_ptr + rows64[:, None] * ND + i * D + d[None, :], mask=m2, other=0.0,
                         eviction_policy=EV)
            h += hp[:, None] * xv.to(tl.float32)
        tl.store(hin_ptr + rows64[:, None] * D + d[None, :],
                 _round_out(h, hin_ptr.dtype.element_ty, INTERP), mask=m2)

    # Sinkhorn backward, separate variant (set_config(sk_bwd="sep")): d(logits) for all tokens
    # in a small kernel of its own, many tokens per program, before the row kernel (which then
    # runs its k = 0 code on the [T, n*n] result), so the VJP is off the row kernel's path.
    @triton.jit(do_not_specialize=["T"])
    def _sk_bwd_kernel(
        hmix_ptr, rms_ptr, alpha_ptr, bias_ptr, dhres_ptr, dlog_ptr, T,
        N: tl.constexpr, F: tl.constexpr, K: tl.constexpr, NP: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        a_res = tl.load(alpha_ptr + 2)
        kk = tl.arange(0, NP)
        valid = (kk < N)[:, None] & (kk < N)[None, :]
        q3 = kk[None, :, None] * N + kk[None, None, :]
        m3 = rmask[:, None, None] & valid[None, :, :]
        mres = tl.load(hmix_ptr + rows64[:, None, None] * F + 2 * N + q3, mask=m3, other=0.0)
        b3 = tl.load(bias_ptr + 2 * N + q3, mask=valid[None, :, :], other=0.0)
        r3 = tl.load(rms_ptr + rows, mask=rmask, other=0.0)
        L = a_res * (r3[:, None, None] * mres) + b3
        dH = tl.load(dhres_ptr + rows64[:, None, None] * (N * N) + q3, mask=m3, other=0.0)
        dL = _sk_vjp(L, dH, valid, K)
        tl.store(dlog_ptr + rows64[:, None, None] * (N * N) + q3, dL, mask=m3)

    # -----------------------------------------------------------------------------------------
    # Backward, row part, per token t:
    #   dh_pre[i] = sum_d dh_in[d] x[i, d];  s = h_pre - hc_eps
    #   raw = [dh_pre*s*(1-s), dh_post*h_post*(1-h_post/2), dh_res]   (dp, dq, dR)
    #   e = alpha_col * raw;  dm = r*e;  coef = (e . m) * r^3 / (n D)
    # Partials per program (fixed token blocks pid, pid+P, ...): sum_t raw (-> dbias) and
    # sum_t raw*u (-> dalpha, grouped by column class in the reduce kernel).
    @triton.jit(do_not_specialize=["T", "NBLK"])
    def _pre_bwd_row_kernel(
        x_ptr,       # [T, n, D] x dtype
        dhin_ptr,    # [T, D] x dtype
        rms_ptr,     # [T] fp32
        hmix_ptr,    # [T, F] fp32
        hpre_ptr,    # [T, n] fp32
        hpost_ptr,   # [T, n] fp32
        dhpost_ptr,  # [T, n] fp32
        dhres_ptr,   # [T, n*n] fp32
        alpha_ptr,   # [3] fp32
        dm_ptr,      # [NDM, T, F_PAD] bf16 scratch (out): pieces of dm = r * e, zero past F
        coef_ptr,    # [T] fp32 scratch (out)
        wsrow_ptr,   # [F_PAD + 4, P] fp32 (out): per program, sum raw (rows f < F_PAD) and
        #              sum raw*u per gate class (rows F_PAD + c, c = pre, post, res)
        T, NBLK, hc_eps,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NDM: tl.constexpr, INTERP: tl.constexpr,
        K: tl.constexpr = 0, NP: tl.constexpr = 1,
        bias_ptr=None,   # [F] fp32 (K > 0): to rebuild the logits
        dlog_ptr=None,   # [T, n*n] fp32 scratch (K > 0): d(logits) of the block's tokens
    ):
        ND: tl.constexpr = N * D
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        dd = tl.arange(0, BLOCK_D)
        ff = tl.arange(0, F_PAD)
        fmask = ff < F
        is_pre = ff < N
        is_post = (ff >= N) & (ff < 2 * N)
        is_res = (ff >= 2 * N) & fmask
        a_pre = tl.load(alpha_ptr)
        a_post = tl.load(alpha_ptr + 1)
        a_res = tl.load(alpha_ptr + 2)
        a_col = tl.where(is_pre, a_pre, tl.where(is_post, a_post, tl.where(fmask, a_res, 0.0)))
        sum_raw = tl.zeros([F_PAD], dtype=tl.float32)
        sum_ru = tl.zeros([F_PAD], dtype=tl.float32)
        dstride = tl.cast(T, tl.int64) * F_PAD   # dm's pieces apart (int64: past 2^31)
        for blk in range(pid, NBLK, nprog):
            rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
            rmask = rows < T
            rows64 = rows.to(tl.int64)
            rm2 = rmask[:, None]
            dhp = tl.zeros([BLOCK_T, F_PAD], dtype=tl.float32)   # dh_pre in columns [0, n)
            for c in range(NCH):
                d = c * BLOCK_D + dd
                m2 = rm2 & (d < D)[None, :]
                g = tl.load(dhin_ptr + rows64[:, None] * D + d[None, :], mask=m2,
                            other=0.0).to(tl.float32)
                for i in tl.static_range(N):
                    xv = tl.load(x_ptr + rows64[:, None] * ND + (i * D) + d[None, :], mask=m2,
                                 other=0.0).to(tl.float32)
                    p = tl.sum(xv * g, axis=1)
                    dhp += tl.where(ff[None, :] == i, p[:, None], 0.0)
            r = tl.load(rms_ptr + rows, mask=rmask, other=0.0)
            m = tl.load(hmix_ptr + rows64[:, None] * F + ff[None, :], mask=rm2 & fmask[None, :],
                        other=0.0)
            hp = tl.load(hpre_ptr + rows64[:, None] * N + ff[None, :],
                         mask=rm2 & is_pre[None, :], other=0.0)
            hq = tl.load(hpost_ptr + rows64[:, None] * N + (ff[None, :] - N),
                         mask=rm2 & is_post[None, :], other=0.0)
            dq = tl.load(dhpost_ptr + rows64[:, None] * N + (ff[None, :] - N),
                         mask=rm2 & is_post[None, :], other=0.0)
            if K > 0:
                # dh_res is w.r.t. SK_K(logits): rebuild the logits a_res*(r*m) + b per token
                # as an [NP, NP] tile, pull dh_res back through the K iterations, and hand the
                # result to the 2-D code below through a [T, n*n] scratch (barrier: visible to
                # all threads of this program).
                kk = tl.arange(0, NP)
                valid = (kk < N)[:, None] & (kk < N)[None, :]
                q3 = kk[None, :, None] * N + kk[None, None, :]
                m3 = rmask[:, None, None] & valid[None, :, :]
                mres = tl.load(hmix_ptr + rows64[:, None, None] * F + 2 * N + q3, mask=m3,
                               other=0.0)
                b3 = tl.load(bias_ptr + 2 * N + q3, mask=valid[None, :, :], other=0.0)
                r3 = tl.load(rms_ptr + rows, mask=rmask, other=0.0)
                L = a_res * (r3[:, None, None] * mres) + b3
                dH = tl.load(dhres_ptr + rows64[:, None, None] * (N * N) + q3, mask=m3,
                             other=0.0)
                dL = _sk_vjp(L, dH, valid, K)
                tl.store(dlog_ptr + rows64[:, None, None] * (N * N) + q3, dL, mask=m3)
                tl.debug_barrier()
                dR = tl.load(dlog_ptr + rows64[:, None] * (N * N) + (ff[None, :] - 2 * N),
                             mask=rm2 & is_res[None, :], other=0.0)
            else:
                dR = tl.load(dhres_ptr + rows64[:, None] * (N * N) + (ff[None, :] - 2 * N),
                             mask=rm2 & is_res[None, :], other=0.0)
            s = hp - hc_eps
            raw = tl.where(is_pre[None, :], dhp * s * (1.0 - s),
                           tl.where(is_post[None, :], dq * hq * (1.0 - 0.5 * hq), dR))
            raw = tl.where(rm2 & fmask[None, :], raw, 0.0)
            e = a_col[None, :] * raw
            dm = r[:, None] * e
            dr = tl.sum(e * m, axis=1)
            coef = dr * (r * r * r) / ND
            dm0, dm1, dm2 = _split3(dm, NDM, INTERP)
            doff = rows64[:, None] * F_PAD + ff[None, :]
            tl.store(dm_ptr + doff, dm0, mask=rm2)
            if NDM > 1:
                tl.store(dm_ptr + dstride + doff, dm1, mask=rm2)
            if NDM > 2:
                tl.store(dm_ptr + 2 * dstride + doff, dm2, mask=rm2)
            tl.store(coef_ptr + rows, coef, mask=rmask)
            sum_raw += tl.sum(raw, axis=0)
            sum_ru += tl.sum(raw * (r[:, None] * m), axis=0)
        # one column per program, so that the reduction reads contiguous rows
        tl.store(wsrow_ptr + ff * nprog + pid, sum_raw)
        tl.store(wsrow_ptr + F_PAD * nprog + pid, tl.sum(tl.where(is_pre, sum_ru, 0.0)))
        tl.store(wsrow_ptr + (F_PAD + 1) * nprog + pid, tl.sum(tl.where(is_post, sum_ru, 0.0)))
        tl.store(wsrow_ptr + (F_PAD + 2) * nprog + pid, tl.sum(tl.where(is_res, sum_ru, 0.0)))

    @triton.jit
    def _dx_exact(dm_ptr, rms_ptr, hmix_ptr, phi_ptr, g_ptr, xv, dh, hp, rows64, rmask, col,
                  dmask, T, N: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                  F_PAD: tl.constexpr, NDM: tl.constexpr, HAS_G: tl.constexpr):
        """dx of short rows (n*D <= SMALL_ND) in float64, one gate column f at a time (then fp32,
        rounded once more to x's dtype by the caller).

        dx = sum_f dm_f (phi_f g - r^2 x m_f / nD) + h_pre dh_in: for short rows the two parts
        cancel (n*D = 1: to eps*r^2 of their size), so both are built from the same dm (its
        bf16 pieces, summed exactly) and subtracted in float64 (docs/triton.md, "Short rows").
        """
        ND: tl.constexpr = N * D
        r = tl.load(rms_ptr + rows64, mask=rmask, other=0.0).to(tl.float64)
        w = tl.zeros(xv.shape, dtype=tl.float64)
        dr = tl.zeros(r.shape, dtype=tl.float64)
        for f in range(F):
            a0, a1, a2 = _load_pieces(dm_ptr, rows64 * F_PAD + f, tl.cast(T, tl.int64) * F_PAD,
                                      rmask, NDM)
            dmf = a0.to(tl.float64)
            if NDM > 1:
                dmf += a1.to(tl.float64)
            if NDM > 2:
                dmf += a2.to(tl.float64)
            phf = tl.load(phi_ptr + f * ND + col, mask=dmask, other=0.0).to(tl.float64)
            w += dmf[:, None] * phf[None, :]
            dr += dmf * tl.load(hmix_ptr + rows64 * F + f, mask=rmask, other=0.0).to(tl.float64)
        if HAS_G:
            w = w * tl.load(g_ptr + col, mask=dmask, other=0.0).to(tl.float64)[None, :]
        coef = r * r * dr / ND
        return (w - coef[:, None] * xv.to(tl.float64)
                + hp.to(tl.float64)[:, None] * dh.to(tl.float64)).to(tl.float32)

    # -----------------------------------------------------------------------------------------
    # Backward, column part: program (stream i, D chunk c, token split s), grid
    # (n, D chunks, splits), or past 65535 D chunks (n * D chunks, splits) in the same order
    # (_col_fold, _col_grid).
    #   w = dm @ phi[:, i*D + d];  dx[i, d] = w*g - coef*x[i, d] + h_pre[i]*dh_in[d]
    #   P[f, i*D + d] += sum_t dm[t, f] x[t, i, d]      (registers; dphi = g*P, dgamma = sum_f phi*P)
    # The gate columns f go in one block [0, FA) (FA = F_PAD) or, at n = 8 (FB > 0), in two,
    # [0, FA) and [FA, FA + FB), so that the dots do not multiply zero rows: F = 80 takes
    # 64 + 16 columns instead of 128 (_f_blocks).
    @triton.jit(do_not_specialize=["T", "TOK_PER_SPLIT"])
    def _pre_bwd_col_kernel(
        x_ptr,       # [T, n, D] x dtype
        dhin_ptr,    # [T, D] x dtype
        hpre_ptr,    # [T, n] fp32
        dm_ptr,      # [NDM, T, F_PAD] bf16 scratch: pieces of dm
        coef_ptr,    # [T] fp32 scratch
        phi_ptr,     # [F, ND] fp32
        g_ptr,       # [ND] fp32 (unused unless HAS_G)
        dx_ptr,      # [T, n, D] x dtype (out)
        wscol_ptr,   # [SPLITS, F, ND] fp32 (out): per-split P
        T, TOK_PER_SPLIT,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_G: tl.constexpr,
        NWA: tl.constexpr, NWB: tl.constexpr, NPA: tl.constexpr, NPB: tl.constexpr,
        NDM: tl.constexpr, INTERP: tl.constexpr,
        FA: tl.constexpr,   # gate columns [0, FA) in the first block (_f_blocks)
        FB: tl.constexpr,   # and [FA, FA + FB) in the second (0: none)
        EXACT: tl.constexpr = False,
        rms_ptr=None,    # [T] fp32 (EXACT)
        hmix_ptr=None,   # [T, F] fp32 (EXACT)
    ):
        ND: tl.constexpr = N * D
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        if NCH > 65535:   # streams and D chunks on grid axis 0 (the rule of _col_fold)
            i = tl.program_id(0) % N
            c = tl.program_id(0) // N
            s = tl.program_id(1)
        else:
            i = tl.program_id(0)
            c = tl.program_id(1)
            s = tl.program_id(2)
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        col = i * D + d
        # per gate-column block: the loop-invariant B operand of w, phi [FA, BLOCK_D] (rows >= F
        # zero) split into bf16 pieces once per program, and the accumulator P
        ff = tl.arange(0, FA)
        p0, p1, p2 = _col_phi(phi_ptr, ff, col, dmask, F, ND, NWB, INTERP)
        P = tl.zeros([FA, BLOCK_D], dtype=tl.float32)
        if FB > 0:
            fb = FA + tl.arange(0, FB)
            q0, q1, q2 = _col_phi(phi_ptr, fb, col, dmask, F, ND, NWB, INTERP)
            PB = tl.zeros([FB, BLOCK_D], dtype=tl.float32)
        if HAS_G:
            g = tl.load(g_ptr + col, mask=dmask, other=0.0)
        t_lo = s * TOK_PER_SPLIT
        t_hi = t_lo + tl.minimum(TOK_PER_SPLIT, T - t_lo)   # = min(t_lo + TOK, T), in int32
        for t0 in range(t_lo, t_hi, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < t_hi
            rows64 = rows.to(tl.int64)
            rm2 = rmask[:, None]
            m2 = rm2 & dmask[None, :]
            coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
            hp = tl.load(hpre_ptr + rows64 * N + i, mask=rmask, other=0.0)
            xv = tl.load(x_ptr + rows64[:, None] * ND + col[None, :], mask=m2, other=0.0)
            dh = tl.load(dhin_ptr + rows64[:, None] * D + d[None, :], mask=m2, other=0.0)
            if EXACT:
                dx = _dx_exact(dm_ptr, rms_ptr, hmix_ptr, phi_ptr, g_ptr, xv, dh, hp, rows64,
                               rmask, col, dmask, T, N, D, F, F_PAD, NDM, HAS_G)
            else:
                w = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
                w = _col_w(dm_ptr, rows64, rm2, ff, p0, p1, p2, w, T, F_PAD, NWA, NWB, INTERP)
                if FB > 0:
                    w = _col_w(dm_ptr, rows64, rm2, fb, q0, q1, q2, w, T, F_PAD, NWA, NWB,
                               INTERP)
                if HAS_G:
                    w = w * g[None, :]
                xf = xv.to(tl.float32)
                dx = w - coef[:, None] * xf + hp[:, None] * dh.to(tl.float32)
            tl.store(dx_ptr + rows64[:, None] * ND + col[None, :],
                     _round_out(dx, dx_ptr.dtype.element_ty, INTERP), mask=m2)
            # P += dm^T @ x (_col_p)
            P = _col_p(dm_ptr, rows64, rmask, ff, xv, P, T, F_PAD, NPA, NPB, INTERP)
            if FB > 0:
                PB = _col_p(dm_ptr, rows64, rmask, fb, xv, PB, T, F_PAD, NPA, NPB, INTERP)
        ws = wscol_ptr + tl.cast(s, tl.int64) * (F * ND)
        tl.store(ws + ff[:, None] * ND + col[None, :], P, mask=(ff < F)[:, None] & dmask[None, :])
        if FB > 0:
            tl.store(ws + fb[:, None] * ND + col[None, :], PB,
                     mask=(fb < F)[:, None] & dmask[None, :])

    @triton.jit
    def _col_phi(phi_ptr, fc, col, dmask, F: tl.constexpr, ND: tl.constexpr,
                 NWB: tl.constexpr, INTERP: tl.constexpr):
        """phi's rows fc (zero from F on) at the columns col, split into NWB bf16 pieces."""
        return _split3(tl.load(phi_ptr + fc[:, None] * ND + col[None, :],
                               mask=(fc < F)[:, None] & dmask[None, :], other=0.0),
                       NWB, INTERP)

    @triton.jit
    def _col_w(dm_ptr, rows64, rm2, fc, p0, p1, p2, w, T, F_PAD: tl.constexpr,
               NWA: tl.constexpr, NWB: tl.constexpr, INTERP: tl.constexpr):
        """w + dm[rows, fc] @ phi[fc, :] from the pieces of both."""
        a0, a1, a2 = _load_pieces(dm_ptr, rows64[:, None] * F_PAD + fc[None, :],
                                  tl.cast(T, tl.int64) * F_PAD, rm2, NWA)
        return _mm_core(a0, a1, a2, p0, p1, p2, w, NWA, NWB, INTERP)

    @triton.jit
    def _col_p(dm_ptr, rows64, rmask, fc, xv, P, T, F_PAD: tl.constexpr,
               NPA: tl.constexpr, NPB: tl.constexpr, INTERP: tl.constexpr):
        """P + dm[rows, fc]^T @ x, from dm's pieces and x split into NPB.  The transposed dm
        pieces are loaded as [len(fc), BLOCK_T] tiles (an in-register tl.trans of w's tiles, or
        P^T = x^T @ dm with the x tile as the big operand, measured 1.1-2.3x and 1.15x slower
        on the H200)."""
        t0, t1, t2 = _load_pieces(dm_ptr, rows64[None, :] * F_PAD + fc[:, None],
                                  tl.cast(T, tl.int64) * F_PAD, rmask[None, :], NPA)
        x0, x1, x2 = _split3(xv, NPB, INTERP)
        return _mm_core(t0, t1, t2, x0, x1, x2, P, NPA, NPB, INTERP)

    # -----------------------------------------------------------------------------------------
    # Fixed-order reduction of the workspaces:
    #   Q[f, k] = sum_s wscol[s, f, k];  dphi = g*Q;  dgamma[k] = sum_f phi[f, k]*Q[f, k]
    #   dbias[f] = sum_p wsrow[f, p];  dalpha[c] = sum_p wsrow[F_PAD + c, p]
    # Grid: max(ND / BLOCK, F + 3) programs; program j < F + 3 also sums row j of wsrow (for
    # j >= F: row F_PAD + j - F), RB columns at a time.  (One program summing all of wsrow
    # read it at ~16 GB/s, 12 us of the 0.14 ms backward at (1,4096,4,2560).)
    @triton.jit
    def _reduce_partials_kernel(
        wscol_ptr,   # [SPLITS, F, ND] fp32
        wsrow_ptr,   # [F_PAD + 4, P] fp32
        phi_ptr,     # [F, ND] fp32
        g_ptr,       # [ND] fp32 (unused unless HAS_G)
        dphi_ptr,    # [F, ND] fp32 (out)
        dgamma_ptr,  # [ND] fp32 (out, if HAS_G)
        dalpha_ptr,  # [3] fp32 (out)
        dbias_ptr,   # [F] fp32 (out)
        SPLITS, PROW,
        ND: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        HAS_G: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        k = pid * BLOCK + tl.arange(0, BLOCK)
        km = k < ND
        ff = tl.arange(0, F_PAD)
        m2 = (ff < F)[:, None] & km[None, :]
        off = ff[:, None] * ND + k[None, :]
        q = tl.zeros([F_PAD, BLOCK], dtype=tl.float32)
        for s in range(SPLITS):
            q += tl.load(wscol_ptr + tl.cast(s, tl.int64) * (F * ND) + off, mask=m2, other=0.0)
        if HAS_G:
            g = tl.load(g_ptr + k, mask=km, other=0.0)
            tl.store(dphi_ptr + off, q * g[None, :], mask=m2)
            ph = tl.load(phi_ptr + off, mask=m2, other=0.0)
            tl.store(dgamma_ptr + k, tl.sum(q * ph, axis=0), mask=km)
        else:
            tl.store(dphi_ptr + off, q, mask=m2)
        if pid < F + 3:   # a row of the row kernel's partials, RB programs' worth at a time
            row = tl.where(pid < F, pid, F_PAD + pid - F)
            pp = tl.arange(0, RB)
            acc = tl.zeros([RB], dtype=tl.float32)
            for p0 in range(0, PROW, RB):
                acc += tl.load(wsrow_ptr + row * PROW + p0 + pp, mask=p0 + pp < PROW, other=0.0)
            tot = tl.sum(acc)
            if pid < F:
                tl.store(dbias_ptr + pid, tot)
            else:
                tl.store(dalpha_ptr + pid - F, tot)

    # -----------------------------------------------------------------------------------------
    # The post operator (CONTRACT.md, "The post operator"), per token t:
    #   x_next[i, :] = sum_j h_res[i, j] x[j, :] + h_post[i] f_out[:]
    # Forward: grid (token blocks * D chunks,), token blocks fastest (_post_fwd_grid); each
    # program reads its x tile of all n streams once ([BLOCK_T, NP, BLOCK_D], NP = pow2(n)
    # padded), f_out once, writes x_next once.
    @triton.jit(do_not_specialize=["T"])
    def _post_fwd_kernel(
        x_ptr,       # [T, n, D] x dtype
        f_ptr,       # [T, D] x dtype
        hpost_ptr,   # [T, n] fp32
        hres_ptr,    # [T, n, n] fp32
        out_ptr,     # [T, n, D] x dtype (out)
        T,
        N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr,
    ):
        ND: tl.constexpr = N * D
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        pid = tl.program_id(0)
        nblk = tl.num_programs(0) // NCH
        rows = (pid % nblk) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = (pid // nblk) * BLOCK_D + tl.arange(0, BLOCK_D)
        jj = tl.arange(0, NP)
        rmask = rows < T
        dmask = d < D
        rows64 = rows.to(tl.int64)
        m2 = rmask[:, None] & dmask[None, :]
        m3 = m2[:, None, :] & (jj < N)[None, :, None]
        x3 = tl.load(x_ptr + rows64[:, None, None] * ND + jj[None, :, None] * D + d[None, None, :],
                     mask=m3, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + rows64[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        hm = rmask[:, None] & (jj < N)[None, :]
        for i in tl.static_range(N):
            hr = tl.load(hres_ptr + rows64[:, None] * (N * N) + i * N + jj[None, :], mask=hm,
                         other=0.0)
            hp = tl.load(hpost_ptr + rows64 * N + i, mask=rmask, other=0.0)
            o = tl.sum(hr[:, :, None] * x3, axis=1) + hp[:, None] * f
            tl.store(out_ptr + rows64[:, None] * ND + i * D + d[None, :],
                     _round_out(o, out_ptr.dtype.element_ty, INTERP), mask=m2)

    # Backward, per token t, given g = dx_next:
    #   dx[j] = sum_i h_res[i, j] g[i];  df_out = sum_i h_post[i] g[i]
    #   dh_post[i] = <g[i], f_out>;      dh_res[i, j] = <g[i], x[j]>
    # One program per BLOCK_T tokens, looping over D.  dx and df_out elementwise from the
    # [BLOCK_T, NP, BLOCK_D] tile of g (as in the forward).  The reductions over D on the tensor
    # cores: with R = BLOCK_T * NP rows, row t*NP + i of the 2-D [R, BLOCK_D] tiles G (g) and X
    # (x) is (token t, stream i), row t of F is f_out of token t; per D chunk
    #   SX += G @ X^T  ([R, R]:  entry (t*NP+i, t'*NP+j) = <g[t,i], x[t',j]>)
    #   SF += G @ F^T  ([R, FR]: entry (t*NP+i, t')      = <g[t,i], f[t']>)
    # and at the end the block diagonal of SX is dh_res and the column t' = t of SF is dh_post
    # (the off-diagonal products are wasted; the tensor cores have the time).  The products are
    # exact (16-bit operands; fp32 x as 3 bf16 pieces); each chunk's dot starts from zero and is
    # added in fp32 (_mm_core), so the error is bounded by BLOCK_D, not D.  No partial sums in
    # memory, no second kernel, no atomics.
    @triton.jit(do_not_specialize=["T"])
    def _post_bwd_kernel(
        x_ptr,       # [T, n, D] x dtype
        f_ptr,       # [T, D] x dtype
        hpost_ptr,   # [T, n] fp32
        hres_ptr,    # [T, n, n] fp32
        g_ptr,       # [T, n, D] x dtype: dx_next
        dx_ptr,      # [T, n, D] x dtype (out)
        df_ptr,      # [T, D] x dtype (out)
        dhpost_ptr,  # [T, n] fp32 (out)
        dhres_ptr,   # [T, n, n] fp32 (out)
        T,
        N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FR: tl.constexpr,
        NPC: tl.constexpr, INTERP: tl.constexpr,
    ):
        ND: tl.constexpr = N * D
        R: tl.constexpr = BLOCK_T * NP
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        t0 = tl.program_id(0) * BLOCK_T
        rows = t0 + tl.arange(0, BLOCK_T)
        jj = tl.arange(0, NP)
        dd = tl.arange(0, BLOCK_D)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        nmask = jj < N
        hm = rmask[:, None] & nmask[None, :]
        q = tl.arange(0, R)               # rows of G and X: token q // NP, stream q % NP
        qt = t0 + q // NP
        qi = q % NP
        qmask = (qt < T) & (qi < N)
        qoff = qt.to(tl.int64) * ND + qi * D
        fq = tl.arange(0, FR)             # rows of F: token fq (rows >= BLOCK_T masked)
        ft = t0 + fq
        fmask = (fq < BLOCK_T) & (ft < T)
        foff = ft.to(tl.int64) * D
        hp = tl.load(hpost_ptr + rows64[:, None] * N + jj[None, :], mask=hm, other=0.0)
        sx = tl.zeros([R, R], dtype=tl.float32)
        sf = tl.zeros([R, FR], dtype=tl.float32)
        for c in range(NCH):
            d = c * BLOCK_D + dd
            dmask = d < D
            m2 = rmask[:, None] & dmask[None, :]
            m3 = m2[:, None, :] & nmask[None, :, None]
            g3 = tl.load(g_ptr + rows64[:, None, None] * ND + jj[None, :, None] * D
                         + d[None, None, :], mask=m3, other=0.0).to(tl.float32)
            df = tl.sum(hp[:, :, None] * g3, axis=1)
            tl.store(df_ptr + rows64[:, None] * D + d[None, :],
                     _round_out(df, df_ptr.dtype.element_ty, INTERP), mask=m2)
            for j in tl.static_range(N):
                hc = tl.load(hres_ptr + rows64[:, None] * (N * N) + jj[None, :] * N + j, mask=hm,
                             other=0.0)                             # h_res[t, :, j]
                dxj = tl.sum(hc[:, :, None] * g3, axis=1)
                tl.store(dx_ptr + rows64[:, None] * ND + j * D + d[None, :],
                         _round_out(dxj, dx_ptr.dtype.element_ty, INTERP), mask=m2)
            # the reductions: [R, BLOCK_D] tiles (the re-read of g comes from L1)
            sx, sf = _post_red_dots(g_ptr, x_ptr, f_ptr, qoff, qmask, foff, fmask, d, dmask,
                                    sx, sf, NPC, INTERP)
        q2 = tl.arange(0, R)
        same = (q // NP)[:, None] == (q2 // NP)[None, :]
        tl.store(dhres_ptr + qt.to(tl.int64)[:, None] * (N * N) + qi[:, None] * N
                 + (q2 % NP)[None, :], sx, mask=qmask[:, None] & same & ((q2 % NP) < N)[None, :])
        tl.store(dhpost_ptr + qt.to(tl.int64)[:, None] * N + qi[:, None] + 0 * fq[None, :], sf,
                 mask=qmask[:, None] & ((q // NP)[:, None] == fq[None, :]))

    @triton.jit
    def _post_red_dots(g_ptr, x_ptr, f_ptr, qoff, qmask, foff, fmask, d, dmask, sx, sf,
                       NPC: tl.constexpr, INTERP: tl.constexpr):
        """sx += G @ X^T, sf += G @ F^T for one D chunk (see _post_bwd_kernel)."""
        gq = tl.load(g_ptr + qoff[:, None] + d[None, :],
                     mask=qmask[:, None] & dmask[None, :], other=0.0)
        xq = tl.load(x_ptr + qoff[:, None] + d[None, :],
                     mask=qmask[:, None] & dmask[None, :], other=0.0)
        fv = tl.load(f_ptr + foff[:, None] + d[None, :],
                     mask=fmask[:, None] & dmask[None, :], other=0.0)
        xt = tl.trans(xq)
        ft = tl.trans(fv)
        if NPC == 1:   # 16-bit x: the products are exact as they are
            sx = _mm_core(gq, gq, gq, xt, xt, xt, sx, 1, 1, INTERP)
            sf = _mm_core(gq, gq, gq, ft, ft, ft, sf, 1, 1, INTERP)
        else:          # fp32 x: bf16 pieces
            a0, a1, a2 = _split3(gq, NPC, INTERP)
            b0, b1, b2 = _split3(xt, NPC, INTERP)
            sx = _mm_core(a0, a1, a2, b0, b1, b2, sx, NPC, NPC, INTERP)
            c0, c1, c2 = _split3(ft, NPC, INTERP)
            sf = _mm_core(a0, a1, a2, c0, c1, c2, sf, NPC, NPC, INTERP)
        return sx, sf


# ---------------------------------------------------------------------------------------------
# Launch configuration: a rule keyed on (n, D, dtype, device), cached.  Override for tuning via
# set_config(); bench/gpu_suite.py sweeps candidates.

_CONFIG_OVERRIDES: dict = {}
_SM_COUNT: dict = {}
_CONFIG_CACHE: dict = {}   # (n, D, dtype name, device type) -> the launch rule's dict
_RESIDENT: dict = {}       # compiled kernel variant -> programs per multiprocessor (_resident)


def set_config(**kw) -> None:
    """Override launch parameters (keys: fwd_bt, fwd_bd, fwd_bd2, fwd_warps, fwd_stages, row_bt,
    row_bd, row_warps, col_bt, col_bd, col_warps, col_stages, col_waves, col_occ, col_splits,
    row_waves, fwd_ilv, hin_order, hin_ev (_l2_reuse); the post operator's with a
    ``post_`` prefix: post_pf_bt, post_pf_bd, post_pb_bt, post_pb_bd, post_pb_warps,
    post_pb_stages); {} restores the rules.

    ``row_waves`` and ``col_occ`` take "auto" (the CUDA default; programs per SM as many as fit,
    from the compiled kernel, see _resident) or a number; ``w_pieces`` / ``p_pieces`` the bf16
    pieces (A, B) of the backward's two products (docs/triton.md, "Precision");
    ``col_fblocks=False`` / ``fwd_fblocks=False`` keep the column kernel's / the split
    forward's gate columns in one block (_f_blocks).

    Variants: ``fwd_split`` ("auto" default: the rule in _fwd_splits; 0: always the fused
    forward; S >= 1, or -1 for ~4 programs per SM: the split forward, with
    fwd_split_bt/bd/warps/stages, hin_bt, hin_bd) and ``sk_bwd`` ("auto" default: "sep"
    on CUDA when T >= 48 * SMs, else "fused"; "sep": d(logits) by _sk_bwd_kernel before the row
    kernel; "fused": inside the row kernel; sk_bt, sk_warps)."""
    _CONFIG_OVERRIDES.clear()
    _CONFIG_OVERRIDES.update(kw)
    _CONFIG_CACHE.clear()
    _RESIDENT.clear()


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _fit_per_sm(n_regs: int, warps: int, shared: int, regs_sm: int = 65536,
                threads_sm: int = 2048, smem_sm: int = 233472) -> int:
    """Blocks of ``warps`` warps, ``n_regs`` registers per thread and ``shared`` bytes of shared
    memory that one multiprocessor holds at once (the CUDA occupancy rules of sm_80/sm_90:
    registers allocated per warp in units of 256, 1 KB of shared memory reserved per block,
    at most 32 blocks)."""
    regs_warp = _cdiv(max(n_regs, 1) * 32, 256) * 256
    return max(1, min((regs_sm // regs_warp) // warps, smem_sm // (shared + 1024),
                      threads_sm // (32 * warps), 32))


def _resident(kernel, key, device, args, kwargs):
    """Programs of ``kernel`` (launched with ``args``, ``kwargs``) that fit on one
    multiprocessor at once, from its compiled binary and the device's limits; None where
    unknown (the interpreter, or a Triton whose internals differ).  Persistent grids are sized
    by it: at one program more than fits, the last wave runs alone (the row kernel at 80
    registers, 3 programs per SM for a grid of 4 per SM: 0.29 instead of 0.17 ms on the H200).

    The kernel is compiled here, before its first launch, so the grid and with it the split of
    the sums (hence the bits) is the same from the first call on.  Cached under ``key``, which
    must name the compiled variant (with the launch rule, cleared by set_config, it is a
    function of a few shape and dtype values; cheap to hash on every call)."""
    if device.type != "cuda":
        return None
    if key not in _RESIDENT:
        try:
            ck = kernel.warmup(*args, grid=(1,), **kwargs)
            ck._init_handles()
            p = torch.cuda.get_device_properties(device)
            _RESIDENT[key] = _fit_per_sm(
                ck.n_regs, ck.metadata.num_warps, ck.metadata.shared,
                getattr(p, "regs_per_multiprocessor", 65536),
                getattr(p, "max_threads_per_multi_processor", 2048),
                getattr(p, "shared_memory_per_multiprocessor", 233472))
        except Exception:   # noqa: BLE001 -- the rule's fixed value is used instead
            _RESIDENT[key] = None
    return _RESIDENT[key]


def _config(n: int, D: int, dtype_name: str, device) -> dict:
    """Launch parameters by rule, from the sweeps of bench/gpu_suite.py on an H200 (2026-11-29).

    Keyed on (n, D, dtype), never on T (no recompilation per batch size); cached (read-only).
    """
    key = (n, D, dtype_name, device.type)
    cfg = _CONFIG_CACHE.get(key)
    if cfg is None:
        cfg = _CONFIG_CACHE[key] = _make_config(n, D, dtype_name, device)
    return cfg


def _make_config(n: int, D: int, dtype_name: str, device) -> dict:
    F_pad = max(16, _next_pow2(n * n + 2 * n))
    wide = F_pad >= 64     # n >= 5
    if device.type != "cuda":   # the interpreter: small blocks keep it quick
        cfg = dict(fwd_bt=16, fwd_bd=16, fwd_warps=4, row_bt=16, row_bd=32, row_warps=4,
                   col_bt=16, col_bd=16, col_warps=4, col_waves=2, row_waves=2,
                   fwd_split_bt=16, fwd_split_bd=16, fwd_split_warps=4, hin_bt=4,
                   hin_bd=32, sk_bt=16, sk_warps=4)
    else:
        cfg = dict(
            fwd_bt=64, fwd_bd=128, fwd_bd2=128, fwd_warps=4, fwd_stages=3,
            fwd_split_bt=64, fwd_split_bd=128, fwd_split_warps=4, fwd_split_stages=3,
            hin_bt=8, hin_bd=512, sk_bt=64, sk_warps=4,
            row_bt=16, row_bd=256, row_warps=8, row_stages=2, row_waves="auto",
            col_bt=32, col_bd=64, col_warps=4, col_stages=3, col_waves=4,
        )
        if F_pad == 32:     # n = 4: one more stage for the fused forward (H200: 3-5 %)
            cfg.update(fwd_stages=4)
        if wide:            # smaller tiles to fit shared memory
            cfg.update(fwd_bd=32, col_bd=32, row_bd=128, fwd_stages=2, col_stages=2)
        if dtype_name != "fp32" and not wide:
            # 8-token row blocks: 64 registers (4 programs per SM) where 16 took 80 (3 per SM);
            # H200 (bench/gpu_pieces.py): 0.287 -> 0.173 ms at (4,4096,4,4096) bf16, 0.053 ->
            # 0.035 at (1,4096,4,2560), 0.247 -> 0.147 at (2,4096,4,7168); fp16 alike
            cfg.update(row_bt=8)
        if dtype_name == "bf16" and not wide:
            # [16 x 128] column tiles (128 registers, 26 KB shared: 4 programs per SM), and the
            # splits fill waves of the programs that fit.  H200 (bench/gpu_pieces.py), column
            # kernel vs [32 x 64]: 0.444 / 0.078 / 0.386 vs 0.465 / 0.082 / 0.410 ms at the
            # three realistic shapes; [32 x 128] took 210 registers (0.619 ms), [16 x 64] 0.536
            cfg.update(col_occ="auto", col_bt=16, col_bd=128)
        if dtype_name != "fp32" and wide:
            # n >= 5, 16-bit x (H200, bench/results/gpu_quick-h200-wide*.json): the split
            # forward at every T (_fwd_splits) with 64-column chunks (fused 0.94 / 1.54 ms
            # -> 0.28 / 0.46 at (2,4096,n,4096), n = 6 / 8), column tiles [64 x 64]
            # (0.96 / 1.73 -> 0.53 / 1.33 ms; 8 warps 0.71 / 1.39), [32 x 64] at n = 8
            # with its two gate-column blocks (_f_blocks; 0.86 -> 0.82 ms)
            cfg.update(fwd_split_bd=64, col_bt=64 if F_pad <= 64 else 32, col_bd=64)
        if dtype_name == "fp32":
            # the split forward at every T (_fwd_splits) with 32-column chunks, and column
            # tiles [16 x 64] (n <= 4) or [32 x 64] (n >= 5), where the rule had the fused
            # forward and [32 x 32] (H200, graph ms, bench/results/gpu_quick-h200-fp32-*.json):
            # backward 2.907 -> 1.753 at (4,4096,4,4096), 0.535 -> 0.320 at (1,4096,4,2560),
            # 2.270 -> 1.672 at (2,4096,6,4096), 3.539 -> 2.763 at (2,4096,8,4096) ([16 x 128],
            # [16 x 32], 2 or 4 stages, 8 warps: mixed or slower); forward 0.786 -> 0.716,
            # 0.345 -> 0.123, 1.827 -> 0.726, 2.879 -> 1.030 (64-column chunks, 8 warps, 2
            # stages slower)
            cfg.update(fwd_bd=32, fwd_split_bd=32, col_bt=32 if wide else 16, col_bd=64)
        if D <= 64:
            p2 = max(16, _next_pow2(D))
            cfg.update(fwd_bd=min(cfg["fwd_bd"], p2), fwd_bd2=min(cfg["fwd_bd2"], p2),
                       col_bd=min(cfg["col_bd"], p2),
                       row_bd=min(cfg["row_bd"], p2))
    _, cfg["w_pieces"], cfg["p_pieces"] = _PIECES[dtype_name]
    if dtype_name == "bf16" and n * D >= LONG_ROW_ND:
        cfg["w_pieces"], cfg["p_pieces"] = _PIECES_LONG_BF16
        if wide and n * D >= LONGER_ROW_ND:
            cfg["w_pieces"] = (1, 1)
    elif dtype_name == "fp16" and wide and n * D >= LONG_ROW_ND:
        cfg["w_pieces"], cfg["p_pieces"] = _PIECES_LONG_FP16
    cfg.update(_CONFIG_OVERRIDES)
    return cfg


def _col_splits(cfg, programs: int, nblk: int, sms: int, occ: int | None = None) -> int:
    """Token splits of the column kernel, whose grid is (n, D chunks, splits): every program
    walks its split's tokens, so all run equally long and a partly filled last wave of programs
    is time lost (Nsight Compute at (4,4096,4,4096), 3 splits: 768 programs for 528 slots,
    "a partial wave ... up to 50 % of the runtime").  With ``occ`` (programs resident per
    multiprocessor: the compiled kernel's, from _resident, or ``col_occ`` when that is a
    number) the rule takes the fewest splits >= 2 whose waves are >= 90 % full, else the
    fullest (at most 16 splits: 8 left half the H200 idle at n = 1, where the column kernel
    has D/128 programs per split; 16 made it 0.152 -> 0.112 ms at (4,4096,1,4096),
    bench/results/gpu_quick-h200-n1-splits.json); without it, ~col_waves programs per
    multiprocessor.  Depends only on (n, D, T,
    SMs) and the compiled kernel: the split of the dphi sums, hence the bits, is fixed per
    shape."""
    if cfg.get("col_splits"):
        return max(1, min(nblk, int(cfg["col_splits"]), _MAX_GRID12))
    if occ is None and cfg.get("col_occ") != "auto":
        occ = cfg.get("col_occ")
    if not occ:
        return max(1, min(nblk, _cdiv(sms * cfg["col_waves"], programs), _MAX_GRID12))
    slots = sms * occ
    best, best_fill = 1, 0.0
    for s in range(min(2, nblk), min(16, nblk) + 1):
        waves = s * programs / slots
        fill = waves / math.ceil(waves)
        if fill >= 0.9:
            return s
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def _fwd_splits(cfg, T, D, device, F_pad, dname, sms: int | None = None) -> int:
    """0: the fused one-kernel forward; S >= 1: the split forward with S D-shares per token
    block (a runtime value of both kernels: no recompilation as it follows T).

    Rule ("auto", the default), on CUDA:
    * n <= 4 (F_PAD <= 32), T >= 2048: S = 4 up to SMs/2 token blocks of 64, S = 2 below 1.5
      SMs, else S = 1.  H200, graph times (bench/results/gpu_quick-h200-fwdsplit.json), fused
      vs split: (1,4096,4,2560) 0.092 vs 0.062 ms (S = 4), (2,4096,4,7168) 0.306 vs 0.264
      (S = 2), (4,4096,4,4096) 0.320 vs 0.300 (S = 1; the split's two passes are separate
      kernels, and its h_in pass, last token blocks first, finds part of x in L2).
    * 16-bit x, n >= 5 (F_PAD >= 64), every T: S for ~4 programs per multiprocessor (below).
      The fused kernel re-reads the [F_PAD, BLOCK_D] phi*g tiles, 2-4x its x tile, per token
      block and has T/64 programs: (2,4096,6,4096) 0.94 vs 0.28 ms, (2,4096,8,4096) 1.54 vs
      0.46, (1,2048,8,4096) 1.29 vs 0.14, (1,512,8,4096) 1.15 vs 0.08
      (bench/results/gpu_quick-h200-wide*.json).
    * fp32 x, every T: the same S, with 32-column chunks: fused vs split (1,4096,4,2560)
      0.345 vs 0.123 ms, (4,4096,4,4096) 0.786 vs 0.716, (2,4096,4,7168) 1.040 vs 0.628,
      (2,4096,6,4096) 1.827 vs 0.726, (2,4096,8,4096) 2.879 vs 1.030, (1,2048,8,4096) 2.561 vs
      0.313 (bench/results/gpu_quick-h200-fp32-*.json).
    The fused kernel otherwise (16-bit x, n <= 4 at short T: one launch fewer).
    -1: S = ceil(4 SMs / token blocks), at most one share per D chunk (and at most 65535, the
    grid's axis 1).  ``sms``: the device's multiprocessors (default: asked of ``device``)."""
    S = cfg.get("fwd_split", "auto")
    if S == "auto":
        S = 0
        if device.type == "cuda" and (dname == "fp32" or F_pad > 32):
            S = -1
        elif device.type == "cuda" and T >= 2048:
            nblk, sms = _cdiv(T, cfg["fwd_bt"]), sms or _sm_count(device)
            S = 4 if 2 * nblk <= sms else (2 if 2 * nblk < 3 * sms else 1)
    S = int(S)
    if S == 0:
        return 0
    nch = _cdiv(D, cfg["fwd_split_bd"])
    if S < 0:
        S = _cdiv(4 * (sms or _sm_count(device)), _cdiv(T, cfg["fwd_split_bt"]))
    return max(1, min(S, nch, _MAX_GRID12))


# ---------------------------------------------------------------------------------------------
# Grids: pure functions of ints (T, n, D), the launch rule's dict and the device's counts
# (multiprocessors, resident programs), which the launchers call and tests/test_grids.py checks
# without a GPU.  CUDA runs at most 2^31 - 1 programs along grid axis 0 and 65535 along axes 1
# and 2, so the token blocks, the one count that grows with T, are always on axis 0, and the D
# chunks go there with them (the kernel unfolds its program id so that the programs run in the
# order a 2-D grid, axis 0 fastest, gave them: same work per program, same bits).  Axes 1 and
# 2 hold only counts bounded apart from T: the split forward's shares S and the column
# kernel's token splits (each clamped to 65535), phi's padded gate rows (<= 128), and the
# column kernel's D chunks (folded onto axis 0 with the streams past 65535, _col_fold).

def _checked(grid: tuple) -> tuple:
    """``grid``, asserted inside CUDA's limits (a few comparisons: it runs per launch)."""
    assert (0 < grid[0] <= _MAX_GRID0 and (len(grid) < 2 or 0 < grid[1] <= _MAX_GRID12)
            and (len(grid) < 3 or 0 < grid[2] <= _MAX_GRID12)), \
        f"launch grid {grid} outside CUDA's limits"
    return grid


def _prep_phi_grid(ND: int, F_pad: int, cuda: bool) -> tuple[tuple, int]:
    """(grid (phi column chunks, F_PAD rows), BLOCK) of _prep_phi_kernel."""
    block = 1024 if cuda else 256
    return _checked((_cdiv(ND, block), F_pad)), block


def _fwd_grid(T: int, cfg) -> tuple:
    """The fused forward's grid: one program per token block."""
    return _checked((_cdiv(T, cfg["fwd_bt"]),))


def _split_grids(T: int, D: int, S: int, cfg) -> tuple[tuple, tuple, int, int]:
    """The split forward's grids and h_in blocks: (pass 1's grid (token blocks, S shares),
    the h_in pass's (token blocks * D chunks,), its BLOCK_T, its BLOCK_D).  The h_in pass has
    one grid axis in every ORDER; the kernel unfolds the program id (_pre_fwd_fin_kernel)."""
    hbt = cfg["hin_bt"]
    hbd = min(cfg["hin_bd"], max(16, _next_pow2(D)))
    return (_checked((_cdiv(T, cfg["fwd_split_bt"]), S)),
            _checked((_cdiv(T, hbt) * _cdiv(D, hbd),)), hbt, hbd)


def _sk_bwd_mode(cfg, T: int, sms: int, cuda: bool) -> str:
    """Where the Sinkhorn backward runs: "sep" (_sk_bwd_kernel) or "fused" (the row kernel).
    "auto": H200 A/B (docs/performance.md), sep wins at T = 8192, 16384 (k20/k0 bwd 1.05,
    1.01 vs 1.16, 1.15), fused at T = 4096."""
    mode = cfg.get("sk_bwd", "auto")
    if mode == "auto":
        mode = "sep" if cuda and T >= 48 * sms else "fused"
    return mode


def _sk_grid(T: int, cfg) -> tuple:
    """_sk_bwd_kernel's grid: one program per token block."""
    return _checked((_cdiv(T, cfg["sk_bt"]),))


def _row_grid(T: int, cfg, sms: int, resident: int | None = None) -> tuple:
    """The persistent row kernel's grid: one program per slot (``row_waves`` per SM; "auto":
    ``resident``, the compiled kernel's programs per SM from _resident, else 4), at most one
    per token block.  Each program walks the blocks pid, pid + programs, ..."""
    waves = cfg["row_waves"]
    if waves == "auto":
        waves = resident or 4
    return _checked((max(1, min(_cdiv(T, cfg["row_bt"]), sms * waves)),))


def _col_fold(D: int, cfg) -> bool:
    """The column kernel's streams and D chunks on one grid axis (the kernel applies the same
    rule to its constexprs D, BLOCK_D): only past 65535 D chunks (D > 4M at 64 columns), as
    the 3-D grid (n, D chunks, splits) ran 1 % faster on the H200 (column kernel 0.390 vs
    0.395 ms at (2,4096,4,7168), 0.404 vs 0.409 at (2,4096,6,4096); the same registers and
    programs per SM)."""
    return _cdiv(D, cfg["col_bd"]) > _MAX_GRID12


def _col_grid(T: int, n: int, D: int, cfg, sms: int, resident: int | None = None
              ) -> tuple[tuple, int]:
    """(grid (n, D chunks, token splits) or, with _col_fold, (n * D chunks, token splits);
    tokens per split) of the column kernel: the splits by _col_splits (``col_occ`` "auto":
    ``resident`` programs per SM, else 4), each a whole number of token blocks, none empty."""
    bt = cfg["col_bt"]
    nch = _cdiv(D, cfg["col_bd"])
    nblk = _cdiv(T, bt)
    occ = cfg.get("col_occ")
    if occ == "auto":
        occ = resident or 4
    tok = _cdiv(nblk, _col_splits(cfg, n * nch, nblk, sms, occ)) * bt
    splits = _cdiv(T, tok)
    return _checked((n * nch, splits) if _col_fold(D, cfg) else (n, nch, splits)), tok


def _reduce_grid(ND: int, F: int, F_pad: int, cuda: bool) -> tuple[tuple, int]:
    """(grid, BLOCK) of _reduce_partials_kernel: ND / BLOCK column programs, at least F + 3
    (one per row of the row kernel's partials)."""
    block = max(16, min(64, 2048 // F_pad)) if cuda else 64
    return _checked((max(_cdiv(ND, block), F + 3),)), block


def _post_fwd_grid(T: int, D: int, cfg) -> tuple:
    """_post_fwd_kernel's grid: token blocks * D chunks on one axis, token blocks fastest."""
    return _checked((_cdiv(T, cfg["pf_bt"]) * _cdiv(D, cfg["pf_bd"]),))


def _post_bwd_grid(T: int, n: int, cfg) -> tuple[tuple, int]:
    """(grid, BLOCK_T) of _post_bwd_kernel: token blocks of >= 16 rows (token, stream) per
    dot."""
    bt = max(cfg["pb_bt"], 16 // _next_pow2(n))
    return _checked((_cdiv(T, bt),)), bt


def _forward_split(x, pg, alpha, bias, h_in, h_post, h_res, inv_rms, h_mix, h_pre, T, n, D, F,
                   F_pad, npa, npb, S, cfg, k, norm_eps, hc_eps, few):
    dev = x.device
    bt, bd = cfg["fwd_split_bt"], cfg["fwd_split_bd"]
    mpart = torch.empty((S, T, F), dtype=torch.float32, device=dev)
    spart = torch.empty((S, T), dtype=torch.float32, device=dev)
    kw = _launch_kw(cfg, "fwd_split")
    fa, fb = _f_blocks(F, F_pad) if cfg.get("fwd_fblocks", True) else (F_pad, 0)
    ilv, order, hin_ev = _l2_reuse(cfg, S, F_pad, dev)
    grid1, grid2, hbt, hbd = _split_grids(T, D, S, cfg)
    _pre_fwd_part_kernel[grid1](
        x, pg, mpart, spart, T, S, N=n, D=D, F=F, F_PAD=F_pad, BLOCK_T=bt, BLOCK_D=bd,
        NPA=npa, NPB=npb, INTERP=_interpret(), FA=fa, FB=fb, CAT=_cat(npa, npb, F_pad),
        ILV=ilv, SEP=few, **kw)
    _pre_fwd_fin_kernel[grid2](
        x, mpart, spart, _f32(alpha), _f32(bias), h_in, h_post, h_res, inv_rms, h_mix, h_pre, T,
        S, float(norm_eps), float(hc_eps), N=n, D=D, F=F, F_PAD=F_pad, BLOCK_T=hbt,
        BLOCK_D=hbd, INTERP=_interpret(), ORDER=order, EV=hin_ev, **_sk_kw(k, n), num_warps=4)


def _l2_reuse(cfg, S: int, F_pad: int, device) -> tuple[bool, str, str]:
    """How the split forward's two passes share the L2: (ILV, the h_in pass's order of D
    chunks, its eviction policy for x).

    Rule, on CUDA at S >= 4 shares (short T: x at most a few times the L2) and F_PAD <= 64
    (n <= 6): pass 1's shares interleaved (share s takes D chunks s, s + S, ...: all programs
    move through D together, so the last D chunks are the last read), then the h_in pass in D
    chunks last first ("dlast"), its x loads evict_first (read for the last time: keep what
    is still to come).  H200, Triton 3.6, graph ms without -> with
    (bench/results/gpu_quick-h200-l2.json): (1,4096,4,2560) 0.0623 -> 0.0580, (1,2048,4,4096)
    0.0573 -> 0.0536, (1,4096,5,4096) 0.151 -> 0.137, (1,4096,6,4096) 0.166 -> 0.153.  Not
    taken where it lost (gpu_quick-h200-l2-explore.json): (1,2048,8,4096) 0.1326 -> 0.1355
    (pass 1 slower), (2,4096,4,7168) at S = 2 0.264 -> 0.270, (4,4096,4,4096) at S = 1 (order
    and hint) 0.300 -> 0.306.  Otherwise: contiguous shares, token blocks last first ("rev": what
    pass 1 read last is still in L2; 3-5 % on the H200), no hint.
    Overrides: set_config(fwd_ilv=, hin_order="rev" | "dlast" | "plain", hin_ev=)."""
    on = device.type == "cuda" and S >= 4 and F_pad <= 64
    return (bool(cfg.get("fwd_ilv", on)), cfg.get("hin_order", "dlast" if on else "rev"),
            cfg.get("hin_ev", "evict_first" if on else ""))


def _cat(npa: int, npb: int, F_pad: int) -> bool:
    """Both phi*g pieces in one dot (_fwd_step): bf16 x (one x piece, two phi*g pieces) and
    F_PAD <= 32.  Measured at n = 4 (split pass 1 4-8 % faster); at F_PAD = 128 (n = 8) the
    [BLOCK_T, 256] accumulator spills (compiler report), so wider F keeps two dots."""
    return npa == 1 and npb == 2 and F_pad <= 32


def _launch_kw(cfg, prefix):
    kw = {"num_warps": cfg[prefix + "_warps"]}
    if not _interpret():
        kw["num_stages"] = cfg.get(prefix + "_stages", 2)
    return kw


def _prep_phi(phi, g, F_pad, npieces):
    F, ND = phi.shape
    out = torch.empty((npieces, F_pad, ND), dtype=torch.bfloat16, device=phi.device)
    grid, BLOCK = _prep_phi_grid(ND, F_pad, phi.device.type == "cuda")
    _prep_phi_kernel[grid](phi, g if g is not None else phi, out, F=F, ND=ND, F_PAD=F_pad,
                           NPIECE=npieces, HAS_G=g is not None, BLOCK=BLOCK, INTERP=_interpret(),
                           num_warps=4)
    return out


def _f_blocks(F: int, F_pad: int) -> tuple[int, int]:
    """The gate-column blocks (FA, FB) of the column kernel and the split forward's pass 1:
    (F_PAD, 0) for one block; else the largest power of two <= F and the power of two >= 16
    that covers the rest, so that the dots multiply fewer zero rows: n = 8 (F = 80) takes
    64 + 16 columns of 128 (H200 at (2,4096,8,4096): column kernel 1.39 -> 0.86 ms, pass 1
    0.283 -> 0.253 ms, bitwise the same m).  Only from 64 on: at n = 5, 6 (32 + 16 of 64) the
    column kernel's two blocks took more registers and were slower (0.40 -> 0.50 ms at
    (2,4096,6,4096))."""
    fa = 1 << (F.bit_length() - 1)
    fb = max(16, _next_pow2(F - fa))
    if fa == F or fa < 64 or fa + fb >= F_pad:
        return F_pad, 0
    return fa, fb


def _f32(a):
    if a.dtype is torch.float32 and a.is_contiguous():   # no dispatch: host time per call
        return a
    return a.to(torch.float32).contiguous()


def _sk_kw(k: int, n: int) -> dict:
    """Sinkhorn constexprs; none at k = 0, so that path compiles exactly the k = 0 kernels."""
    if k < 0:
        raise ValueError(f"sinkhorn_iters: expected >= 0, got {k}")
    return {} if k == 0 else {"K": k, "NP": _next_pow2(n)}


# ---------------------------------------------------------------------------------------------

def _on_x_device(fn):
    """``fn`` run with x's CUDA device current.  Triton launches (and _resident compiles) on
    the current device and its current stream, so tensors on cuda:1 while cuda:0 is current
    would go to the wrong GPU.  The device is switched only when it differs (otherwise the
    cost is one current_device() call); nothing changes on the CPU (the interpreter)."""
    @functools.wraps(fn)
    def run(*args, **kw):
        dev = (args[0] if args else kw["x"]).device
        if dev.type != "cuda" or dev.index == torch.cuda.current_device():
            return fn(*args, **kw)
        with torch.cuda.device(dev.index):
            return fn(*args, **kw)
    return run


@_on_x_device
def forward(x, phi, alpha, bias, gamma, *, norm_eps, hc_eps, sinkhorn_iters=0):
    """(h_in [T,D] x dtype, h_post [T,n], h_res [T,n,n], inv_rms [T], h_mix [T,F], h_pre [T,n])"""
    k = int(sinkhorn_iters)
    T, n, D = x.shape
    F = n * n + 2 * n
    F_pad = max(16, _next_pow2(F))
    ND = n * D
    dev = x.device
    pdt = phi.dtype
    x = x.contiguous()
    h_in = empty_torch((T, D), x.dtype, dev)
    h_post = empty_torch((T, n), torch.float32, dev)
    h_res = empty_torch((T, n, n), torch.float32, dev)
    inv_rms = empty_torch((T,), torch.float32, dev)
    h_mix = empty_torch((T, F), torch.float32, dev)
    h_pre = empty_torch((T, n), torch.float32, dev)
    if T > 0:
        dname = _dtype_name(x.dtype)
        npa, npb = _PIECES[dname][0]
        few = T * n * n < FEW_RES
        if few:   # few h_res entries: phi*g to fp32 precision, products added in fp32
            npb = 3
        cfg = _config(n, D, dname, dev)
        g = None if gamma is None else _f32(gamma).reshape(ND)
        pg = _prep_phi(_f32(phi), g, F_pad, npb)
        S = _fwd_splits(cfg, T, D, dev, F_pad, dname)
        if S > 0:
            _forward_split(x, pg, alpha, bias, h_in, h_post, h_res, inv_rms, h_mix, h_pre, T, n,
                           D, F, F_pad, npa, npb, S, cfg, k, norm_eps, hc_eps, few)
        else:
            _pre_fwd_kernel[_fwd_grid(T, cfg)](
                x, pg, _f32(alpha), _f32(bias), h_in, h_post, h_res, inv_rms, h_mix, h_pre,
                T, float(norm_eps), float(hc_eps),
                N=n, D=D, F=F, F_PAD=F_pad, BLOCK_T=cfg["fwd_bt"], BLOCK_D=cfg["fwd_bd"],
                BLOCK_D2=cfg.get("fwd_bd2", cfg["fwd_bd"]), NPA=npa, NPB=npb,
                INTERP=_interpret(), CAT=_cat(npa, npb, F_pad), **_sk_kw(k, n),
                **_launch_kw(cfg, "fwd"), SEP=few)
    outs = (h_post, h_res, inv_rms, h_mix, h_pre)
    return (h_in,) + tuple(o if o.dtype == pdt else o.to(pdt) for o in outs)


@_on_x_device
def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
             *, norm_eps, hc_eps, sinkhorn_iters=0):
    """(dx [T,n,D] x dtype, dphi [F,nD], dalpha [3], dbias [F], dgamma [n,D] or None)"""
    k = int(sinkhorn_iters)
    T, n, D = x.shape
    F = n * n + 2 * n
    F_pad = max(16, _next_pow2(F))
    ND = n * D
    dev = x.device
    pdt = phi.dtype
    x = x.contiguous()
    dx = empty_torch((T, n, D), x.dtype, dev)
    dphi = empty_torch((F, ND), torch.float32, dev)
    dalpha = empty_torch((3,), torch.float32, dev)
    dbias = empty_torch((F,), torch.float32, dev)
    dgamma = None if gamma is None else empty_torch((n, D), torch.float32, dev)
    if T == 0:
        dphi.zero_(); dalpha.zero_(); dbias.zero_()
        if dgamma is not None:
            dgamma.zero_()
    else:
        dname = _dtype_name(x.dtype)
        cfg = _config(n, D, dname, dev)
        (nwa, nwb), (npa, npb) = cfg["w_pieces"], cfg["p_pieces"]
        sms = _sm_count(dev)
        phi32 = _f32(phi)
        g = None if gamma is None else _f32(gamma).reshape(ND)
        dh_in = dh_in.contiguous()
        hp32 = _f32(h_pre)
        # row kernel: persistent, prow programs (as many as fit on the GPU at once)
        bt = cfg["row_bt"]
        nblk = _cdiv(T, bt)
        ndm = max(nwa, npa)
        dm = torch.empty((ndm, T, F_pad), dtype=torch.bfloat16, device=dev)
        coef = torch.empty((T,), dtype=torch.float32, device=dev)
        sk = _sk_kw(k, n)
        dhr = _f32(dh_res).reshape(T, n * n)
        if k > 0 and _sk_bwd_mode(cfg, T, sms, dev.type == "cuda") == "sep":
            # d(logits) by its own kernel; the row kernel then runs its k = 0 code on it
            dlog = torch.empty((T, n * n), dtype=torch.float32, device=dev)
            _sk_bwd_kernel[_sk_grid(T, cfg)](
                _f32(h_mix), _f32(inv_rms), _f32(alpha), _f32(bias), dhr, dlog, T,
                N=n, F=F, K=k, NP=_next_pow2(n), BLOCK_T=cfg["sk_bt"],
                num_warps=cfg["sk_warps"])
            dhr, sk = dlog, {}
        elif k > 0:   # d(logits) scratch, [T, n*n] (the size class of dh_res)
            sk.update(bias_ptr=_f32(bias),
                      dlog_ptr=torch.empty((T, n * n), dtype=torch.float32, device=dev))
        row_args = [x, dh_in, _f32(inv_rms), _f32(h_mix), hp32, _f32(h_post), _f32(dh_post),
                    dhr, _f32(alpha), dm, coef, coef, T, nblk, float(hc_eps)]
        row_kw = dict(N=n, D=D, F=F, F_PAD=F_pad, BLOCK_T=bt, BLOCK_D=cfg["row_bd"], NDM=ndm,
                      INTERP=_interpret(), **sk, **_launch_kw(cfg, "row"))
        res = None
        if cfg["row_waves"] == "auto":   # one program per slot (coef stands in for wsrow)
            res = _resident(_pre_bwd_row_kernel, ("row", n, D, dname, dev, sk.get("K", 0)),
                            dev, row_args, row_kw)
        grid = _row_grid(T, cfg, sms, res)
        prow = grid[0]
        row_args[11] = wsrow = torch.empty((F_pad + 4, prow), dtype=torch.float32, device=dev)
        _pre_bwd_row_kernel[grid](*row_args, **row_kw)
        # column kernel: grid (n, D chunks, token splits) (_col_grid); splits by (n, D, T, SMs,
        # programs per SM): fixed per shape
        exact = {}
        if ND <= SMALL_ND:   # short rows: dx in float64 (_dx_exact)
            exact = dict(EXACT=True, rms_ptr=_f32(inv_rms), hmix_ptr=_f32(h_mix))
        col_args = [x, dh_in, hp32, dm, coef, phi32, g if g is not None else phi32, dx, coef,
                    T, 0]
        fa, fb = (F_pad, 0) if exact or not cfg.get("col_fblocks", True) else _f_blocks(F, F_pad)
        col_kw = dict(N=n, D=D, F=F, F_PAD=F_pad, BLOCK_T=cfg["col_bt"], BLOCK_D=cfg["col_bd"],
                      HAS_G=g is not None,
                      NWA=nwa, NWB=nwb, NPA=npa, NPB=npb, NDM=ndm, INTERP=_interpret(),
                      FA=fa, FB=fb, **exact, **_launch_kw(cfg, "col"))
        res = None
        if cfg.get("col_occ") == "auto":   # the splits fill waves of the programs that fit
            res = _resident(_pre_bwd_col_kernel, ("col", n, D, dname, dev, g is not None),
                            dev, col_args, col_kw)
        grid, col_args[10] = _col_grid(T, n, D, cfg, sms, res)
        splits = grid[-1]
        col_args[8] = wscol = torch.empty((splits, F, ND), dtype=torch.float32, device=dev)
        _pre_bwd_col_kernel[grid](*col_args, **col_kw)
        grid, BLOCK = _reduce_grid(ND, F, F_pad, dev.type == "cuda")
        _reduce_partials_kernel[grid](
            wscol, wsrow, phi32, g if g is not None else phi32, dphi,
            dgamma if dgamma is not None else dphi, dalpha, dbias, splits, prow,
            ND=ND, F=F, F_PAD=F_pad, HAS_G=g is not None, BLOCK=BLOCK,
            RB=1024 if dev.type == "cuda" else 32, num_warps=4)
    outs = (dphi, dalpha, dbias, dgamma)
    return (dx,) + tuple(None if o is None else (o if o.dtype == pdt else o.to(pdt))
                         for o in outs)


# ---------------------------------------------------------------------------------------------
# The post operator

def _post_config(n: int, D: int, device, fp32: bool = False) -> dict:
    """Post kernels' blocks.  Forward: a [BLOCK_T, pow2(n), BLOCK_D] tile of ~4096 elements per
    program.  Backward: BLOCK_T * pow2(n) = 16 rows per dot (the tensor cores' minimum), D in
    chunks of 256 (512 at n > 4) for 16-bit x.  Measured on the H200 (docs/performance.md);
    smaller chunks, or 8 warps, fall off a cliff (~9x; not from spills: the compiler reports
    none).  fp32 x splits both dot operands into 3 pieces; chunks of 128 were the fastest
    measured (3.4x the floor; 64: 5.2x, 32: 9.5x): fp32 x is correct but not tuned."""
    npad = _next_pow2(n)
    p2 = max(16, _next_pow2(D))
    if device.type != "cuda":
        cfg = dict(pf_bt=4, pf_bd=32, pb_bt=max(1, 16 // npad), pb_bd=32, warps=4, pb_warps=4)
    else:
        cfg = dict(pf_bt=max(1, 8 // npad), pf_bd=512, warps=4, pf_stages=2,
                   pb_bt=max(1, 16 // npad), pb_bd=512 if npad > 4 else 256, pb_warps=4,
                   pb_stages=3)
        if fp32:
            cfg.update(pb_bd=128)
    cfg.update(pf_bd=min(cfg["pf_bd"], p2), pb_bd=min(cfg["pb_bd"], p2))
    cfg.update({k[5:]: v for k, v in _CONFIG_OVERRIDES.items() if k.startswith("post_")})
    return cfg


@_on_x_device
def post_forward(x, f_out, h_post, h_res):
    """x_next [T,n,D] (x's dtype) = h_res @ x + h_post * f_out, per token."""
    T, n, D = x.shape
    dev = x.device
    out = empty_torch((T, n, D), x.dtype, dev)
    if T > 0:
        cfg = _post_config(n, D, dev)
        kw = {"num_warps": cfg["warps"]}
        if not _interpret():
            kw["num_stages"] = cfg["pf_stages"]
        _post_fwd_kernel[_post_fwd_grid(T, D, cfg)](
            x.contiguous(), f_out.to(x.dtype).contiguous(), _f32(h_post), _f32(h_res), out, T,
            N=n, NP=_next_pow2(n), D=D, BLOCK_T=cfg["pf_bt"], BLOCK_D=cfg["pf_bd"],
            INTERP=_interpret(), **kw)
    return out


@_on_x_device
def post_backward(x, f_out, h_post, h_res, dx_next):
    """(dx [T,n,D], df_out [T,D] in x's dtype; dh_post [T,n], dh_res [T,n,n] in h_post's)"""
    T, n, D = x.shape
    dev = x.device
    dx = empty_torch((T, n, D), x.dtype, dev)
    df = empty_torch((T, D), x.dtype, dev)
    dhp = empty_torch((T, n), torch.float32, dev)
    dhr = empty_torch((T, n, n), torch.float32, dev)
    if T > 0:
        cfg = _post_config(n, D, dev, x.dtype == torch.float32)
        npad = _next_pow2(n)
        grid, bt = _post_bwd_grid(T, n, cfg)   # >= 16 rows per dot
        kw = {"num_warps": cfg["pb_warps"]}
        if not _interpret():
            kw["num_stages"] = cfg["pb_stages"]
        _post_bwd_kernel[grid](
            x.contiguous(), f_out.to(x.dtype).contiguous(), _f32(h_post), _f32(h_res),
            dx_next.to(x.dtype).contiguous(), dx, df, dhp, dhr, T,
            N=n, NP=npad, D=D, BLOCK_T=bt, BLOCK_D=cfg["pb_bd"], FR=max(16, _next_pow2(bt)),
            NPC=3 if x.dtype == torch.float32 else 1,   # fp32: 3 bf16 pieces per operand
            INTERP=_interpret(), **kw)
    pdt = h_post.dtype
    return (dx, df, dhp if pdt == dhp.dtype else dhp.to(pdt),
            dhr if pdt == dhr.dtype else dhr.to(pdt))
