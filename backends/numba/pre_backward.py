"""The pre operator's backward on the CPU: one fused, parallel pass per chunk of tokens, then
a chunk-ordered reduction of the parameter-gradient partials.

Math: ``docs/contract.md``, "Backward"; tiling, chunking and precision: ``docs/numba.md``.
"""
from __future__ import annotations

import numpy as np

from .._common import SMALL_ND, empty
from ._kernels import KT, LOCK, SB, TB, chunking, compute_dtype, numba, storage

if numba is not None:
    from numba import njit, prange

    from ._kernels import FASTMATH, _ld, _st
    from .sinkhorn import _sk_vjp

    # Per token t (v = x[t] as one row of nD = n*D, r = inv_rms, m = h_mix):
    #   dh_pre = sum_d dh_in[d] * x[i, d];  s = h_pre - hc_eps;  dp = dh_pre * s * (1 - s)
    #   dq = dh_post * h_post * (1 - h_post / 2);  dR = dh_res, or its SK_k VJP for k > 0
    #   e = [a_pre * dp, a_post * dq, a_res * dR];  dm = r * e;  dr = dot(e, m)
    #   w = dm @ phi;  dx = w * g - (dr * r^3 / nD) * v + h_pre[i] * dh_in (+ dx_add where
    #   has_add: another gradient of x, such as the post operator's), rounded once
    # and, summed per chunk into its own partials (dab = [dalpha, dbias] in fp64):
    #   dalpha += [dot(dp, r*m[:n]), dot(dq, r*m[n:2n]), dot(dR, r*m[2n:])]
    #   dbias += [dp, dq, dR]
    #   dphi += outer(dm, v * g);  dgamma += v * w (has_gamma only)
    # Pass 1 is per token (fp64 scalars); pass 2 walks stream i's columns tile by tile (KT) for
    # a super-block (SB) of tokens in groups of TB = 8: w four tokens at a time, then the
    # rank-8 update of the dphi tile while it is in L2.
    # Arguments: x [T, nD] (storage kind), phi [F, nD] / g [nD] compute dtype, alpha [3] /
    # bias [F] fp64, inv_rms [T], h_mix [T, F], h_pre / h_post / dh_post [T, n], dh_res
    # [T, n*n] gates' dtype, dh_in [T, D] and dx_add [T, nD] (storage kind; any array of that
    # kind when not has_add), zero = 0 in the compute dtype, sk = k;
    # outputs dx [T, nD] (storage kind), dphi_p [C, F, nD], dg_p [C, nD] compute dtype and
    # dab_p [C, 3 + F] fp64, one row per chunk.

    @njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
    def _pre_bwd_kernel(x, phi, g, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                        dh_res, hc_eps, n, D, csize, has_gamma, zero, sk, dx_add, has_add, dx,
                        dphi_p, dg_p, dab_p):
        T = x.shape[0]
        nD = n * D
        F = phi.shape[0]
        F4 = F - F % 4
        nchunks = (T + csize - 1) // csize
        a_pre = np.float64(alpha[0])
        a_post = np.float64(alpha[1])
        a_res = np.float64(alpha[2])
        Du = np.uint64(D)
        for c in prange(nchunks):
            t0 = c * csize
            t1 = min(T, t0 + csize)
            dphi_c = dphi_p[c]
            dg_c = dg_p[c]
            dab_c = dab_p[c]
            dphi_c[:, :] = zero
            dg_c[:] = zero
            dab_c[:] = 0.0
            vt = np.empty((TB, KT), phi.dtype)
            wt = np.empty((4, KT), phi.dtype)
            dm = np.zeros((SB, F), phi.dtype)
            hpc = np.empty((SB, n), phi.dtype)
            coef = np.empty(SB, phi.dtype)
            dhp = np.empty(n, np.float64)
            e = np.empty(F, np.float64)
            # Sinkhorn scratch: logits, their pulled-back gradient, exp(logits - max), and the
            # k x n row / column scalings and sums of the replayed iterations
            nn = n * n
            kk1 = max(sk, 1)
            lg = np.empty(nn, np.float64)
            dl = np.empty(nn, np.float64)
            ep0 = np.empty(nn, np.float64)
            su = np.empty((kk1, n), np.float64)
            sv = np.empty((kk1, n), np.float64)
            srs = np.empty((kk1, n), np.float64)
            scs = np.empty((kk1, n), np.float64)
            for s0 in range(t0, t1, SB):
                ns = min(SB, t1 - s0)
                # pass 1, per token: dh_pre, gate derivatives, dm, dalpha / dbias
                for j in range(ns):
                    t = s0 + j
                    for i in range(n):
                        off = np.uint64(i) * Du
                        s = zero
                        for d in range(Du):   # products in the compute dtype (zero's)
                            s += (zero + _ld(dh_in, t, d)) * _ld(x, t, off + d)
                        dhp[i] = s
                    r = np.float64(inv_rms[t])
                    for i in range(n):
                        hpv = np.float64(h_pre[t, i])
                        hpc[j, i] = hpv
                        sg = hpv - hc_eps
                        dp = dhp[i] * sg * (1.0 - sg)
                        e[i] = a_pre * dp
                        dab_c[0] += dp * (r * h_mix[t, i])
                        dab_c[3 + i] += dp
                        hq = np.float64(h_post[t, i])
                        dq = dh_post[t, i] * hq * (1.0 - hq / 2.0)
                        e[n + i] = a_post * dq
                        dab_c[1] += dq * (r * h_mix[t, n + i])
                        dab_c[3 + n + i] += dq
                    if sk > 0:  # dh_res is w.r.t. SK_k(logits): pull it back to the logits
                        for q in range(nn):
                            lg[q] = a_res * (r * h_mix[t, 2 * n + q]) + bias[2 * n + q]
                            dl[q] = dh_res[t, q]
                        _sk_vjp(lg, dl, n, sk, ep0, su, sv, srs, scs)
                    for q in range(n * n):
                        dR = np.float64(dh_res[t, q])
                        if sk > 0:
                            dR = dl[q]
                        e[2 * n + q] = a_res * dR
                        dab_c[2] += dR * (r * h_mix[t, 2 * n + q])
                        dab_c[3 + 2 * n + q] += dR
                    dr = 0.0
                    for f in range(F):
                        dr += e[f] * h_mix[t, f]
                        dm[j, f] = r * e[f]
                    coef[j] = dr * r * r * r / nD
                for j in range(ns, SB):
                    for f in range(F):
                        dm[j, f] = zero
                # pass 2, column tile by column tile (x re-read from cache); tiles never
                # straddle streams; the phi / dphi tiles stay in L2 for the whole super-block
                for i in range(n):
                    for d0 in range(0, D, KT):
                        Lu = np.uint64(min(KT, D - d0))
                        du0 = np.uint64(d0)
                        ku0 = np.uint64(i * D + d0)
                        for g0 in range(0, ns, TB):
                            ng = min(TB, ns - g0)
                            for jj in range(TB):
                                if jj < ng:
                                    t = s0 + g0 + jj
                                    for k in range(Lu):
                                        vt[jj, k] = _ld(x, t, ku0 + k)
                                else:
                                    for k in range(Lu):
                                        vt[jj, k] = zero
                            # w = dm @ phi on this tile, four tokens at a time (each phi load
                            # serves four tokens; padding tokens have dm = 0)
                            for q0 in range(0, ng, 4):
                                for k in range(Lu):
                                    wt[0, k] = zero
                                    wt[1, k] = zero
                                    wt[2, k] = zero
                                    wt[3, k] = zero
                                j = g0 + q0
                                for f in range(0, F4, 4):
                                    c00 = dm[j, f]
                                    c01 = dm[j, f + 1]
                                    c02 = dm[j, f + 2]
                                    c03 = dm[j, f + 3]
                                    c10 = dm[j + 1, f]
                                    c11 = dm[j + 1, f + 1]
                                    c12 = dm[j + 1, f + 2]
                                    c13 = dm[j + 1, f + 3]
                                    c20 = dm[j + 2, f]
                                    c21 = dm[j + 2, f + 1]
                                    c22 = dm[j + 2, f + 2]
                                    c23 = dm[j + 2, f + 3]
                                    c30 = dm[j + 3, f]
                                    c31 = dm[j + 3, f + 1]
                                    c32 = dm[j + 3, f + 2]
                                    c33 = dm[j + 3, f + 3]
                                    for k in range(Lu):
                                        kk = ku0 + k
                                        p0 = phi[f, kk]
                                        p1 = phi[f + 1, kk]
                                        p2 = phi[f + 2, kk]
                                        p3 = phi[f + 3, kk]
                                        wt[0, k] += c00 * p0 + c01 * p1 + c02 * p2 + c03 * p3
                                        wt[1, k] += c10 * p0 + c11 * p1 + c12 * p2 + c13 * p3
                                        wt[2, k] += c20 * p0 + c21 * p1 + c22 * p2 + c23 * p3
                                        wt[3, k] += c30 * p0 + c31 * p1 + c32 * p2 + c33 * p3
                                for f in range(F4, F):
                                    c00 = dm[j, f]
                                    c10 = dm[j + 1, f]
                                    c20 = dm[j + 2, f]
                                    c30 = dm[j + 3, f]
                                    for k in range(Lu):
                                        p0 = phi[f, ku0 + k]
                                        wt[0, k] += c00 * p0
                                        wt[1, k] += c10 * p0
                                        wt[2, k] += c20 * p0
                                        wt[3, k] += c30 * p0
                                for jq in range(min(4, ng - q0)):
                                    jj = q0 + jq
                                    t = s0 + g0 + jj
                                    cj = coef[g0 + jj]
                                    hj = hpc[g0 + jj, i]
                                    for k in range(Lu):
                                        kk = ku0 + k
                                        d = (wt[jq, k] * g[kk] - cj * vt[jj, k]
                                             + hj * _ld(dh_in, t, du0 + k))
                                        if has_add:
                                            d += _ld(dx_add, t, kk)
                                        _st(dx, t, kk, d)
                                    if has_gamma:
                                        for k in range(Lu):
                                            dg_c[ku0 + k] += vt[jj, k] * wt[jq, k]
                            # dphi[f, tile] += g * sum_j dm[j, f] * v[j, tile]
                            for f in range(F):
                                c0 = dm[g0, f]
                                c1 = dm[g0 + 1, f]
                                c2 = dm[g0 + 2, f]
                                c3 = dm[g0 + 3, f]
                                c4 = dm[g0 + 4, f]
                                c5 = dm[g0 + 5, f]
                                c6 = dm[g0 + 6, f]
                                c7 = dm[g0 + 7, f]
                                for k in range(Lu):
                                    kk = ku0 + k
                                    dphi_c[f, kk] += g[kk] * (
                                        c0 * vt[0, k] + c1 * vt[1, k] + c2 * vt[2, k]
                                        + c3 * vt[3, k] + c4 * vt[4, k] + c5 * vt[5, k]
                                        + c6 * vt[6, k] + c7 * vt[7, k])

    # out[r, k] = sum_c parts[c, r, k], over chunks c in order, in fp64: the same sums whatever
    # the thread count.

    @njit(parallel=True, cache=True, nogil=True)
    def _reduce_partials_kernel(parts, out):
        """out[r, k] = sum over chunks c, in order, of parts[c, r, k] (float64 sums)."""
        C = parts.shape[0]
        R = parts.shape[1]
        K = parts.shape[2]
        for rr in prange(R):
            orow = out[rr]
            for k in range(K):
                s = 0.0
                for c in range(C):
                    s += np.float64(parts[c, rr, k])
                orow[k] = s


