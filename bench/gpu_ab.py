"""A/B of this checkout's Triton backend against another version of backends/triton_gpu.py, in
one process on the same inputs (per-kernel device times, CUDA-graph totals, agreement).

    git show REV:backends/triton_gpu.py > /tmp/other.py     # on this machine
    python3 bench/gpu_ab.py /tmp/other.py [--flush]          # on the GPU

The other file is loaded as a sibling module of the installed backend (it imports ._common).
--flush also times each call after writing 256 MB (L2 holds no x, and no dirty dx lines from
the previous call are left to write back). Prints one line per (shape, pass, version) and
writes $OUT/gpu_ab.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import (tg, make_inputs, bench_graph, kernel_ms, rel,  # noqa: E402
                       backward_args, NORM_EPS, HC_EPS)

SHAPES = [(4, 4096, 4, 4096), (1, 4096, 4, 2560), (2, 4096, 4, 7168)]


def load_other(path):
    pkg = tg.__name__.rsplit(".", 1)[0]
    shutil.copy(path, os.path.join(os.path.dirname(tg.__file__), "_ab_other.py"))
    return importlib.import_module(pkg + "._ab_other")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("other")
    ap.add_argument("--flush", action="store_true")
    args = ap.parse_args()
    mods = [("this", tg), ("other", load_other(args.other))]
    junk = torch.empty(2 ** 28, dtype=torch.uint8, device="cuda")
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    rows = []
    for shape in SHAPES:
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(*shape, torch.bfloat16,
                                                                     seed=5)
        ref = {}
        for name, mod in mods:
            fo = mod.forward(x, phi, alpha, bias, g, **kw)
            bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
            bo = mod.backward(*bargs, **kw)
            for kind, fn, out in (("fwd", lambda: mod.forward(x, phi, alpha, bias, g, **kw), fo),
                                  ("bwd", lambda: mod.backward(*bargs, **kw), bo)):
                ref.setdefault(kind, out)
                diff = max(rel(a, b.double()) for a, b in zip(out, ref[kind]) if a is not None)
                r = dict(shape=shape, kind=kind, version=name, graph_ms=bench_graph(fn, 100),
                         kernels=kernel_ms(fn),
                         diff_vs_this=diff)
                if args.flush:
                    r["kernels_flushed"] = kernel_ms(lambda: (junk.zero_(), fn()))
                rows.append(r)
                print(f"{shape} {kind} {name:5s} graph {r['graph_ms']:.4f} ms diff {diff:.1e} "
                      f"{r['kernels']}" + (f"\n      flushed {r['kernels_flushed']}"
                                           if args.flush else ""), flush=True)
        del x, dh_in, fo, bo, bargs
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT") or "/tmp", "gpu_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
