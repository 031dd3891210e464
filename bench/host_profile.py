"""Host (CPU) time of one forward / backward call of the Triton backend, and where it goes.

    python3 bench/host_profile.py [--shape B S n D] [--calls N]

At small shapes the GPU finishes before the host has launched the next call, so plain
do_bench measures the host.  Prints, per pass: the time per call with the GPU kept busy
(calls queued back to back, one synchronize), the device time of the same call in a CUDA
graph, and the top functions of a cProfile run by own time.  Writes $OUT/host_profile.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import (tg, make_inputs, bench_graph, backward_args,  # noqa: E402
                       NORM_EPS, HC_EPS)


def per_call(fn, calls):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t_host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t0) / calls
    return t_host * 1e3, t_all * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=(1, 4096, 4, 2560))
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(*args.shape, torch.bfloat16,
                                                                 seed=1)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    fo = tg.forward(x, phi, alpha, bias, g, **kw)
    bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
    out = {"shape": list(args.shape)}
    for kind, fn in (("fwd", lambda: tg.forward(x, phi, alpha, bias, g, **kw)),
                     ("bwd", lambda: tg.backward(*bargs, **kw))):
        host_ms, wall_ms = per_call(fn, args.calls)
        dev_ms = bench_graph(fn, 100)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.calls):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        out[kind] = dict(host_ms=host_ms, wall_ms=wall_ms, device_ms=dev_ms,
                         profile=s.getvalue())
        print(f"{kind}: host {host_ms:.4f} ms/call, queued wall {wall_ms:.4f} ms/call, "
              f"device (graph) {dev_ms:.4f} ms")
        print(s.getvalue()[:4000])
    with open(os.path.join(os.environ.get("OUT") or "/tmp", "host_profile.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
