"""GPU suite for the Triton backend, in one device call (issue 4).

    python3 bench/gpu_suite.py [--quick] [--no-compile] [--no-sanitize] [--no-sweep]

1. accuracy vs a float64 torch transcription of CONTRACT.md at the realistic shapes
   (1,4096,4,2560), (4,4096,4,4096), (2,4096,4,7168) and odd shapes (n=3, D=1000, S=1) for
   bf16/fp16/fp32, outputs allocated after poisoning the allocator with NaNs;
2. bitwise repeatability (two runs, torch.equal);
3. compute-sanitizer --tool memcheck on a small forward+backward (a subprocess, caching off);
4. timings (triton.testing.do_bench, median): ours vs PyTorch eager vs torch.compile vs the floor
   (bytes that must move / copy bandwidth measured in this run), with each kernel's own
   bandwidth from torch.profiler; a small sweep of launch configurations first.
Prints a table and writes JSON to $OUT (or bench/results/ when $OUT is unset).

    python3 bench/gpu_suite.py --issue5 [--deadline S]

Issue 5 rows instead: accuracy + bitwise repeatability of the post operator and of pre with
sinkhorn_iters = k (k in 1, 3, 20) against float64 torch, the k = 20 row/column margins, and
timings of pre k = 0 / k = 20 and post forward / backward against eager, torch.compile and the
floor.  ``--deadline`` stops starting new work after S seconds (the JSON is saved as it goes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    from mhc_multi.backends import triton as tg
except Exception:  # not installed: import the module from the checkout
    sys.path.insert(0, ROOT)
    from backends import triton as tg
import triton  # noqa: E402

NORM_EPS = 1e-6
HC_EPS = 1e-6
from mhc_multi.tolerances import (ACTIVATION_TOLERANCE, PARAM_TOLERANCE,  # noqa: E402
                                  SINKHORN_MARGIN_TOLERANCE)
TOL_ACT = {d: ACTIVATION_TOLERANCE[d] for d in ("bf16", "fp16", "fp32")}   # CONTRACT.md's table
TOL_PARAM = PARAM_TOLERANCE["fp32"]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# CONTRACT.md in torch (float64 for the reference, fp32 for the eager / compiled baselines)

def ref_forward(x, phi, alpha, bias, gamma, cd):
    T, n, D = x.shape
    v = x.to(cd).reshape(T, n * D)
    phi, alpha, bias = phi.to(cd), alpha.to(cd), bias.to(cd)
    r = torch.rsqrt((v * v).mean(1) + NORM_EPS)
    m = (v if gamma is None else v * gamma.to(cd).reshape(-1)) @ phi.T
    u = r[:, None] * m
    h_pre = torch.sigmoid(alpha[0] * u[:, :n] + bias[:n]) + HC_EPS
    h_post = 2 * torch.sigmoid(alpha[1] * u[:, n:2 * n] + bias[n:2 * n])
    h_res = (alpha[2] * u[:, 2 * n:] + bias[2 * n:]).reshape(T, n, n)
    h_in = torch.einsum("ti,tid->td", h_pre, v.reshape(T, n, D))
    return h_in, h_post, h_res, r, m, h_pre


def ref_backward(x, phi, alpha, bias, r, m, h_pre, h_post, dh_in, dh_post, dh_res, gamma, cd):
    T, n, D = x.shape
    v = x.to(cd).reshape(T, n * D)
    phi, alpha = phi.to(cd), alpha.to(cd)
    r, m, h_pre, h_post = r.to(cd), m.to(cd), h_pre.to(cd), h_post.to(cd)
    dh_in, dh_post, dh_res = dh_in.to(cd), dh_post.to(cd), dh_res.to(cd)
    g = None if gamma is None else gamma.to(cd).reshape(-1)
    u = r[:, None] * m
    dh_pre = torch.einsum("td,tid->ti", dh_in, v.reshape(T, n, D))
    s = h_pre - HC_EPS
    dp = dh_pre * s * (1 - s)
    dq = dh_post * h_post * (1 - h_post / 2)
    dR = dh_res.reshape(T, n * n)
    e = torch.cat([alpha[0] * dp, alpha[1] * dq, alpha[2] * dR], 1)
    dm = r[:, None] * e
    w = dm @ phi
    dr = (e * m).sum(1)
    dv = (w if g is None else w * g) - (dr * r ** 3 / (n * D))[:, None] * v \
        + (h_pre[:, :, None] * dh_in[:, None, :]).reshape(T, n * D)
    dalpha = torch.stack([(dp * u[:, :n]).sum(), (dq * u[:, n:2 * n]).sum(), (dR * u[:, 2 * n:]).sum()])
    dbias = torch.cat([dp.sum(0), dq.sum(0), dR.sum(0)])
    dphi = dm.T @ (v if g is None else v * g)
    dgamma = None if g is None else (v * w).sum(0).reshape(n, D)
    return dv.reshape(T, n, D), dphi, dalpha, dbias, dgamma


def torch_forward(x, phi, alpha, bias, gamma):
    """The PyTorch baseline (eager or compiled): fp32 math, outputs in the contract's dtypes."""
    out = ref_forward(x, phi, alpha, bias, gamma, torch.float32)
    return (out[0].to(x.dtype),) + out[1:]


def torch_backward(x, phi, alpha, bias, r, m, h_pre, h_post, dh_in, dh_post, dh_res, gamma):
    out = ref_backward(x, phi, alpha, bias, r, m, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
                       torch.float32)
    return (out[0].to(x.dtype),) + out[1:]


# ---------------------------------------------------------------------------------------------

