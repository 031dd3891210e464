"""Benchmark of the Numba CPU backend: numba vs PyTorch eager fp32 vs the NumPy reference.

bf16 x, fp32 parameters, shapes (1,1024,4,2048) and (2,2048,4,4096). Rows: the pre operator's
forward / backward, the same with Sinkhorn k = 20 (numba only: its cost over k = 0), and the post
operator's forward / backward. Runs are interleaved (numba, eager, numpy, numba,
eager, ...) and the median of each is reported, so load from other processes hits every
contender alike. Also measures, in a fresh subprocess, the peak RSS of one
backward at (2,2048,4,4096) against the bytes of its inputs and outputs.

    .venv/bin/python bench/bench_numba.py [--reps N] [--numpy-reps N] [--quick]

Writes bench/results/numba.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mhc_multi.backends import numba as nb  # noqa: E402
from mhc_multi.backends import numpy_ref as ref  # noqa: E402

KW = dict(norm_eps=1e-6, hc_eps=1e-6)
SHAPES = [(1, 1024, 4, 2048), (2, 2048, 4, 4096)]


def make_inputs(T, n, D, seed=0):
    rng = np.random.default_rng(seed)
    F = n * n + 2 * n
    bf = lambda a: ref._cast(a, np.uint16)  # noqa: E731  (exact round-to-nearest-even)
    return dict(
        x=bf(rng.standard_normal((T, n, D))),
        phi=(rng.standard_normal((F, n * D)) / np.sqrt(n * D)).astype(np.float32),
        alpha=(rng.choice([-1.0, 1.0], 3) * rng.uniform(0.5, 1.5, 3)).astype(np.float32),
        bias=(0.1 * rng.standard_normal(F)).astype(np.float32),
        gamma=(1 + 0.1 * rng.standard_normal((n, D))).astype(np.float32),
        dh_in=bf(rng.standard_normal((T, D))),
        dh_post=rng.standard_normal((T, n)).astype(np.float32),
        dh_res=rng.standard_normal((T, n, n)).astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------
# PyTorch eager fp32: the same math, written the obvious way (no autograd, no fusion)

def torch_impl():
    import torch

    def fwd(x, phi, alpha, bias, gamma, norm_eps, hc_eps):
        T, n, D = x.shape
        xf = x.float()
        v = xf.reshape(T, n * D)
        r = torch.rsqrt((v * v).mean(1) + norm_eps)
        m = (v * gamma.reshape(1, -1)) @ phi.T
        u = r[:, None] * m
        h_pre = torch.sigmoid(alpha[0] * u[:, :n] + bias[:n]) + hc_eps
        h_post = 2 * torch.sigmoid(alpha[1] * u[:, n:2 * n] + bias[n:2 * n])
        h_res = (alpha[2] * u[:, 2 * n:] + bias[2 * n:]).reshape(T, n, n)
        h_in = torch.einsum("ti,tid->td", h_pre, xf).to(x.dtype)
        return h_in, h_post, h_res, r, m, h_pre

    def bwd(x, phi, alpha, bias, r, m, h_pre, h_post, dh_in, dh_post, dh_res, gamma, hc_eps):
        T, n, D = x.shape
        xf = x.float()
        v = xf.reshape(T, n * D)
        g = gamma.reshape(1, -1)
        dhi = dh_in.float()
        dh_pre = torch.einsum("td,tid->ti", dhi, xf)
        s = h_pre - hc_eps
        dp = dh_pre * s * (1 - s)
        dq = dh_post * h_post * (1 - h_post / 2)
        dR = dh_res.reshape(T, n * n)
        e = torch.cat([alpha[0] * dp, alpha[1] * dq, alpha[2] * dR], 1)
        dm = r[:, None] * e
        w = dm @ phi
        dr = (e * m).sum(1)
        dv = w * g - (dr * r ** 3 / (n * D))[:, None] * v + (h_pre[:, :, None] * dhi[:, None, :]).reshape(T, -1)
        u = r[:, None] * m
        dalpha = torch.stack([(dp * u[:, :n]).sum(), (dq * u[:, n:2 * n]).sum(), (dR * u[:, 2 * n:]).sum()])
        dbias = torch.cat([dp.sum(0), dq.sum(0), dR.sum(0)])
        vg = v * g
        dphi = dm.T @ vg
        dgamma = (v * w).sum(0).reshape(n, D)
        return dv.reshape(T, n, D).to(x.dtype), dphi, dalpha, dbias, dgamma

    def post_fwd(x, f_out, h_post, h_res):
        xf = x.float()
        return (torch.einsum("tij,tjd->tid", h_res, xf)
                + h_post[:, :, None] * f_out.float()[:, None, :]).to(x.dtype)

    def post_bwd(x, f_out, h_post, h_res, dx_next):
        xf, ff, g = x.float(), f_out.float(), dx_next.float()
        dx = torch.einsum("tij,tid->tjd", h_res, g).to(x.dtype)
        df_out = torch.einsum("ti,tid->td", h_post, g).to(x.dtype)
        dh_post = torch.einsum("tid,td->ti", g, ff)
        dh_res = torch.einsum("tid,tjd->tij", g, xf)
        return dx, df_out, dh_post, dh_res

    return torch, fwd, bwd, post_fwd, post_bwd


def bench_shape(shape, reps, numpy_reps):
    torch, tfwd, tbwd, tpf, tpb = torch_impl()
    torch.set_num_threads(os.cpu_count() or 2)
    B, S, n, D = shape
    T = B * S
    a = make_inputs(T, n, D)
    # numba
    nf = lambda: nb.forward(a["x"], a["phi"], a["alpha"], a["bias"], a["gamma"], **KW)  # noqa: E731
    h_in, h_post, h_res, r, m, h_pre = nf()
    nbk = lambda: nb.backward(a["x"], a["phi"], a["alpha"], a["bias"], r, m, h_pre, h_post,  # noqa: E731
                              a["dh_in"], a["dh_post"], a["dh_res"], a["gamma"], **KW)
    nbk()
    # torch eager fp32 (x as real bf16 tensors)
    tx = torch.from_numpy(a["x"].view(np.int16)).view(torch.bfloat16)
    tdh = torch.from_numpy(a["dh_in"].view(np.int16)).view(torch.bfloat16)
    tp = {k: torch.from_numpy(a[k]) for k in ("phi", "alpha", "bias", "gamma", "dh_post", "dh_res")}
    tr, tm, thp, thpo = (torch.from_numpy(z) for z in (r, m, h_pre, h_post))
    tf = lambda: tfwd(tx, tp["phi"], tp["alpha"], tp["bias"], tp["gamma"], 1e-6, 1e-6)  # noqa: E731
    tb = lambda: tbwd(tx, tp["phi"], tp["alpha"], tp["bias"], tr, tm, thp, thpo, tdh,  # noqa: E731
                      tp["dh_post"], tp["dh_res"], tp["gamma"], 1e-6)
    tf(), tb()
    # numpy reference
    rf = lambda: ref.forward(a["x"], a["phi"], a["alpha"], a["bias"], a["gamma"], **KW)  # noqa: E731
    rb = lambda: ref.backward(a["x"], a["phi"], a["alpha"], a["bias"], r, m, h_pre, h_post,  # noqa: E731
                              a["dh_in"], a["dh_post"], a["dh_res"], a["gamma"], **KW)
    # Sinkhorn k = 20 (numba only; compared with numba k = 0)
    nf20 = lambda: nb.forward(a["x"], a["phi"], a["alpha"], a["bias"], a["gamma"],  # noqa: E731
                              sinkhorn_iters=20, **KW)
    nb20 = lambda: nb.backward(a["x"], a["phi"], a["alpha"], a["bias"], r, m, h_pre, h_post,  # noqa: E731
                               a["dh_in"], a["dh_post"], a["dh_res"], a["gamma"],
                               sinkhorn_iters=20, **KW)
    nf20(), nb20()
    # the post operator: f_out [T, D] and dx_next [T, n, D] in bf16, gates fp32
    rng = np.random.default_rng(1)
    f_out = ref._cast(rng.standard_normal((T, D)), np.uint16)
    dx_next = ref._cast(rng.standard_normal((T, n, D)), np.uint16)
    hres = (np.eye(n) + 0.1 * rng.standard_normal((T, n, n))).astype(np.float32)
    npf = lambda: nb.post_forward(a["x"], f_out, h_post, hres)  # noqa: E731
    npb = lambda: nb.post_backward(a["x"], f_out, h_post, hres, dx_next)  # noqa: E731
    npf(), npb()
    tfo = torch.from_numpy(f_out.view(np.int16)).view(torch.bfloat16)
    tdxn = torch.from_numpy(dx_next.view(np.int16)).view(torch.bfloat16)
    thres = torch.from_numpy(hres)
    tpf_ = lambda: tpf(tx, tfo, thpo, thres)  # noqa: E731
    tpb_ = lambda: tpb(tx, tfo, thpo, thres, tdxn)  # noqa: E731
    tpf_(), tpb_()
    rpf = lambda: ref.post_forward(a["x"], f_out, h_post, hres)  # noqa: E731
    rpb = lambda: ref.post_backward(a["x"], f_out, h_post, hres, dx_next)  # noqa: E731
    keys = [f"{w}_{p}" for p in ("fwd", "bwd", "post_fwd", "post_bwd") for w in ("numba", "eager", "numpy")]
    keys += ["numba_fwd_sk20", "numba_bwd_sk20"]
    times = {k: [] for k in keys}

    def timed(key, fn):
        t0 = time.perf_counter()
        fn()
        times[key].append((time.perf_counter() - t0) * 1e3)

    with torch.no_grad():
        for i in range(reps):
            timed("numba_fwd", nf)
            timed("eager_fwd", tf)
            timed("numba_bwd", nbk)
            timed("eager_bwd", tb)
            timed("numba_fwd_sk20", nf20)
            timed("numba_bwd_sk20", nb20)
            timed("numba_post_fwd", npf)
            timed("eager_post_fwd", tpf_)
            timed("numba_post_bwd", npb)
            timed("eager_post_bwd", tpb_)
            if i < numpy_reps:
                timed("numpy_fwd", rf)
                timed("numpy_bwd", rb)
                timed("numpy_post_fwd", rpf)
                timed("numpy_post_bwd", rpb)
    med = {k: float(np.median(v)) if v else None for k, v in times.items()}
    return {"shape": list(shape), "reps": reps, "numpy_reps": numpy_reps, "median_ms": med,
            "all_ms": times}


PEAK_CHILD = r"""
import sys, json, numpy as np
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from bench_numba import make_inputs, KW
from mhc_multi.backends import numba as nb
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
B, S, n, D = 2, 2048, 4, 4096
T = B * S
small = make_inputs(4, n, D)           # compile / load the kernels first (small shape)
f = nb.forward(small['x'], small['phi'], small['alpha'], small['bias'], small['gamma'], **KW)
nb.backward(small['x'], small['phi'], small['alpha'], small['bias'], f[3], f[4], f[5], f[1],
            small['dh_in'], small['dh_post'], small['dh_res'], small['gamma'], **KW)
