"""The gates of the pre operator's forward (CONTRACT.md), per token block: from the raw
projections m [BLOCK_T, F_PAD] (= h_mix) and the sums of squares,
    r = 1/sqrt(mean(v*v) + norm_eps);  u = r*m
    h_pre = sigmoid(a0*u[:n] + b[:n]) + hc_eps;  h_post = 2*sigmoid(a1*u[n:2n] + b[n:2n])
    h_res = a2*u[2n:] + b[2n:]  (the logits; with K > 0 Sinkhorn-projected, SK_K(logits))
and their stores.  Shared by the fused and the split forward (pre_forward.py).
"""
from __future__ import annotations

from ._util import tl, triton

if triton is not None:
    from .sinkhorn import _sk_iterate, _sk_p0

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
