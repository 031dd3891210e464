"""The pre operator's forward on the CPU: one fused, parallel pass per chunk of tokens.

Math: ``docs/contract.md``, "Forward"; tiling and precision: ``docs/numba.md``.
"""
from __future__ import annotations

import numpy as np

from .._common import FEW_RES, empty
from ._kernels import KT, LOCK, SB, TB, chunking, compute_dtype, numba, storage

if numba is not None:
    from numba import njit, prange

    from ._kernels import FASTMATH, _ld, _st
    from .sinkhorn import _sk_forward

    # Per token t (v = x[t] as one row of nD = n*D):
    #   m = phi @ (v * g) (h_mix), r = (sum(v*v) / nD + norm_eps)^(-1/2) (inv_rms), u = r * m
    #   h_pre  = sigmoid(a_pre * u[:n] + bias[:n]) + hc_eps
    #   h_post = 2 * sigmoid(a_post * u[n:2n] + bias[n:2n])
    #   h_res  = L = a_res * u[2n:] + bias[2n:], or SK_k(L) for k > 0
    #   h_in   = sum_i h_pre[i] * x[t, i, :], rounded once to x's encoding
    # Pass 1 walks the columns tile by tile (KT) and a super-block (SB) of tokens in groups of
    # TB = 8: each group's tile is decoded once into vt (as v * g), and each phi row load serves
    # 8 tokens. The gates are fp64 scalars; pass 2 forms h_in from x, still in cache.
    # Arguments: x [T, nD] (storage kind), phi [F, nD] fp32 or fp64 (read as it is: no copy per
    # call), g [nD] compute dtype, alpha [3] / bias [F] fp64, csize tokens per chunk, zero = 0
    # in the compute dtype, sk = k; outputs h_in [T, D]
    # (storage kind), h_post / h_pre [T, n], h_res [T, n*n], inv_rms [T], h_mix [T, F] in the
    # gates' dtype.

    @njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
    def _pre_fwd_kernel(x, phi, g, alpha, bias, norm_eps, hc_eps, n, D, csize, zero, sk,
                        h_in, h_post, h_res, inv_rms, h_mix, h_pre):
        T = x.shape[0]
        nD = n * D
        F = phi.shape[0]
        nchunks = (T + csize - 1) // csize
        a_pre = np.float64(alpha[0])
        a_post = np.float64(alpha[1])
        a_res = np.float64(alpha[2])
        Du = np.uint64(D)
        for c in prange(nchunks):
            t0 = c * csize
            t1 = min(T, t0 + csize)
            vt = np.empty((TB, KT), g.dtype)
            hb = np.empty(D, g.dtype)
            hp = np.empty(n, g.dtype)
            m = np.empty((SB, F), np.float64)
            ss = np.empty(SB, np.float64)
            lg = np.empty(n * n, np.float64)
            for s0 in range(t0, t1, SB):
                ns = min(SB, t1 - s0)
                m[:, :] = 0.0
                ss[:] = 0.0
                # pass 1, tile by tile: sum of squares and the F projections; a phi tile stays
                # in L2 for the whole super-block and each row load serves TB tokens
                for k0 in range(0, nD, KT):
                    Lu = np.uint64(min(KT, nD - k0))
                    ku0 = np.uint64(k0)
                    for g0 in range(0, ns, TB):
                        ng = min(TB, ns - g0)
                        for jj in range(TB):
                            if jj < ng:
                                t = s0 + g0 + jj
                                s = zero
                                for k in range(Lu):
                                    val = _ld(x, t, ku0 + k)
                                    vt[jj, k] = val * g[ku0 + k]
                                    s += val * val
                                ss[g0 + jj] += s
                            else:
                                for k in range(Lu):
                                    vt[jj, k] = zero
                        for f in range(F):
                            a0 = zero
                            a1 = zero
                            a2 = zero
                            a3 = zero
                            a4 = zero
                            a5 = zero
                            a6 = zero
                            a7 = zero
                            for k in range(Lu):
                                pk = phi[f, ku0 + k]
                                a0 += vt[0, k] * pk
                                a1 += vt[1, k] * pk
                                a2 += vt[2, k] * pk
                                a3 += vt[3, k] * pk
                                a4 += vt[4, k] * pk
                                a5 += vt[5, k] * pk
                                a6 += vt[6, k] * pk
                                a7 += vt[7, k] * pk
                            m[g0, f] += a0
                            m[g0 + 1, f] += a1
                            m[g0 + 2, f] += a2
                            m[g0 + 3, f] += a3
                            m[g0 + 4, f] += a4
                            m[g0 + 5, f] += a5
                            m[g0 + 6, f] += a6
                            m[g0 + 7, f] += a7
                # gates, then pass 2 (x re-read from cache): h_in = sum_i h_pre[i] * x[i, :]
                for j in range(ns):
                    t = s0 + j
                    r = 1.0 / np.sqrt(ss[j] / nD + norm_eps)
                    inv_rms[t] = r
                    for f in range(F):
                        h_mix[t, f] = m[j, f]
                    for i in range(n):
                        z = a_pre * (r * m[j, i]) + bias[i]
                        hpv = 1.0 / (1.0 + np.exp(-z)) + hc_eps
                        h_pre[t, i] = hpv
                        hp[i] = hpv
                        z = a_post * (r * m[j, n + i]) + bias[n + i]
                        h_post[t, i] = 2.0 / (1.0 + np.exp(-z))
                    for q in range(n * n):  # the logits L, in fp64
                        lg[q] = a_res * (r * m[j, 2 * n + q]) + bias[2 * n + q]
                    if sk > 0:  # h_res = SK_k(L) (skipped for k = 0: h_res = L)
                        _sk_forward(lg, n, sk)
                    for q in range(n * n):
                        h_res[t, q] = lg[q]
                    h0 = hp[0]
                    for d in range(Du):
                        hb[d] = h0 * _ld(x, t, d)
                    for i in range(1, n):
                        hi = hp[i]
                        off = np.uint64(i) * Du
                        for d in range(Du):
                            hb[d] += hi * _ld(x, t, off + d)
                    for d in range(Du):
                        _st(h_in, t, d, hb[d])