def make_inputs(B, S, n, D, dtype, gamma=True, seed=None):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    T, F = B * S, n * n + 2 * n
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(T, n, D, **kw).to(dtype)
    phi = torch.randn(F, n * D, **kw) / (n * D) ** 0.5
    alpha = torch.randn(3, **kw)
    bias = 0.1 * torch.randn(F, **kw)
    g = (1 + 0.1 * torch.randn(n, D, **kw)) if gamma else None
    dh_in = torch.randn(T, D, **kw).to(dtype)
    dh_post = torch.randn(T, n, **kw)
    dh_res = torch.randn(T, n, n, **kw)
    return x, phi, alpha, bias, g, dh_in, dh_post, dh_res


def poison():
    """Fill the caching allocator's free memory with NaN so unwritten outputs show."""
    free = torch.cuda.mem_get_info()[0]
    try:
        junk = torch.empty(int(free * 0.5) // 4, dtype=torch.float32, device="cuda")
        junk.fill_(float("nan"))
        del junk
    except RuntimeError:
        pass


def rel(got, ref):
    if got is None and ref is None:
        return 0.0
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


FWD_NAMES = ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre")
BWD_NAMES = ("dx", "dphi", "dalpha", "dbias", "dgamma")


def accuracy(shape, dname, gamma=True):
    B, S, n, D = shape
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, DT[dname], gamma)
    poison()
    out = tg.forward(x, phi, alpha, bias, g, norm_eps=NORM_EPS, hc_eps=HC_EPS)
    ref = ref_forward(x, phi, alpha, bias, g, torch.float64)
    errs = {k: rel(o, r) for k, o, r in zip(FWD_NAMES, out, ref)}
    del ref
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = out
    poison()
    bout = tg.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
                       g, norm_eps=NORM_EPS, hc_eps=HC_EPS)
    bref = ref_backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                        dh_res, g, torch.float64)
    errs.update({k: rel(o, r) for k, o, r in zip(BWD_NAMES, bout, bref) if r is not None})
    ok = all(v <= (TOL_ACT[dname] if k in ("h_in", "dx") else TOL_PARAM) for k, v in errs.items())
    # bitwise repeatability
    out2 = tg.forward(x, phi, alpha, bias, g, norm_eps=NORM_EPS, hc_eps=HC_EPS)
    bout2 = tg.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                        dh_res, g, norm_eps=NORM_EPS, hc_eps=HC_EPS)
    same = all(torch.equal(a, b) for a, b in zip(out, out2)) and \
        all((a is None and b is None) or torch.equal(a, b) for a, b in zip(bout, bout2))
    del x, dh_in, out, out2, bout, bout2, bref
    torch.cuda.empty_cache()
    return errs, ok, same


# ---------------------------------------------------------------------------------------------

def bench(fn, ms=200):
    return triton.testing.do_bench(fn, warmup=50, rep=ms, return_mode="median")


def capture_graph(fn):
    """fn captured in a CUDA graph, after warm-up calls on a side stream (compiles, caches)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def bench_graph(fn, ms=200):
    """Median time of fn captured in a CUDA graph and replayed: the device time without the
    host's launch overhead (METHOD.md: "for many small launches, capture a graph")."""
    return bench(capture_graph(fn).replay, ms)


def copy_bandwidth():
    a = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    return 2 * a.numel() / (t * 1e-3)


def copy_same_ms(nbytes_moved):
    """A device-to-device copy moving ``nbytes_moved`` bytes (half read, half written), timed
    like our kernels by plain do_bench (L2 flushed before each call; in a CUDA graph the copy
    becomes a copy-engine node, ~1.6x slower on the H200, so not there): what moving that
    many bytes costs at this size."""
    src = torch.empty(nbytes_moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res):
    """The backward's positional arguments (CONTRACT.md's order) from the outputs ``fo`` =
    (h_in, h_post, h_res, inv_rms, h_mix, h_pre) of a forward on the same inputs."""
    return (x, phi, alpha, bias, fo[3], fo[4], fo[5], fo[1], dh_in, dh_post, dh_res, g)


def kernel_ms(fn, iters=20):
    """kernel_times for printed rows: names cut to 28 characters, ms rounded to 0.1 us."""
    return {k[:28]: round(v, 4) for k, v in kernel_times(fn, iters).items()}


def kernel_times(fn, iters=20):
    """Median-ish per-kernel device time (ms per call) by kernel name, from torch.profiler."""
    from torch.profiler import profile, ProfilerActivity
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0) > 0:
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = ev.cuda_time_total
            if t > 0:
                out[ev.key] = t / iters / 1e3
    return out


FWD_CANDIDATES = [
    dict(),
    dict(fwd_split=0),
    dict(fwd_split=2),
    dict(fwd_split=4),
    dict(fwd_stages=3),
    dict(fwd_bd2=256),
]
ROW_CANDIDATES = [
    dict(row_bt=16, row_bd=256, row_warps=8, row_stages=2, row_waves=4),
    dict(row_bt=8, row_bd=256, row_warps=4, row_stages=2),
    dict(row_bt=4, row_bd=512, row_warps=4, row_stages=2),
    dict(row_bt=16, row_bd=256, row_warps=8, row_stages=2),
    dict(row_bt=8, row_bd=512, row_warps=8, row_stages=3),
]
COL_CANDIDATES = [
    dict(col_bt=32, col_bd=64, col_warps=4, col_stages=3, col_waves=4),
    dict(col_bt=64, col_bd=64, col_warps=4, col_stages=3, col_waves=2),
    dict(col_bt=32, col_bd=128, col_warps=8, col_stages=3, col_waves=2),
    dict(col_bt=64, col_bd=128, col_warps=8, col_stages=3, col_waves=2),
    dict(col_bt=16, col_bd=128, col_warps=4, col_stages=3, col_waves=2),
    dict(col_bt=64, col_bd=64, col_warps=4, col_stages=3, col_waves=4),
    dict(col_bt=32, col_bd=128, col_warps=4, col_stages=3, col_waves=2),
    dict(col_bt=16, col_bd=64, col_warps=4, col_stages=3, col_waves=2),
    dict(col_bt=64, col_bd=128, col_warps=4, col_stages=3, col_waves=2),
    dict(col_bt=32, col_bd=64, col_warps=4, col_stages=3, col_waves=8),
    dict(col_bt=32, col_bd=64, col_warps=4, col_stages=4, col_waves=4),
]


