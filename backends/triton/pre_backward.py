"""The pre operator's backward (CONTRACT.md; the math above each kernel, design in
docs/triton.md): three launches, no atomics, every sum in a fixed order (bitwise repeatable).

* ``_pre_bwd_row_kernel``  persistent: per token block the gate derivatives, dm = r*e (bf16
  pieces) and coef = dr*r^3/(nD) into scratch, partial sums for dbias and dalpha; with
  Sinkhorn, d(logits) first (sinkhorn.py: inside it, or before it in _sk_bwd_kernel).
* ``_pre_bwd_col_kernel``  per (stream, D chunk, token split): w = dm @ phi, dx, and the partial
  P = dm^T @ v of dphi/g in registers, written once to a [splits, F, nD] workspace.
* ``_reduce_partials_kernel``  fixed-order sums: dphi = g*P, dgamma = sum_f phi*P, dbias, dalpha.
"""
from __future__ import annotations

from .._common import SMALL_ND, empty_torch
from ._util import _Launch, _cdiv, _dtype_name, _f32, _f_pad, _interpret, _next_pow2, \
    _on_x_device, _tokens, tl, torch, triton
from .config import _col_cfg, _config, _f_blocks, _launch_kw, _plan, _resident, _row_tiles, \
    _sk_bwd_mode, _sm_count
from .grids import _col_grid, _reduce_grid, _row_grid, _sk_grid
from .sinkhorn import _sk_kw

