"""Quick GPU timing of the Triton backend at the realistic shapes, in one device call: forward
and backward graph times (CUDA graph, median) and each kernel's device time.

    python3 bench/gpu_quick.py [--dtype bf16]

For A/B between commits: prints one line per (shape, pass), writes $OUT/gpu_quick.json.
The acceptance table is bench/gpu_suite.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import (tg, bench_graph, kernel_times, make_inputs, copy_bandwidth,  # noqa: E402
                       NORM_EPS, HC_EPS, DT)

SHAPES = [(1, 4096, 4, 2560), (4, 4096, 4, 4096), (2, 4096, 4, 7168)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    rows = [dict(copy_TBps=copy_bandwidth())]
    print(rows[0], flush=True)
    for shape in SHAPES:
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(*shape, DT[args.dtype],
                                                                     seed=5)
        fo = tg.forward(x, phi, alpha, bias, g, **kw)
        bargs = (x, phi, alpha, bias, *fo[3:6], fo[1], dh_in, dh_post, dh_res, g)
        for name, fn in (("fwd", lambda: tg.forward(x, phi, alpha, bias, g, **kw)),
                         ("bwd", lambda: tg.backward(*bargs, **kw))):
            r = dict(shape=shape, pass_=name, graph_ms=round(bench_graph(fn), 4),
                     kernels={k[:28]: round(v, 4) for k, v in kernel_times(fn, 20).items()})
            print(r, flush=True)
            rows.append(r)
        del x, dh_in, fo, bargs
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT") or ".", "gpu_quick.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