a = make_inputs(T, n, D)
f = nb.forward(a['x'], a['phi'], a['alpha'], a['bias'], a['gamma'], **KW)
ins = [a['x'], a['phi'], a['alpha'], a['bias'], f[3], f[4], f[5], f[1], a['dh_in'], a['dh_post'],
       a['dh_res'], a['gamma']]
# reset the high-water mark to the current RSS (Linux: write 5 to clear_refs)
try:
    open('/proc/self/clear_refs', 'w').write('5')
    reset = True
except OSError:
    reset = False
before_rss, before_hwm = rss(), hwm()
out = nb.backward(*ins, **KW)
after_hwm = hwm()
in_bytes = sum(x.nbytes for x in ins)
out_bytes = sum(x.nbytes for x in out if x is not None)
print(json.dumps(dict(hwm_reset=reset, rss_before=before_rss, hwm_before=before_hwm,
                      hwm_after=after_hwm, input_bytes=in_bytes, output_bytes=out_bytes,
                      extra_bytes=after_hwm - before_rss - out_bytes)))
"""


def peak_rss():
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(ROOT), str(ROOT / "bench")],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (numba, eager)")
    p.add_argument("--numpy-reps", type=int, default=3,
                   help="repetitions of the NumPy reference (a third of it at the larger shape)")
    p.add_argument("--quick", action="store_true", help="first shape only, no peak-RSS run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "numba.json"),
                   help="JSON path (default bench/results/numba.json)")
    args = p.parse_args(argv)
    import numba
    import torch
    results = []
    print(f"{'shape':>18} {'pass':>8} {'numba ms':>9} {'eager ms':>9} {'numpy ms':>9} "
          f"{'eager/numba':>11} {'numpy/numba':>11}")
    for shape in SHAPES[:1] if args.quick else SHAPES:
        res = bench_shape(shape, args.reps, args.numpy_reps if shape == SHAPES[0] else
                          max(1, args.numpy_reps // 3))
        med = res["median_ms"]
        for pas in ("fwd", "bwd", "post_fwd", "post_bwd"):
            nbt, et, npt = med[f"numba_{pas}"], med[f"eager_{pas}"], med[f"numpy_{pas}"]
            res[f"speedup_vs_eager_{pas}"] = et / nbt
            res[f"speedup_vs_numpy_{pas}"] = npt / nbt if npt else None
            print(f"{str(tuple(shape)):>18} {pas:>8} {nbt:9.2f} {et:9.2f} {npt or float('nan'):9.1f} "
                  f"{et / nbt:10.2f}x {(npt or float('nan')) / nbt:10.1f}x", flush=True)
        for pas in ("fwd", "bwd"):
            res[f"sk20_over_k0_{pas}"] = med[f"numba_{pas}_sk20"] / med[f"numba_{pas}"]
            print(f"{str(tuple(shape)):>18} {pas + ' k=20':>8} {med[f'numba_{pas}_sk20']:9.2f} ms "
                  f"({res[f'sk20_over_k0_{pas}']:.2f}x numba k=0)", flush=True)
        results.append(res)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "versions": {"numba": numba.__version__, "torch": torch.__version__,
                     "numpy": np.__version__},
        "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
        "x_dtype": "bf16", "param_dtype": "fp32", "results": results,
    }
    if not args.quick:
        pk = peak_rss()
        report["peak_rss_backward_2x2048x4x4096"] = pk
        print(f"peak RSS, backward (2,2048,4,4096): inputs {pk['input_bytes'] / 2**20:.1f} MiB, "
              f"outputs {pk['output_bytes'] / 2**20:.1f} MiB, extra beyond them "
              f"{pk['extra_bytes'] / 2**20:.1f} MiB (limit 64 MiB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
