"""The post operator (CONTRACT.md, "The post operator"), forward and backward, per token t:
    x_next[i, :] = sum_j h_res[i, j] x[j, :] + h_post[i] f_out[:]
The math of each pass is above its kernel; blocks come from config._post_config.
"""
from __future__ import annotations

from .._common import FEW_POST, empty_torch
from ._util import _Launch, _as, _f32, _interpret, _next_pow2, _on_x_device, _tokens, tl, torch, \
    triton
from .config import _plan, _post_config
from .grids import _post_bwd_grid, _post_fwd_grid

if triton is not None:
    from .precision import _mm_core, _round_out, _split3

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
        EXACT: tl.constexpr = False,
    ):
        ND: tl.constexpr = N * D
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
        CD: tl.constexpr = tl.float64 if EXACT else tl.float32   # EXACT: _common.FEW_POST
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
                     mask=m3, other=0.0).to(CD)
        f = tl.load(f_ptr + rows64[:, None] * D + d[None, :], mask=m2, other=0.0).to(CD)
        hm = rmask[:, None] & (jj < N)[None, :]
        for i in tl.static_range(N):
            hr = tl.load(hres_ptr + rows64[:, None] * (N * N) + i * N + jj[None, :], mask=hm,
                         other=0.0).to(CD)
            hp = tl.load(hpost_ptr + rows64 * N + i, mask=rmask, other=0.0).to(CD)
            o = (tl.sum(hr[:, :, None] * x3, axis=1) + hp[:, None] * f).to(tl.float32)
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
        NPC: tl.constexpr, INTERP: tl.constexpr, EXACT: tl.constexpr = False,
    ):
        ND: tl.constexpr = N * D
        CD: tl.constexpr = tl.float64 if EXACT else tl.float32   # EXACT: _common.FEW_POST
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
        hp = tl.load(hpost_ptr + rows64[:, None] * N + jj[None, :], mask=hm, other=0.0).to(CD)
        sx = tl.zeros([R, R], dtype=tl.float32)
        sf = tl.zeros([R, FR], dtype=tl.float32)
        for c in range(NCH):
            d = c * BLOCK_D + dd
            dmask = d < D
            m2 = rmask[:, None] & dmask[None, :]
            m3 = m2[:, None, :] & nmask[None, :, None]
            g3 = tl.load(g_ptr + rows64[:, None, None] * ND + jj[None, :, None] * D
                         + d[None, None, :], mask=m3, other=0.0).to(CD)
            df = tl.sum(hp[:, :, None] * g3, axis=1).to(tl.float32)
            tl.store(df_ptr + rows64[:, None] * D + d[None, :],
                     _round_out(df, df_ptr.dtype.element_ty, INTERP), mask=m2)
            for j in tl.static_range(N):
                hc = tl.load(hres_ptr + rows64[:, None] * (N * N) + jj[None, :] * N + j, mask=hm,
                             other=0.0).to(CD)                      # h_res[t, :, j]
                dxj = tl.sum(hc[:, :, None] * g3, axis=1).to(tl.float32)
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


def _post_fwd_launch(T, n, D, dev) -> _Launch:
    """The post forward's launch at (T, n, D, device): tiles from _post_config."""
    cfg = _post_config(n, D, dev)
    kw = {"num_warps": cfg["warps"]}
    if not _interpret():
        kw["num_stages"] = cfg["pf_stages"]
    return _Launch(_post_fwd_kernel, _post_fwd_grid(T, D, cfg), dict(
        N=n, NP=_next_pow2(n), D=D, BLOCK_T=cfg["pf_bt"], BLOCK_D=cfg["pf_bd"],
        INTERP=_interpret(), EXACT=T * n * D <= FEW_POST, **kw))


def _post_bwd_launch(T, n, D, dev, fp32) -> _Launch:
    """The post backward's launch at (T, n, D, device, fp32 x or not)."""
    cfg = _post_config(n, D, dev, fp32)
    grid, bt = _post_bwd_grid(T, n, cfg)   # >= 16 rows per dot
    kw = {"num_warps": cfg["pb_warps"]}
    if not _interpret():
        kw["num_stages"] = cfg["pb_stages"]
    return _Launch(_post_bwd_kernel, grid, dict(
        N=n, NP=_next_pow2(n), D=D, BLOCK_T=bt, BLOCK_D=cfg["pb_bd"], FR=max(16, _next_pow2(bt)),
        NPC=3 if fp32 else 1,   # fp32: 3 bf16 pieces per operand
        INTERP=_interpret(), EXACT=T * n * D <= FEW_POST, **kw))


@_on_x_device
def post_forward(x, f_out, h_post, h_res):
    """x_next [*L,n,D] (x's dtype) = h_res @ x + h_post * f_out, per token (L: the token
    dims, T tokens in all; f_out [*L,D], h_post [*L,n], h_res [*L,n,n])."""
    _, T, n, D = _tokens(x)
    dev = x.device
    out = empty_torch(x.shape, x.dtype, dev)
    if T > 0:
        launch = _plan(("post_fwd", T, n, D, dev), lambda: _post_fwd_launch(T, n, D, dev))
        launch(_as(x, x.dtype), _as(f_out, x.dtype), _f32(h_post), _f32(h_res), out, T)
    return out


@_on_x_device
def post_backward(x, f_out, h_post, h_res, dx_next):
    """(dx [*L,n,D], df_out [*L,D] in x's dtype; dh_post [*L,n], dh_res [*L,n,n] in h_post's)
    for x [*L,n,D] (L: the token dims, T tokens in all)."""
    lead, T, n, D = _tokens(x)
    dev = x.device
    dx = empty_torch(x.shape, x.dtype, dev)
    df = empty_torch((*lead, D), x.dtype, dev)
    dhp = empty_torch((*lead, n), torch.float32, dev)
    dhr = empty_torch((*lead, n, n), torch.float32, dev)
    if T > 0:
        fp32 = x.dtype == torch.float32
        launch = _plan(("post_bwd", T, n, D, dev, fp32),
                       lambda: _post_bwd_launch(T, n, D, dev, fp32))
        launch(_as(x, x.dtype), _as(f_out, x.dtype), _f32(h_post), _f32(h_res),
               _as(dx_next, x.dtype), dx, df, dhp, dhr, T)
    pdt = h_post.dtype
    return (dx, df, dhp if pdt == dhp.dtype else dhp.to(pdt),
            dhr if pdt == dhr.dtype else dhr.to(pdt))
