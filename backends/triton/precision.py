"""Precision: fp32 accuracy on bf16 tensor cores (docs/triton.md, "Precision").

Every fp32 operand of a dot is split into bf16 pieces (a = a0 + a1 + a2, each the bf16 rounding
of what is left) and the dot is the sum of the piece products a_i @ b_j with
i + j < max(pieces): two or three bf16 dots reach ~2^-17 relative, six reach fp32.  bf16 x is
exact in one piece, fp16 x in two.  How many pieces each product takes is a correctness
choice, made here and nowhere else (``pieces``); so is ``_dx_exact``, the float64 dx of short
rows.  ``_prep_phi_kernel`` stores phi*g in pieces for the forward (``_phi_pieces``, which
the split forward's pass 1 also calls to make them itself).  Tiles and splits live in
config.py.

The three products:
    fwd: m = x @ (phi*g)^T                      (A = x,  B = phi*g)
    w:   w = dm @ phi          (only feeds dx)  (A = dm, B = phi)
    P:   P = dm^T @ x          (dphi, dgamma)   (A = dm, B = x)
"""
from __future__ import annotations

from ._util import tl, triton

#: bf16 pieces (A, B) of each product, by x dtype: the rule for short rows (see ``pieces``).
_PIECES = {
    #            fwd (A,B)  w (A,B)  P (A,B)
    "bf16":     ((1, 2),   (2, 2),  (3, 1)),
    "fp16":     ((2, 2),   (2, 2),  (3, 2)),
    "fp32":     ((3, 3),   (3, 3),  (3, 3)),
}

#: bf16 x with rows of n*D >= LONG_ROW_ND: w and P take two pieces of dm and one of phi / x.
#: Long rows average one token's rounding of dm over many elements; in shorter rows it is the
#: whole error, so they keep _PIECES (errors in docs/triton.md).
LONG_ROW_ND = 256
_PIECES_LONG_BF16 = ((2, 1), (2, 1))
#: fp16 x at n >= 5 (F_PAD >= 64), the same rows: P takes two pieces of dm as well (x's two
#: pieces are exact, so the error is bf16's: dm to 16 bits); w keeps 2 x 2 (fp16's dx bound
#: is 1e-3).  At n <= 4 the two-piece P is slower on the H200, so n <= 4 keeps three pieces.
_PIECES_LONG_FP16 = ((2, 2), (2, 2))
#: bf16 x at n >= 5 with rows of n*D >= LONGER_ROW_ND take one piece of dm for w too (dx well
#: inside its bound, docs/triton.md); at n = 4 it takes more registers and is slower.
LONGER_ROW_ND = 4096


def pieces(dtype_name: str, n: int, D: int) -> tuple[tuple, tuple, tuple]:
    """The bf16 pieces (A, B) of the three products (fwd, w, P) for x of ``dtype_name`` and
    rows of n streams of D: _PIECES, with the long-row rules above."""
    fwd, w, p = _PIECES[dtype_name]
    wide = n >= 5   # F_PAD >= 64
    if dtype_name == "bf16" and n * D >= LONG_ROW_ND:
        w, p = _PIECES_LONG_BF16
        if wide and n * D >= LONGER_ROW_ND:
            w = (1, 1)
    elif dtype_name == "fp16" and wide and n * D >= LONG_ROW_ND:
        w, p = _PIECES_LONG_FP16
    return fwd, w, p


def fwd_pieces(dtype_name: str, few: bool) -> tuple[int, int]:
    """(x pieces, phi*g pieces) of the forward's product.  With few h_res entries (``few``:
    T*n*n < FEW_RES) phi*g takes three pieces (fp32 precision; the kernels then also add the
    products in fp32, SEP), as a cancelling h_res amplifies the error of m."""
    npa, npb = _PIECES[dtype_name][0]
    return npa, 3 if few else npb


