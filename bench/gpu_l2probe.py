"""Does the backward column kernel run faster when its x and dh_in are still in L2?

    python3 bench/gpu_l2probe.py

For a few token counts at n = 4, D = 4096 (bf16), the column kernel's device time per token,
(warm) as the backward runs it, right after the row kernel read the same x and dh_in, and
(cold) with a 256 MB buffer written between the two kernels (L2 flushed).  If warm is much
faster at token counts whose x + dh_in fit in L2, a design that runs the column work on a
token chunk right after its row work (the second read from L2) can pay; if not, the column
kernel's limit is on chip.  Writes $OUT/gpu_l2probe.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import (tg, make_inputs, kernel_times, backward_args,  # noqa: E402
                       NORM_EPS, HC_EPS)


class _Flushing:
    """Stands in for a JIT kernel: kernel[grid](...) writes the flush buffer first."""

    def __init__(self, kern, buf):
        self.kern, self.buf = kern, buf

    def __getitem__(self, grid):
        launch = self.kern[grid]

        def run(*a, **k):
            self.buf.fill_(1.0)
            return launch(*a, **k)
        return run

    def __getattr__(self, name):
        return getattr(self.kern, name)


def main():
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    buf = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda")
    col = tg._pre_bwd_col_kernel
    rows = []
    for T in (256, 512, 1024, 2048, 16384):
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(1, T, 4, 4096,
                                                                     torch.bfloat16, seed=3)
        fo = tg.forward(x, phi, alpha, bias, g, **kw)
        bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
        fn = lambda: tg.backward(*bargs, **kw)  # noqa: E731
        r = dict(T=T)
        for mode in ("warm", "cold"):
            tg._pre_bwd_col_kernel = col if mode == "warm" else _Flushing(col, buf)
            try:
                kt = kernel_times(fn, 30)
            finally:
                tg._pre_bwd_col_kernel = col
            c = kt.get("_pre_bwd_col_kernel", float("nan"))
            rr = kt.get("_pre_bwd_row_kernel", float("nan"))
            r[mode] = dict(col_ms=round(c, 4), row_ms=round(rr, 4),
                           col_us_per_1k_tokens=round(c / T * 1e6, 2))
        r["cold_over_warm"] = round(r["cold"]["col_ms"] / r["warm"]["col_ms"], 3)
        print(r, flush=True)
        rows.append(r)
    out = os.path.join(os.environ.get("OUT") or ".", "gpu_l2probe.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
