"""Numba CPU backend: fused, parallel, deterministic forward and backward of the mHC pre operator.

Interface: see ``backends/numpy_ref.py`` (x [T, n, D] with ``np.uint16`` meaning bfloat16 bits,
parameters fp32 or fp64, outputs in the contract's dtypes). Design notes: ``docs/numba.md``.

* One pass per block of ``TB`` tokens: the block's activations are read from memory once,
  decoded (bf16/fp16 bits -> fp32 in registers) into a small per-thread scratch buffer that stays
  in L2, and everything else (sum of squares, the ``F`` projections, gates, ``h_in``; in the
  backward ``dh_pre``, gate derivatives, ``w = dm @ phi``, ``dx`` and the parameter-gradient
  contributions) is computed from that buffer. No temporary of size ``T x n*D`` exists.
* Tokens are split into a fixed number of chunks that depends on ``T`` only (never on the thread
  count); each chunk owns its partial parameter-gradient buffers, which are reduced afterwards in
  chunk order in float64. Results are therefore bitwise identical for any thread count and from
  run to run.
* Arithmetic is fp32 for 16/32-bit activations with fp32 parameters and fp64 as soon as either
  side is fp64; per-token scalars (gates, their derivatives, ``dalpha``/``dbias``) are fp64.
  16-bit outputs are rounded once, to nearest even, from the fp32 result.
"""
from __future__ import annotations

import threading

import numpy as np

from ._common import FEW_RES, SMALL_ND, empty

ARRAY_KIND = "numpy"
SUPPORTS_SINKHORN = True

try:  # numba is optional: importing this module must work without it
    import numba
    from llvmlite import ir as _ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload
    _IMPORT_ERROR: str | None = None
except Exception as _exc:  # pragma: no cover - exercised only without numba
    numba = None
    _IMPORT_ERROR = f"numba is not installed ({type(_exc).__name__}: {_exc})"


def availability() -> str | None:
    """None when this backend can run here, else the reason it cannot."""
    return _IMPORT_ERROR


TB = 8           # tokens per group (register blocking: one phi row load serves TB tokens)
SB = 64          # tokens per super-block (SB % TB == 0): phi / dphi tiles stay cached across it
KT = 512         # column tile: TB x KT activations in L1, F x KT of phi / dphi in L2
PT = 512         # post operator: column tile per token
MAX_CHUNKS = 16  # fixed chunking of the tokens: chunk count depends on T only

# Numba calls from several Python threads are serialised: the parallel region already uses
# every core, and this keeps any threading layer (workqueue included) safe.
_LOCK = threading.Lock()


