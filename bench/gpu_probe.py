"""Kernel anatomy and launch-rule tuning on the GPU, in one device call.

    python3 bench/gpu_probe.py [--sections post,fwd,col,tune,postacc] [--deadline S]

fwd / col: time copies of the forward and column kernels with one stage left out (no pass 2,
no dots, no squares, ...) or done differently (both phi*g pieces in one dot); post: the post
backward's launch candidates; tune: library set_config candidates at the realistic shapes, plain
and in a CUDA graph, with per-kernel times; postacc: the post backward's reductions against
float64 at long rows (D up to 65536).  Writes $OUT/gpu_probe.json (copies of this session's runs:
bench/results/gpu_probe-h200-*.json) and prints one line per case.  Experimental kernels live
here, not in the library: a variant that wins moves into backends/triton_gpu.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import (tg, make_inputs, bench, bench_graph, copy_bandwidth, nbytes,  # noqa: E402
                       poison, rel, kernel_times, NORM_EPS, HC_EPS)

_fwd_step = tg._fwd_step
_gates_epilogue = tg._gates_epilogue
_round_out = tg._round_out
_mm_core = tg._mm_core
_split3 = tg._split3
_load_pieces = tg._load_pieces
_dot = tg._dot


@triton.jit(do_not_specialize=["T"])
def _fwd_probe_kernel(
    x_ptr, pg_ptr, alpha_ptr, bias_ptr, hin_ptr, hpost_ptr, hres_ptr, rms_ptr, hmix_ptr,
    hpre_ptr, T, norm_eps, hc_eps,
    N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NPA: tl.constexpr, NPB: tl.constexpr,
    DO_SS: tl.constexpr, DO_DOT: tl.constexpr, DO_P2: tl.constexpr, CAT: tl.constexpr,
    CHAIN: tl.constexpr, INTERP: tl.constexpr = False,
):
    ND: tl.constexpr = N * D
    NCH: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    ff = tl.arange(0, F_PAD)
    FC: tl.constexpr = NPB * F_PAD
    fc = tl.arange(0, FC)
    acc = tl.zeros([BLOCK_T, F_PAD], dtype=tl.float32)
    accc = tl.zeros([BLOCK_T, FC], dtype=tl.float32)
    ss2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(NCH * N):
        c = j // N
        i = j - c * N
        d = c * BLOCK_D + dd
        dmask = d < D
        xv = tl.load(x_ptr + rows64[:, None] * ND + i * D + d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        if DO_SS:
            xf = xv.to(tl.float32)
            ss2 += xf * xf
        if DO_DOT:
            if CAT:
                bc = tl.load(pg_ptr + fc[None, :] * ND + i * D + d[:, None], mask=dmask[:, None],
                             other=0.0)
                if CHAIN:
                    accc = _dot(xv, bc, accc, INTERP)
                else:
                    accc += _dot(xv, bc, tl.zeros([BLOCK_T, FC], dtype=tl.float32), INTERP)
            else:
                b0, b1, b2 = _load_pieces(pg_ptr, ff[None, :] * ND + i * D + d[:, None],
                                          F_PAD * ND, dmask[:, None], NPB)
                acc = _mm_core(xv, xv, xv, b0, b1, b2, acc, NPA, NPB, INTERP)
    if CAT:
        acc = tl.sum(tl.reshape(accc, [BLOCK_T, NPB, F_PAD]), axis=1)
    ss = tl.sum(ss2, axis=1)
    if not DO_SS:
        ss += 1.0
    gate = _gates_epilogue(acc, ss, rows, rows64, rmask, ff, alpha_ptr, bias_ptr, rms_ptr,
                           hmix_ptr, hpre_ptr, hpost_ptr, hres_ptr, norm_eps, hc_eps, N, F, ND,
                           0, 1)
    if DO_P2:
        for cc in range(NCH):
            c = NCH - 1 - cc
            d = c * BLOCK_D + dd
            dmask = d < D
            m2 = rmask[:, None] & dmask[None, :]
            h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for i in tl.static_range(N):
                hp = tl.sum(tl.where(ff[None, :] == i, gate, 0.0), axis=1)
                xv = tl.load(x_ptr + rows64[:, None] * ND + (i * D) + d[None, :], mask=m2,
                             other=0.0)
                h += hp[:, None] * xv.to(tl.float32)
            tl.store(hin_ptr + rows64[:, None] * D + d[None, :], h.to(hin_ptr.dtype.element_ty),
                     mask=m2)


def fwd_probe(x, phi, alpha, bias, g, bt, bd, warps, stages, flags):
    T, n, D = x.shape
    F = n * n + 2 * n
    F_pad = max(16, triton.next_power_of_2(F))
    outs = [torch.empty((T, D), dtype=x.dtype, device=x.device)] + [
        torch.empty(s, dtype=torch.float32, device=x.device)
        for s in ((T, n), (T, n, n), (T,), (T, F), (T, n))]
    pg = tg._prep_phi(phi, g.reshape(-1), F_pad, 2)

    def run():
        _fwd_probe_kernel[(triton.cdiv(T, bt),)](
            x, pg, alpha, bias, *outs, T, NORM_EPS, HC_EPS, N=n, D=D, F=F, F_PAD=F_pad,
            BLOCK_T=bt, BLOCK_D=bd, NPA=1, NPB=2, num_warps=warps, num_stages=stages,
            INTERP=tg._interpret(), **flags)
    return run, outs


@triton.jit(do_not_specialize=["T", "TOK_PER_SPLIT"])
def _col_probe_kernel(
    x_ptr, dhin_ptr, hpre_ptr, dm_ptr, coef_ptr, pp_ptr, g_ptr, dx_ptr, wscol_ptr,
    T, TOK_PER_SPLIT,
    N: tl.constexpr, D: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    NWA: tl.constexpr, NWB: tl.constexpr, NPA: tl.constexpr, NPB: tl.constexpr,
    NDM: tl.constexpr, DO_W: tl.constexpr, DO_P: tl.constexpr, TRANS: tl.constexpr,
):
    ND: tl.constexpr = N * D
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.program_id(2)
    d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    col = i * D + d
    ff = tl.arange(0, F_PAD)
    p0, p1, p2 = _load_pieces(pp_ptr, ff[:, None] * ND + col[None, :], F_PAD * ND,
                              dmask[None, :], NWB)
    g = tl.load(g_ptr + col, mask=dmask, other=0.0)
    P = tl.zeros([F_PAD, BLOCK_D], dtype=tl.float32)
    t_lo = s * TOK_PER_SPLIT
    t_hi = tl.minimum(t_lo + TOK_PER_SPLIT, T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < t_hi
        rows64 = rows.to(tl.int64)
        rm2 = rmask[:, None]
        m2 = rm2 & dmask[None, :]
        a0, a1, a2 = _load_pieces(dm_ptr, rows64[:, None] * F_PAD + ff[None, :], T * F_PAD,
                                  rm2, NDM)
        coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        hp = tl.load(hpre_ptr + rows64 * N + i, mask=rmask, other=0.0)
        xv = tl.load(x_ptr + rows64[:, None] * ND + col[None, :], mask=m2, other=0.0)
        dh = tl.load(dhin_ptr + rows64[:, None] * D + d[None, :], mask=m2, other=0.0)
        w = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if DO_W:
            w = _mm_core(a0, a1, a2, p0, p1, p2, w, NWA, NWB, False)
        w = w * g[None, :]
        xf = xv.to(tl.float32)
        dx = w - coef[:, None] * xf + hp[:, None] * dh.to(tl.float32)
        tl.store(dx_ptr + rows64[:, None] * ND + col[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=m2)
        if DO_P:
            if TRANS:
                t0_ = tl.trans(a0)
                t1_ = tl.trans(a1)
                t2_ = tl.trans(a2)
            else:
                t0_, t1_, t2_ = _load_pieces(dm_ptr, rows64[None, :] * F_PAD + ff[:, None],
                                             T * F_PAD, rmask[None, :], NPA)
            P = _mm_core(t0_, t1_, t2_, xv, xv, xv, P, NPA, NPB, False)
    tl.store(wscol_ptr + s * (F * ND) + ff[:, None] * ND + col[None, :], P,
             mask=(ff < F)[:, None] & dmask[None, :])


def col_probe(x, phi, g, dh_in, h_pre, bt, bd, warps, stages, waves, flags):
    T, n, D = x.shape
    F = n * n + 2 * n
    F_pad = max(16, triton.next_power_of_2(F))
    dev = x.device
    dm = (torch.randn(3, T, F_pad, device=dev) * 1e-3).to(torch.bfloat16)
    coef = torch.randn(T, device=dev) * 1e-4
    pp = tg._prep_phi(phi, None, F_pad, 2)
    dx = torch.empty_like(x)
    nch = triton.cdiv(D, bd)
    nblk = triton.cdiv(T, bt)
    splits = max(1, min(nblk, triton.cdiv(132 * waves, n * nch)))
    tps = triton.cdiv(nblk, splits) * bt
    splits = triton.cdiv(T, tps)
    ws = torch.empty((splits, F, n * D), dtype=torch.float32, device=dev)

    def run():
        _col_probe_kernel[(n, nch, splits)](
            x, dh_in, h_pre, dm, coef, pp, g.reshape(-1), dx, ws, T, tps, N=n, D=D, F=F,
            F_PAD=F_pad, BLOCK_T=bt, BLOCK_D=bd, NWA=2, NWB=2, NPA=3, NPB=1, NDM=3,
            num_warps=warps, num_stages=stages, **flags)
    return run


def post_accuracy():
    """Post backward variants vs float64 torch at long rows (the tensor-core accumulation of
    the "dot" reductions drifts with D; the elementwise "ew" ones should not)."""
    rows = []
    for (T, n, D, dn) in [(256, 4, 7168, torch.bfloat16), (128, 4, 16384, torch.bfloat16),
                          (64, 4, 65536, torch.bfloat16), (256, 3, 7168, torch.float16),
                          (256, 4, 7168, torch.float32), (64, 8, 4096, torch.bfloat16),
                          (512, 1, 4096, torch.bfloat16), (33, 2, 1000, torch.bfloat16)]:
        gen = torch.Generator(device="cuda").manual_seed(11)
        x = torch.randn(T, n, D, device="cuda", generator=gen).to(dn)
        f = torch.randn(T, D, device="cuda", generator=gen).to(dn)
        hp = torch.rand(T, n, device="cuda", generator=gen) * 2
        hr = torch.rand(T, n, n, device="cuda", generator=gen)
        gn = torch.randn(T, n, D, device="cuda", generator=gen).to(dn)
        xd, fd, gd = x.double(), f.double(), gn.double()
        ref = (torch.einsum("tij,tid->tjd", hr.double(), gd), torch.einsum("ti,tid->td", hp.double(), gd),
               torch.einsum("tid,td->ti", gd, fd), torch.einsum("tid,tjd->tij", gd, xd))
        for cfg in ({}, dict(post_pb_bd=512)):
            tg.set_config(**cfg)
            poison()
            got = tg.post_backward(x, f, hp, hr, gn)
            errs = [rel(a, b) for a, b in zip(got, ref)]
            rows.append(dict(T=T, n=n, D=D, dtype=str(dn), cfg=cfg, errs=errs))
            print(f"postacc T={T} n={n} D={D} {dn} {cfg} dx {errs[0]:.1e} df {errs[1]:.1e} "
                  f"dh_post {errs[2]:.1e} dh_res {errs[3]:.1e}", flush=True)
        tg.set_config()
    return rows


def tune(bw, left):
    """Library launch configurations (set_config) at the three realistic shapes, bf16 (the post
    backward's candidates are the "post" section's)."""
    fwd_c = [dict()]
    col_c = [dict(), dict(col_splits=2), dict(col_splits=7), dict(col_occ=None)]
    out = []
    for shape in [(4, 4096, 4, 4096), (1, 4096, 4, 2560), (2, 4096, 4, 7168)]:
        B, S, n, D = shape
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, torch.bfloat16,
                                                                     seed=5)
        kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
        tg.set_config()
        fo = tg.forward(x, phi, alpha, bias, g, **kw)
        h_in, h_post, h_res, inv_rms, h_mix, h_pre = fo
        bargs = (x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, g)
        bo = tg.backward(*bargs, **kw)
        ff = (nbytes(x, phi, alpha, bias, g) + nbytes(*fo)) / bw * 1e3
        bf = (nbytes(*bargs) + nbytes(*bo)) / bw * 1e3
        for kind, cands, fn, fl, ref in (
                ("fwd", fwd_c, lambda: tg.forward(x, phi, alpha, bias, g, **kw), ff, fo),
                ("bwd", col_c, lambda: tg.backward(*bargs, **kw), bf, bo)):
            for c in cands:
                if left() < 45:
                    break
                tg.set_config(**c)
                try:
                    o = fn()
                    diff = max(rel(a, b.double()) for a, b in zip(o, ref) if a is not None)
                    t = bench(fn, 100)
                    tgr = bench_graph(fn, 100)
                    kt = {k[:24]: round(v, 4) for k, v in kernel_times(fn, 10).items()}
                except Exception as exc:
                    t, tgr, kt, diff = float("inf"), float("inf"), {}, str(exc)[:120]
                out.append(dict(shape=shape, kind=kind, cfg=c, ms=t, graph_ms=tgr,
                                x_floor=t / fl, graph_x_floor=tgr / fl, diff=diff, kernels=kt))
                print(f"tune {kind} {shape} {c} {t:.4f} ms {t / fl:.2f}x | graph {tgr:.4f} ms "
                      f"{tgr / fl:.2f}x floor (diff {diff:.1e}) {kt}" if isinstance(diff, float)
                      else f"tune {kind} {shape} {c} failed {diff}", flush=True)
        del x, dh_in, fo, bo, bargs, h_in
        tg.set_config()
        torch.cuda.empty_cache()
    return out


def kstats(fn):
    """(registers, spills, wgmma in the PTX) of the last compiled kernel launched by fn."""
    try:
        k = fn()
        ptx = k.asm.get("ptx", "")
        return {"regs": k.n_regs, "spills": k.n_spills, "wgmma": "wgmma" in ptx,
                "mma": "mma.sync" in ptx, "smem": k.metadata.shared}
    except Exception as exc:
        return {"err": str(exc)[:200]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deadline", type=float, default=480)
    ap.add_argument("--sections", default="post,fwd,col",
                    help="comma list of: post, fwd, col (anatomy) and tune, postacc")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    t0 = time.time()
    out_dir = os.environ.get("OUT") or "/tmp"
    rep = {"device": torch.cuda.get_device_name()}

    def save():
        with open(os.path.join(out_dir, "gpu_probe.json"), "w") as f:
            json.dump(rep, f, indent=1, default=str)

    def left():
        return args.deadline - (time.time() - t0)

    bw = copy_bandwidth()
    rep["copy_TBps"] = bw / 1e12
    print(f"copy {bw / 1e12:.2f} TB/s", flush=True)

    if "postacc" in sections:
        rep["postacc"] = post_accuracy()
        save()
    if "tune" in sections:
        rep["tune"] = tune(bw, left)
        save()
    # 1. post backward: the launch rule against other blocks (diff: relative to the rule)
    rows = []
    for shape in ([] if "post" not in sections else [(1, 4096, 4, 2560), (4, 4096, 4, 4096), (2, 4096, 4, 7168)]):
        B, S, n, D = shape
        T = B * S
        gen = torch.Generator(device="cuda").manual_seed(3)
        x = torch.randn(T, n, D, device="cuda", generator=gen).bfloat16()
        f = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
        hp = torch.rand(T, n, device="cuda", generator=gen) * 2
        hr = torch.rand(T, n, n, device="cuda", generator=gen)
        gn = torch.randn(T, n, D, device="cuda", generator=gen).bfloat16()
        floor = (3 * nbytes(x) + 2 * nbytes(f) + 2 * nbytes(hp, hr)) / bw * 1e3
        ref = None
        cands = [dict()] + [
            dict(post_pb_bt=bt_, post_pb_bd=bd_, post_pb_warps=w_, post_pb_stages=s_)
            for (bt_, bd_, w_, s_) in [(4, 128, 4, 3), (4, 512, 4, 3), (8, 256, 4, 3),
                                       (4, 256, 8, 3), (4, 256, 4, 2)]]
        for cfg in cands:
            if left() < 60:
                break
            tg.set_config(**cfg)
            try:
                got = tg.post_backward(x, f, hp, hr, gn)
                if ref is None:
                    ref = got
                errs = [rel(a, b.double()) for a, b in zip(got, ref)]
                t = bench(lambda: tg.post_backward(x, f, hp, hr, gn), 100)
            except Exception as exc:
                errs, t = str(exc)[:100], float("inf")
            r = dict(shape=shape, cfg=cfg, ms=t, floor_ms=floor, x_floor=t / floor, diff=errs)
            rows.append(r)
            print(f"post_bwd {shape} {cfg} {t:.4f} ms {t / floor:.2f}x floor diff {errs}",
                  flush=True)
        tg.set_config()
        del x, f, hp, hr, gn, ref
        torch.cuda.empty_cache()
    rep["post_bwd"] = rows
    save()

    if "fwd" not in sections and "col" not in sections:
        rep["wall_s"] = time.time() - t0
        save()
        print(f"probe done {time.time() - t0:.0f}s")
        return
    # 2. forward anatomy at (4,4096,4,4096) bf16
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(4, 4096, 4, 4096, torch.bfloat16,
                                                                 seed=5)
    T, n, D = x.shape
    floor = (nbytes(x) + x.shape[0] * D * 2) / bw * 1e3
    rep["fwd_floor_ms"] = floor
    lib = bench(lambda: tg.forward(x, phi, alpha, bias, g, norm_eps=NORM_EPS, hc_eps=HC_EPS))
    print(f"fwd library {lib:.4f} ms {lib / floor:.2f}x", flush=True)
    rep["fwd_lib_ms"] = lib
    ref = tg.forward(x, phi, alpha, bias, g, norm_eps=NORM_EPS, hc_eps=HC_EPS)
    base = dict(DO_SS=True, DO_DOT=True, DO_P2=True, CAT=False, CHAIN=False)
    variants = [
        ("full", {}), ("no_p2", dict(DO_P2=False)), ("no_p2_no_dot", dict(DO_P2=False, DO_DOT=False)),
        ("no_p2_no_ss", dict(DO_P2=False, DO_SS=False)), ("only_p2", dict(DO_SS=False, DO_DOT=False)),
        ("cat", dict(CAT=True)), ("cat_chain", dict(CAT=True, CHAIN=True)),
        ("cat_no_p2", dict(CAT=True, DO_P2=False)),
    ]
    cfgs = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3), (64, 64, 8, 4),
            (128, 64, 4, 3)]
    frows = []
    for name, fl in variants:
        for (bt, bd, w, s) in (cfgs if name in ("full", "cat", "no_p2", "cat_no_p2") else cfgs[:1]):
            if left() < 60:
                break
            flags = dict(base, **fl)
            try:
                run, outs = fwd_probe(x, phi, alpha, bias, g, bt, bd, w, s, flags)
                run()
                t = bench(run, 100)
                err = [rel(a, b.double()) for a, b in zip(outs, ref)] if name in ("full", "cat", "cat_chain") else None
                st = kstats(lambda: _fwd_probe_kernel[(1,)](
                    x, tg._prep_phi(phi, g.reshape(-1), 32, 2), alpha, bias, *outs, 0, NORM_EPS,
                    HC_EPS, N=n, D=D, F=24, F_PAD=32, BLOCK_T=bt, BLOCK_D=bd, NPA=1, NPB=2,
                    num_warps=w, num_stages=s, **flags))
            except Exception as exc:
                t, err, st = float("inf"), str(exc)[:200], {}
            r = dict(variant=name, cfg=(bt, bd, w, s), ms=t, x_floor=t / floor, err=err, stats=st)
            frows.append(r)
            print(f"fwd {name:14s} {(bt, bd, w, s)} {t:.4f} ms {t / floor:.2f}x err {err} {st}",
                  flush=True)
    rep["fwd"] = frows
    save()

    # 3. column kernel anatomy
    hp32 = torch.rand(T, n, device="cuda")
    crow = []
    for name, fl in [("full", {}), ("no_w", dict(DO_W=False)), ("no_p", dict(DO_P=False)),
                     ("no_w_no_p", dict(DO_W=False, DO_P=False)), ("trans", dict(TRANS=True))]:
        for (bt, bd, w, s, wv) in ((32, 64, 4, 3, 4), (64, 64, 4, 3, 2), (64, 128, 8, 3, 2)):
            if left() < 40:
                break
            flags = dict(dict(DO_W=True, DO_P=True, TRANS=False), **fl)
            try:
                run = col_probe(x, phi, g, dh_in, hp32, bt, bd, w, s, wv, flags)
                run()
                t = bench(run, 100)
            except Exception as exc:
                t = float("inf")
                print("  failed", str(exc)[:200])
            crow.append(dict(variant=name, cfg=(bt, bd, w, s, wv), ms=t))
            print(f"col {name:10s} {(bt, bd, w, s, wv)} {t:.4f} ms "
                  f"({(3 * nbytes(x) + nbytes(dh_in)) / (t * 1e-3) / 1e12:.2f} TB/s design)",
                  flush=True)
    rep["col"] = crow
    rep["wall_s"] = time.time() - t0
    save()
    print(f"probe done {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