def try_time(fn):
    try:
        return bench(fn, 100)
    except Exception as exc:  # a config that does not compile (e.g. shared memory)
        print("   config failed:", type(exc).__name__, str(exc)[:200])
        return float("inf")


def timing(shape, bw, do_compile, sweep):
    B, S, n, D = shape
    T = B * S
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, torch.bfloat16)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    fout = tg.forward(x, phi, alpha, bias, g, **kw)
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = fout
    bargs = (x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, g)
    fwd = lambda: tg.forward(x, phi, alpha, bias, g, **kw)  # noqa: E731
    bwd = lambda: tg.backward(*bargs, **kw)  # noqa: E731
    res = {"shape": list(shape)}
    best = {}
    if sweep:
        tg.set_config()
        ft = [(try_time(fwd) if not tg.set_config(**c) else 0, c) for c in FWD_CANDIDATES]
        ft.sort(key=lambda p: p[0])
        best.update(ft[0][1])
        res["fwd_sweep"] = [(t, c) for t, c in ft]
        rt = [(try_time(bwd) if not tg.set_config(**best, **c) else 0, c) for c in ROW_CANDIDATES]
        rt.sort(key=lambda p: p[0])
        best.update(rt[0][1])
        ct = [(try_time(bwd) if not tg.set_config(**best, **c) else 0, c) for c in COL_CANDIDATES]
        ct.sort(key=lambda p: p[0])
        best.update(ct[0][1])
        res["bwd_sweep"] = [(t, c) for t, c in rt + ct]
        tg.set_config(**best)
    res["config"] = best
    res["fwd_ms"] = bench(fwd)
    res["bwd_ms"] = bench(bwd)
    res["fwd_ms_2"] = bench(fwd)   # the same version twice: the spread is the noise
    res["bwd_ms_2"] = bench(bwd)
    fo = tg.forward(x, phi, alpha, bias, g, **kw)
    bo = tg.backward(*bargs, **kw)
    fwd_floor_b = nbytes(x, phi, alpha, bias, g) + nbytes(*fo)
    bwd_floor_b = nbytes(*bargs) + nbytes(*bo)
    res["fwd_floor_ms"] = fwd_floor_b / bw * 1e3
    res["bwd_floor_ms"] = bwd_floor_b / bw * 1e3
    res["fwd_copy_same_ms"] = copy_same_ms(fwd_floor_b)
    res["bwd_copy_same_ms"] = copy_same_ms(bwd_floor_b)
    # per-kernel bandwidth: bytes each kernel's design moves / its own time
    xb, hb = nbytes(x), nbytes(dh_in)
    F = n * n + 2 * n
    small = T * 4 * (F + 2 * n + n * n + 1)
    kb = {
        "_pre_fwd_kernel": 2 * xb + hb + small,
        "_pre_fwd_part_kernel": xb,
        "_pre_fwd_fin_kernel": xb + hb + small,
        "_pre_bwd_row_kernel": xb + hb + small + T * 4 * 33,
        "_pre_bwd_col_kernel": 2 * xb + hb + T * 4 * 34,
    }
    kt = {}
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        for k, t in kernel_times(fn).items():
            kt[k] = {"ms": t}
            for kk, b in kb.items():
                if k.startswith(kk):
                    kt[k]["bytes"] = b
                    kt[k]["TBps"] = b / (t * 1e-3) / 1e12
                    kt[k]["of_copy"] = b / (t * 1e-3) / bw
    res["kernels"] = kt
    res["eager_fwd_ms"] = bench(lambda: torch_forward(x, phi, alpha, bias, g))
    res["eager_bwd_ms"] = bench(lambda: torch_backward(*bargs))
    # the same in CUDA graphs: device time without the host's launch overhead
    res["fwd_graph_ms"] = bench_graph(fwd)
    res["bwd_graph_ms"] = bench_graph(bwd)
    if do_compile:
        cf = torch.compile(torch_forward, dynamic=False)
        cb = torch.compile(torch_backward, dynamic=False)
        cf(x, phi, alpha, bias, g)
        cb(*bargs)
        res["compile_fwd_ms"] = bench(lambda: cf(x, phi, alpha, bias, g))
        res["compile_bwd_ms"] = bench(lambda: cb(*bargs))
        res["compile_fwd_graph_ms"] = bench_graph(lambda: cf(x, phi, alpha, bias, g))
        res["compile_bwd_graph_ms"] = bench_graph(lambda: cb(*bargs))
    tg.set_config()
    del x, dh_in, fout, fo, bo
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------

def sanitize_child():
    for (T, n, D, dt, gam) in [(5, 3, 1000, torch.bfloat16, True), (37, 4, 130, torch.float32, False),
                               (3, 1, 7, torch.float16, True)]:
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(1, T, n, D, dt, gam, seed=1)
        o = tg.forward(x, phi, alpha, bias, g, norm_eps=NORM_EPS, hc_eps=HC_EPS)
        tg.backward(x, phi, alpha, bias, o[3], o[4], o[5], o[1], dh_in, dh_post, dh_res, g,
                    norm_eps=NORM_EPS, hc_eps=HC_EPS)
    torch.cuda.synchronize()
    print("sanitize child done")