if triton is not None:

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
        (n*D/16 or T/16 steps) that bias reaches 1e-4 relative (docs/triton.md).  Within the
        chunk the products chain through that accumulator (a few ulps over five dots); SEP makes
        every product a dot of its own, added in fp32 (round to nearest), for the
        few-h_res-entries forward (FEW_RES), where a cancelling h_res amplifies those ulps.
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
        # whole loop accumulates on the tensor cores (tests/triton_codegen_check.py catches it).
        # An opaque copy of the product keeps the add in fp32.  With several dots the last
        # one's accumulator is not zero and nothing folds.
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

    # The column kernel's three piece products (pre_backward._pre_bwd_col_kernel)
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
        pieces are loaded as [len(fc), BLOCK_T] tiles (faster on the H200 than a tl.trans of
        w's tiles, or P^T = x^T @ dm)."""
        t0, t1, t2 = _load_pieces(dm_ptr, rows64[None, :] * F_PAD + fc[:, None],
                                  tl.cast(T, tl.int64) * F_PAD, rmask[None, :], NPA)
        x0, x1, x2 = _split3(xv, NPB, INTERP)
        return _mm_core(t0, t1, t2, x0, x1, x2, P, NPA, NPB, INTERP)

    @triton.jit
    def _dx_exact(x_ptr, rms_ptr, hmix_ptr, hpre_ptr, hpost_ptr, dhin_ptr, dhpost_ptr, dres_ptr,
                  alpha_ptr, phi_ptr, g_ptr, hc_eps, xv, dh, hp, xa, rows64, rmask, col, dmask,
                  P, N: tl.constexpr, D: tl.constexpr, HAS_G: tl.constexpr):
        """(dx, P + dm^T @ x) of short rows (n*D <= SMALL_ND): dx plus xa (another gradient of
        x, or 0) in float64 (then fp32, rounded once more to x's dtype by the caller), and the
        float64 accumulator P [F_PAD, BLOCK_D] of dphi / dgamma, e and dm included, from the
        backward's own inputs.

        dx = sum_f dm_f (phi_f g - r^2 x m_f / nD) + h_pre dh_in: for short rows the two parts
        cancel (n*D = 1: to eps*r^2 of their size), which multiplies any rounding of dm_f, so
        e = [a_pre dp, a_post dq, a_res dR] and dm = r e are rebuilt here in float64 rather than
        read from the row kernel's fp32 pieces (docs/triton.md, "Short rows").  So is P: with a
        handful of terms nothing averages out, and dgamma = sum_f phi_f P_f can cancel too
        (100x at (1,5,1,1) puts fp32 P's rounding over the fp32 bound).  dres_ptr is [T, n*n]
        fp32: dh_res, or with Sinkhorn its pull-back to the logits.
        """
        ND: tl.constexpr = N * D
        tl.static_assert(ND <= 16)   # SMALL_ND: a stream's D in one 16-wide block
        k = tl.arange(0, 16)
        km = rmask[:, None] & (k < D)[None, :]
        r = tl.load(rms_ptr + rows64, mask=rmask, other=0.0).to(tl.float64)
        dhrow = tl.load(dhin_ptr + rows64[:, None] * D + k[None, :], mask=km,
                        other=0.0).to(tl.float64)
        w = tl.zeros(xv.shape, dtype=tl.float64)
        dr = tl.zeros(r.shape, dtype=tl.float64)   # dot(e, m)
        rx = r[:, None] * xv.to(tl.float64)        # P_f += sum_t e_f (r x)
        a_pre = tl.load(alpha_ptr).to(tl.float64)
        for j in range(N):   # pre: dp = dh_pre s (1 - s), s = h_pre - hc_eps
            xj = tl.load(x_ptr + rows64[:, None] * ND + j * D + k[None, :], mask=km,
                         other=0.0).to(tl.float64)
            sj = tl.load(hpre_ptr + rows64 * N + j, mask=rmask, other=0.0).to(tl.float64) - hc_eps
            e = a_pre * tl.sum(dhrow * xj, axis=1) * sj * (1.0 - sj)
            w, dr, P = _dx_exact_gate(e, j, w, dr, P, rx, hmix_ptr, phi_ptr, rows64, rmask, col,
                                      dmask, N, ND)
        a_post = tl.load(alpha_ptr + 1).to(tl.float64)
        for j in range(N):   # post: dq = dh_post h_post (1 - h_post / 2)
            hq = tl.load(hpost_ptr + rows64 * N + j, mask=rmask, other=0.0).to(tl.float64)
            e = a_post * tl.load(dhpost_ptr + rows64 * N + j, mask=rmask,
                                 other=0.0).to(tl.float64) * hq * (1.0 - 0.5 * hq)
            w, dr, P = _dx_exact_gate(e, N + j, w, dr, P, rx, hmix_ptr, phi_ptr, rows64, rmask,
                                      col, dmask, N, ND)
        a_res = tl.load(alpha_ptr + 2).to(tl.float64)
        for q in range(N * N):   # res: dR
            e = a_res * tl.load(dres_ptr + rows64 * (N * N) + q, mask=rmask,
                                other=0.0).to(tl.float64)
            w, dr, P = _dx_exact_gate(e, 2 * N + q, w, dr, P, rx, hmix_ptr, phi_ptr, rows64,
                                      rmask, col, dmask, N, ND)
        w = r[:, None] * w   # dm = r e
        if HAS_G:
            w = w * tl.load(g_ptr + col, mask=dmask, other=0.0).to(tl.float64)[None, :]
        coef = r * r * r * dr / ND
        dx = (w - coef[:, None] * xv.to(tl.float64)
              + hp.to(tl.float64)[:, None] * dh.to(tl.float64) + xa).to(tl.float32)
        return dx, P

    @triton.jit
    def _dx_exact_gate(e, f, w, dr, P, rx, hmix_ptr, phi_ptr, rows64, rmask, col, dmask,
                       N: tl.constexpr, ND: tl.constexpr):
        """One gate column f of _dx_exact: w += e_f phi_f (at col), dr += e_f m_f, and row f of
        P += sum_t e_f r x (at col)."""
        F: tl.constexpr = N * N + 2 * N
        phf = tl.load(phi_ptr + f * ND + col, mask=dmask, other=0.0).to(tl.float64)
        m = tl.load(hmix_ptr + rows64 * F + f, mask=rmask, other=0.0).to(tl.float64)
        pf = tl.sum(e[:, None] * rx, axis=0)
        ff = tl.arange(0, P.shape[0])
        P = tl.where((ff == f)[:, None], P + pf[None, :], P)
        return w + e[:, None] * phf[None, :], dr + e * m, P

    @triton.jit
    def _phi_pieces(p, g, NPIECE: tl.constexpr, HAS_G: tl.constexpr, INTERP: tl.constexpr):
        """The NPIECE bf16 pieces of phi*g from phi's values p and g's (broadcast to p; unused
        unless HAS_G): p0 = bf16(p*g), p1 = bf16(p*g - p0), ... (precision._split3)."""
        p = p.to(tl.float32)
        if HAS_G:
            p = p * g.to(tl.float32)
        return _split3(p, NPIECE, INTERP)

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
        p = tl.load(phi_ptr + f * ND + k, mask=km & (fv < F), other=0.0)
        g = p
        if HAS_G:
            g = tl.load(g_ptr + k, mask=km, other=0.0)
        p0, p1, p2 = _phi_pieces(p, g, NPIECE, HAS_G, INTERP)
        tl.store(out_ptr + f * ND + k, p0, mask=km)
        if NPIECE > 1:
            tl.store(out_ptr + F_PAD * ND + f * ND + k, p1, mask=km)
        if NPIECE > 2:
            tl.store(out_ptr + 2 * F_PAD * ND + f * ND + k, p2, mask=km)

