"""The Triton backend's acceptance suite, in one device call.

    python3 bench/gpu_suite.py [--quick] [--no-accuracy] [--no-sanitize] [--no-compile]
                               [--deadline S] [--config JSON] [--json PATH]
    python3 bench/gpu_suite.py --sinkhorn-post [the same options]
    TRITON_INTERPRET=1 python3 bench/gpu_suite.py --device cpu [--sinkhorn-post]   # smoke test

The pre operator (default):

1. accuracy at the realistic shapes (1,4096,4,2560), (4,4096,4,4096), (2,4096,4,7168) and at
   odd ones (S = 1; T = 5 at n = D = 1; n = 3 to 8 at D = 130 to 1024; the odd ones also
   without gamma), bf16 / fp16 / fp32 x: every forward output and every gradient against the
   float64 reference (numpy_ref.forward64 / backward64 on the same inputs copied to the host
   as float64; the backward on the kernel's own forward intermediates), within its bound from
   mhc_multi.tolerances; before each kernel call the CUDA allocator is filled with NaN, so an
   output element left unwritten fails;
2. bitwise repeatability: each case runs twice, torch.equal;
3. compute-sanitizer --tool memcheck on small calls of every kernel (pre with k = 0 and k = 3,
   post), in a subprocess with the caching allocator off;
4. timings at the realistic shapes, bf16 x (triton.testing.do_bench medians, plain and in a
   CUDA graph): ours, PyTorch eager and torch.compile of bench/torch_reference.py, the floor
   (bytes that must move / the copy bandwidth of this process), a copy of the same bytes, and
   each kernel's bandwidth from torch.profiler.

--sinkhorn-post: the post operator and pre with sinkhorn_iters = k (k in 1, 3, 20), accuracy
and repeatability as above (for pre with k > 0 also the row and column margins of h_res: within
the float64 result's own margin plus SINKHORN_MARGIN_TOLERANCE), and timings of pre k = 0 /
k = 20 and post forward / backward. (4,4096,4,4096) comes first, so a short device call still
gets the headline rows.

--device cpu runs the accuracy and repeatability cases at tiny shapes on Triton's CPU
interpreter (no NaN poisoning, memcheck or timings there). --config applies set_config
overrides (docs/triton.md) to every call, memcheck included, to put a launch variant through
the suite; bench/gpu_quick.py --variants times variants against each other.

Writes JSON as it goes (--json PATH, else $OUT/gpu_suite.json or
$OUT/gpu_suite_sinkhorn_post.json, else bench/results/<that name>-<device type>.json), prints
the timing table, and exits 1 when a case is out of bounds, not bitwise repeatable or raised.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _results  # noqa: E402
import torch_reference as tref  # noqa: E402
from _gpu import (DT, HC_EPS, NORM_EPS, backward_args, bench, bench_graph,  # noqa: E402
                  copy_bandwidth, copy_same_ms, kernel_times, make_inputs, nbytes, poison,
                  post_inputs, tg)
from mhc_multi.backends import numpy_ref  # noqa: E402
from mhc_multi.crosscheck import relative_error  # noqa: E402
from mhc_multi.tolerances import SINKHORN_MARGIN_TOLERANCE, tolerance  # noqa: E402

PRE_OUT = ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre")
PRE_GRAD = ("dx", "dphi", "dalpha", "dbias", "dgamma")
POST_NAMES = ("x_next", "dx", "df_out", "dh_post", "dh_res")
DTYPES = ("bf16", "fp16", "fp32")
REALISTIC = [(1, 4096, 4, 2560), (4, 4096, 4, 4096), (2, 4096, 4, 7168)]
HEADLINE = (4, 4096, 4, 4096)
# n >= 5 at n*D >= 4096: the split forward, one dm piece for w, two gate-column blocks in the
# column kernel at n = 8
ODD = [(1, 1, 3, 1000), (3, 1, 3, 1000), (1, 333, 3, 1000), (2, 77, 8, 130), (1, 5, 1, 1),
       (1, 600, 8, 1000), (1, 700, 6, 700), (2, 257, 5, 1024)]
ODD_SINKHORN_POST = [((1, 333, 3, 1000), "fp16"), ((2, 77, 8, 130), "fp32"), ((1, 5, 1, 1), "bf16")]
# --device cpu: shapes the interpreter runs in about a second per call (short rows and their
# cancellations are tests/test_accuracy.py's)
TINY = [(1, 5, 1, 8), (2, 3, 3, 40)]
TINY_SINKHORN_POST = [((1, 3, 3, 7), "fp16"), ((1, 5, 1, 8), "fp32")]


# ---------------------------------------------------------------------------------------------
# accuracy and repeatability

def host64(t):
    """A tensor as a float64 numpy array on the host (None stays None)."""
    return None if t is None else t.detach().cpu().double().numpy()


def same_bits(a, b):
    return all((p is None and q is None) or torch.equal(p, q) for p, q in zip(a, b))


def margin(h_res):
    """The largest |row sum - 1| and |column sum - 1| of float64 [T, n, n] matrices."""
    return float(max(np.abs(h_res.sum(-1) - 1).max(initial=0),
                     np.abs(h_res.sum(-2) - 1).max(initial=0)))


def within_bounds(errs, dname):
    ok = all(v <= tolerance(k, dname) for k, v in errs.items() if not k.startswith("margin"))
    return ok and errs.get("margin", 0.0) <= errs.get("margin_ref", 0.0) + SINKHORN_MARGIN_TOLERANCE


def accuracy_pre(shape, dname, k=0, gamma=True, device="cuda"):
    """(errors by output, all within their bounds, bitwise repeatable) of one pre case."""
    B, S, n, D = shape
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, DT[dname], gamma,
                                                                 device=device)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
    poison()
    out = tg.forward(x, phi, alpha, bias, g, **kw)
    bargs = backward_args(out, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
    poison()
    grads = tg.backward(*bargs, **kw)
    same = (same_bits(out, tg.forward(x, phi, alpha, bias, g, **kw))
            and same_bits(grads, tg.backward(*bargs, **kw)))
    args64 = [host64(a) for a in bargs]   # the backward's arguments: the forward's inputs too
    ref = numpy_ref.forward64(*args64[:4], args64[11], **kw)
    errs = {name: relative_error(o, r) for name, o, r in zip(PRE_OUT, out, ref)}
    if k:   # k iterations need not converge on arbitrary logits: the float64 result's margin
        errs["margin"], errs["margin_ref"] = margin(host64(out[2])), margin(ref[2])
    del ref
    errs.update({name: relative_error(o, r) for name, o, r in
                 zip(PRE_GRAD, grads, numpy_ref.backward64(*args64, **kw)) if r is not None})
    return errs, within_bounds(errs, dname), same


def accuracy_post(shape, dname, device="cuda"):
    """(errors by output, all within their bounds, bitwise repeatable) of one post case."""
    B, S, n, D = shape
    args = post_inputs(B, S, n, D, DT[dname], device=device)   # x, f_out, h_post, h_res, dx_next
    poison()
    y = tg.post_forward(*args[:4])
    poison()
    got = (y,) + tuple(tg.post_backward(*args))
    same = same_bits(got, (tg.post_forward(*args[:4]),) + tuple(tg.post_backward(*args)))
    args64 = [host64(a) for a in args]
    ref = (numpy_ref.post_forward64(*args64[:4]),) + numpy_ref.post_backward64(*args64)
    errs = {name: relative_error(o, r) for name, o, r in zip(POST_NAMES, got, ref)}
    return errs, within_bounds(errs, dname), same


# ---------------------------------------------------------------------------------------------
# timings (CUDA)

def baselines(shape, k, do_compile, x, phi, alpha, bias, g, dh_in, dh_post, dh_res):
    """{"eager": (fwd, bwd), "compile": (fwd, bwd)}: bench/torch_reference.py on the same
    tensors as [B, S, ...] views, as written and under torch.compile(dynamic=False)."""
    B, S, n, D = shape
    x4 = x.view(B, S, n, D)
    cot = (dh_in.view(B, S, D), dh_post.view(B, S, n), dh_res.view(B, S, n, n))
    bargs = backward_args(tref.forward(x4, phi, alpha, bias, g, sinkhorn_iters=k),
                          x4, phi, alpha, bias, g, *cot)

    def calls(fwd, bwd):
        return (lambda: fwd(x4, phi, alpha, bias, g, sinkhorn_iters=k),
                lambda: bwd(*bargs, sinkhorn_iters=k))
    out = {"eager": calls(tref.forward, tref.backward)}
    if do_compile:
        out["compile"] = calls(torch.compile(tref.forward, dynamic=False),
                               torch.compile(tref.backward, dynamic=False))
    return out


def post_baselines(shape, do_compile, x, f, hp, hr, gn):
    """The same for the post operator."""
    B, S, n, D = shape
    args = (x.view(B, S, n, D), f.view(B, S, D), hp.view(B, S, n), hr.view(B, S, n, n))
    dx_next = gn.view(B, S, n, D)

    def calls(fwd, bwd):
        return lambda: fwd(*args), lambda: bwd(*args, dx_next)
    out = {"eager": calls(tref.post_forward, tref.post_backward)}
    if do_compile:
        out["compile"] = calls(torch.compile(tref.post_forward, dynamic=False),
                               torch.compile(tref.post_backward, dynamic=False))
    return out


def time_baselines(res, prefix, impls, graph):
    """``{prefix}{eager,compile}_{fwd,bwd}_ms`` (and ``..._graph_ms`` with ``graph``) into res."""
    for name, fns in impls.items():
        for p, fn in zip(("fwd", "bwd"), fns):
            fn()   # compiles
            res[f"{prefix}{name}_{p}_ms"] = bench(fn)
            if graph and name == "compile":
                res[f"{prefix}{name}_{p}_graph_ms"] = bench_graph(fn)


def timing_pre(shape, bw, do_compile):
    B, S, n, D = shape
    T = B * S
    inputs = make_inputs(B, S, n, D, torch.bfloat16)
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = inputs
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    fo = tg.forward(x, phi, alpha, bias, g, **kw)
    bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
    fwd = lambda: tg.forward(x, phi, alpha, bias, g, **kw)  # noqa: E731
    bwd = lambda: tg.backward(*bargs, **kw)  # noqa: E731
    res = {"shape": list(shape)}
    res["fwd_ms"] = bench(fwd)
    res["bwd_ms"] = bench(bwd)
    res["fwd_ms_2"] = bench(fwd)   # the same version twice: the spread is the noise
    res["bwd_ms_2"] = bench(bwd)
    fwd_floor_b = nbytes(x, phi, alpha, bias, g) + nbytes(*fo)
    bwd_floor_b = nbytes(*bargs) + nbytes(*bwd())
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
    for fn in (fwd, bwd):
        for k, t in kernel_times(fn).items():
            kt[k] = {"ms": t}
            for kk, b in kb.items():
                if k.startswith(kk):
                    kt[k].update(bytes=b, TBps=b / (t * 1e-3) / 1e12, of_copy=b / (t * 1e-3) / bw)
    res["kernels"] = kt
    # the same in CUDA graphs: device time without the host's launch overhead
    res["fwd_graph_ms"] = bench_graph(fwd)
    res["bwd_graph_ms"] = bench_graph(bwd)
    time_baselines(res, "", baselines(shape, 0, do_compile, *inputs), graph=True)
    return res


def timing_sinkhorn_post(shape, bw, do_compile):
    B, S, n, D = shape
    inputs = make_inputs(B, S, n, D, torch.bfloat16)
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = inputs
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
        res[f"pre_k{k}_bwd_floor_ms"] = (nbytes(*bargs) + nbytes(*bwd())) / bw * 1e3
        res[f"pre_k{k}_kernels"] = {**kernel_times(fwd), **kernel_times(bwd)}
        time_baselines(res, f"pre_k{k}_", baselines(shape, k, do_compile, *inputs), graph=False)
    pargs = post_inputs(B, S, n, D, torch.bfloat16)
    pf = lambda: tg.post_forward(*pargs[:4])  # noqa: E731
    pb = lambda: tg.post_backward(*pargs)  # noqa: E731
    res["post_fwd_ms"] = bench(pf)
    res["post_bwd_ms"] = bench(pb)
    res["post_fwd_graph_ms"] = bench_graph(pf)
    res["post_bwd_graph_ms"] = bench_graph(pb)
    res["post_fwd_floor_ms"] = (nbytes(*pargs[:4]) + nbytes(pf())) / bw * 1e3
    res["post_bwd_floor_ms"] = (nbytes(*pargs) + nbytes(*pb())) / bw * 1e3
    res["post_kernels"] = {**kernel_times(pf), **kernel_times(pb)}
    time_baselines(res, "post_", post_baselines(shape, do_compile, *pargs), graph=False)
    return res


def pre_table(rows):
    lines = ["| shape (B,S,n,D) bf16 | pass | ours ms | floor ms | x floor | eager ms | compile ms | "
             "x faster than compile | ours in a graph ms | x floor | compile in a graph ms | "
             "x faster | same-size copy ms | graph x copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in ("fwd", "bwd"):
            ours, fl, og = r[f"{p}_ms"], r[f"{p}_floor_ms"], r[f"{p}_graph_ms"]
            comp, cg = r.get(f"compile_{p}_ms"), r.get(f"compile_{p}_graph_ms")
            lines.append(f"| {tuple(r['shape'])} | {p} | {ours:.3f} | {fl:.3f} | {ours / fl:.2f} | "
                         f"{r[f'eager_{p}_ms']:.3f} | {'' if comp is None else f'{comp:.3f}'} | "
                         f"{'' if comp is None else f'{comp / ours:.1f}'} | {og:.3f} | "
                         f"{og / fl:.2f} | {'' if cg is None else f'{cg:.3f}'} | "
                         f"{'' if cg is None else f'{cg / og:.1f}'} | "
                         f"{r[f'{p}_copy_same_ms']:.3f} | {og / r[f'{p}_copy_same_ms']:.2f} |")
    lines += ["", "| shape | kernel | ms | TB/s (design bytes) | of copy |", "|---|---|---|---|---|"]
    for r in rows:
        for k, v in r["kernels"].items():
            lines.append(f"| {tuple(r['shape'])} | {k[:40]} | {v['ms']:.4f} | "
                         f"{v.get('TBps', float('nan')):.2f} | {v.get('of_copy', float('nan')):.2f} |")
    return "\n".join(lines)


def sinkhorn_post_table(rows):
    lines = ["| shape (B,S,n,D) bf16 | op | pass | ours ms | floor ms | x floor | eager ms | "
             "compile ms | x faster than compile | ours in a graph ms | x floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for op in ("pre_k0", "pre_k20", "post"):
            for p in ("fwd", "bwd"):
                ours, fl = r[f"{op}_{p}_ms"], r[f"{op}_{p}_floor_ms"]
                comp = r.get(f"{op}_compile_{p}_ms")
                lines.append(
                    f"| {tuple(r['shape'])} | {op} | {p} | {ours:.3f} | {fl:.3f} | {ours / fl:.2f} | "
                    f"{r[f'{op}_eager_{p}_ms']:.3f} | {'' if comp is None else f'{comp:.3f}'} | "
                    f"{'' if comp is None else f'{comp / ours:.1f}'} | "
                    f"{r[f'{op}_{p}_graph_ms']:.3f} | {r[f'{op}_{p}_graph_ms'] / fl:.2f} |")
        for sfx, what in (("ms", "plain"), ("graph_ms", "in a graph")):
            f0, f20 = r[f"pre_k0_fwd_{sfx}"], r[f"pre_k20_fwd_{sfx}"]
            b0, b20 = r[f"pre_k0_bwd_{sfx}"], r[f"pre_k20_bwd_{sfx}"]
            lines.append(f"| {tuple(r['shape'])} | k20/k0 ({what}) | fwd {f20 / f0:.3f}, bwd "
                         f"{b20 / b0:.3f}, fwd+bwd {(f20 + b20) / (f0 + b0):.3f} | | | | | | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# compute-sanitizer

def sanitize_child():
    """Small calls of every kernel, run under compute-sanitizer by run_sanitizer."""
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    for (T, n, D, dt, gam, k) in [(5, 3, 1000, torch.bfloat16, True, 0),
                                  (37, 4, 130, torch.float32, False, 0),
                                  (3, 1, 7, torch.float16, True, 0),
                                  (37, 4, 130, torch.bfloat16, True, 3),
                                  (5, 3, 7, torch.float32, False, 3)]:
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(1, T, n, D, dt, gam, seed=1)
        o = tg.forward(x, phi, alpha, bias, g, sinkhorn_iters=k, **kw)
        tg.backward(*backward_args(o, x, phi, alpha, bias, g, dh_in, dh_post, dh_res),
                    sinkhorn_iters=k, **kw)
    pargs = post_inputs(1, 37, 3, 130, torch.bfloat16, seed=1)
    tg.post_forward(*pargs[:4])
    tg.post_backward(*pargs)
    torch.cuda.synchronize()
    print("sanitize child done")


def run_sanitizer(config, timeout):
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
           sys.executable, os.path.abspath(__file__), "--sanitize-child"]
    if config:
        cmd += ["--config", config]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {"ran": False, "why": "compute-sanitizer not found"}
    except subprocess.TimeoutExpired:
        return {"ran": False, "why": "timeout"}
    tail = (p.stdout + p.stderr)[-1500:]
    return {"ran": True, "rc": p.returncode, "clean": p.returncode == 0 and "ERROR SUMMARY: 0" in tail,
            "s": time.time() - t0, "tail": tail}


# ---------------------------------------------------------------------------------------------
# the run

class Run:
    """One run's report (saved after every step), its deadline and its device."""

    def __init__(self, args, name):
        self.args, self.name, self.t0 = args, name, time.time()
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.report = {"config": json.loads(args.config) if args.config else {},
                       "accuracy": [], "timing": [], "errors": []}
        self.meta = dict(device=torch.cuda.get_device_name() if self.cuda else
                         "cpu (Triton interpreter)", torch=torch.__version__,
                         triton=getattr(tg.triton, "__version__", None))

    def left(self):
        return self.args.deadline - (time.time() - self.t0)

    def save(self):
        self.report["wall_s"] = time.time() - self.t0
        _results.write(self.name, self.device.type, self.report, self.args.json, **self.meta)

    def step(self, what, fn, *a, **kw):
        """fn(*a, **kw); an exception is recorded in the report's errors (and printed), not
        raised, and gives None."""
        try:
            return fn(*a, **kw)
        except Exception:
            self.report["errors"].append(f"{what}: {traceback.format_exc()}")
            print(self.report["errors"][-1], flush=True)
            return None
        finally:
            if self.cuda:
                torch.cuda.empty_cache()

    def accuracy(self, kind, shape, dname, k=0, gamma=True):
        if self.args.no_accuracy or self.left() < 20:
            return
        what = f"accuracy {kind} {shape} {dname} k={k} gamma={gamma}"
        r = (self.step(what, accuracy_post, shape, dname, device=self.device) if kind == "post"
             else self.step(what, accuracy_pre, shape, dname, k, gamma, device=self.device))
        if r is None:
            return
        errs, ok, same = r
        acc = self.report["accuracy"]
        acc.append(dict(kind=kind, shape=shape, dtype=dname, k=k, gamma=gamma, ok=ok,
                        bitwise=same, errs=errs))
        self.report["accuracy_all_ok"] = all(a["ok"] for a in acc)
        self.report["bitwise_all"] = all(a["bitwise"] for a in acc)
        self.save()
        worst = max((e for e in errs if not e.startswith("margin")),
                    key=lambda e: errs[e] / tolerance(e, dname))
        print(f"{kind} k={k} {str(shape):20s} {dname} gamma={gamma!s:5s} ok={ok} bitwise={same} "
              f"worst={worst} " + " ".join(f"{a}={b:.1e}" for a, b in errs.items()) +
              f" {time.time() - self.t0:.0f}s", flush=True)

    def timing(self, fn, shape, bw, table):
        if self.left() < 60:
            print("deadline: skipping timing", shape, flush=True)
            return
        do_compile = not self.args.no_compile and self.left() > 150
        r = self.step(f"timing {shape}", fn, shape, bw, do_compile)
        if r is None:
            return
        self.report["timing"].append(r)
        self.report["table"] = table(self.report["timing"])
        self.save()
        print(self.report["table"], f"{time.time() - self.t0:.0f}s", flush=True)

    def bandwidth(self):
        bw = copy_bandwidth()
        self.report["copy_TBps"] = bw / 1e12
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
        return bw

    def failed(self):
        r = self.report
        return bool(r["errors"]) or not all(a["ok"] and a["bitwise"] for a in r["accuracy"])