def run_sanitizer():
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
           sys.executable, os.path.abspath(__file__), "--sanitize-child"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        return {"ran": False, "why": "compute-sanitizer not found"}
    except subprocess.TimeoutExpired:
        return {"ran": False, "why": "timeout"}
    tail = (p.stdout + p.stderr)[-1500:]
    return {"ran": True, "rc": p.returncode, "clean": p.returncode == 0 and "ERROR SUMMARY: 0" in tail,
            "s": time.time() - t0, "tail": tail}


# ---------------------------------------------------------------------------------------------
# Issue 5: Sinkhorn (sinkhorn_iters = k) and the post operator

def sk_torch(L, k):
    P = torch.exp(L - L.amax(dim=(-2, -1), keepdim=True))
    for _ in range(k):
        P = P / P.sum(-1, keepdim=True)
        P = P / P.sum(-2, keepdim=True)
    return P


def sk_vjp_torch(L, k, dP):
    """numpy_ref._sinkhorn_vjp in torch: replay the k iterations, walk them backward."""
    P0 = torch.exp(L - L.amax(dim=(-2, -1), keepdim=True))
    tape, P = [], P0
    for _ in range(k):
        r = P.sum(-1, keepdim=True); tape.append((-1, P, r)); P = P / r
        c = P.sum(-2, keepdim=True); tape.append((-2, P, c)); P = P / c
    for axis, Pin, sm in reversed(tape):
        Q = Pin / sm
        dP = (dP - (dP * Q).sum(axis, keepdim=True)) / sm
    return dP * P0


def res_logits(phi, alpha, bias, r, m, n, cd):
    return (alpha.to(cd)[2] * (r.to(cd)[:, None] * m.to(cd)[:, 2 * n:])
            + bias.to(cd)[2 * n:]).reshape(-1, n, n)


def torch_forward_sk(x, phi, alpha, bias, gamma, k=20):
    out = list(torch_forward(x, phi, alpha, bias, gamma))
    out[2] = sk_torch(out[2], k)
    return tuple(out)


def torch_backward_sk(x, phi, alpha, bias, r, m, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
                      k=20):
    n = x.shape[1]
    dl = sk_vjp_torch(res_logits(phi, alpha, bias, r, m, n, torch.float32), k, dh_res)
    return torch_backward(x, phi, alpha, bias, r, m, h_pre, h_post, dh_in, dh_post, dl, gamma)


def post_ref(x, f, hp, hr, g, cd):
    xf, ff, gf, hp, hr = x.to(cd), f.to(cd), g.to(cd), hp.to(cd), hr.to(cd)
    y = torch.einsum("tij,tjd->tid", hr, xf) + hp[:, :, None] * ff[:, None, :]
    dx = torch.einsum("tij,tid->tjd", hr, gf)
    df = torch.einsum("ti,tid->td", hp, gf)
    dhp = torch.einsum("tid,td->ti", gf, ff)
    dhr = torch.einsum("tid,tjd->tij", gf, xf)
    return y, dx, df, dhp, dhr


def torch_post_fwd(x, f, hp, hr):
    y = torch.einsum("tij,tjd->tid", hr, x.float()) + hp[:, :, None] * f.float()[:, None, :]
    return y.to(x.dtype)


def torch_post_bwd(x, f, hp, hr, g):
    gf = g.float()
    dx = torch.einsum("tij,tid->tjd", hr, gf)
    df = torch.einsum("ti,tid->td", hp, gf)
    dhp = torch.einsum("tid,td->ti", gf, f.float())
    dhr = torch.einsum("tid,tjd->tij", gf, x.float())
    return dx.to(x.dtype), df.to(x.dtype), dhp, dhr


def tol(name, dname):
    return TOL_ACT[dname] if name in ("h_in", "dx", "x_next", "df_out") else TOL_PARAM


def accuracy_sk(shape, dname, k, gamma=True):
    B, S, n, D = shape
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, DT[dname], gamma)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
    poison()
    out = tg.forward(x, phi, alpha, bias, g, **kw)
    ref = list(ref_forward(x, phi, alpha, bias, g, torch.float64))
    ref[2] = sk_torch(ref[2], k)
    errs = {nm: rel(o, rf) for nm, o, rf in zip(FWD_NAMES, out, ref)}
    hr = out[2].double()
    errs["margin"] = max((hr.sum(-1) - 1).abs().max().item(), (hr.sum(-2) - 1).abs().max().item())
    # k iterations need not converge on arbitrary logits: the float64 result's own margin
    errs["margin_ref"] = max((ref[2].sum(-1) - 1).abs().max().item(),
                             (ref[2].sum(-2) - 1).abs().max().item())
    del ref
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = out
    poison()
    bout = tg.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
                       g, **kw)
    dl = sk_vjp_torch(res_logits(phi, alpha, bias, inv_rms, h_mix, n, torch.float64), k,
                      dh_res.double())
    bref = ref_backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                        dl, g, torch.float64)
    errs.update({nm: rel(o, rf) for nm, o, rf in zip(BWD_NAMES, bout, bref) if rf is not None})
    ok = all(v <= tol(nm, dname) for nm, v in errs.items() if not nm.startswith("margin"))
    ok = ok and errs["margin"] <= errs["margin_ref"] + SINKHORN_MARGIN_TOLERANCE
    out2 = tg.forward(x, phi, alpha, bias, g, **kw)
    bout2 = tg.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                        dh_res, g, **kw)
    same = all(torch.equal(a, b) for a, b in zip(out, out2)) and \
        all((a is None and b is None) or torch.equal(a, b) for a, b in zip(bout, bout2))
    del x, dh_in, out, out2, bout, bout2, bref
    torch.cuda.empty_cache()
    return errs, ok, same


