"""The Triton backend at a very large token count, checked against the float64 reference.

    python3 bench/gpu_long_tokens.py [--shape B,S,n,D] [--dtype bf16|fp16|fp32]
                                     [--param-dtype fp32|bf16|fp16] [--workers N] [--out F]

Runs ``mhc_multi.forward`` and ``mhc_multi.backward`` (backend="triton") once at a T = B*S far
beyond the CUDA grid limit of 65535 programs on axes 1 and 2 (default (1, 600017, 4, 1024):
T*n*D = 2.46e9 elements, past int32 offsets too), then evaluates the float64 reference
(``numpy_ref.forward64`` / ``backward64``, the oracle) in token chunks on the CPU, in
``--workers`` processes, and prints each output's relative Frobenius error beside its bound
from ``mhc_multi.tolerances``. The backward is judged on the reference's own intermediates
(rounded to fp32), as ``crosscheck`` does. Writes JSON (to $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np
import torch

import mhc_multi
from mhc_multi.backends import numpy_ref
from mhc_multi.tolerances import tolerance

KW = dict(norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=0)
CHUNK = 8192
_G: dict = {}   # the host copies, shared with the forked workers


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _sq(got, ref64):
    """(sum of squared differences, sum of squared reference values) in float64."""
    d = numpy_ref._to64(got) - ref64
    return float(np.vdot(d, d)), float(np.vdot(ref64, ref64))


def _chunk(lo: int) -> dict:
    g = _G
    hi = min(lo + CHUNK, g["T"])
    x = g["x"][lo:hi]
    out = numpy_ref.forward64(x, *g["params"], **KW)
    res = {name: _sq(g[name][lo:hi], ref) for name, ref in
           zip(("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre"), out)}
    mids = [a.astype(np.float32) for a in (out[3], out[4], out[5], out[1])]
    g_ref = numpy_ref.backward64(x, *g["params"][:3], *mids, g["dh_in"][lo:hi],
                                 g["dh_post"][lo:hi], g["dh_res"][lo:hi], g["params"][3], **KW)
    res["dx"] = _sq(g["dx"][lo:hi], g_ref[0])
    res["sums"] = g_ref[1:]           # dphi, dalpha, dbias, dgamma of these tokens, float64
    return res


def _reference(T: int, workers: int, fn):
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(fn, range(0, T, CHUNK), chunksize=1)


def _mids(lo: int):
    g = _G
    hi = min(lo + CHUNK, g["T"])
    out = numpy_ref.forward64(g["x"][lo:hi], *g["params"], **KW)
    return lo, [a.astype(np.float32) for a in (out[3], out[4], out[5], out[1])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,600017,4,1024", help="B,S,n,D of x")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="x's dtype")
    ap.add_argument("--param-dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                    help="phi, alpha, bias, gamma")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                    help="CPU processes evaluating the float64 reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test on the interpreter")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_long_tokens-*.json)")
    a = ap.parse_args(argv)
    B, S, n, D = (int(v) for v in a.shape.split(","))
    T, F = B * S, n * n + 2 * n
    t0 = time.time()
    torch.manual_seed(a.seed)
    x, phi, alpha, bias, gamma = mhc_multi.random_inputs((1, 1, n, D), a.dtype,
                                                         param_dtype=a.param_dtype, seed=a.seed,
                                                         device=a.device)
    dt = x.dtype
    # x at the realistic scale of random_inputs (per-token scales), drawn on the GPU
    x = (torch.randn(B, S, n, D, device=a.device) *
         torch.exp(torch.empty(B, S, 1, 1, device=a.device).uniform_(-1.386, 1.386))).to(dt)
    _G.update(T=T, x=_np(x).reshape(T, n, D),
              params=[None if p is None else numpy_ref._to64(_np(p)) for p in
                      (phi, alpha, bias, gamma)])
    # 1. the reference forward's intermediates (the backward's inputs), in chunks
    mids = dict(_reference(T, a.workers, _mids))
    cat = [np.concatenate([mids[lo][i] for lo in sorted(mids)]) for i in range(4)]
    inv_rms, h_mix, h_pre, h_post = (torch.from_numpy(c).to(a.device) for c in cat)
    dh_in = torch.randn(B, S, D, device=a.device).to(dt)
    dh_post = torch.randn(B, S, n, device=a.device)
    dh_res = torch.randn(B, S, n, n, device=a.device)
    t1 = time.time()
    # 2. the GPU run (poisoned outputs: an unwritten element is NaN and fails)
    os.environ["MHC_MULTI_POISON"] = "1"
    from mhc_multi.backends import _common
    _common.POISON = True
    out = mhc_multi.forward(x, phi, alpha, bias, gamma, backend="triton")
    grads = mhc_multi.backward(x, phi, alpha, bias, inv_rms.reshape(B, S),
                               h_mix.reshape(B, S, F), h_pre.reshape(B, S, n),
                               h_post.reshape(B, S, n), dh_in, dh_post, dh_res, gamma,
                               backend="triton")
    if a.device == "cuda":
        torch.cuda.synchronize()
    t2 = time.time()
    for name, v in zip(out._fields, out):
        _G[name] = _np(v).reshape((T,) + tuple(v.shape[2:]))
    _G.update(dx=_np(grads.dx).reshape(T, n, D), dh_in=_np(dh_in).reshape(T, D),
              dh_post=_np(dh_post).reshape(T, n), dh_res=_np(dh_res).reshape(T, n, n))
    del x, out
    # 3. the reference, chunk by chunk, and the errors
    parts = _reference(T, a.workers, _chunk)
    rows = []
    for name in ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre", "dx"):
        dd, rr = (sum(p[name][i] for p in parts) for i in (0, 1))
        rows.append((name, float(np.sqrt(dd / rr))))
    pdt = {"dphi": phi, "dalpha": alpha, "dbias": bias, "dgamma": gamma}
    for i, name in enumerate(("dphi", "dalpha", "dbias", "dgamma")):
        if parts[0]["sums"][i] is None:
            continue
        ref = sum(p["sums"][i] for p in parts)
        got = numpy_ref._to64(_np(getattr(grads, name)))
        rows.append((name, float(np.linalg.norm(got - ref) / np.linalg.norm(ref))))
    t3 = time.time()
    ok = True
    print(f"shape {(B, S, n, D)}  T={T}  T*n*D={T * n * D:.3e}  x={a.dtype}  "
          f"params={a.param_dtype}  GPU forward+backward {t2 - t1:.1f} s  "
          f"reference {t3 - t2 + t1 - t0:.0f} s")
    result = []
    for name, err in rows:
        pd = mhc_multi.checks.dtype_name(pdt[name]) if name in pdt else a.param_dtype
        bound = tolerance(name, a.dtype, pd)
        ok &= err <= bound
        result.append(dict(output=name, error=err, bound=bound, ok=err <= bound))
        print(f"{name:<8} {err:10.2e} {bound:8.0e}  {'ok' if err <= bound else 'FAIL'}")
    print("all ok" if ok else "FAILED")
    path = a.out or os.path.join(os.environ.get("OUT", "."),
                                 f"gpu_long_tokens-{a.dtype}-{T}-{n}-{D}.json")
    with open(path, "w") as f:
        json.dump(dict(shape=[B, S, n, D], dtype=a.dtype, param_dtype=a.param_dtype,
                       device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu", rows=result, ok=ok,
                       gpu_s=t2 - t1), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
