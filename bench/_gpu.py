"""What the GPU bench tools share: inputs, the NaN-poisoned allocator, do_bench and CUDA-graph
timing, the copy bandwidth, byte counts and per-kernel times from torch.profiler.

``tg`` is the Triton backend. This module imports without a GPU (and without triton): the
inputs and ``nbytes`` also serve CPU runs, where the kernels run on Triton's interpreter.
"""
from __future__ import annotations

import os
import sys

import torch

import torch_reference as tref

try:
    from mhc_multi.backends import triton as tg
except Exception:  # not installed: import the module from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from backends import triton as tg

NORM_EPS = 1e-6
HC_EPS = 1e-6
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _generator(device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return gen


def make_inputs(B, S, n, D, dtype, gamma=True, seed=None, device="cuda"):
    """(x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res), token-major ([T, n, D] etc., as
    the backend takes them), drawn on ``device`` at realistic scales: x and dh_in in ``dtype``,
    the rest fp32; a fresh seed unless ``seed`` is given."""
    kw = dict(device=device, generator=_generator(device, seed))
    T, F = B * S, n * n + 2 * n
    x = torch.randn(T, n, D, **kw).to(dtype)
    phi = torch.randn(F, n * D, **kw) / (n * D) ** 0.5
    alpha = torch.randn(3, **kw)
    bias = 0.1 * torch.randn(F, **kw)
    g = (1 + 0.1 * torch.randn(n, D, **kw)) if gamma else None
    dh_in = torch.randn(T, D, **kw).to(dtype)
    dh_post = torch.randn(T, n, **kw)
    dh_res = torch.randn(T, n, n, **kw)
    return x, phi, alpha, bias, g, dh_in, dh_post, dh_res


def post_inputs(B, S, n, D, dtype, seed=None, device="cuda"):
    """(x, f_out, h_post, h_res, dx_next) of the post operator, token-major: x, f_out and
    dx_next in ``dtype``, the gates fp32, h_res doubly stochastic (20 Sinkhorn iterations)."""
    kw = dict(device=device, generator=_generator(device, seed))
    T = B * S
    x = torch.randn(T, n, D, **kw).to(dtype)
    f = torch.randn(T, D, **kw).to(dtype)
    hp = 2 * torch.rand(T, n, **kw)
    hr = tref.sinkhorn(torch.randn(T, n, n, **kw), 20)
    gn = torch.randn(T, n, D, **kw).to(dtype)
    return x, f, hp, hr, gn


def backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res):
    """The backward's positional arguments (CONTRACT.md's order) from the outputs ``fo`` =
    (h_in, h_post, h_res, inv_rms, h_mix, h_pre) of a forward on the same inputs."""
    return (x, phi, alpha, bias, fo[3], fo[4], fo[5], fo[1], dh_in, dh_post, dh_res, g)


def poison():
    """Fill half of the CUDA caching allocator's free memory with NaN, so an output element a
    kernel leaves unwritten shows as NaN. A no-op without CUDA (the interpreter's CPU tensors)."""
    if not torch.cuda.is_available():
        return
    free = torch.cuda.mem_get_info()[0]
    try:
        junk = torch.empty(int(free * 0.5) // 4, dtype=torch.float32, device="cuda")
        junk.fill_(float("nan"))
        del junk
    except RuntimeError:
        pass


def rel(got, ref):
    """||got - ref|| / ||ref|| on the device, for two versions' outputs (the float64 judgement
    is mhc_multi.crosscheck.relative_error); inf when ``got`` has a NaN or an inf."""
    if got is None and ref is None:
        return 0.0
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ---------------------------------------------------------------------------------------------
# timing (CUDA)

def bench(fn, ms=200):
    """Median ms of ``fn`` by triton.testing.do_bench (it flushes L2 before each call)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=50, rep=ms, return_mode="median")


def capture_graph(fn):
    """fn captured in a CUDA graph, after warm-up calls on a side stream (compiles, caches)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def bench_graph(fn, ms=200):
    """Median time of fn captured in a CUDA graph and replayed: the device time without the
    host's launch overhead."""
    return bench(capture_graph(fn).replay, ms)


def copy_bandwidth():
    """Bytes/s of a 1 GiB device-to-device copy (read + write): the floor's denominator."""
    a = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    return 2 * a.numel() / (t * 1e-3)


def copy_same_ms(nbytes_moved):
    """A device-to-device copy moving ``nbytes_moved`` bytes (half read, half written), timed
    like our kernels by plain do_bench (L2 flushed before each call; in a CUDA graph the copy
    becomes a copy-engine node, slower, so not there): what moving that many bytes costs at
    this size."""
    src = torch.empty(nbytes_moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def kernel_stats(fn, iters=20):
    """Per-kernel ``(device ms, launches)`` per call of fn (means over ``iters`` calls) by
    kernel name, from torch.profiler."""
    from torch.profiler import profile, ProfilerActivity
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0) > 0:
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = ev.cuda_time_total
            if t > 0:
                out[ev.key] = (t / iters / 1e3, ev.count // iters)
    return out


def kernel_times(fn, iters=20):
    """Per-kernel device time (ms per call, the mean over ``iters`` calls) by kernel name."""
    return {k: ms for k, (ms, _) in kernel_stats(fn, iters).items()}


def kernel_ms(fn, iters=20):
    """kernel_times for printed rows: names cut to 28 characters, ms rounded to 0.1 us."""
    return {k[:28]: round(v, 4) for k, v in kernel_times(fn, iters).items()}