def run_pre(run):
    args = run.args
    realistic = [] if not run.cuda else [HEADLINE] if args.quick else REALISTIC
    odd = ODD if run.cuda else TINY
    for shape in realistic + odd:
        for dname in DTYPES:
            for gam in ((True, False) if shape in odd and dname != "fp16" else (True,)):
                run.accuracy("pre", shape, dname, 0, gam)
    if not run.cuda:
        return
    if not args.no_sanitize:
        mc = run.report["memcheck"] = run_sanitizer(args.config, min(300, max(10, run.left())))
        print("memcheck:", {k: v for k, v in mc.items() if k != "tail"})
        print(mc.get("tail", "")[-600:], flush=True)
        run.save()
    bw = run.bandwidth()
    for shape in realistic:
        run.timing(timing_pre, shape, bw, pre_table)


def run_sinkhorn_post(run):
    head = HEADLINE if run.cuda else TINY[-1]
    run.accuracy("post", head, "bf16")
    run.accuracy("pre", head, "bf16", 20)
    if run.cuda:
        bw = run.bandwidth()
        run.timing(timing_sinkhorn_post, head, bw, sinkhorn_post_table)
    odd = ODD_SINKHORN_POST if run.cuda else TINY_SINKHORN_POST
    for shape, dname in odd:
        run.accuracy("post", shape, dname)
    if run.cuda:
        run.accuracy("post", REALISTIC[0], "bf16")
    for k in (1, 3, 20):
        for shape, dname in odd:
            run.accuracy("pre", shape, dname, k)
    if run.cuda and not run.args.quick:
        for shape in REALISTIC:
            if shape != head:
                run.timing(timing_sinkhorn_post, shape, bw, sinkhorn_post_table)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sinkhorn-post", action="store_true",
                    help="the post operator and pre with Sinkhorn (k = 1, 3, 20)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the accuracy cases at tiny shapes on Triton's interpreter "
                         "(TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="one realistic shape only")
    ap.add_argument("--no-accuracy", action="store_true",
                    help="timings only (no accuracy or repeatability cases)")
    ap.add_argument("--no-sanitize", action="store_true", help="no compute-sanitizer memcheck")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile baseline")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds: start no new case after this (the JSON is saved as it goes)")
    ap.add_argument("--config", help="JSON {set_config key: value} applied to every call")
    ap.add_argument("--json", help="where to write the JSON")
    ap.add_argument("--sanitize-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        tg.set_config(**json.loads(args.config))
    if args.sanitize_child:
        return sanitize_child()
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        ap.error("--device cpu runs the kernels on Triton's interpreter: set TRITON_INTERPRET=1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (--device cpu runs the accuracy cases on the interpreter)")
    try:   # each shape (and k) compiles its own graph
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except AttributeError:
        pass
    run = Run(args, "gpu_suite_sinkhorn_post" if args.sinkhorn_post else "gpu_suite")
    print(run.meta, flush=True)
    (run_sinkhorn_post if args.sinkhorn_post else run_pre)(run)
    run.save()
    r = run.report
    print(f"accuracy all ok: {r.get('accuracy_all_ok')}, bitwise: {r.get('bitwise_all')}, "
          f"errors: {len(r['errors'])}, total {time.time() - run.t0:.0f}s", flush=True)
    return 1 if run.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