def post_inputs(B, S, n, D, dtype, seed=None):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    T = B * S
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(T, n, D, **kw).to(dtype)
    f = torch.randn(T, D, **kw).to(dtype)
    hp = 2 * torch.rand(T, n, **kw)
    hr = sk_torch(torch.randn(T, n, n, **kw), 20)
    gn = torch.randn(T, n, D, **kw).to(dtype)
    return x, f, hp, hr, gn


def accuracy_post(shape, dname):
    B, S, n, D = shape
    x, f, hp, hr, gn = post_inputs(B, S, n, D, DT[dname])
    poison()
    y = tg.post_forward(x, f, hp, hr)
    poison()
    got = (y,) + tuple(tg.post_backward(x, f, hp, hr, gn))
    ref = post_ref(x, f, hp, hr, gn, torch.float64)
    names = ("x_next", "dx", "df_out", "dh_post", "dh_res")
    errs = {nm: rel(a, b) for nm, a, b in zip(names, got, ref)}
    ok = all(v <= tol(nm, dname) for nm, v in errs.items())
    got2 = (tg.post_forward(x, f, hp, hr),) + tuple(tg.post_backward(x, f, hp, hr, gn))
    same = all(torch.equal(a, b) for a, b in zip(got, got2))
    del x, f, gn, got, got2, ref
    torch.cuda.empty_cache()
    return errs, ok, same


def timing5(shape, bw, do_compile):
    B, S, n, D = shape
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, torch.bfloat16)
    res = {"shape": list(shape)}
    for k in (0, 20):
        kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
        fo = tg.forward(x, phi, alpha, bias, g, **kw)
        bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
        fwd = lambda: tg.forward(x, phi, alpha, bias, g, **kw)  # noqa: E731
        bwd = lambda: tg.backward(*bargs, **kw)  # noqa: E731
        res[f"pre_k{k}_fwd_ms"] = bench(fwd)
        res[f"pre_k{k}_bwd_ms"] = bench(bwd)
        res[f"pre_k{k}_fwd_graph_ms"] = bench_graph(fwd)
        res[f"pre_k{k}_bwd_graph_ms"] = bench_graph(bwd)
        res[f"pre_k{k}_fwd_floor_ms"] = (nbytes(x, phi, alpha, bias, g) + nbytes(*fo)) / bw * 1e3
        bo = bwd()
        res[f"pre_k{k}_bwd_floor_ms"] = (nbytes(*bargs) + nbytes(*bo)) / bw * 1e3
        res[f"pre_k{k}_kernels"] = {**kernel_times(fwd), **kernel_times(bwd)}
        if k == 20:
            ef = lambda: torch_forward_sk(x, phi, alpha, bias, g)  # noqa: E731
            eb = lambda: torch_backward_sk(*bargs)  # noqa: E731
        else:
            ef = lambda: torch_forward(x, phi, alpha, bias, g)  # noqa: E731
            eb = lambda: torch_backward(*bargs)  # noqa: E731
        res[f"pre_k{k}_eager_fwd_ms"] = bench(ef)
        res[f"pre_k{k}_eager_bwd_ms"] = bench(eb)
        if do_compile:
            cf = torch.compile(torch_forward_sk if k else torch_forward, dynamic=False)
            cb = torch.compile(torch_backward_sk if k else torch_backward, dynamic=False)
            res[f"pre_k{k}_compile_fwd_ms"] = bench(lambda: cf(x, phi, alpha, bias, g))
            res[f"pre_k{k}_compile_bwd_ms"] = bench(lambda: cb(*bargs))
        del fo, bo
    del dh_in
    torch.cuda.empty_cache()
    xp, f, hp, hr, gn = post_inputs(B, S, n, D, torch.bfloat16)
    pf = lambda: tg.post_forward(xp, f, hp, hr)  # noqa: E731
    pb = lambda: tg.post_backward(xp, f, hp, hr, gn)  # noqa: E731
    res["post_fwd_ms"] = bench(pf)
    res["post_bwd_ms"] = bench(pb)
    res["post_fwd_graph_ms"] = bench_graph(pf)
    res["post_bwd_graph_ms"] = bench_graph(pb)
    res["post_fwd_floor_ms"] = (nbytes(xp, f, hp, hr) + nbytes(pf())) / bw * 1e3
    res["post_bwd_floor_ms"] = (nbytes(xp, f, hp, hr, gn) + nbytes(*pb())) / bw * 1e3
    res["post_kernels"] = {**kernel_times(pf), **kernel_times(pb)}
    res["post_eager_fwd_ms"] = bench(lambda: torch_post_fwd(xp, f, hp, hr))
    res["post_eager_bwd_ms"] = bench(lambda: torch_post_bwd(xp, f, hp, hr, gn))
    if do_compile:
        cf = torch.compile(torch_post_fwd, dynamic=False)
        cb = torch.compile(torch_post_bwd, dynamic=False)
        res["post_compile_fwd_ms"] = bench(lambda: cf(xp, f, hp, hr))
        res["post_compile_bwd_ms"] = bench(lambda: cb(xp, f, hp, hr, gn))
    del xp, f, gn
    torch.cuda.empty_cache()
    return res