def _chunking(T: int) -> tuple[int, int]:
    """(chunk size, chunk count) for T tokens: a function of T only."""
    if T == 0:
        return TB, 0
    blocks = -(-T // TB)
    per = -(-blocks // MAX_CHUNKS)
    csize = per * TB
    return csize, -(-T // csize)


if numba is not None:
    _FM = {"reassoc", "contract"}  # lets LLVM vectorise the reductions; integer code untouched

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
    # element load / store a[i, k] by storage kind:
    # uint16 = bf16 bits, int16 = fp16 bits, anything else = native float

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

    # Inner loops run over unsigned column indices (``ku0 + k`` with both uint64): numba then
    # emits no negative-index wrap-around select, and LLVM vectorises the loop. (1-D views would
    # do the same but cost a reference-count update each, which adds up in these tiled loops.)

    # -----------------------------------------------------------------------------------------
    # Sinkhorn-Knopp on one token's n x n logits (fp64, row-major, in local arrays)

    @njit(cache=True, nogil=True)
    def _sk_forward(p, n, k):
        """p <- SK_k(p): exp(p - max), then k times rows / row sums, columns / column sums
        (fp64; one reciprocal per row / column, then multiplies)."""
        nn = n * n
        mx = p[0]
        for q in range(1, nn):
            mx = max(mx, p[q])
        for q in range(nn):
            p[q] = np.exp(p[q] - mx)
        for _ in range(k):
            for i in range(n):
                s = 0.0
                for j in range(n):
                    s += p[i * n + j]
                inv = 1.0 / s
                for j in range(n):
                    p[i * n + j] *= inv
            for j in range(n):
                s = 0.0
                for i in range(n):
                    s += p[i * n + j]
                inv = 1.0 / s
                for i in range(n):
                    p[i * n + j] *= inv

    @njit(cache=True, nogil=True)
    def _sk_vjp(lg, dp, n, k, p0, su, sv, srs, scs):
        """dp <- d(logits) from dp = d(SK_k(logits)), exactly through the k iterations.

        Every step of SK scales rows or columns, so after any step the matrix is
        ``P0[i,j] * u[i] * v[j]``: the replay keeps only the k x n scalings ``su`` (rows, after
        the row step of each iteration), ``sv`` (columns, after the column step) and the sums
        ``srs``/``scs`` that were divided by. Then, in reverse, with Q the step's output and
        s its sums: ``dp <- (dp - sum_axis(dp * Q)) / s``; finally ``dp * P0`` (through exp;
        the max shift has zero gradient).
        """
        nn = n * n
        mx = lg[0]
        for q in range(1, nn):
            mx = max(mx, lg[q])
        for q in range(nn):
            p0[q] = np.exp(lg[q] - mx)
        for it in range(k):
            for i in range(n):
                uo = su[it - 1, i] if it > 0 else 1.0
                s = 0.0
                for j in range(n):
                    vo = sv[it - 1, j] if it > 0 else 1.0
                    s += p0[i * n + j] * uo * vo
                srs[it, i] = s
                su[it, i] = uo / s
            for j in range(n):
                vo = sv[it - 1, j] if it > 0 else 1.0
                s = 0.0
                for i in range(n):
                    s += p0[i * n + j] * su[it, i] * vo
                scs[it, j] = s
                sv[it, j] = vo / s
        for it in range(k - 1, -1, -1):
            for j in range(n):  # column step: Q = P0 * su[it] * sv[it]
                vj = sv[it, j]
                a = 0.0
                for i in range(n):
                    a += dp[i * n + j] * (p0[i * n + j] * su[it, i] * vj)
                inv = 1.0 / scs[it, j]
                for i in range(n):
                    dp[i * n + j] = (dp[i * n + j] - a) * inv
            for i in range(n):  # row step: Q = P0 * su[it] * sv[it - 1]
                ui = su[it, i]
                a = 0.0
                for j in range(n):
                    vo = sv[it - 1, j] if it > 0 else 1.0
                    a += dp[i * n + j] * (p0[i * n + j] * ui * vo)
                inv = 1.0 / srs[it, i]
                for j in range(n):
                    dp[i * n + j] = (dp[i * n + j] - a) * inv
        for q in range(nn):
            dp[q] *= p0[q]

    # -----------------------------------------------------------------------------------------
    # forward

    @njit(parallel=True, cache=True, fastmath=_FM, nogil=True)
    def _fwd_kernel(x, phig, alpha, bias, norm_eps, hc_eps, n, D, csize, zero, sk,
                    h_in, h_post, h_res, inv_rms, h_mix, h_pre):
        T = x.shape[0]
        nD = n * D
        F = phig.shape[0]
        nchunks = (T + csize - 1) // csize
        a_pre = np.float64(alpha[0])
        a_post = np.float64(alpha[1])
        a_res = np.float64(alpha[2])
        Du = np.uint64(D)
        for c in prange(nchunks):
            t0 = c * csize
            t1 = min(T, t0 + csize)
            vt = np.empty((TB, KT), phig.dtype)
            hb = np.empty(D, phig.dtype)
            hp = np.empty(n, phig.dtype)
            m = np.empty((SB, F), np.float64)
            ss = np.empty(SB, np.float64)
            lg = np.empty(n * n, np.float64)
            for s0 in range(t0, t1, SB):
                ns = min(SB, t1 - s0)
                m[:, :] = 0.0
                ss[:] = 0.0
                # pass 1, tile by tile: sum of squares and the F projections; a phig tile stays
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
                                    vt[jj, k] = val
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
                                pk = phig[f, ku0 + k]
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
                    for q in range(n * n):
                        h_res[t, q] = a_res * (r * m[j, 2 * n + q]) + bias[2 * n + q]
                    if sk > 0:  # Sinkhorn-Knopp in fp64 on the n x n logits (skipped for k = 0)
                        for q in range(n * n):
                            lg[q] = a_res * (r * m[j, 2 * n + q]) + bias[2 * n + q]
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

    # -----------------------------------------------------------------------------------------
    # backward

    @njit(parallel=True, cache=True, fastmath=_FM, nogil=True)
    def _bwd_kernel(x, phi, g, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                    dh_res, hc_eps, n, D, csize, has_gamma, zero, sk, dx, dphi_p, dg_p, dab_p):
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
                        for d in range(Du):
                            s += _ld(dh_in, t, d) * _ld(x, t, off + d)
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
                                        _st(dx, t, kk, wt[jq, k] * g[kk] - cj * vt[jj, k]
                                            + hj * _ld(dh_in, t, du0 + k))
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

    # -----------------------------------------------------------------------------------------
    # the post operator: x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f_out, and its backward.
    # Tokens are independent (no cross-token sums): prange over fixed chunks of tokens, each
    # token walked in column tiles of PT; a tile of x / dx_next / f_out is decoded once into
    # per-thread fp32 (fp64) scratch in L1 and every output of the tile is computed from it.

    @njit(cache=True, fastmath=_FM, nogil=True)
    def _store_tile(out, t, ku0, acc, Lu):
        """out[t, ku0 : ku0 + Lu] = acc[:Lu], rounded once to out's encoding (one call site per
        encoding keeps the 16-bit encoders inlined once: smaller kernels, faster compiles)."""
        for k in range(Lu):
            _st(out, t, ku0 + k, acc[k])

    @njit(parallel=True, cache=True, fastmath=_FM, nogil=True)
    def _post_fwd_kernel(x, f, hp, hr, n, D, csize, out):
        T = x.shape[0]
        nchunks = (T + csize - 1) // csize
        Du = np.uint64(D)
        for c in prange(nchunks):
            t0 = c * csize
            t1 = min(T, t0 + csize)
            xt = np.empty((n, PT), hp.dtype)
            ft = np.empty(PT, hp.dtype)
            acc = np.empty(PT, hp.dtype)
            for t in range(t0, t1):
                for d0 in range(0, D, PT):
                    Lu = np.uint64(min(PT, D - d0))
                    du0 = np.uint64(d0)
                    for k in range(Lu):
                        ft[k] = _ld(f, t, du0 + k)
                    for j in range(n):
                        ku0 = np.uint64(j) * Du + du0
                        for k in range(Lu):
                            xt[j, k] = _ld(x, t, ku0 + k)
                    for i in range(n):
                        a = hp[t, i]
                        for k in range(Lu):
                            acc[k] = a * ft[k]
                        for j in range(n):
                            b = hr[t, i * n + j]
                            for k in range(Lu):
                                acc[k] += b * xt[j, k]
                        _store_tile(out, t, np.uint64(i) * Du + du0, acc, Lu)

    @njit(parallel=True, cache=True, fastmath=_FM, nogil=True)
    def _post_bwd_kernel(x, f, hp, hr, g, n, D, csize, zero, dx, df, dhp, dhr):
        T = x.shape[0]
        nchunks = (T + csize - 1) // csize
        Du = np.uint64(D)
        for c in prange(nchunks):
            t0 = c * csize
            t1 = min(T, t0 + csize)
            xt = np.empty((n, PT), hp.dtype)
            gt = np.empty((n, PT), hp.dtype)
            ft = np.empty(PT, hp.dtype)
            acc = np.empty(PT, hp.dtype)
            sp = np.empty(n, np.float64)
            sr = np.empty(n * n, np.float64)
            for t in range(t0, t1):
                sp[:] = 0.0
                sr[:] = 0.0
                for d0 in range(0, D, PT):
                    Lu = np.uint64(min(PT, D - d0))
                    du0 = np.uint64(d0)
                    for k in range(Lu):
                        ft[k] = _ld(f, t, du0 + k)
                    for j in range(n):
                        ku0 = np.uint64(j) * Du + du0
                        for k in range(Lu):
                            xt[j, k] = _ld(x, t, ku0 + k)
                            gt[j, k] = _ld(g, t, ku0 + k)
                    # df_out = sum_i h_post[i] dx_next[i]
                    a = hp[t, 0]
                    for k in range(Lu):
                        acc[k] = a * gt[0, k]
                    for i in range(1, n):
                        a = hp[t, i]
                        for k in range(Lu):
                            acc[k] += a * gt[i, k]
                    _store_tile(df, t, du0, acc, Lu)
                    # dx[j] = sum_i h_res[i, j] dx_next[i]
                    for j in range(n):
                        a = hr[t, j]
                        for k in range(Lu):
                            acc[k] = a * gt[0, k]
                        for i in range(1, n):
                            a = hr[t, i * n + j]
                            for k in range(Lu):
                                acc[k] += a * gt[i, k]
                        _store_tile(dx, t, np.uint64(j) * Du + du0, acc, Lu)
                    # dh_post[i] = <dx_next[i], f>, dh_res[i, j] = <dx_next[i], x[j]>: a tile's
                    # dot in the compute dtype, summed over tiles in fp64
                    for i in range(n):
                        s = zero
                        for k in range(Lu):
                            s += gt[i, k] * ft[k]
                        sp[i] += s
                        for j in range(n):
                            s = zero
                            for k in range(Lu):
                                s += gt[i, k] * xt[j, k]
                            sr[i * n + j] += s
                for i in range(n):
                    dhp[t, i] = sp[i]
                for q in range(n * n):
                    dhr[t, q] = sr[q]

    @njit(parallel=True, cache=True, nogil=True)
    def _reduce_kernel(parts, out):
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


# ---------------------------------------------------------------------------------------------
# Python wrappers

def _storage(a: np.ndarray) -> np.ndarray:
    """The array as the kernels read it: fp16 travels as int16 bits, bf16 already as uint16."""
    if a.dtype == np.float16:
        return a.view(np.int16)
    return a


def _compute_dtype(x_dtype, p_dtype):
    return np.float64 if (x_dtype == np.float64 or p_dtype == np.float64) else np.float32


def _iters(sinkhorn_iters) -> int:
    k = int(sinkhorn_iters)
    if k < 0:
        raise ValueError(f"sinkhorn_iters: expected an int >= 0, got {sinkhorn_iters!r}")
    return k  # one int64 kernel argument: k = 0 and every k > 0 share one compiled kernel


def forward(x, phi, alpha, bias, gamma, *, norm_eps, hc_eps, sinkhorn_iters=0):
    sk = _iters(sinkhorn_iters)
    T, n, D = x.shape
    nD = n * D
    F = phi.shape[0]
    pd = phi.dtype
    cd = _compute_dtype(x.dtype, pd)
    if T * n * n < FEW_RES:   # few h_res entries: m in float64 (a cancelling h_res, _common)
        cd = np.float64
    h_in = empty((T, D), x.dtype)
    h_post = empty((T, n), pd)
    h_res = empty((T, n, n), pd)
    inv_rms = empty((T,), pd)
    h_mix = empty((T, F), pd)
    h_pre = empty((T, n), pd)
    if T == 0:
        return h_in, h_post, h_res, inv_rms, h_mix, h_pre
    phig = np.ascontiguousarray(phi, dtype=cd)
    if gamma is not None:
        phig = phig * np.asarray(gamma, dtype=cd).reshape(1, nD)  # (v*g).phi == v.(phi*g)
    csize, _ = _chunking(T)
    with _LOCK:
        _fwd_kernel(_storage(x).reshape(T, nD), phig, np.asarray(alpha, np.float64),
                    np.asarray(bias, np.float64), float(norm_eps), float(hc_eps), n, D, csize,
                    cd(0), sk, _storage(h_in), h_post, h_res.reshape(T, n * n), inv_rms, h_mix, h_pre)
    return h_in, h_post, h_res, inv_rms, h_mix, h_pre


def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
             *, norm_eps, hc_eps, sinkhorn_iters=0):
    sk = _iters(sinkhorn_iters)
    T, n, D = x.shape
    nD = n * D
    F = phi.shape[0]
    pd = phi.dtype
    cd = _compute_dtype(x.dtype, pd)
    if x.dtype == np.float32 and nD <= SMALL_ND:
        cd = np.float64   # short rows cancel in dx (backends/_common.py)
    dx = empty((T, n, D), x.dtype)
    if T == 0:
        return (dx, np.zeros((F, nD), pd), np.zeros(3, pd), np.zeros(F, pd),
                None if gamma is None else np.zeros((n, D), pd))
    phic = np.ascontiguousarray(phi, dtype=cd)
    g = np.ones(nD, cd) if gamma is None else np.ascontiguousarray(gamma, dtype=cd).reshape(nD)
    csize, nchunks = _chunking(T)
    dphi_p = np.empty((nchunks, F, nD), cd)
    dg_p = np.empty((nchunks, 1, nD), cd)
    dab_p = np.empty((nchunks, 1, 3 + F), np.float64)
    with _LOCK:
        _bwd_kernel(_storage(x).reshape(T, nD), phic, g, np.asarray(alpha, np.float64),
                    np.asarray(bias, np.float64), inv_rms, h_mix, h_pre, h_post, _storage(dh_in),
                    dh_post, dh_res.reshape(T, n * n), float(hc_eps), n, D, csize,
                    gamma is not None, cd(0), sk, _storage(dx).reshape(T, nD), dphi_p, dg_p[:, 0], dab_p[:, 0])
        dphi = empty((F, nD), pd)
        _reduce_kernel(dphi_p, dphi)
        dab = empty((1, 3 + F), pd)
        _reduce_kernel(dab_p, dab)
        dgamma = None
        if gamma is not None:
            dg = empty((1, nD), pd)
            _reduce_kernel(dg_p, dg)
            dgamma = dg.reshape(n, D)
    return dx, dphi, dab[0, :3].copy(), dab[0, 3:].copy(), dgamma


# ---------------------------------------------------------------------------------------------
# the post operator (CONTRACT.md, "The post operator")

def post_forward(x, f_out, h_post, h_res):
    """x_next [T,n,D] (x's encoding) = h_res @ x + h_post * f_out, per token."""
    T, n, D = x.shape
    cd = _compute_dtype(x.dtype, h_post.dtype)
    x_next = empty((T, n, D), x.dtype)
    if T == 0:
        return x_next
    csize, _ = _chunking(T)
    hp = np.ascontiguousarray(h_post, dtype=cd)
    hr = np.ascontiguousarray(h_res, dtype=cd).reshape(T, n * n)
    with _LOCK:
        _post_fwd_kernel(_storage(x).reshape(T, n * D), _storage(f_out), hp, hr, n, D, csize,
                         _storage(x_next).reshape(T, n * D))
    return x_next


def post_backward(x, f_out, h_post, h_res, dx_next):
    """(dx [T,n,D], df_out [T,D] in x's encoding; dh_post [T,n], dh_res [T,n,n] in h_post's)"""
    T, n, D = x.shape
    pd = h_post.dtype
    cd = _compute_dtype(x.dtype, pd)
    dx = empty((T, n, D), x.dtype)
    df_out = empty((T, D), x.dtype)
    dh_post = empty((T, n), pd)
    dh_res = empty((T, n, n), pd)
    if T == 0:
        return dx, df_out, dh_post, dh_res
    csize, _ = _chunking(T)
    hp = np.ascontiguousarray(h_post, dtype=cd)
    hr = np.ascontiguousarray(h_res, dtype=cd).reshape(T, n * n)
    with _LOCK:
        _post_bwd_kernel(_storage(x).reshape(T, n * D), _storage(f_out), hp, hr,
                         _storage(dx_next).reshape(T, n * D), n, D, csize, cd(0),
                         _storage(dx).reshape(T, n * D), _storage(df_out), dh_post,
                         dh_res.reshape(T, n * n))
    return dx, df_out, dh_post, dh_res
