"""Precision pieces of the backward column kernel against its time, in one device call.

    python3 bench/gpu_pieces.py [--deadline S] [--no-accuracy] [--variants JSON]

For each variant of ``w_pieces`` / ``p_pieces`` (bf16 pieces of dm and phi for ``w = dm @ phi``,
of dm and x for ``P = dm^T @ x``; docs/triton.md, "Precision") and a few column-kernel blocks:
the errors of every backward output against float64 at the realistic shapes and at short rows,
bitwise repeatability, the CUDA-graph time of the backward, each kernel's time, and the column
kernel's registers / spills / shared memory. Prints one line per (variant, shape) and writes
$OUT/gpu_pieces.json (or bench/results/ when $OUT is unset). ``--variants '{"name": {...}}'``
replaces the built-in list (any set_config keys, and "dtype": "fp16" or "fp32" for x; bf16
by default); ``--no-accuracy`` times the realistic shapes
only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import (tg, accuracy, bench_graph, kernel_ms, backward_args,  # noqa: E402
                       make_inputs, NORM_EPS, HC_EPS, ROOT, DT)

SHAPES = [(4, 4096, 4, 4096), (1, 4096, 4, 2560), (2, 4096, 4, 7168)]
SHORT = [(1, 3, 4, 64), (1, 1, 2, 130), (1, 5, 3, 1000), (1, 37, 4, 130), (1, 2, 8, 36)]
VARIANTS = {
    "w22_p31": dict(w_pieces=(2, 2), p_pieces=(3, 1)),
    "w12_p31": dict(w_pieces=(1, 2), p_pieces=(3, 1)),
    "w21_p31": dict(w_pieces=(2, 1), p_pieces=(3, 1)),
    "w11_p31": dict(w_pieces=(1, 1), p_pieces=(3, 1)),
    "w22_p21": dict(w_pieces=(2, 2), p_pieces=(2, 1)),
    "w21_p21": dict(w_pieces=(2, 1), p_pieces=(2, 1)),
    "w11_p21": dict(w_pieces=(1, 1), p_pieces=(2, 1)),
    "w11_p21_bt64": dict(w_pieces=(1, 1), p_pieces=(2, 1), col_bt=64),
    "w11_p21_occ5": dict(w_pieces=(1, 1), p_pieces=(2, 1), col_occ=5),
    "w11_p21_bd128w8": dict(w_pieces=(1, 1), p_pieces=(2, 1), col_bd=128, col_warps=8,
                            col_occ=2),
}


def kernel_stats():
    """{kernel: [(n_regs, n_spills, shared bytes), ...]} of every compiled backward variant, in
    compile order."""
    out = {}
    for name in ("_pre_bwd_row_kernel", "_pre_bwd_col_kernel"):
        try:
            out[name] = [(k.n_regs, k.n_spills, k.metadata.shared)
                         for cache in getattr(tg, name).device_caches.values()
                         for k in cache[0].values()]
        except Exception as exc:   # the attribute names of another Triton version
            out[name] = [repr(exc)[:120]]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deadline", type=float, default=1e9)
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--variants", help="JSON object: name -> set_config keywords")
    args = ap.parse_args()
    variants = VARIANTS if not args.variants else {
        k: {kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()}
        for k, v in json.loads(args.variants).items()}
    t0 = time.time()
    rows = []
    out = os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"),
                       "gpu_pieces.json")
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    for vname, cfg in variants.items():
        cfg = dict(cfg)
        dname = cfg.pop("dtype", "bf16")
        seen = {k: len(v) for k, v in kernel_stats().items()}
        for shape in SHAPES + ([] if args.no_accuracy else SHORT):
            if time.time() - t0 > args.deadline:
                print("deadline", flush=True)
                break
            tg.set_config(**cfg)
            try:
                r = dict(variant=vname, shape=shape, dtype=dname)
                if not args.no_accuracy:
                    errs, ok, same = accuracy(shape, dname)
                    r.update(ok=ok, bitwise=same, errs={
                        k: errs[k] for k in ("dx", "dphi", "dgamma", "dalpha", "dbias")})
                if shape in SHAPES:
                    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(
                        *shape, DT[dname], seed=5)
                    fo = tg.forward(x, phi, alpha, bias, g, **kw)
                    bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
                    fn = lambda: tg.backward(*bargs, **kw)  # noqa: E731
                    r["graph_ms"] = bench_graph(fn, 100)
                    r["kernels"] = kernel_ms(fn)
                    del x, dh_in, fo, bargs
                    torch.cuda.empty_cache()
            except Exception as exc:
                r = dict(variant=vname, shape=shape, error=repr(exc)[:300])
            finally:
                tg.set_config()
            rows.append(r)
            print(vname, shape, {k: v for k, v in r.items() if k not in ("variant", "shape")},
                  flush=True)
        new = {k: v[seen[k]:] for k, v in kernel_stats().items()}
        fit = {str(k[:2]): v for k, v in getattr(tg, "_RESIDENT", {}).items()}
        print(vname, "new compiles (regs, spills, shared):", new, "resident:", fit, flush=True)
        rows.append(dict(variant=vname, kernel_stats=new, resident=fit))
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
