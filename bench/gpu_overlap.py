"""Can the backward's row work hide under its column work?  (A go/no-go for a one-kernel
backward whose programs run the row part of token chunk k + 1 while others run the column part
of chunk k: docs/performance.md, "Where the backward could go".)

    python3 bench/gpu_overlap.py [--shape B S n D] [--variants JSON]

Two independent problems A and B of the same shape: the column kernel of A and the row kernel
of B (each exactly as the backward launches it, captured by wrapping the kernels), timed in CUDA
graphs alone, one after the other, and side by side on two streams (column first, and row
first).  Side by side near max(column, row) means the row work fits in what the column kernel
leaves idle (DRAM at ~55 %, docs/triton.md); near the sum means it does not.  The column
kernel reads x and dh_in from DRAM here; in a one-kernel design they would come from L2, so
this is the pessimistic side.  Writes $OUT/gpu_overlap.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import (tg, make_inputs, bench_graph, backward_args,  # noqa: E402
                       NORM_EPS, HC_EPS)


class _Recorder:
    """Stands in for a JIT kernel: records the last launch (grid, args, kwargs) and runs it."""

    def __init__(self, kern):
        self.kern, self.last = kern, None

    def __getitem__(self, grid):
        launch = self.kern[grid]

        def run(*a, **k):
            self.last = (grid, a, k)
            return launch(*a, **k)
        return run

    def __getattr__(self, name):
        return getattr(self.kern, name)


def capture(shape, seed):
    """(row launch, column launch, tensors to keep alive) of one backward at ``shape``."""
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(*shape, torch.bfloat16,
                                                                 seed=seed)
    fo = tg.forward(x, phi, alpha, bias, g, **kw)
    bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
    row, col = _Recorder(tg._pre_bwd_row_kernel), _Recorder(tg._pre_bwd_col_kernel)
    tg._pre_bwd_row_kernel, tg._pre_bwd_col_kernel = row, col
    try:
        out = tg.backward(*bargs, **kw)
    finally:
        tg._pre_bwd_row_kernel, tg._pre_bwd_col_kernel = row.kern, col.kern
    (gr, ar, kr), (gc, ac, kc) = row.last, col.last
    return (lambda: row.kern[gr](*ar, **kr)), (lambda: col.kern[gc](*ac, **kc)), (bargs, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=(4, 4096, 4, 4096))
    ap.add_argument("--variants", default='{"rule": {}}',
                    help='set_config per variant, e.g. {"col3": {"col_splits": 3}}')
    args = ap.parse_args()
    rows = []
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for vname, cfg in json.loads(args.variants).items():
        tg.set_config(**cfg)
        row_a, col_a, keep_a = capture(args.shape, 1)
        row_b, col_b, keep_b = capture(args.shape, 2)

        def side_by_side(first, second):
            def fn():
                cur = torch.cuda.current_stream()
                s1.wait_stream(cur)
                s2.wait_stream(cur)
                with torch.cuda.stream(s1):
                    first()
                with torch.cuda.stream(s2):
                    second()
                cur.wait_stream(s1)
                cur.wait_stream(s2)
            return fn

        r = dict(variant=vname, config=cfg, shape=list(args.shape),
                 col_ms=bench_graph(col_a), row_ms=bench_graph(row_b),
                 seq_ms=bench_graph(lambda: (col_a(), row_b())),
                 side_col_first_ms=bench_graph(side_by_side(col_a, row_b)),
                 side_row_first_ms=bench_graph(side_by_side(row_b, col_a)))
        r["sum_ms"] = r["col_ms"] + r["row_ms"]
        r["max_ms"] = max(r["col_ms"], r["row_ms"])
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
              flush=True)
        rows.append(r)
        del keep_a, keep_b
        tg.set_config()
    with open(os.path.join(os.environ.get("OUT") or ".", "gpu_overlap.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
