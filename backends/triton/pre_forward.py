"""The pre operator's forward (CONTRACT.md; the math above ``_pre_fwd_kernel``).

Kernels (design in docs/triton.md; phi*g's bf16 pieces come from precision._prep_phi_kernel):
* ``_pre_fwd_kernel``   the fused forward, one program per BLOCK_T tokens: pass 1 over the row
                        (sum of squares, m on the tensor cores), the gates (gates.py), pass 2
                        over D in reverse order (the most recently read x is re-read from L2)
                        writes h_in.  Nothing bigger than [T, F] is written besides the outputs.
* ``_pre_fwd_part_kernel``, ``_pre_fwd_fin_kernel``  the split forward (config._fwd_splits):
                        pass 1 over a share of the row -> fp32 partials; then gates and h_in.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

from .._common import FEW_RES, empty_torch
from ._util import _Launch, _dtype_name, _f32, _f_pad, _interpret, _next_pow2, _on_x_device, \
    _tokens, tl, torch, triton
from .config import _cat, _config, _f_blocks, _fwd_pdl, _fwd_prep, _fwd_splits, \
    _hin_tiles, _l2_reuse, _launch_kw, _plan, _split_bd, _split_bt
from .grids import _fwd_grid, _prep_phi_grid, _split_grids
from .precision import fwd_pieces
from .sinkhorn import _sk_kw

if triton is not None:
    from .gates import _gates, _gates_epilogue, _gates_store
    from .precision import _load_pieces, _mm_core, _mm_pieces, _phi_pieces, _prep_phi_kernel, \
        _round_out

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
                 INTERP: tl.constexpr, SEP: tl.constexpr = False, PREP: tl.constexpr = False,
                 g_ptr=None, F: tl.constexpr = 0, HAS_G: tl.constexpr = False):
        """acc + the x tile @ the phi*g pieces' columns ff (B tile [BLOCK_D, len(ff)]): loaded
        from _prep_phi_kernel's pieces at pg_ptr, or (PREP) made here from phi [F, ND] at
        pg_ptr and g [ND], the same arithmetic (_phi_pieces)."""
        off = ff[None, :] * ND + i * D + d[:, None]
        if PREP:
            p = tl.load(pg_ptr + off, mask=(d < D)[:, None] & (ff < F)[None, :], other=0.0)
            g = p
            if HAS_G:
                g = tl.load(g_ptr + i * D + d, mask=d < D, other=0.0)[:, None]
            b0, b1, b2 = _phi_pieces(p, g, NPB, HAS_G, INTERP)
        else:
            b0, b1, b2 = _load_pieces(pg_ptr, off, F_PAD * ND, (d < D)[:, None], NPB)
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
            _hin_chunk(x_ptr, hpre_ptr, hin_ptr, rows64, rmask, (NCH2 - 1 - cc) * BLOCK_D2 + dd2,
                       N, D, INTERP)

    @triton.jit
    def _hin_chunk(x_ptr, hpre_ptr, hin_ptr, rows64, rmask, d, N: tl.constexpr,
                   D: tl.constexpr, INTERP: tl.constexpr):
        """h_in = sum_i h_pre[i] * x[i, d] of the rows at the columns d, stored; h_pre read
        back from its store [T, n]."""
        ND: tl.constexpr = N * D
        m2 = rmask[:, None] & (d < D)[None, :]
        h = tl.zeros([rows64.shape[0], d.shape[0]], dtype=tl.float32)
        for i in tl.static_range(N):
            hp = tl.load(hpre_ptr + rows64 * N + i, mask=rmask, other=0.0)
            xv = tl.load(x_ptr + rows64[:, None] * ND + (i * D) + d[None, :], mask=m2, other=0.0)
            h += hp[:, None] * xv.to(tl.float32)
        tl.store(hin_ptr + rows64[:, None] * D + d[None, :],
                 _round_out(h, hin_ptr.dtype.element_ty, INTERP), mask=m2)

    # -----------------------------------------------------------------------------------------
    # Forward, split variant (the rule in _fwd_splits, or set_config(fwd_split=S)): S programs
    # per token block (more programs when T is small), pass 1 and pass 2 apart.  Two launches:
    #   _pre_fwd_part_kernel  grid (T/BT, S): pass 1 over the program's share of the D chunks
    #                         (all n streams) -> fp32 partials [S, T, F] of m and [S, T] of the
    #                         sum of squares (S from _fwd_splits)
    #   _pre_fwd_fin_kernel   grid (T/BT2 * D/BD2,): fixed-order sum over s, r, gates (in every
    #                         program; stored, with Sinkhorn, by the first D chunk's),
    #                         h_in = sum_i h_pre[i] x[i, :]
    @triton.jit
    def _spart(mpart_ptr, S, T, F: tl.constexpr):
        """Where the split forward's partial sums of squares [S, T] start: after the partials
        of m [S, T, F] in the one buffer (int64: S * T * F can pass 2^31)."""
        return mpart_ptr + tl.cast(S, tl.int64) * T * F

    @triton.jit(do_not_specialize=["T", "S"])
    def _pre_fwd_part_kernel(
        x_ptr,       # [T, n, D] x dtype
        pg_ptr,      # [NPB, F_PAD, ND] bf16 pieces of phi*g (PREP: phi [F, ND] fp32)
        mpart_ptr,   # [S*T*F + S*T] fp32 (out): [S, T, F] share s's part of m, then [S, T]
        #              its part of the sum of squares (_spart)
        T, S,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        NPA: tl.constexpr, NPB: tl.constexpr, INTERP: tl.constexpr,
        FA: tl.constexpr, FB: tl.constexpr,   # gate columns in one or two blocks (_f_blocks)
        CAT: tl.constexpr = False,
        ILV: tl.constexpr = False,   # shares interleaved: share s takes D chunks s, s + S, ...
        SEP: tl.constexpr = False,   # separate dots, added in fp32 (few h_res entries, _mm_core)
        PREP: tl.constexpr = False,  # pg_ptr is phi [F, ND] fp32: pieces made here (_fwd_dot)
        g_ptr=None,                  # [ND] fp32 (PREP and HAS_G)
        HAS_G: tl.constexpr = False,
        PDL: tl.constexpr = "",      # when the h_in pass may launch: "start", "end" (_fwd_pdl)
    ):
        if PDL == "start" and not INTERP:
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        _part_share(x_ptr, pg_ptr, mpart_ptr, rows, tl.program_id(1), T, S, g_ptr, N, D, F,
                    F_PAD, BLOCK_T, BLOCK_D, NPA, NPB, INTERP, FA, FB, CAT, ILV, SEP, PREP,
                    HAS_G, PDL)

    @triton.jit
    def _part_share(x_ptr, pg_ptr, mpart_ptr, rows, s, T, S, g_ptr, N: tl.constexpr,
                    D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NPA: tl.constexpr,
                    NPB: tl.constexpr, INTERP: tl.constexpr, FA: tl.constexpr, FB: tl.constexpr,
                    CAT: tl.constexpr, ILV: tl.constexpr, SEP: tl.constexpr,
                    PREP: tl.constexpr, HAS_G: tl.constexpr, PDL: tl.constexpr):
        """Pass 1 of the split forward for the token block ``rows`` over share s of the D
        chunks (all n streams): its parts of m and of the sum of squares, stored to the
        partials (see _pre_fwd_part_kernel's arguments)."""
        ND: tl.constexpr = N * D
        NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
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
            if CAT:
                acc, ss2 = _fwd_step(x_ptr, pg_ptr, rows64, rmask, i, d, ff, acc, ss2, ND, D,
                                     F_PAD, NPA, NPB, INTERP, SEP, CAT)
            else:
                xv, ss2 = _fwd_x(x_ptr, rows64, rmask, i, d, ss2, ND, D)
                acc = _fwd_dot(xv, pg_ptr, i, d, ff, acc, ND, D, F_PAD, NPA, NPB, INTERP, SEP,
                               PREP, g_ptr, F, HAS_G)
                if FB > 0:
                    accb = _fwd_dot(xv, pg_ptr, i, d, fb, accb, ND, D, F_PAD, NPA, NPB, INTERP,
                                    SEP, PREP, g_ptr, F, HAS_G)
        if PDL == "end" and not INTERP:   # the h_in pass waits for this grid's stores anyway
            tl.extra.cuda.gdc_launch_dependents()
        acc = _fwd_acc_sum(acc, FA, CAT)
        sT = tl.cast(s, tl.int64) * T   # int64: S * T can pass 2^31
        tl.store(mpart_ptr + (sT + rows64[:, None]) * F + ff[None, :], acc,
                 mask=rmask[:, None] & (ff < F)[None, :])
        if FB > 0:
            tl.store(mpart_ptr + (sT + rows64[:, None]) * F + fb[None, :], accb,
                     mask=rmask[:, None] & (fb < F)[None, :])
        tl.store(_spart(mpart_ptr, S, T, F) + sT + rows64, tl.sum(ss2, axis=1), mask=rmask)

    @triton.jit(do_not_specialize=["T", "S"])
    def _pre_fwd_fin_kernel(
        x_ptr,       # [T, n, D] x dtype
        mpart_ptr,   # [S*T*F + S*T] fp32: pass 1's partials of m and of the sum of squares
        alpha_ptr, bias_ptr,   # [3], [F] fp32
        hin_ptr,     # [T, D] x dtype (out)
        hpost_ptr, hres_ptr, rms_ptr, hmix_ptr, hpre_ptr,   # as _pre_fwd_kernel's (out)
        T, S, norm_eps, hc_eps,
        N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr,
        K: tl.constexpr = 0, NP: tl.constexpr = 1,
        ORDER: tl.constexpr = "rev",   # programs' order over (token blocks, D chunks), _l2_reuse
        EV: tl.constexpr = "",         # eviction policy of the x loads
        PDL: tl.constexpr = False,     # launched before pass 1 has finished (_fwd_pdl)
        SB: tl.constexpr = 0,          # shares summed per step as one tile (0: one at a time)
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
        if PDL and not INTERP:   # pass 1's partials are complete and visible past this
            tl.extra.cuda.gdc_wait()
        acc, ss = _sum_parts(mpart_ptr, S, T, rows64, rmask, ff, F, SB)
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

    @triton.jit
    def _sum_parts(mpart_ptr, S, T, rows64, rmask, ff, F: tl.constexpr, SB: tl.constexpr):
        """A token block's projections [BLOCK_T, F_PAD] and sums of squares [BLOCK_T]: its S
        partials (_part_share) summed in a fixed order, one share at a time (SB = 0) or SB
        shares as one [SB, BLOCK_T, F_PAD] tile."""
        spart_ptr = _spart(mpart_ptr, S, T, F)
        rm2 = rmask[:, None]
        acc = tl.zeros([rows64.shape[0], ff.shape[0]], dtype=tl.float32)
        ss = tl.zeros([rows64.shape[0]], dtype=tl.float32)
        if SB == 0:
            for s in range(S):
                sT = tl.cast(s, tl.int64) * T   # int64: S * T can pass 2^31
                acc += tl.load(mpart_ptr + (sT + rows64[:, None]) * F + ff[None, :],
                               mask=rm2 & (ff < F)[None, :], other=0.0)
                ss += tl.load(spart_ptr + sT + rows64, mask=rmask, other=0.0)
        else:
            sb = tl.arange(0, SB)
            for s0 in range(0, S, SB):
                sv = s0 + sb
                sT = sv.to(tl.int64) * T
                sm = (sv < S)[:, None]
                acc += tl.sum(tl.load(
                    mpart_ptr + (sT[:, None, None] + rows64[None, :, None]) * F
                    + ff[None, None, :], mask=sm[:, :, None] & rm2[None, :, :]
                    & (ff < F)[None, None, :], other=0.0), axis=0)
                ss += tl.sum(tl.load(spart_ptr + sT[:, None] + rows64[None, :],
                                     mask=sm & rmask[None, :], other=0.0), axis=0)
        return acc, ss


def _prep_phi_launch(F, ND, F_pad, npieces, has_g, cuda) -> _Launch:
    """The launch of _prep_phi_kernel: phi [F, nD] (times g [nD] with has_g) -> its bf16
    pieces [npieces, F_PAD, nD]."""
    grid, BLOCK = _prep_phi_grid(ND, F_pad, cuda)
    return _Launch(_prep_phi_kernel, grid, dict(F=F, ND=ND, F_PAD=F_pad, NPIECE=npieces,
                                                HAS_G=has_g, BLOCK=BLOCK, INTERP=_interpret(),
                                                num_warps=4))


def _prep_phi(phi, g, F_pad, npieces, launch):
    """[npieces, F_PAD, nD] bf16: the pieces of phi [F, nD] (times g [nD], if given), by
    ``launch`` (the plan's _prep_phi_launch)."""
    F, ND = phi.shape
    out = torch.empty((npieces, F_pad, ND), dtype=torch.bfloat16, device=phi.device)
    launch(phi, g if g is not None else phi, out)
    return out


class _Plan(NamedTuple):
    """A forward's launches at one (T, n, D, x dtype, device, k, gamma or not): pure values of
    the launch rule, kept per signature (config._plan)."""
    S: int                       # 0: the fused kernel; else the split forward's shares
    prep: bool                   # pass 1 makes phi*g's pieces (config._fwd_prep)
    npb: int                     # phi*g's pieces
    main: _Launch                # the fused kernel, or pass 1 of the split forward
    fin: _Launch | None = None   # the split forward's h_in pass
    pieces: _Launch | None = None   # _prep_phi_kernel, where the pieces are made apart


def _plan_forward(T, n, D, dname, dev, k, has_g) -> _Plan:
    """The launch rule's choices for a forward at this signature (config.py, grids.py)."""
    F, F_pad = n * n + 2 * n, _f_pad(n)
    cfg = _config(n, D, dname, dev)
    few = T * n * n < cfg.get("few_res", FEW_RES)   # few h_res entries: products added in fp32
    npa, npb = fwd_pieces(dname, few)
    common = dict(N=n, D=D, F=F, F_PAD=F_pad, INTERP=_interpret())
    pieces = partial(_prep_phi_launch, F, n * D, F_pad, npb, has_g, dev.type == "cuda")
    fa, fb = _f_blocks(F, F_pad) if cfg.get("fwd_fblocks", True) else (F_pad, 0)
    S = _fwd_splits(cfg, T, D, dev, F_pad, dname)
    if S == 0:
        return _Plan(0, False, npb, _Launch(_pre_fwd_kernel, _fwd_grid(T, cfg), dict(
            common, BLOCK_T=cfg["fwd_bt"], BLOCK_D=cfg["fwd_bd"],
            BLOCK_D2=cfg.get("fwd_bd2", cfg["fwd_bd"]), NPA=npa, NPB=npb,
            CAT=_cat(npa, npb, F_pad), SEP=few, **_sk_kw(k, n), **_launch_kw(cfg, "fwd"))),
            pieces=pieces())
    prep = _fwd_prep(cfg, T)
    ilv, order, hin_ev = _l2_reuse(cfg, S, F_pad, dev)
    grid1, grid2, hbt, hbd = _split_grids(T, D, S, cfg)
    kw1 = dict(common, BLOCK_T=_split_bt(cfg, T), BLOCK_D=_split_bd(cfg, T), NPA=npa,
               NPB=npb, FA=fa, FB=fb, CAT=not prep and _cat(npa, npb, F_pad), ILV=ilv, SEP=few,
               **_launch_kw(cfg, "fwd_split"))
    if prep:
        kw1.update(PREP=True, HAS_G=has_g)
    kw2 = dict(common, BLOCK_T=hbt, BLOCK_D=hbd, ORDER=order, EV=hin_ev, **_sk_kw(k, n),
               num_warps=4)
    sb = _hin_tiles(cfg, T)[2]
    if sb:   # the fin kernel sums its partials sb shares at a time
        kw2["SB"] = _next_pow2(sb)
    pdl = _fwd_pdl(cfg, dev)
    if pdl:
        kw1.update(PDL=pdl)
        kw2.update(PDL=True, launch_pdl=True)
    return _Plan(S, prep, npb, _Launch(_pre_fwd_part_kernel, grid1, kw1),
                 _Launch(_pre_fwd_fin_kernel, grid2, kw2), None if prep else pieces())


@_on_x_device
def forward(x, phi, alpha, bias, gamma, *, norm_eps, hc_eps, sinkhorn_iters=0):
    """(h_in [*L,D] x dtype, h_post [*L,n], h_res [*L,n,n], inv_rms [*L], h_mix [*L,F],
    h_pre [*L,n]) from x [*L,n,D] (bf16/fp16/fp32; L: the token dims, T tokens in all),
    phi [F,nD], alpha [3], bias [F], gamma [n,D] or None (fp32; the gates come back in phi's
    dtype)."""
    k = int(sinkhorn_iters)
    lead, T, n, D = _tokens(x)
    F = n * n + 2 * n
    dev = x.device
    pdt = phi.dtype
    x = x.contiguous()
    h_in = empty_torch((*lead, D), x.dtype, dev)
    h_post = empty_torch((*lead, n), torch.float32, dev)
    h_res = empty_torch((*lead, n, n), torch.float32, dev)
    inv_rms = empty_torch(lead, torch.float32, dev)
    h_mix = empty_torch((*lead, F), torch.float32, dev)
    h_pre = empty_torch((*lead, n), torch.float32, dev)
    if T > 0:
        has_g = gamma is not None
        p = _plan(("fwd", T, n, D, x.dtype, dev, k, has_g),
                  lambda: _plan_forward(T, n, D, _dtype_name(x.dtype), dev, k, has_g))
        phi32 = _f32(phi)
        g = _f32(gamma) if has_g else None   # [n, D]: the kernels take it as [nD]
        eps = (float(norm_eps), float(hc_eps))
        if p.prep:   # pass 1 makes the pieces from phi and g
            pg, prep = phi32, dict(g_ptr=g if has_g else phi32)
        else:
            pg, prep = _prep_phi(phi32, g, _f_pad(n), p.npb, p.pieces), {}
        if p.S == 0:
            p.main(x, pg, _f32(alpha), _f32(bias), h_in, h_post, h_res, inv_rms, h_mix, h_pre,
                   T, *eps)
        else:
            # pass 1 in S shares -> partials [S, T, F] and [S, T] (one buffer: _spart); then
            # the gates and h_in
            part = torch.empty(p.S * T * (F + 1), dtype=torch.float32, device=dev)
            p.main(x, pg, part, T, p.S, **prep)
            p.fin(x, part, _f32(alpha), _f32(bias), h_in, h_post, h_res, inv_rms, h_mix, h_pre,
                  T, p.S, *eps)
    outs = (h_post, h_res, inv_rms, h_mix, h_pre)
    return (h_in,) + tuple(o if o.dtype == pdt else o.to(pdt) for o in outs)
