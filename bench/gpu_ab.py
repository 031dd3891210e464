"""A/B of this checkout's Triton backend against another version of it, in one process on the
same inputs (per-kernel device times, CUDA-graph totals, agreement).

    mkdir /tmp/other && git archive REV backends/triton | tar -x -C /tmp/other   # a package
    python3 bench/gpu_ab.py /tmp/other/backends/triton [--flush] [--shapes B,S,n,D ...]
    git show REV:backends/triton_gpu.py > /tmp/other.py    # or a one-file version (older REVs)
    python3 bench/gpu_ab.py /tmp/other.py [--dtypes bf16,fp32]

The other version is loaded as a sibling of the installed backend, mhc_multi.backends._ab_other
(it imports the backends' _common).
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
from _gpu import (tg, make_inputs, bench_graph, kernel_ms, rel,  # noqa: E402
                  backward_args, NORM_EPS, HC_EPS, DT)

SHAPES = [(4, 4096, 4, 4096), (1, 4096, 4, 2560), (2, 4096, 4, 7168)]


def load_other(path):
    pkg = tg.__name__.rsplit(".", 1)[0]                       # mhc_multi.backends
    backends = os.path.dirname(os.path.dirname(tg.__file__))   # its folder
    if os.path.isdir(path):
        shutil.rmtree(os.path.join(backends, "_ab_other"), ignore_errors=True)
        shutil.copytree(path, os.path.join(backends, "_ab_other"))
    else:
        shutil.copy(path, os.path.join(backends, "_ab_other.py"))
    return importlib.import_module(pkg + "._ab_other")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("other", help="the other version: a backends/triton folder, or one file")
    ap.add_argument("--flush", action="store_true",
                    help="also time each call after writing 256 MB (L2 flushed)")
    ap.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES],
                    help="B,S,n,D (default: the three realistic shapes)")
    ap.add_argument("--dtypes", default="bf16", help="x dtypes, comma-separated")
    args = ap.parse_args()
    mods = [("this", tg), ("other", load_other(args.other))]
    junk = torch.empty(2 ** 28, dtype=torch.uint8, device="cuda")
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    rows = []
    cases = [(tuple(int(v) for v in sh.split(",")), dt) for sh in args.shapes
             for dt in args.dtypes.split(",")]
    for shape, dname in cases:
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(*shape, DT[dname], seed=5)
        ref = {}
        for name, mod in mods:
            fo = mod.forward(x, phi, alpha, bias, g, **kw)
            bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
            bo = mod.backward(*bargs, **kw)
            for kind, fn, out in (("fwd", lambda: mod.forward(x, phi, alpha, bias, g, **kw), fo),
                                  ("bwd", lambda: mod.backward(*bargs, **kw), bo)):
                ref.setdefault(kind, out)
                diff = max(rel(a, b.double()) for a, b in zip(out, ref[kind]) if a is not None)
                same = all(torch.equal(a, b) for a, b in zip(out, ref[kind]) if a is not None)
                r = dict(shape=shape, dtype=dname, kind=kind, version=name,
                         graph_ms=bench_graph(fn, 100), kernels=kernel_ms(fn),
                         diff_vs_this=diff, bitwise_vs_this=same)
                if args.flush:
                    r["kernels_flushed"] = kernel_ms(lambda: (junk.zero_(), fn()))
                rows.append(r)
                print(f"{shape} {dname} {kind} {name:5s} graph {r['graph_ms']:.4f} ms "
                      f"diff {diff:.1e} "
                      f"{'bitwise' if same else 'NOT bitwise'} "
                      f"{r['kernels']}" + (f"\n      flushed {r['kernels_flushed']}"
                                           if args.flush else ""), flush=True)
        del x, dh_in, fo, bo, bargs
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT") or "/tmp", "gpu_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
