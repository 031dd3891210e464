#!/usr/bin/env python
"""Benchmark every available mhc_multi backend against PyTorch eager and torch.compile.

For each shape it times the forward and the backward of the pre operator (and, with
``--post``, of the post operator) for

* every backend that can run on the chosen device (CUDA: triton; CPU: numba, numpy), called
  through the public front end (``mhc_multi.forward`` / ``backward`` / ``post_*``),
* ``torch eager``: ``bench/torch_reference.py``, CONTRACT.md transcribed into torch in fp32,
* ``torch compile``: ``torch.compile`` of the same functions, where it works (else ``n/a``),

next to the memory floor: the bytes that must move (every input read once, every output
written once) over the copy bandwidth measured in the same run. See bench/README.md.

    python bench/bench.py                       # default shapes for the device
    python bench/bench.py --quick               # smoke test: tiny shapes, 2 repetitions
    python bench/bench.py --tokens 256,1024,4096,16384 --plot bench/results/sweep.png
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mhc_multi  # noqa: E402
from mhc_multi import registry  # noqa: E402
import torch_reference as tref  # noqa: E402
from _gpu import nbytes  # noqa: E402

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                "fp64": torch.float64}
CPU_SHAPES = [(1, 1024, 4, 2048), (2, 2048, 4, 4096)]
CUDA_SHAPES = [(1, 4096, 4, 2560), (4, 4096, 4, 4096), (2, 4096, 4, 7168)]
QUICK_SHAPES = [(1, 64, 4, 128), (2, 128, 4, 256)]
CPU_BACKENDS = ("numba", "numpy")   # backends timed on CPU tensors
CUDA_BACKENDS = ("triton",)         # backends timed on CUDA tensors
EAGER, COMPILE = "torch eager", "torch compile"
PRE_OUT = ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre")
PRE_GRAD = ("dx", "dphi", "dalpha", "dbias", "dgamma")
POST_OUT = ("x_next",)
POST_GRAD = ("dx", "df_out", "dh_post", "dh_res")


# ---------------------------------------------------------------------------------------------
# command line

def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected B,S,n,D (four positive ints), got {text!r}")
    return parts


def _ints(text: str) -> list[int]:
    try:
        vals = [int(p) for p in text.split(",") if p]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive ints, got {text!r}")
    return vals


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=_shape, metavar="B,S,n,D",
                   help="shapes to time (default: CPU %s; CUDA %s)" % (
                       " ".join(",".join(map(str, s)) for s in CPU_SHAPES),
                       " ".join(",".join(map(str, s)) for s in CUDA_SHAPES)))
    p.add_argument("--tokens", type=_ints, metavar="T1,T2,...",
                   help="token sweep: shapes (1, T, n, D) with n, D of the first shape (for --plot)")
    p.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="bf16", help="x's dtype (params are fp32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b],
                   help="comma-separated backends to time (default: every available one for the device)")
    p.add_argument("--sinkhorn", type=int, default=0, metavar="K",
                   help="sinkhorn_iters=K (backends without SUPPORTS_SINKHORN are skipped)")
    p.add_argument("--post", action="store_true", help="also time the post operator")
    p.add_argument("--no-gamma", action="store_true", help="gamma=None (default: a gamma is given)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile", action="store_true", help="run torch.compile even with --quick")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny shapes, 2 repetitions, no torch.compile unless --compile")
    p.add_argument("--reps", type=int, help="CPU: timed repetitions per implementation "
                   "(default: as many as fit in --budget, 3..50)")
    p.add_argument("--budget", type=float, default=4.0,
                   help="CPU: seconds of timed repetitions per shape and pass (default 4)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU: torch.set_num_threads (default os.cpu_count(); lower it on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="where to write the numbers "
                   "(default bench/results/bench-<device>.json)")
    p.add_argument("--plot", type=Path, help="draw time vs tokens to this PNG")
    args = p.parse_args(argv)
    if args.sinkhorn < 0:
        p.error("--sinkhorn: expected K >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# timing

class CpuTimer:
    """Median wall time of interleaved repetitions: each repetition runs every implementation
    once (in a rotating order), so drift in machine load hits all of them alike."""

    def __init__(self, reps: int | None, budget: float, warmup: int):
        self.reps, self.budget, self.warmup = reps, budget, warmup

    def warm(self, fn: Callable) -> float:
        """Run ``fn`` ``warmup`` times (compiles, caches); return the last call's seconds."""
        dt = 0.0
        for _ in range(self.warmup):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        return dt

    def time(self, fns: dict[str, Callable], estimates: dict[str, float]) -> dict[str, tuple[float, int]]:
        names = list(fns)
        if not names:
            return {}
        reps = self.reps
        if reps is None:
            per_rep = max(sum(estimates[n] for n in names), 1e-6)
            reps = max(3, min(50, int(self.budget / per_rep)))
        samples = {n: [] for n in names}
        for r in range(reps):
            for k in range(len(names)):
                name = names[(k + r) % len(names)]
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - t0)
        return {n: (statistics.median(s) * 1e3, len(s)) for n, s in samples.items()}