def table5(rows):
    lines = ["| shape (B,S,n,D) bf16 | op | pass | ours ms | floor ms | x floor | eager ms | "
             "compile ms | x faster than compile | ours in a graph ms | x floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for op in ("pre_k0", "pre_k20", "post"):
            for p in ("fwd", "bwd"):
                if f"{op}_{p}_ms" not in r:
                    continue
                ours, fl = r[f"{op}_{p}_ms"], r[f"{op}_{p}_floor_ms"]
                comp = r.get(f"{op}_compile_{p}_ms")
                lines.append(
                    f"| {tuple(r['shape'])} | {op} | {p} | {ours:.3f} | {fl:.3f} | {ours / fl:.2f} | "
                    f"{r[f'{op}_eager_{p}_ms']:.3f} | {'' if comp is None else f'{comp:.3f}'} | "
                    f"{'' if comp is None else f'{comp / ours:.1f}'} | "
                    f"{r[f'{op}_{p}_graph_ms']:.3f} | {r[f'{op}_{p}_graph_ms'] / fl:.2f} |")
        for sfx, what in (("ms", "plain"), ("graph_ms", "in a graph")):
            if f"pre_k20_fwd_{sfx}" in r:
                f0, f20 = r[f"pre_k0_fwd_{sfx}"], r[f"pre_k20_fwd_{sfx}"]
                b0, b20 = r[f"pre_k0_bwd_{sfx}"], r[f"pre_k20_bwd_{sfx}"]
                lines.append(f"| {tuple(r['shape'])} | k20/k0 ({what}) | fwd {f20 / f0:.3f}, bwd "
                             f"{b20 / b0:.3f}, fwd+bwd {(f20 + b20) / (f0 + b0):.3f} | | | | | | | | |")
    return "\n".join(lines)


def main_issue5(args, report, save, t_start):
    """Priority order, so a short device call still gets the headline numbers: accuracy at
    (4,4096,4,4096), its timings, the odd shapes (k in 1, 3, 20), then the other shapes."""
    import traceback
    left = lambda: args.deadline - (time.time() - t_start)  # noqa: E731
    report["accuracy5"], report["timing5"], report["errors5"] = [], [], []

    def acc_case(kind, shape, dname, k):
        if args.no_accuracy or left() < 20:
            return
        try:
            errs, ok, same = accuracy_post(shape, dname) if kind == "post" else \
                accuracy_sk(shape, dname, k)
        except Exception:
            report["errors5"].append(f"acc {kind} {shape} {dname} k={k}: {traceback.format_exc()}")
            print(report["errors5"][-1], flush=True)
            return
        report["accuracy5"].append(dict(kind=kind, shape=shape, dtype=dname, k=k, ok=ok,
                                        bitwise=same, errs=errs))
        report["accuracy5_all_ok"] = all(a["ok"] for a in report["accuracy5"])
        report["bitwise5_all"] = all(a["bitwise"] for a in report["accuracy5"])
        save()
        print(f"acc {kind} k={k} {str(shape):22s} {dname} ok={ok} bitwise={same} " +
              " ".join(f"{a}={b:.1e}" for a, b in errs.items()), f"{time.time() - t_start:.0f}s",
              flush=True)

    def time_case(shape):
        if left() < 60:
            print("deadline: skipping timing", shape)
            return
        try:
            r = timing5(shape, bw, not args.no_compile and left() > 150)
        except Exception:
            report["errors5"].append(f"timing {shape}: {traceback.format_exc()}")
            print(report["errors5"][-1], flush=True)
            return
        report["timing5"].append(r)
        report["table5"] = table5(report["timing5"])
        save()
        print(report["table5"], f"{time.time() - t_start:.0f}s", flush=True)

    acc_case("post", (4, 4096, 4, 4096), "bf16", 0)
    acc_case("sk", (4, 4096, 4, 4096), "bf16", 20)
    bw = copy_bandwidth()
    report["copy_TBps"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    time_case((4, 4096, 4, 4096))
    odd = [("post", (1, 333, 3, 1000), "fp16", 0), ("post", (2, 77, 8, 130), "fp32", 0),
           ("post", (1, 5, 1, 1), "bf16", 0), ("post", (1, 4096, 4, 2560), "bf16", 0)]
    for k in (1, 3, 20):
        odd += [("sk", (1, 333, 3, 1000), "fp16", k), ("sk", (2, 77, 8, 130), "fp32", k),
                ("sk", (1, 5, 1, 1), "bf16", k)]
    for c in odd:
        acc_case(*c)
    if not args.quick:
        for shape in ((1, 4096, 4, 2560), (2, 4096, 4, 7168)):
            time_case(shape)
    report["wall_s"] = time.time() - t_start
    save()
    print(f"accuracy all ok: {report.get('accuracy5_all_ok')}, bitwise: {report.get('bitwise5_all')}, "
          f"errors: {len(report['errors5'])}, total {time.time() - t_start:.0f}s")


# ---------------------------------------------------------------------------------------------
# A/B of the switchable variants (backends/triton set_config): the split forward
# (fwd_split) and the separate Sinkhorn-backward kernel (sk_bwd="sep"), in one device call.

AB_FWD = {"default": {}, "split_auto": dict(fwd_split=-1), "fused_bt16": dict(fwd_bt=16, fwd_bd=128),
          "split8": dict(fwd_split=8)}
AB_BWD20 = {"default": {}, "sk_sep": dict(sk_bwd="sep")}


def ab_sanitize_child():
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    xp, f, hp, hr, gn = post_inputs(1, 37, 3, 130, torch.bfloat16, seed=1)
    tg.post_forward(xp, f, hp, hr)
    tg.post_backward(xp, f, hp, hr, gn)
    for cfg, k in ((dict(), 3), (dict(fwd_split=2, sk_bwd="sep"), 3), (dict(fwd_split=3), 0)):
        tg.set_config(**cfg)
        for (T, n, D, dt) in [(37, 4, 130, torch.bfloat16), (5, 3, 7, torch.float32)]:
            x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(1, T, n, D, dt, True, seed=1)
            o = tg.forward(x, phi, alpha, bias, g, sinkhorn_iters=k, **kw)
            tg.backward(x, phi, alpha, bias, o[3], o[4], o[5], o[1], dh_in, dh_post, dh_res, g,
                        sinkhorn_iters=k, **kw)
    tg.set_config()
    torch.cuda.synchronize()
    print("ab sanitize child done")


def main_ab(args, report, save, t_start):
    import traceback
    left = lambda: args.deadline - (time.time() - t_start)  # noqa: E731
    report["ab_accuracy"], report["ab_timing"], report["ab_errors"] = [], [], []
    shape = (4, 4096, 4, 4096)
    acc_cases = [("default", {}, 0), ("default", {}, 20), ("split_auto", dict(fwd_split=-1), 0),
                 ("split_auto+sk_sep", dict(fwd_split=-1, sk_bwd="sep"), 20),
                 ("sk_sep", dict(sk_bwd="sep"), 20), ("fused_bt16", dict(fwd_bt=16, fwd_bd=128), 0)]
    for name, cfg, k in acc_cases:
        if left() < 120:
            break
        try:
            tg.set_config(**cfg)
            errs, ok, same = accuracy(shape, "bf16") if k == 0 else accuracy_sk(shape, "bf16", k)
            report["ab_accuracy"].append(dict(variant=name, k=k, ok=ok, bitwise=same, errs=errs))
            print(f"ab acc {name:18s} k={k:2d} ok={ok} bitwise={same} " +
                  " ".join(f"{a}={b:.1e}" for a, b in errs.items()), f"{time.time() - t_start:.0f}s",
                  flush=True)
        except Exception:
            report["ab_errors"].append(f"acc {name} k={k}: {traceback.format_exc()}")
            print(report["ab_errors"][-1], flush=True)
        finally:
            tg.set_config()
        save()
    bw = copy_bandwidth()
    report["copy_TBps"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    lines = ["| shape | case | variant | ms | floor ms | x floor |", "|---|---|---|---|---|---|"]
    for shp in ((4, 4096, 4, 4096), (1, 4096, 4, 2560), (2, 4096, 4, 7168)):
        if left() < 75:
            print("deadline: skipping", shp, flush=True)
            continue
        B, S, n, D = shp
        r = {"shape": list(shp)}
        try:
            x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, torch.bfloat16)
            for k in (0, 20):
                kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
                fo = tg.forward(x, phi, alpha, bias, g, **kw)
                bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
                ffl = (nbytes(x, phi, alpha, bias, g) + nbytes(*fo)) / bw * 1e3
                bfl = (nbytes(*bargs) + nbytes(*tg.backward(*bargs, **kw))) / bw * 1e3
                r[f"fwd_floor_ms"], r[f"bwd_floor_ms"] = ffl, bfl
                for vname, cfg in AB_FWD.items():
                    if k == 20 and vname not in ("default", "split_auto"):
                        continue
                    if vname == "split8" and shp != (1, 4096, 4, 2560):
                        continue
                    tg.set_config(**cfg)
                    t = try_time(lambda: tg.forward(x, phi, alpha, bias, g, **kw))
                    r[f"fwd_k{k}_{vname}_ms"] = t
                    lines.append(f"| {shp} | fwd k={k} | {vname} | {t:.3f} | {ffl:.3f} | {t / ffl:.2f} |")
                    if vname == "split_auto" and k == 0:
                        r["split_auto_kernels"] = kernel_times(
                            lambda: tg.forward(x, phi, alpha, bias, g, **kw))
                    tg.set_config()
                for vname, cfg in (AB_BWD20.items() if k == 20 else [("default", {})]):
                    tg.set_config(**cfg)
                    t = try_time(lambda: tg.backward(*bargs, **kw))
                    r[f"bwd_k{k}_{vname}_ms"] = t
                    lines.append(f"| {shp} | bwd k={k} | {vname} | {t:.3f} | {bfl:.3f} | {t / bfl:.2f} |")
                    tg.set_config()
                del fo, bargs
            for vname in AB_BWD20:
                r[f"bwd_k20/k0_{vname}"] = r[f"bwd_k20_{vname}_ms"] / r["bwd_k0_default_ms"]
                lines.append(f"| {shp} | bwd k20/k0 | {vname} | {r[f'bwd_k20/k0_{vname}']:.3f} | | |")
            del x, dh_in
            torch.cuda.empty_cache()
        except Exception:
            report["ab_errors"].append(f"timing {shp}: {traceback.format_exc()}")
            print(report["ab_errors"][-1], flush=True)
        finally:
            tg.set_config()
        report["ab_timing"].append(r)
        report["ab_table"] = "\n".join(lines)
        save()
        print(report["ab_table"], f"{time.time() - t_start:.0f}s", flush=True)
    if not args.no_sanitize and left() > 15:
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
               sys.executable, os.path.abspath(__file__), "--ab-sanitize-child"]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                               timeout=max(10, left()))
            tail = (p.stdout + p.stderr)[-1500:]
            report["ab_memcheck"] = {"ran": True, "rc": p.returncode, "s": time.time() - t0,
                                     "clean": p.returncode == 0 and "ERROR SUMMARY: 0" in tail,
                                     "tail": tail}
        except Exception as exc:
            report["ab_memcheck"] = {"ran": False, "why": repr(exc), "s": time.time() - t0}
        print("memcheck:", report["ab_memcheck"], flush=True)
        save()
    report["wall_s"] = time.time() - t_start
    save()
    print(f"ab done, errors: {len(report['ab_errors'])}, total {time.time() - t_start:.0f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ab", action="store_true", help="A/B of the set_config variants")
    ap.add_argument("--ab-sanitize-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sanitize-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="one realistic shape only")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile baseline")
    ap.add_argument("--no-sanitize", action="store_true", help="no compute-sanitizer memcheck")
    ap.add_argument("--no-sweep", action="store_true",
                    help="time the launch rules as shipped, no sweep of launch configurations")
    ap.add_argument("--no-accuracy", action="store_true",
                    help="timings only (no accuracy or repeatability cases)")
    ap.add_argument("--issue5", action="store_true", help="post operator and Sinkhorn rows")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; stop starting work")
    args = ap.parse_args()
    if args.sanitize_child:
        return sanitize_child()
    if args.ab_sanitize_child:
        return ab_sanitize_child()
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    report = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python3"] + sys.argv), "torch": torch.__version__,
              "triton": triton.__version__}
    print(report)
    if args.ab:
        def save_ab():
            with open(os.path.join(out_dir, "gpu_suite_ab.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)
        return main_ab(args, report, save_ab, t_start)
    if args.issue5:
        def save5():
            with open(os.path.join(out_dir, "gpu_suite_issue5.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)
        return main_issue5(args, report, save5, t_start)
    realistic = [(1, 4096, 4, 2560), (4, 4096, 4, 4096), (2, 4096, 4, 7168)]
    if args.quick:
        realistic = [(4, 4096, 4, 4096)]

    def save():
        with open(os.path.join(out_dir, "gpu_suite.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    if not args.no_accuracy:
        acc = []
        odd = [(1, 1, 3, 1000), (3, 1, 3, 1000), (1, 333, 3, 1000), (2, 77, 8, 130), (1, 5, 1, 1),
               # n >= 5 at n*D >= 4096: the split forward, one dm piece for w, two gate-column
               # blocks in the column kernel at n = 8
               (1, 600, 8, 1000), (1, 700, 6, 700), (2, 257, 5, 1024)]
        for shape in realistic + odd:
            for dname in ("bf16", "fp16", "fp32"):
                for gam in ((True, False) if shape in odd and dname != "fp16" else (True,)):
                    errs, ok, same = accuracy(shape, dname, gam)
                    worst = max(errs, key=lambda k: errs[k] / (TOL_ACT[dname] if k in ("h_in", "dx") else TOL_PARAM))
                    acc.append(dict(shape=shape, dtype=dname, gamma=gam, ok=ok, bitwise=same, errs=errs))
                    print(f"acc {str(shape):22s} {dname} gamma={gam!s:5s} ok={ok} bitwise={same} "
                          f"h_in={errs['h_in']:.1e} dx={errs['dx']:.1e} h_mix={errs['h_mix']:.1e} "
                          f"dphi={errs['dphi']:.1e} dgamma={errs.get('dgamma', 0):.1e} "
                          f"dalpha={errs['dalpha']:.1e} worst={worst}", flush=True)
        report["accuracy"] = acc
        report["accuracy_all_ok"] = all(a["ok"] for a in acc)
        report["bitwise_all"] = all(a["bitwise"] for a in acc)
        save()
        print(f"accuracy all ok: {report['accuracy_all_ok']}, bitwise: {report['bitwise_all']}, "
              f"{time.time() - t_start:.0f}s", flush=True)
    if not args.no_sanitize:
        report["memcheck"] = run_sanitizer()
        print("memcheck:", {k: v for k, v in report["memcheck"].items() if k != "tail"})
        print(report["memcheck"].get("tail", "")[-600:], flush=True)
        save()
    bw = copy_bandwidth()
    report["copy_TBps"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in realistic:
        r = timing(shape, bw, not args.no_compile, not args.no_sweep)
        rows.append(r)
        report["timing"] = rows
        save()
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("sweep")}, default=str),
              flush=True)
    # the table
    lines = ["| shape (B,S,n,D) bf16 | pass | ours ms | floor ms | x floor | eager ms | compile ms | "
             "x faster than compile | ours in a graph ms | x floor | compile in a graph ms | "
             "x faster | same-size copy ms | graph x copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in ("fwd", "bwd"):
            ours, fl, og = r[f"{p}_ms"], r[f"{p}_floor_ms"], r[f"{p}_graph_ms"]
            comp, cg = r.get(f"compile_{p}_ms"), r.get(f"compile_{p}_graph_ms")
            lines.append(f"| {tuple(r['shape'])} | {p} | {ours:.3f} | {fl:.3f} | {ours / fl:.2f} | "
                         f"{r[f'eager_{p}_ms']:.3f} | {comp if comp is None else f'{comp:.3f}'} | "
                         f"{'' if comp is None else f'{comp / ours:.1f}'} | {og:.3f} | "
                         f"{og / fl:.2f} | {cg if cg is None else f'{cg:.3f}'} | "
                         f"{'' if cg is None else f'{cg / og:.1f}'} | "
                         f"{r[f'{p}_copy_same_ms']:.3f} | {og / r[f'{p}_copy_same_ms']:.2f} |")
    lines.append("")
    lines.append("| shape | kernel | ms | TB/s (design bytes) | of copy |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        for k, v in r["kernels"].items():
            lines.append(f"| {tuple(r['shape'])} | {k[:40]} | {v['ms']:.4f} | "
                         f"{v.get('TBps', float('nan')):.2f} | {v.get('of_copy', float('nan')):.2f} |")
    table = "\n".join(lines)
    report["table"] = table
    report["wall_s"] = time.time() - t_start
    save()
    print(table)
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
