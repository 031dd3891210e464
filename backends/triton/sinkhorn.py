"""Sinkhorn-Knopp on per-token [BLOCK_T, NP, NP] tiles, forward and VJP (CONTRACT.md,
"Sinkhorn"): h_res = SK_K(logits), the logits a_res * (inv_rms * h_mix[2n:]) + bias[2n:].

NP = pow2(n); entries outside the n x n block are zero in P and ignored.  K is a constexpr:
K = 0 compiles none of this (``_sk_kw`` passes no Sinkhorn constexprs then).  The forward's
projection runs inside the forward kernels' gate store (pre_forward._gates_store); the
backward's d(logits) in ``_sk_bwd_kernel`` or inside the row kernel (``sk_bwd``, config.py),
both through ``_sk_dlogits``.
"""
from __future__ import annotations

from ._util import _next_pow2, tl, triton


def _sk_kw(k: int, n: int) -> dict:
    """Sinkhorn constexprs; none at k = 0, so that path compiles exactly the k = 0 kernels."""
    assert k >= 0, k   # the front end checked sinkhorn_iters
    return {} if k == 0 else {"K": k, "NP": _next_pow2(n)}


if triton is not None:

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

    @triton.jit
    def _sk_dlogits(hmix_ptr, rms_ptr, bias_ptr, dhres_ptr, dlog_ptr, a_res, rows, rows64,
                    rmask, N: tl.constexpr, F: tl.constexpr, K: tl.constexpr,
                    NP: tl.constexpr):
        """d(logits) of the tokens ``rows`` into dlog [T, n*n]: the logits rebuilt per token as
        an [NP, NP] tile, L = a_res * (inv_rms * h_mix[2n:]) + bias[2n:], and dh_res pulled
        back through the K iterations (_sk_vjp)."""
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

    # The Sinkhorn backward on its own (set_config(sk_bwd="sep")): d(logits) for all tokens in a
    # small kernel, many tokens per program, before the row kernel (which then runs its k = 0
    # code on the [T, n*n] result), so the VJP is off the row kernel's path.
    @triton.jit(do_not_specialize=["T"])
    def _sk_bwd_kernel(
        hmix_ptr,    # [T, F] fp32
        rms_ptr,     # [T] fp32
        alpha_ptr,   # [3] fp32
        bias_ptr,    # [F] fp32
        dhres_ptr,   # [T, n*n] fp32: d(SK_K(logits))
        dlog_ptr,    # [T, n*n] fp32 (out): d(logits)
        T,
        N: tl.constexpr, F: tl.constexpr, K: tl.constexpr, NP: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        a_res = tl.load(alpha_ptr + 2)
        _sk_dlogits(hmix_ptr, rms_ptr, bias_ptr, dhres_ptr, dlog_ptr, a_res, rows, rows64, rmask,
                    N, F, K, NP)