class CudaTimer:
    """``triton.testing.do_bench`` (median; it flushes L2 between calls)."""

    def __init__(self, quick: bool):
        from triton.testing import do_bench
        self.do_bench = do_bench
        self.kw = dict(warmup=5, rep=20) if quick else dict(warmup=25, rep=200)

    def warm(self, fn: Callable) -> float:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        return 0.0

    def time(self, fns: dict[str, Callable], estimates) -> dict[str, tuple[float, int]]:
        return {n: (float(self.do_bench(f, return_mode="median", **self.kw)), 0) for n, f in fns.items()}


def copy_bandwidth(device: torch.device, quick: bool) -> tuple[float, int]:
    """(bytes/s, buffer bytes) of ``dst.copy_(src)``: 2 * bytes moved per copy."""
    nbytes = (256 if device.type == "cuda" else (64 if quick else 128)) << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        from triton.testing import do_bench
        ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
        secs = ms / 1e3
    else:
        for _ in range(2):
            dst.copy_(src)
        ts = []
        for _ in range(5 if quick else 15):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
        secs = statistics.median(ts)
    return 2 * nbytes / secs, nbytes


# ---------------------------------------------------------------------------------------------
# helpers

def _reason(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _rel_diff(got, ref) -> float:
    g = got.detach().double().cpu()
    r = ref.detach().double().cpu()
    if g.shape != r.shape:
        return math.inf
    num, den = torch.linalg.vector_norm(g - r).item(), torch.linalg.vector_norm(r).item()
    err = num / den if den > 0 else num
    return err if math.isfinite(err) else math.inf


def check_against(outs, ref_outs, names, x_dtype: str) -> str | None:
    """None when every output is within 2x the contract bound of torch eager, else a note."""
    worst = None
    for name, got, ref in zip(names, outs, ref_outs):
        if ref is None:
            continue
        if got is None:
            return f"{name} missing"
        err = _rel_diff(got, ref)
        bound = 2 * mhc_multi.tolerance(name, x_dtype, "fp32")
        if err > bound and (worst is None or err / bound > worst[2]):
            worst = (name, err, err / bound)
    return None if worst is None else f"{worst[0]} differs from eager by {worst[1]:.1e}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "mhc_multi": getattr(mhc_multi, "__version__", None)}
    for mod in ("triton", "numba"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            out[mod] = None
    return out


def pick_backends(args, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(backends to time, {backend: why skipped})."""
    on_device = CUDA_BACKENDS if device.type == "cuda" else CPU_BACKENDS
    skipped: dict[str, str] = {}
    chosen: list[str] = []
    infos = {b.name: b for b in mhc_multi.available_backends()}
    wanted = args.backends if args.backends is not None else list(infos)
    for name in wanted:
        if name not in infos:
            skipped[name] = f"unknown backend (known: {', '.join(infos)})"
        elif name not in on_device:
            skipped[name] = f"does not run on {device.type} tensors"
        elif not infos[name].available:
            skipped[name] = infos[name].reason or "not available"
        else:
            mod = registry._load(name)
            if args.sinkhorn and not getattr(mod, "SUPPORTS_SINKHORN", False):
                skipped[name] = "SUPPORTS_SINKHORN is False"
            else:
                chosen.append(name)
    return chosen, skipped


# ---------------------------------------------------------------------------------------------
# one shape

class Impl:
    """One implementation of one pass: a callable, or the reason it cannot run."""

    def __init__(self, name: str, fn: Callable | None, reason: str | None = None):
        self.name, self.fn, self.reason = name, fn, reason
        self.note: str | None = None
        self.estimate = 0.0


def bench_pass(timer, impls: list[Impl], ref_out, out_names, x_dtype: str) -> dict[str, dict]:
    """Warm every implementation up (compiling what compiles), check it against eager, time."""
    for im in impls:
        if im.fn is None:
            continue
        try:
            out = im.fn()
            im.estimate = timer.warm(im.fn)
        except Exception as exc:  # noqa: BLE001 - an implementation that fails is reported n/a
            im.fn, im.reason = None, _reason(exc)
            continue
        if ref_out is not None and im.name != EAGER:
            if not isinstance(out, (tuple, list)):
                out = (out,)
            im.note = check_against(out, ref_out, out_names, x_dtype)
    live = {im.name: im.fn for im in impls if im.fn is not None}
    times = timer.time(live, {im.name: im.estimate for im in impls})
    return {im.name: dict(ms=times[im.name][0] if im.name in times else None,
                          reps=times[im.name][1] if im.name in times else 0,
                          reason=im.reason, note=im.note) for im in impls}


def compiled(fn: Callable, enabled: bool, why_not: str):
    if not enabled:
        return None, why_not
    try:
        return torch.compile(fn, dynamic=False), None
    except Exception as exc:  # noqa: BLE001
        return None, _reason(exc)


def bench_shape(shape, args, device, backends, timer, bandwidth, compile_on, compile_why) -> list[dict]:
    B, S, n, D = shape
    xd = args.dtype
    k = args.sinkhorn
    x, phi, alpha, bias, gamma = mhc_multi.random_inputs(
        shape, xd, param_dtype="fp32", gamma=not args.no_gamma, seed=args.seed, device=str(device))
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)

    def rand(*s, dtype=torch.float32):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    with torch.no_grad():
        fwd_ref = tref.forward(x, phi, alpha, bias, gamma, sinkhorn_iters=k)
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = fwd_ref
    dh_in, dh_post, dh_res = rand(B, S, D, dtype=x.dtype), rand(B, S, n), rand(B, S, n, n)
    bwd_args = (x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma)
    with torch.no_grad():
        bwd_ref = tref.backward(*bwd_args, sinkhorn_iters=k)

    passes = []  # (pass name, bytes, {impl: callable}, reference outputs, output names)
    fwd_bytes = nbytes(x, phi, alpha, bias, gamma) + nbytes(*fwd_ref)
    bwd_bytes = (nbytes(x, phi, gamma, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res)
                 + nbytes(*bwd_ref))
    cf, cf_why = compiled(tref.forward, compile_on, compile_why)
    cb, cb_why = compiled(tref.backward, compile_on, compile_why)
    fwd = [Impl(EAGER, lambda: tref.forward(x, phi, alpha, bias, gamma, sinkhorn_iters=k)),
           Impl(COMPILE, cf and (lambda: cf(x, phi, alpha, bias, gamma, sinkhorn_iters=k)), cf_why)]
    bwd = [Impl(EAGER, lambda: tref.backward(*bwd_args, sinkhorn_iters=k)),
           Impl(COMPILE, cb and (lambda: cb(*bwd_args, sinkhorn_iters=k)), cb_why)]
    for b in backends:
        fwd.append(Impl(b, lambda b=b: mhc_multi.forward(x, phi, alpha, bias, gamma, backend=b,
                                                         sinkhorn_iters=k)))
        bwd.append(Impl(b, lambda b=b: mhc_multi.backward(*bwd_args, backend=b, sinkhorn_iters=k)))
    passes.append(("fwd", fwd_bytes, fwd, fwd_ref, PRE_OUT))
    passes.append(("bwd", bwd_bytes, bwd, bwd_ref, PRE_GRAD))

    if args.post:
        f_out, dx_next = rand(B, S, D, dtype=x.dtype), rand(B, S, n, D, dtype=x.dtype)
        pargs = (x, f_out, h_post, h_res)
        with torch.no_grad():
            pf_ref = (tref.post_forward(*pargs),)
            pb_ref = tref.post_backward(*pargs, dx_next)
        pf_bytes = nbytes(*pargs) + nbytes(*pf_ref)
        pb_bytes = nbytes(*pargs, dx_next) + nbytes(*pb_ref)
        cpf, cpf_why = compiled(tref.post_forward, compile_on, compile_why)
        cpb, cpb_why = compiled(tref.post_backward, compile_on, compile_why)
        pf = [Impl(EAGER, lambda: tref.post_forward(*pargs)),
              Impl(COMPILE, cpf and (lambda: cpf(*pargs)), cpf_why)]
        pb = [Impl(EAGER, lambda: tref.post_backward(*pargs, dx_next)),
              Impl(COMPILE, cpb and (lambda: cpb(*pargs, dx_next)), cpb_why)]
        for b in backends:
            if not getattr(registry._load(b), "post_forward", None):
                pf.append(Impl(b, None, "backend has no post_forward"))
                pb.append(Impl(b, None, "backend has no post_forward"))
                continue
            pf.append(Impl(b, lambda b=b: mhc_multi.post_forward(*pargs, backend=b)))
            pb.append(Impl(b, lambda b=b: mhc_multi.post_backward(*pargs, dx_next, backend=b)))
        passes.append(("post fwd", pf_bytes, pf, pf_ref, POST_OUT))
        passes.append(("post bwd", pb_bytes, pb, pb_ref, POST_GRAD))

    rows = []
    for pname, nb, impls, ref_out, names in passes:
        with torch.no_grad():
            res = bench_pass(timer, impls, ref_out, names, xd)
        floor_ms = nb / bandwidth * 1e3
        eager_ms = res[EAGER]["ms"]
        comp_ms = res[COMPILE]["ms"]
        for name, r in res.items():
            ms = r["ms"]
            rows.append(dict(
                shape=list(shape), B=B, S=S, n=n, D=D, tokens=B * S, op="post" if "post" in pname else "pre",
                pass_=pname, impl=name, ms=ms, reps=r["reps"], bytes=nb, floor_ms=floor_ms,
                gb_per_s=(nb / (ms / 1e3) / 1e9) if ms else None,
                x_floor=(ms / floor_ms) if ms else None,
                vs_eager=(eager_ms / ms) if ms and eager_ms else None,
                vs_compile=(comp_ms / ms) if ms and comp_ms else None,
                status="ok" if ms is not None else "n/a", reason=r["reason"], note=r["note"]))
        del impls
    return rows


# ---------------------------------------------------------------------------------------------
# output

def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def _ms(v) -> str:
    """Milliseconds: 3 decimals from 1 ms up, 4 below, exponent under 1 us."""
    if v is None:
        return "n/a"
    return f"{v:.3f}" if v >= 1 else f"{v:.4f}" if v >= 1e-3 else f"{v:.2e}"


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = (f"{'shape B,S,n,D':<18} {'pass':<8} {'implementation':<14} {'ms':>9} {'GB/s':>7} "
            f"{'x floor':>8} {'vs eager':>9} {'vs compile':>10}  note")
    print(head, file=out)
    print("-" * len(head), file=out)
    last = None
    for r in rows:
        key = (tuple(r["shape"]), r["pass_"])
        shape = ",".join(map(str, r["shape"]))
        if key != last:
            if last is not None and last[0] != key[0]:
                print(file=out)
            print(f"{shape:<18} {r['pass_']:<8} {'floor':<14} {_ms(r['floor_ms']):>9} "
                  f"{r['bytes'] / r['floor_ms'] / 1e6:>7.1f} {1.0:>8.2f} {'':>9} {'':>10}  "
                  f"{r['bytes'] / 2**20:.1f} MiB must move", file=out)
            last = key
        note = r["reason"] if r["ms"] is None else (r["note"] or "")
        print(f"{'':<18} {'':<8} {r['impl']:<14} {_ms(r['ms']):>9} {_f(r['gb_per_s'], '7.1f'):>7} "
              f"{_f(r['x_floor'], '8.2f'):>8} {_f(r['vs_eager'], '9.2f'):>9} "
              f"{_f(r['vs_compile'], '10.2f'):>10}  {note}", file=out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pass_names = list(dict.fromkeys(r["pass_"] for r in rows))
    nds = list(dict.fromkeys((r["n"], r["D"]) for r in rows))
    ncols = min(2, len(pass_names))
    nrows = math.ceil(len(pass_names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5 * nrows), squeeze=False)
    for ax in axes.flat[len(pass_names):]:
        ax.set_visible(False)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {im: f"C{i}" for i, im in enumerate(impls)}          # one colour per implementation
    markers = "os^Dvp*hX"                                          # one marker per (n, D)
    for ax, pname in zip(axes.flat, pass_names):
        sel = [r for r in rows if r["pass_"] == pname]
        for j, nd in enumerate(nds):
            tag = f" (n={nd[0]}, D={nd[1]})" if len(nds) > 1 else ""
            mk = markers[j % len(markers)]
            floor = sorted({(r["tokens"], r["floor_ms"]) for r in sel if (r["n"], r["D"]) == nd})
            if floor:
                ax.plot(*zip(*floor), "k--", marker=mk, mfc="none", lw=1, label="memory floor" + tag)
            for impl in impls:
                pts = sorted((r["tokens"], r["ms"]) for r in sel
                             if r["impl"] == impl and (r["n"], r["D"]) == nd and r["ms"] is not None)
                if pts:
                    ax.plot(*zip(*pts), "-", marker=mk, color=colors[impl], label=impl + tag)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T = B*S")
        ax.set_ylabel("ms (median)")
        ax.set_title(pname)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("bench: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2

    if args.shapes:
        shapes = [tuple(s) for s in args.shapes]
    elif args.quick:
        shapes = list(QUICK_SHAPES)
    else:
        shapes = list(CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.tokens:
        n, D = shapes[0][2], shapes[0][3]
        shapes = [(1, t, n, D) for t in args.tokens]

    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
        timer = CpuTimer(reps=args.reps if args.reps else (2 if args.quick else None),
                         budget=args.budget, warmup=1 if args.quick else 2)
    else:
        timer = CudaTimer(args.quick)

    compile_on = not args.no_compile and (not args.quick or args.compile)
    compile_why = "skipped (--no-compile)" if args.no_compile else "skipped (--quick; add --compile)"
    try:  # several shapes each compile their own graph
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except AttributeError:
        pass

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    backends, skipped = pick_backends(args, device)
    bandwidth, bw_bytes = copy_bandwidth(device, args.quick)
    dev_name = device_name(device)
    print(f"device: {dev_name}   torch {torch.__version__}   x {args.dtype}, params fp32"
          f"   sinkhorn_iters={args.sinkhorn}   gamma={'none' if args.no_gamma else 'given'}")
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (dst.copy_(src), {bw_bytes >> 20} MiB)   "
          f"timing: {'triton.testing.do_bench, median' if device.type == 'cuda' else 'median of interleaved repetitions, %d threads' % torch.get_num_threads()}")
    if device.type == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores before the run: other "
              "processes compete for the CPU, so CPU times are inflated and noisy")
    print(f"backends: {', '.join(backends) or 'none'}"
          + "".join(f"\n  skipped {b}: {why}" for b, why in skipped.items()))
    print(flush=True)

    rows = []
    for i, shape in enumerate(shapes):
        print(f"[{i + 1}/{len(shapes)}] shape {','.join(map(str, shape))} ...", file=sys.stderr, flush=True)
        rows += bench_shape(shape, args, device, backends, timer, bandwidth, compile_on, compile_why)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    bad = [r for r in rows if r["note"]]
    if bad:
        print(f"\nWARNING: {len(bad)} result(s) differ from torch eager by more than 2x the contract "
              "bound (see note)")

    meta = dict(device=dev_name, device_type=device.type,
                date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                command=" ".join([Path(sys.executable).name, *sys.argv]),
                versions=versions(), platform=platform.platform(),
                threads=torch.get_num_threads() if device.type == "cpu" else None,
                cpu_count=os.cpu_count(), load_average_before=load,
                load_average_after=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                copy_bandwidth_bytes_per_s=bandwidth, copy_buffer_bytes=bw_bytes,
                timing=("triton.testing.do_bench median" if device.type == "cuda"
                        else "median of interleaved repetitions (perf_counter)"),
                x_dtype=args.dtype, param_dtype="fp32", sinkhorn_iters=args.sinkhorn,
                gamma=not args.no_gamma, quick=args.quick, backends=backends, skipped=skipped,
                compile=compile_on, shapes=[list(s) for s in shapes])
    json_path = args.json or HERE / "results" / f"bench-{'cpu' if device.type == 'cpu' else _slug(dev_name)}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    out_rows = [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows]
    json_path.write_text(json.dumps(dict(meta=meta, rows=out_rows), indent=1) + "\n")
    print(f"\nwrote {json_path}")
    if args.plot:
        plot(rows, args.plot, f"mhc_multi on {dev_name}, x {args.dtype}, sinkhorn_iters={args.sinkhorn}")
        print(f"wrote {args.plot}")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
