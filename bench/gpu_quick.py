"""Quick GPU timing of the Triton backend at the realistic shapes, in one device call: forward
and backward graph times (median of CUDA-graph replays) and each kernel's device time, of the
pre operator (passes fwd, bwd; bwd_add: the backward with another gradient of x added in its
column kernel, dx_add, as in the step) and of the post operator (post_fwd, post_bwd).

    python3 bench/gpu_quick.py [--dtype bf16] [--passes fwd,bwd,bwd_add,post_fwd,post_bwd]
                               [--variants JSON] [--shapes B,S,n,D ...]

Each (shape, pass) also gets its floor (bytes that must move / the copy bandwidth of this
process, _gpu.copy_bandwidth) and ``copy_same_ms`` (_gpu.copy_same_ms: a copy of the same
number of bytes, what moving them costs at this size as do_bench measures).

``--variants '{"name": {set_config keys}}'`` times each variant (default: the launch rule
alone) and gives each output's relative difference from the first variant's (``vs_first``:
0.0 where bitwise the same); a variant that raises (a tile that does not fit) is recorded
with its error and skipped.  For A/B between commits or launch variants: prints one line per
(variant, shape, pass), writes $OUT/gpu_quick.json.  The acceptance suite (accuracy against
float64, the timing table) is bench/gpu_suite.py; ``--config`` puts a variant through it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu import (tg, bench_graph, kernel_ms, make_inputs, post_inputs,  # noqa: E402
                  copy_bandwidth, copy_same_ms, backward_args, rel, nbytes, NORM_EPS, HC_EPS, DT)

SHAPES = [(1, 4096, 4, 2560), (4, 4096, 4, 4096), (2, 4096, 4, 7168)]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", help="x dtype: bf16, fp16 or fp32")
    ap.add_argument("--passes", default="fwd,bwd",
                    help="comma-separated: fwd, bwd, bwd_add (pre), post_fwd, post_bwd")
    ap.add_argument("--variants", default='{"rule": {}}',
                    help='JSON {"name": {set_config keys}}; the first is the reference')
    ap.add_argument("--shapes", nargs="*", help="B,S,n,D (default: the three realistic shapes)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    variants = json.loads(args.variants)
    passes = args.passes.split(",")
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    rows = [dict(copy_TBps=copy_bandwidth())]
    print(rows[0], flush=True)
    for shape in shapes:
        x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(*shape, DT[args.dtype],
                                                                     seed=5)
        fo = tg.forward(x, phi, alpha, bias, g, **kw)
        bargs = backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res)
        pin = post_inputs(*shape, DT[args.dtype], seed=5) if "post" in args.passes else ()
        # bwd_add: the step's pre backward, post's dx added in the column kernel (dx_add)
        dxa = torch.randn_like(x) if "bwd_add" in passes else None
        fns = {"fwd": lambda: tg.forward(x, phi, alpha, bias, g, **kw),
               "bwd": lambda: tg.backward(*bargs, **kw),
               "bwd_add": lambda: tg.backward(*bargs, **kw, dx_add=dxa),
               "post_fwd": lambda: (tg.post_forward(*pin[:4]),),
               "post_bwd": lambda: tg.post_backward(*pin)}
        inputs = {"fwd": (x, phi, alpha, bias, g), "bwd": bargs, "bwd_add": bargs + (dxa,),
                  "post_fwd": pin[:4], "post_bwd": pin}
        for name in passes:   # bytes that must move: the pass's inputs and outputs
            moved = nbytes(*inputs[name], *fns[name]())
            r = dict(shape=shape, pass_=name,
                     floor_ms=round(moved / rows[0]["copy_TBps"] * 1e3, 4),
                     copy_same_ms=round(copy_same_ms(moved), 4))
            print(r, flush=True)
            rows.append(r)
        first = {}
        for vname, cfg in variants.items():
            tg.set_config(**cfg)
            try:
                for name in passes:
                    fn = fns[name]
                    r = dict(variant=vname, shape=shape, pass_=name)
                    try:
                        outs = [o for o in fn() if o is not None]
                    except Exception as exc:   # noqa: BLE001 -- e.g. a tile that does not fit
                        r["error"] = str(exc)[:200]
                    else:
                        ref = first.setdefault(name, [o.double() for o in outs])
                        r.update(graph_ms=round(bench_graph(fn), 4), kernels=kernel_ms(fn),
                                 vs_first=[float(f"{rel(o, q):.2e}") for o, q in zip(outs, ref)])
                        del outs
                    print(r, flush=True)
                    rows.append(r)
            finally:
                tg.set_config()
        del x, dh_in, fo, bargs, fns, first, pin, inputs, dxa
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT") or ".", "gpu_quick.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