def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
             *, norm_eps, hc_eps, sinkhorn_iters=0, dx_add=None):
    """(dx [T,n,D] in x's encoding; dphi [F,nD], dalpha [3], dbias [F], dgamma [n,D] or None
    in phi's dtype) from the forward's intermediates and the cotangents dh_in, dh_post, dh_res;
    ``dx_add`` [T,n,D] in x's encoding is added to dx before its one rounding."""
    sk = int(sinkhorn_iters)  # one int64 argument: every k shares one compiled kernel
    T, n, D = x.shape
    nD = n * D
    F = phi.shape[0]
    pd = phi.dtype
    cd = compute_dtype(x.dtype, pd)
    if nD <= SMALL_ND:   # short rows cancel in dx and dgamma (backends/_common.py)
        cd = np.float64
    dx = empty((T, n, D), x.dtype)
    if T == 0:
        return (dx, np.zeros((F, nD), pd), np.zeros(3, pd), np.zeros(F, pd),
                None if gamma is None else np.zeros((n, D), pd))
    phic = np.ascontiguousarray(phi, dtype=cd)
    g = np.ones(nD, cd) if gamma is None else np.ascontiguousarray(gamma, dtype=cd).reshape(nD)
    csize, nchunks = chunking(T)
    dphi_p = np.empty((nchunks, F, nD), cd)
    dg_p = np.empty((nchunks, 1, nD), cd)
    dab_p = np.empty((nchunks, 1, 3 + F), np.float64)
    with LOCK:
        _pre_bwd_kernel(storage(x).reshape(T, nD), phic, g, np.asarray(alpha, np.float64),
                        np.asarray(bias, np.float64), inv_rms, h_mix, h_pre, h_post,
                        storage(dh_in), dh_post, dh_res.reshape(T, n * n), float(hc_eps), n, D,
                        csize, gamma is not None, cd(0), sk,
                        storage(dx if dx_add is None else dx_add).reshape(T, nD),
                        dx_add is not None, storage(dx).reshape(T, nD), dphi_p,
                        dg_p[:, 0], dab_p[:, 0])
        dphi = empty((F, nD), pd)
        _reduce_partials_kernel(dphi_p, dphi)
        dab = empty((1, 3 + F), pd)
        _reduce_partials_kernel(dab_p, dab)
        dgamma = None
        if gamma is not None:
            dg = empty((1, nD), pd)
            _reduce_partials_kernel(dg_p, dg)
            dgamma = dg.reshape(n, D)
    return dx, dphi, dab[0, :3].copy(), dab[0, 3:].copy(), dgamma
