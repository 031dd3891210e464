#!/usr/bin/env python
"""Few tokens to many: the operators and the forward step over a sweep of T, graph and call.

For each T (tokens, B = 1, S = T) at one (n, D) it times, through the public API:

* ``pre fwd`` / ``pre bwd``: ``mhc_multi.forward`` / ``backward`` (Sinkhorn k = 20);
* ``post fwd`` / ``post bwd``: ``mhc_multi.post_forward`` / ``post_backward``;
* ``step fwd``: ``MHCLayer`` (pre -> per-channel-scale block -> post) under ``no_grad``;
* ``step fwd (torch compile)``: the same step in plain PyTorch under ``torch.compile``
  (bench/step.py's ``PlainStep``), on CUDA only.

Two times per row (microseconds, medians of 5 blocks):

* ``graph``: one CUDA-graph replay of the call, device time only (on the CPU: n/a);
* ``call``: a plain Python call, host work included (a loop of calls, then one sync).

``floor`` is the bytes the call must move (every input read once, every output written once;
the step as bench/step.py's ``floor_bytes``) over the copy bandwidth measured in the same run.
Writes JSON (``--json``, default ``$OUT/tokens.json``, else ``bench/results/tokens-<device>.json``).

    python bench/tokens.py                                # CUDA: T = 1 .. 16384, n = 4, D = 4096
    python bench/tokens.py --ts 1,8,64 --n 8 --dtype fp32
    python bench/tokens.py --ts 1,64 --no-compile --launch jit   # launches through fn[grid]
    python bench/tokens.py --device cpu --quick           # smoke test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import mhc_multi  # noqa: E402
import _results  # noqa: E402
from _gpu import capture_graph, nbytes  # noqa: E402
from bench import copy_bandwidth  # noqa: E402
from step import DTYPES, K, PlainStep, Scale, floor_bytes  # noqa: E402

TS = (1, 2, 8, 64, 256, 1024, 4096, 16384)


def graph_us(fn, reps: int = 50) -> float:
    """Device time of one CUDA-graph replay of ``fn`` (median of 5 blocks of ``reps``, back to
    back: a decode loop's replays, with no L2 flush between them as do_bench would do)."""
    graph = capture_graph(fn)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(out)


def call_us(fn, device, reps: int = 100) -> float:
    """Wall time of one plain call of ``fn`` (median of 5 loops of ``reps`` calls, one sync
    after each loop): host work and device time, whichever is longer."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e6 / reps)
    return statistics.median(out)


def cases(T: int, a, device):
    """(name, fn, bytes that must move) of every timed call at T tokens."""
    n, D, dt = a.n, a.D, DTYPES[a.dtype]
    torch.manual_seed(0)
    layer = mhc_multi.MHCLayer(Scale(D, device=device, dtype=dt), n, D, sinkhorn_iters=K,
                               device=device).eval()
    with torch.no_grad():
        layer.pre.alpha.fill_(0.5)
    p = layer.pre
    x = mhc_multi.random_inputs((1, T, n, D), a.dtype, seed=0, device=device)[0]
    params = tuple(None if t is None else t.detach() for t in (p.phi, p.alpha, p.bias, p.gamma))
    kw = dict(backend=a.backend, sinkhorn_iters=K)
    out = mhc_multi.forward(x, *params, **kw)
    dh_in, dh_post, dh_res = (torch.randn_like(out.h_in), torch.randn_like(out.h_post),
                              torch.randn_like(out.h_res))
    f = layer.block(out.h_in).detach()
    dx_next = torch.randn_like(x)
    grads = mhc_multi.backward(x, params[0], params[1], params[2], out.inv_rms, out.h_mix,
                               out.h_pre, out.h_post, dh_in, dh_post, dh_res, params[3],
                               backend=a.backend, sinkhorn_iters=K)
    post_kw = dict(backend=a.backend)
    x_next = mhc_multi.post_forward(x, f, out.h_post, out.h_res, **post_kw)
    pg = mhc_multi.post_backward(x, f, out.h_post, out.h_res, dx_next, **post_kw)
    gates = (out.h_post, out.h_res, out.inv_rms, out.h_mix, out.h_pre)
    yield "pre fwd", lambda: mhc_multi.forward(x, *params, **kw), \
        nbytes(x, *params, out.h_in, *gates)
    yield "pre bwd", lambda: mhc_multi.backward(
        x, params[0], params[1], params[2], out.inv_rms, out.h_mix, out.h_pre, out.h_post,
        dh_in, dh_post, dh_res, params[3], backend=a.backend, sinkhorn_iters=K), \
        nbytes(x, *params, *gates, dh_in, dh_post, dh_res, *grads)
    yield "post fwd", lambda: mhc_multi.post_forward(x, f, out.h_post, out.h_res, **post_kw), \
        nbytes(x, f, out.h_post, out.h_res, x_next)
    yield "post bwd", lambda: mhc_multi.post_backward(x, f, out.h_post, out.h_res, dx_next,
                                                      **post_kw), \
        nbytes(x, f, out.h_post, out.h_res, dx_next, *pg)
    step_bytes = floor_bytes(1, T, n, D, x.element_size(), False)

    def ours():
        with torch.no_grad():
            return layer(x)
    yield "step fwd", ours, step_bytes
    if device.type == "cuda" and not a.no_compile:
        plain = torch.compile(PlainStep(layer))

        def compiled():
            with torch.no_grad():
                return plain(x)
        yield "step fwd (torch compile)", compiled, step_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ts", default=",".join(map(str, TS)), help="token counts, comma-separated")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--D", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--launch", default="direct", choices=("direct", "jit"),
                   help="the Triton backend's launches: past Triton's per-call binding once "
                        "compiled (direct, the default) or through fn[grid] every time (jit)")
    p.add_argument("--quick", action="store_true", help="smoke test: T = 1, 8, n = 4, D = 64")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.ts, a.D, a.no_compile = "1,8", 64, True
    a.t_list = [int(t) for t in a.ts.split(",") if t.strip()]
    return a


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['T']:>6} {r['op']:<26} n/a: {r['error']}", flush=True)
        return
    g = f"{r['graph_us']:>9.1f}" if "graph_us" in r else f"{'n/a':>9}"
    print(f"{r['T']:>6} {r['op']:<26} {g} {r['call_us']:>9.1f} {r['floor_us']:>9.2f}", flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    from mhc_multi.backends.triton import _util
    _util.DIRECT_LAUNCH = a.launch == "direct"
    bandwidth, _ = copy_bandwidth(device, a.quick)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; n = {a.n}, D = {a.D}, {a.dtype} x, "
          f"fp32 parameters, k = {K}, {a.launch} launches; microseconds")
    print(f"{'T':>6} {'op':<26} {'graph':>9} {'call':>9} {'floor':>9}", flush=True)
    rows = []
    for T in a.t_list:
        for name, fn, nb in cases(T, a, device):
            row = dict(T=T, op=name, floor_us=nb / bandwidth * 1e6, bytes=nb)
            try:
                row["call_us"] = call_us(fn, device, reps=3 if a.quick else 100)
                if device.type == "cuda":
                    row["graph_us"] = graph_us(fn)
            except Exception as exc:   # noqa: BLE001 - reported in the table
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            _print_row(row)   # as it is measured: a run cut short keeps what it printed
    _results.write("tokens", device.type, {"rows": rows}, a.json, argv,
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   copy_bytes_per_s=bandwidth, n=a.n, D=a.D, dtype=a.dtype, launch=a.launch,
                   torch=torch.__version__, mhc_multi=mhc_multi.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
