#!/usr/bin/env python
"""The front end's own cost per call: a backend's functions are replaced by stubs that return
the results of one real call, so what is timed is the front end alone (checks or the cached
plan, conversions to and from the backend's container, output assembly).

``--backend triton`` times the whole host path of a plain call instead (front end and the
backend's host code: plans, allocations, argument handling) with the kernel launches stubbed
(``_util._Launch.__call__``), on CPU tensors through the interpreter's code path: what a call
costs the host besides its launches (on a GPU add Triton's launcher, ~6-8 us per kernel, and
the caching allocator's cost per tensor).

Per entry point (forward, backward, post_forward, post_backward) it prints the median (and the
minimum) of ``--rounds`` rounds of ``--calls`` calls, in microseconds per call, and writes them
to JSON (``--json``, default ``$OUT/frontend.json``, else
``bench/results/frontend-<backend>.json``).

``--autograd L`` times the framework's share of a training step instead: an ``MHCStack`` of L
per-channel scale blocks, forward and ``torch.autograd.grad`` of x and every parameter, per
layer, recorded through the eager ``autograd.Function`` s and through the custom ops
(``autograd._eager`` off), without and with ``recompute=L``; each backend call returns the
result of the first real call made at the same place in the step (numba and numpy backends).

    .venv/bin/python bench/frontend.py                      # numba, T = 1 (1,1,4,64) bf16
    .venv/bin/python bench/frontend.py --shape 1,1,4,4096 --backend numpy
    .venv/bin/python bench/frontend.py --shape 1,1,4,4096 --backend triton --calls 300 --rounds 25
    .venv/bin/python bench/frontend.py --autograd 4 --shape 1,64,4,256 --dtype fp32 --calls 50
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if any(a.endswith("triton") for a in sys.argv[1:]):   # the triton host path runs on CPU
    # tensors: the interpreter's code path, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import _results  # noqa: E402
import mhc_multi  # noqa: E402
from mhc_multi import random_inputs  # noqa: E402
ENTRY_POINTS = ("forward", "backward", "post_forward", "post_backward")


def _stub_backend(name: str) -> None:
    """The backend's four functions return the first real result, every time."""
    mod = importlib.import_module(f"mhc_multi.backends.{'numpy_ref' if name == 'numpy' else name}")
    for fn in ENTRY_POINTS:
        real, memo = getattr(mod, fn), []

        def stub(*args, _real=real, _memo=memo, **kw):
            if not _memo:
                _memo.append(_real(*args, **kw))
            return _memo[0]
        setattr(mod, fn, stub)


def _stub_by_place(name: str) -> list[int]:
    """The backend's four functions return, at the k-th backend call of a step, the result of
    the first real call made k-th; the returned counter (its one entry) restarts a step."""
    mod = importlib.import_module(f"mhc_multi.backends.{'numpy_ref' if name == 'numpy' else name}")
    place, memo = [0], {}
    for fn in ENTRY_POINTS:
        def stub(*args, _real=getattr(mod, fn), _fn=fn, **kw):
            place[0] += 1
            key = (_fn, place[0])
            if key not in memo:
                memo[key] = _real(*args, **kw)
            return memo[key]
        setattr(mod, fn, stub)
    return place