def forward(x, phi, alpha, bias, gamma, *, norm_eps, hc_eps, sinkhorn_iters=0):
    """(h_in [T,D] in x's encoding; h_post [T,n], h_res [T,n,n], inv_rms [T], h_mix [T,F],
    h_pre [T,n] in phi's dtype) from x [T,n,D] and the fp32 / fp64 parameters."""
    sk = int(sinkhorn_iters)  # one int64 argument: every k shares one compiled kernel
    T, n, D = x.shape
    nD = n * D
    F = phi.shape[0]
    pd = phi.dtype
    cd = compute_dtype(x.dtype, pd)
    if T * n * n < FEW_RES:   # few h_res entries: m in float64 (backends/_common.py)
        cd = np.float64
    h_in = empty((T, D), x.dtype)
    h_post = empty((T, n), pd)
    h_res = empty((T, n, n), pd)
    inv_rms = empty((T,), pd)
    h_mix = empty((T, F), pd)
    h_pre = empty((T, n), pd)
    if T == 0:
        return h_in, h_post, h_res, inv_rms, h_mix, h_pre
    g = np.ones(nD, cd) if gamma is None else np.ascontiguousarray(gamma, dtype=cd).reshape(nD)
    csize, _ = chunking(T)
    with LOCK:
        _pre_fwd_kernel(storage(x).reshape(T, nD), np.ascontiguousarray(phi), g,
                        np.asarray(alpha, np.float64),
                        np.asarray(bias, np.float64), float(norm_eps), float(hc_eps), n, D,
                        csize, cd(0), sk, storage(h_in), h_post, h_res.reshape(T, n * n),
                        inv_rms, h_mix, h_pre)
    return h_in, h_post, h_res, inv_rms, h_mix, h_pre
