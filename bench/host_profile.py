"""Host (CPU) time of one forward / backward call of the Triton backend, and where it goes.

    python3 bench/host_profile.py [--shape B S n D ...] [--calls N] [--variants JSON]

At small shapes the GPU finishes before the host has launched the next call, so plain
do_bench measures the host.  Prints, per pass: the time per call with the GPU kept busy
(calls queued back to back, one synchronize), the device time of the same call in a CUDA
graph, plain do_bench (what it measures when the host is the limit), and the top functions of
a cProfile run by own time, per ``set_config`` variant (``--variants '{"name": {...}}'``,
default the rule alone).  Writes $OUT/host_profile.json.
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
from gpu_suite import (tg, make_inputs, bench, bench_graph, backward_args,  # noqa: E402
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
    ap.add_argument("--shape", type=int, nargs=4, action="append",
                    help="B S n D (repeatable; default 1 4096 4 2560)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--variants", default='{"rule": {}}')
    ap.add_argument("--top", type=int, default=18, help="cProfile rows (0: no profile)")
    args = ap.parse_args()
    variants = json.loads(args.variants)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    rows = []
    for shape in args.shape or [(1, 4096, 4, 2560)]:
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(*shape, torch.bfloat16,
                                                                     seed=1)
        fo = tg.forward(x, phi, alpha, bias, g, **kw)
        bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
        for vname, cfg in variants.items():
            tg.set_config(**cfg)
            for kind, fn in (("fwd", lambda: tg.forward(x, phi, alpha, bias, g, **kw)),
                             ("bwd", lambda: tg.backward(*bargs, **kw))):
                host_ms, wall_ms = per_call(fn, args.calls)
                r = dict(shape=list(shape), variant=vname, pass_=kind, host_ms=host_ms,
                         wall_ms=wall_ms, do_bench_ms=bench(fn), device_ms=bench_graph(fn, 100))
                print(f"{shape} {vname} {kind}: host {host_ms:.4f} ms/call, queued wall "
                      f"{wall_ms:.4f}, do_bench {r['do_bench_ms']:.4f}, device (graph) "
                      f"{r['device_ms']:.4f} ms", flush=True)
                if args.top:
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(args.calls):
                        fn()
                    pr.disable()
                    torch.cuda.synchronize()
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top)
                    r["profile"] = s.getvalue()
                    print(r["profile"][:4000])
                rows.append(r)
            tg.set_config()
    with open(os.path.join(os.environ.get("OUT") or "/tmp", "host_profile.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