if triton is not None:
    from .precision import _col_p, _col_phi, _col_w, _dx_exact, _round_out, _split3
    from .sinkhorn import _sk_bwd_kernel, _sk_dlogits

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
                # dh_res is w.r.t. SK_K(logits): d(logits) of the block's tokens (_sk_dlogits),
                # handed to the 2-D code below through a [T, n*n] scratch (barrier: visible to
                # all threads of this program).
                _sk_dlogits(hmix_ptr, rms_ptr, bias_ptr, dhres_ptr, dlog_ptr, a_res, rows,
                            rows64, rmask, N, F, K, NP)
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

    # -----------------------------------------------------------------------------------------
    # Backward, column part: program (stream i, D chunk c, token split s), grid
    # (n, D chunks, splits), or past 65535 D chunks (n * D chunks, splits) in the same order
    # (_col_fold, _col_grid).
    #   w = dm @ phi[:, i*D + d];  dx[i, d] = w*g - coef*x[i, d] + h_pre[i]*dh_in[d]
    #   P[f, i*D + d] += sum_t dm[t, f] x[t, i, d]   (registers; dphi = g*P, dgamma = sum_f phi*P)
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
        wscol_ptr,   # [SPLITS, F, ND] fp32, float64 with EXACT (out): per-split P
        T, TOK_PER_SPLIT,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_G: tl.constexpr,
        NWA: tl.constexpr, NWB: tl.constexpr, NPA: tl.constexpr, NPB: tl.constexpr,
        NDM: tl.constexpr, INTERP: tl.constexpr,
        FA: tl.constexpr,   # gate columns [0, FA) in the first block (_f_blocks)
        FB: tl.constexpr,   # and [FA, FA + FB) in the second (0: none)
        EXACT: tl.constexpr = False,
        # EXACT only (_dx_exact), fp32: inv_rms [T], h_mix [T, F], h_post / dh_post [T, n],
        # dR [T, n*n] (dh_res, or its Sinkhorn pull-back), alpha [3]; and hc_eps
        rms_ptr=None, hmix_ptr=None, hpost_ptr=None, dhpost_ptr=None, dres_ptr=None,
        alpha_ptr=None, hc_eps=0.0,
        HAS_ADD: tl.constexpr = False,
        dxadd_ptr=None,  # [T, n, D] x dtype (HAS_ADD): added to dx before its one rounding
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
        P = tl.zeros([FA, BLOCK_D], dtype=tl.float64 if EXACT else tl.float32)
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
            if HAS_ADD:
                xa = tl.load(dxadd_ptr + rows64[:, None] * ND + col[None, :], mask=m2, other=0.0)
            if EXACT:   # P too (FB = 0 here)
                dx, P = _dx_exact(x_ptr, rms_ptr, hmix_ptr, hpre_ptr, hpost_ptr, dhin_ptr,
                                  dhpost_ptr, dres_ptr, alpha_ptr, phi_ptr, g_ptr, hc_eps, xv,
                                  dh, hp, xa.to(tl.float64) if HAS_ADD else 0.0, rows64, rmask,
                                  col, dmask, P, N, D, HAS_G)
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
                if HAS_ADD:
                    dx += xa.to(tl.float32)
            tl.store(dx_ptr + rows64[:, None] * ND + col[None, :],
                     _round_out(dx, dx_ptr.dtype.element_ty, INTERP), mask=m2)
            if not EXACT:   # P += dm^T @ x (_col_p)
                P = _col_p(dm_ptr, rows64, rmask, ff, xv, P, T, F_PAD, NPA, NPB, INTERP)
            if FB > 0:
                PB = _col_p(dm_ptr, rows64, rmask, fb, xv, PB, T, F_PAD, NPA, NPB, INTERP)
        ws = wscol_ptr + tl.cast(s, tl.int64) * (F * ND)
        tl.store(ws + ff[:, None] * ND + col[None, :], P, mask=(ff < F)[:, None] & dmask[None, :])
        if FB > 0:
            tl.store(ws + fb[:, None] * ND + col[None, :], PB,
                     mask=(fb < F)[:, None] & dmask[None, :])

    # -----------------------------------------------------------------------------------------
    # Fixed-order reduction of the workspaces:
    #   Q[f, k] = sum_s wscol[s, f, k];  dphi = g*Q;  dgamma[k] = sum_f phi[f, k]*Q[f, k]
    #   dbias[f] = sum_p wsrow[f, p];  dalpha[c] = sum_p wsrow[F_PAD + c, p]
    # Grid: max(ND / BLOCK, F + 3) programs; program j < F + 3 also sums row j of wsrow (for
    # j >= F: row F_PAD + j - F), RB columns at a time (one program for all of wsrow is slow).
    @triton.jit
    def _reduce_partials_kernel(
        wscol_ptr,   # [SPLITS, F, ND] fp32 (float64 for short rows: summed in float64)
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
        q = tl.zeros([F_PAD, BLOCK], dtype=wscol_ptr.dtype.element_ty)
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


class _Plan:
    """A backward's launches at one (T, n, D, x dtype, device, k, gamma or not, dx_add or not):
    constexprs and grids, kept per signature (config._plan).  The persistent row grid and the
    column kernel's splits come from the compiled kernels (_resident): they are set on the
    first call, from its arguments."""
    __slots__ = ("dname", "cfg", "sms", "ndm", "bt", "sk", "sk_launch", "row_kw", "row_grid",
                 "row", "col_kw", "col_grid", "col", "tok", "red")

    def __init__(self, T, n, D, dname, dev, k, has_g, has_add):
        F, F_pad = n * n + 2 * n, _f_pad(n)
        ND = n * D
        self.dname = dname
        cfg = self.cfg = _col_cfg(_config(n, D, dname, dev), has_add)
        (nwa, nwb), (npa, npb) = cfg["w_pieces"], cfg["p_pieces"]
        self.sms = _sm_count(dev)
        self.bt, bd = _row_tiles(cfg, T, D, self.sms)
        self.ndm = max(nwa, npa)
        self.sk = "" if k == 0 else _sk_bwd_mode(cfg, T, self.sms, dev.type == "cuda")
        common = dict(N=n, D=D, F=F, F_PAD=F_pad, NDM=self.ndm, INTERP=_interpret())
        self.sk_launch = None
        if self.sk == "sep":   # d(logits) by its own kernel; the row kernel runs its k = 0 code
            self.sk_launch = _Launch(_sk_bwd_kernel, _sk_grid(T, cfg), dict(
                N=n, F=F, K=k, NP=_next_pow2(n), BLOCK_T=cfg["sk_bt"], num_warps=cfg["sk_warps"]))
        self.row_kw = dict(common, BLOCK_T=self.bt, BLOCK_D=bd, **_launch_kw(cfg, "row"),
                           **(_sk_kw(k, n) if self.sk == "fused" else {}))
        exact = ND <= SMALL_ND   # short rows: dx in float64 (_dx_exact)
        fa, fb = (F_pad, 0) if exact or not cfg.get("col_fblocks", True) else _f_blocks(F, F_pad)
        self.col_kw = dict(common, BLOCK_T=cfg["col_bt"], BLOCK_D=cfg["col_bd"], HAS_G=has_g,
                           NWA=nwa, NWB=nwb, NPA=npa, NPB=npb, FA=fa, FB=fb,
                           **_launch_kw(cfg, "col"))
        if exact:
            self.col_kw["EXACT"] = True
        if has_add:
            self.col_kw["HAS_ADD"] = True
        red_grid, block = _reduce_grid(ND, F, F_pad, dev.type == "cuda")
        self.red = _Launch(_reduce_partials_kernel, red_grid, dict(
            ND=ND, F=F, F_PAD=F_pad, HAS_G=has_g, BLOCK=block,
            RB=1024 if dev.type == "cuda" else 32, num_warps=4))
        self.row_grid = self.col_grid = self.tok = self.row = self.col = None


@_on_x_device
def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
             *, norm_eps, hc_eps, sinkhorn_iters=0, dx_add=None):
    """(dx [*L,n,D] x dtype, dphi [F,nD], dalpha [3], dbias [F], dgamma [n,D] or None; the
    parameter gradients in phi's dtype) from x [*L,n,D] (L: the token dims, T tokens in all),
    the forward's other inputs and intermediates ([*L, ...]) and the gradients dh_in [*L,D]
    (x's dtype), dh_post [*L,n], dh_res [*L,n,n] (fp32). ``dx_add`` [*L,n,D] (x's dtype) is
    added to dx in the column kernel, before its one rounding."""
    k = int(sinkhorn_iters)
    _, T, n, D = _tokens(x)
    F = n * n + 2 * n
    F_pad = _f_pad(n)
    ND = n * D
    dev = x.device
    pdt = phi.dtype
    x = x.contiguous()
    dx = empty_torch(x.shape, x.dtype, dev)
    dphi = empty_torch((F, ND), torch.float32, dev)
    dalpha = empty_torch((3,), torch.float32, dev)
    dbias = empty_torch((F,), torch.float32, dev)
    dgamma = None if gamma is None else empty_torch((n, D), torch.float32, dev)
    if T == 0:
        dphi.zero_(); dalpha.zero_(); dbias.zero_()
        if dgamma is not None:
            dgamma.zero_()
    else:
        has_g, has_add = gamma is not None, dx_add is not None
        p = _plan(("bwd", T, n, D, x.dtype, dev, k, has_g, has_add),
                  lambda: _Plan(T, n, D, _dtype_name(x.dtype), dev, k, has_g, has_add))
        phi32 = _f32(phi)
        g = _f32(gamma) if has_g else phi32   # [n, D] read as [nD]; phi32: a placeholder (HAS_G)
        dh_in = dh_in.contiguous()
        rms32, hmix32, hp32, hpost32, dhpost32, alpha32 = (
            _f32(a) for a in (inv_rms, h_mix, h_pre, h_post, dh_post, alpha))
        # row kernel: persistent, as many programs as fit on the GPU at once
        dm = torch.empty((p.ndm, T, F_pad), dtype=torch.bfloat16, device=dev)
        coef = torch.empty((T,), dtype=torch.float32, device=dev)
        dres = _f32(dh_res)   # [*L, n, n], read as [T, n*n]
        sk = {}
        if p.sk == "sep":
            dlog = torch.empty((T, n * n), dtype=torch.float32, device=dev)
            p.sk_launch(hmix32, rms32, alpha32, _f32(bias), dres, dlog, T)
            dres = dlog
        elif p.sk == "fused":   # d(logits) scratch, [T, n*n] (the size class of dh_res)
            sk = dict(bias_ptr=_f32(bias),
                      dlog_ptr=torch.empty((T, n * n), dtype=torch.float32, device=dev))
        row_args = [x, dh_in, rms32, hmix32, hp32, hpost32, dhpost32, dres, alpha32, dm, coef,
                    coef, T, _cdiv(T, p.bt), float(hc_eps)]
        if p.row_grid is None:
            res = None
            if p.cfg["row_waves"] == "auto":   # one program per slot (coef stands in for wsrow)
                res = _resident(_pre_bwd_row_kernel, ("row", n, D, p.dname, dev, k if sk else 0,
                                                      p.bt), dev, row_args, dict(p.row_kw, **sk))
            p.row_grid = _row_grid(T, p.bt, p.cfg, p.sms, res)
            p.row = _Launch(_pre_bwd_row_kernel, p.row_grid, p.row_kw)
        prow = p.row_grid[0]
        row_args[11] = wsrow = torch.empty((F_pad + 4, prow), dtype=torch.float32, device=dev)
        p.row(*row_args, **sk)
        # column kernel: grid (n, D chunks, token splits) (_col_grid); splits by (n, D, T, SMs,
        # programs per SM): fixed per shape
        col = {}
        if "EXACT" in p.col_kw:   # short rows: dx in float64 (_dx_exact)
            col = dict(rms_ptr=rms32, hmix_ptr=hmix32, hpost_ptr=hpost32, dhpost_ptr=dhpost32,
                       dres_ptr=sk.get("dlog_ptr", dres), alpha_ptr=alpha32,
                       hc_eps=float(hc_eps))
        if has_add:
            col["dxadd_ptr"] = dx_add.contiguous()
        ws_dt = torch.float64 if "EXACT" in p.col_kw else torch.float32   # P's workspace
        col_args = [x, dh_in, hp32, dm, coef, phi32, g, dx, None, T, 0]
        if p.col_grid is None:
            col_args[8] = torch.empty((1,), dtype=ws_dt, device=dev)   # for the workspace
            res = None
            if p.cfg.get("col_occ") == "auto":   # the splits fill waves of the programs that fit
                res = _resident(_pre_bwd_col_kernel, ("col", n, D, p.dname, dev, has_g, has_add),
                                dev, col_args, dict(p.col_kw, **col))
            p.col_grid, p.tok = _col_grid(T, n, D, p.cfg, p.sms, res)
            p.col = _Launch(_pre_bwd_col_kernel, p.col_grid, p.col_kw)
        splits = p.col_grid[-1]
        col_args[8] = wscol = torch.empty((splits, F, ND), dtype=ws_dt, device=dev)
        col_args[10] = p.tok
        p.col(*col_args, **col)
        p.red(wscol, wsrow, phi32, g, dphi, dgamma if has_g else dphi, dalpha, dbias, splits,
              prow)
    outs = (dphi, dalpha, dbias, dgamma)
    return (dx,) + tuple(None if o is None else (o if o.dtype == pdt else o.to(pdt))
                         for o in outs)
