#!/usr/bin/env python
"""Where a plain Triton-backend call's host time goes, on a CUDA machine (T = 1 by default).

Per entry point (pre forward and backward, post forward and backward) through the public API:

* ``call``: the plain call (a loop of calls, then one sync), host work and launches;
* ``stubbed``: the same call with every kernel launch stubbed (``_util._Launch.__call__``
  returns at once), so the rest: front end, plans, allocations, argument handling;
* ``launches``: the difference, and how many kernels the call launches;
* ``allocs``: the ``torch.empty`` calls it makes.

Per launch site of the pre forward: the whole ``_Launch`` call against the compiled kernel's
own launcher called alone with the same arguments (what Triton's launch costs by itself) and
``_Launch``'s key.  Then one ``torch.empty`` and one small aten op (``x.sum()``), for scale.

Medians of 5 loops of calls (``tokens.call_us``), microseconds; JSON to ``--json``, default
``$OUT/host.json``, else ``bench/results/host-<device>.json``.

    python3 bench/host.py                       # n = 4, D = 4096, bf16, k = 20, T = 1
    python3 bench/host.py --shape 1,64,4,4096
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _results  # noqa: E402
import mhc_multi  # noqa: E402
from tokens import call_us  # noqa: E402

CUDA = torch.device("cuda")


def _counted(fn, launch_cls) -> tuple[int, int]:
    """(kernel launches, torch.empty calls) of one call of ``fn``."""
    counts = [0, 0]
    real_call, real_empty = launch_cls.__call__, torch.empty

    def call(self, *a, **k):
        counts[0] += 1
        return real_call(self, *a, **k)

    def empty(*a, **k):
        counts[1] += 1
        return real_empty(*a, **k)
    launch_cls.__call__, torch.empty = call, empty
    try:
        fn()
    finally:
        launch_cls.__call__, torch.empty = real_call, real_empty
    return counts[0], counts[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1,1,4,4096", help="B,S,n,D")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/host.py times the Triton backend's host path on a CUDA machine; "
              "bench/frontend.py --backend triton times it on the CPU (launches stubbed).")
        return 2
    from mhc_multi.backends.triton import _util
    launch_cls = _util._Launch
    shape = tuple(int(v) for v in args.shape.split(","))
    x, phi, alpha, bias, g = mhc_multi.random_inputs(shape, args.dtype, seed=0, device="cuda")
    kw = dict(backend="triton", sinkhorn_iters=20)
    out = mhc_multi.forward(x, phi, alpha, bias, g, **kw)
    dh_in, dh_post, dh_res = (torch.randn_like(t) for t in (out.h_in, out.h_post, out.h_res))
    f_out, dx_next = torch.randn_like(out.h_in), torch.randn_like(x)
    calls = {
        "pre fwd": lambda: mhc_multi.forward(x, phi, alpha, bias, g, **kw),
        "pre bwd": lambda: mhc_multi.backward(x, phi, alpha, bias, out.inv_rms, out.h_mix,
                                              out.h_pre, out.h_post, dh_in, dh_post, dh_res, g,
                                              **kw),
        "post fwd": lambda: mhc_multi.post_forward(x, f_out, out.h_post, out.h_res,
                                                   backend="triton"),
        "post bwd": lambda: mhc_multi.post_backward(x, f_out, out.h_post, out.h_res, dx_next,
                                                    backend="triton"),
    }
    rows = []
    print(f"{args.shape} {args.dtype}, k = 20, {torch.cuda.get_device_name()}; µs per call")
    print(f"{'call':10s} {'call':>8s} {'stubbed':>8s} {'launches':>9s} {'n':>3s} {'allocs':>7s}")
    real_call = launch_cls.__call__
    for name, fn in calls.items():
        whole = call_us(fn, CUDA, args.reps)
        n_launch, n_empty = _counted(fn, launch_cls)
        launch_cls.__call__ = lambda self, *a, **k: None
        try:
            stubbed = call_us(fn, CUDA, args.reps)
        finally:
            launch_cls.__call__ = real_call
        rows.append(dict(kind="call", op=name, call_us=whole, stubbed_us=stubbed,
                         launches=n_launch, allocs=n_empty))
        print(f"{name:10s} {whole:8.1f} {stubbed:8.1f} {whole - stubbed:9.1f} {n_launch:3d} "
              f"{n_empty:7d}", flush=True)

    # the pre forward's launch sites: _Launch against the compiled kernel's launcher alone
    sites = []

    def grab(self, *a, **k):
        sites.append((self, a, k))
        return real_call(self, *a, **k)
    launch_cls.__call__ = grab
    try:
        calls["pre fwd"]()
    finally:
        launch_cls.__call__ = real_call
    print(f"{'launch site':24s} {'_Launch':>8s} {'launcher':>9s} {'key':>6s}")
    for site, a, k in sites:
        vals = site._values(a, k, site.tail)
        ck = site.kernels.get(site._key(vals))
        name = getattr(getattr(site.fn, "fn", site.fn), "__name__", "?")
        whole = call_us(lambda: site(*a, **k), CUDA, args.reps * 5)
        alone = None
        if ck is not None:
            g3, stream = site.grid, _util._stream()
            alone = call_us(lambda: ck.run(g3[0], g3[1], g3[2], stream, ck.function,
                                           ck.packed_metadata, None, None, None, *vals),
                            CUDA, args.reps * 5)
        key_us = call_us(lambda: site._key(vals), CUDA, args.reps * 20)
        rows.append(dict(kind="launch", op=name, launch_us=whole, launcher_us=alone,
                         key_us=key_us))
        print(f"{name:24s} {whole:8.2f} {alone if alone is not None else float('nan'):9.2f} "
              f"{key_us:6.2f}", flush=True)
    for name, fn in (("torch.empty", lambda: torch.empty((1, 4096), dtype=torch.bfloat16,
                                                         device="cuda")),
                     ("x.sum()", lambda: x.sum())):
        v = call_us(fn, CUDA, args.reps * 5)
        rows.append(dict(kind="torch", op=name, call_us=v))
        print(f"{name:24s} {v:8.2f}")
    _results.write("host", torch.cuda.get_device_name().replace(" ", "_"), {"rows": rows},
                   args.json, shape=args.shape, dtype=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