def _timed(fn, warmup: int, rounds: int, calls: int, per: int = 1) -> dict:
    """``fn`` after ``warmup`` calls: the median and minimum over ``rounds`` rounds of ``calls``
    calls, in µs per call divided by ``per``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls / per * 1e6)
    return {"median_us": statistics.median(times), "min_us": min(times)}


class _Scale(torch.nn.Module):
    """The block: ``h_in * w`` per channel."""

    def __init__(self, D):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(D))

    def forward(self, h):
        return h * self.w


def autograd_steps(a, layers: int) -> dict:
    """Framework µs per layer of an MHCStack forward+backward, eager functions against the
    custom ops, without and with recompute (the backend stubbed by place)."""
    from mhc_multi import autograd
    B, S, n, D = (int(v) for v in a.shape.split(","))
    x = random_inputs((B, S, n, D), a.dtype, seed=0)[0].requires_grad_()
    dy = torch.randn_like(x)
    eager = autograd._eager
    place = _stub_by_place(a.backend)
    res = {}
    for recompute in (None, layers):
        for path in ("functions", "ops"):
            torch.manual_seed(0)
            stack = mhc_multi.MHCStack([_Scale(D) for _ in range(layers)], n, D,
                                       backend=a.backend, recompute=recompute)
            params = list(stack.parameters())

            def step():
                place[0] = 0
                return torch.autograd.grad(stack(x), [x, *params], dy)
            autograd._eager = eager if path == "functions" else (lambda *t: False)
            try:
                key = f"recompute={recompute} {path}"
                res[key] = _timed(step, 5, a.rounds, a.calls, per=layers)
            finally:
                autograd._eager = eager
            print(f"{key:<24} {res[key]['median_us']:7.1f} us per layer forward+backward "
                  f"(min {res[key]['min_us']:.1f})")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="numba", choices=("numba", "numpy", "triton"))
    p.add_argument("--shape", default="1,1,4,64", help="B,S,n,D")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json", default=None)
    p.add_argument("--autograd", type=int, default=0, metavar="L",
                   help="time an MHCStack of L layers through autograd instead (see above)")
    a = p.parse_args(argv)
    if a.autograd:
        if a.backend == "triton":
            p.error("--autograd stubs the numba or numpy backend")
        res = autograd_steps(a, a.autograd)
        _results.write("frontend-autograd", a.backend, {"results": res}, a.json, argv,
                       args=vars(a), cpu_count=os.cpu_count(), torch=torch.__version__)
        return 0
    B, S, n, D = (int(v) for v in a.shape.split(","))
    x, phi, alpha, bias, g = random_inputs((B, S, n, D), a.dtype, seed=0)
    # the parameters as a module hands them over: the same Parameter objects at every call
    phi, alpha, bias, g = (torch.nn.Parameter(t, requires_grad=False)
                           for t in (phi, alpha, bias, g))
    out = mhc_multi.forward(x, phi, alpha, bias, g, backend=a.backend)
    dh_in = torch.randn(B, S, D).to(x.dtype)
    dh_post, dh_res = torch.randn(B, S, n), torch.randn(B, S, n, n)
    f_out, dx_next = torch.randn(B, S, D).to(x.dtype), torch.randn(B, S, n, D).to(x.dtype)

    if a.backend == "triton":   # the backend's host code runs; its launches do not
        from mhc_multi.backends.triton import _util
        _util._Launch.__call__ = lambda self, *args, **kw: None
    else:
        _stub_backend(a.backend)

    calls = {
        "forward": lambda: mhc_multi.forward(x, phi, alpha, bias, g, backend=a.backend),
        "backward": lambda: mhc_multi.backward(x, phi, alpha, bias, out.inv_rms, out.h_mix,
                                               out.h_pre, out.h_post, dh_in, dh_post, dh_res, g,
                                               backend=a.backend),
        "post_forward": lambda: mhc_multi.post_forward(x, f_out, out.h_post, out.h_res,
                                                       backend=a.backend),
        "post_backward": lambda: mhc_multi.post_backward(x, f_out, out.h_post, out.h_res,
                                                         dx_next, backend=a.backend),
    }
    res = {}
    for name, fn in calls.items():
        res[name] = _timed(fn, 100, a.rounds, a.calls)
        print(f"{name:<14} {res[name]['median_us']:7.1f} us per call (min {res[name]['min_us']:.1f})")
    _results.write("frontend", a.backend, {"results": res}, a.json, argv, args=vars(a),
                   cpu_count=os.cpu_count(), torch=torch.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
