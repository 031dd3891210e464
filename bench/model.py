#!/usr/bin/env python
"""mHC in a model: a LLaMA-like stack with plain residual connections against the same blocks in
an ``MHCStack``, with and without selective recompute, eager and under ``torch.compile``.

Each transformer layer is two blocks, attention (RMSNorm, QKV, SDPA with a causal mask, output
projection) and a SwiGLU MLP (RMSNorm, gate/up, down), and each block is one residual step: in
the residual model ``h = h + block(h)``, in the mHC model one ``MHCLayer`` around the block (the
hidden state expanded to n streams before the first and merged after the last). Per mode it
reports the time of a training step (forward + backward of the mean-square output, no optimizer)
and the memory for the backward:

* CUDA: the step's peak allocated memory above what was allocated before it (weights, input),
  and its time (median of ``--reps`` steps, CUDA events);
* CPU: the bytes autograd holds for the backward after the forward (distinct storages saved,
  parameters excluded), and the time (median of ``--reps`` steps).

"over residual" is each mHC mode's figure minus the residual model's. Writes a JSON of every row
(``--json``, default ``$OUT/model.json``, else ``bench/results/model-<device>.json``).

    python bench/model.py                                   # CUDA: D=4096, 2 layers, B=2, S=4096
    python bench/model.py --recompute auto,4 --no-compile
    python bench/model.py --device cpu --quick              # smoke test (tiny model)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _results  # noqa: E402
import mhc_multi  # noqa: E402
from mhc_multi import MHCStack, expand_streams, merge_streams  # noqa: E402
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class RMSNorm(torch.nn.Module):
    def __init__(self, D, **kw):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(D, **kw))

    def forward(self, h):
        return F.rms_norm(h, (h.shape[-1],), self.weight, 1e-6)


class Attention(torch.nn.Module):
    """Pre-norm causal self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, D, heads, **kw):
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(D, **kw)
        self.qkv = torch.nn.Linear(D, 3 * D, bias=False, **kw)
        self.out = torch.nn.Linear(D, D, bias=False, **kw)

    def forward(self, h):
        B, S, D = h.shape
        q, k, v = self.qkv(self.norm(h)).view(B, S, 3, self.heads, D // self.heads).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, S, D))


class SwiGLU(torch.nn.Module):
    """Pre-norm SwiGLU MLP."""

    def __init__(self, D, hidden, **kw):
        super().__init__()
        self.norm = RMSNorm(D, **kw)
        self.gate_up = torch.nn.Linear(D, 2 * hidden, bias=False, **kw)
        self.down = torch.nn.Linear(hidden, D, bias=False, **kw)

    def forward(self, h):
        g, u = self.gate_up(self.norm(h)).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


def blocks(a, **kw):
    out = []
    for _ in range(a.layers):
        out += [Attention(a.dim, a.heads, **kw), SwiGLU(a.dim, a.ffn, **kw)]
    return out


class Residual(torch.nn.Module):
    def __init__(self, a, **kw):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks(a, **kw))

    def forward(self, h):
        for block in self.blocks:
            h = h + block(h)
        return h


class MHC(torch.nn.Module):
    def __init__(self, a, recompute, **kw):
        """The blocks in the activations' dtype, the mHC parameters fp32."""
        super().__init__()
        self.n = a.n
        self.stack = MHCStack(blocks(a, **kw), a.n, a.dim, sinkhorn_iters=a.sinkhorn,
                              recompute=recompute, device=kw["device"])

    def forward(self, h):
        return merge_streams(self.stack(expand_streams(h, self.n)))


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008, help="SwiGLU hidden size")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--layers", type=int, default=2, help="transformer layers (2 blocks each)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--n", type=int, default=4, help="mHC streams")
    p.add_argument("--sinkhorn", type=int, default=20)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--recompute", default="auto,all",
                   help="MHCStack recompute values besides None: ints, 'auto', 'all' (one group)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--reps", type=int, default=10, help="timed steps per mode (median)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: D=64, ffn=128, 4 heads, B=2, S=32, 3 reps, no compile")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.dim, a.ffn, a.heads, a.seq, a.reps, a.no_compile = 64, 128, 4, 32, 3, True
    return a


def _recompute_values(a) -> list:
    out = []
    for v in a.recompute.split(","):
        v = v.strip()
        if v:
            out.append(2 * a.layers if v == "all" else v if v == "auto" else int(v))
    return out


def _held_bytes(model, h) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in the forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(h)
    del out
    return sum(held.values())


def measure(model, h, a) -> dict:
    def step():
        model(h).float().square().mean().backward()

    step()   # warm-up: compiles, autotunes
    step()
    if h.device.type == "cuda":
        torch.cuda.synchronize()
        for p in model.parameters():
            p.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() - base
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(a.reps):
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return {"ms": statistics.median(times), "memory_bytes": mem,
                "memory_kind": "peak allocated during the step"}
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "memory_bytes": _held_bytes(model, h),
            "memory_kind": "held for the backward after the forward"}


def main(argv=None) -> int:
    a = parse_args(argv)
    dev = torch.device(a.device)
    dt = DTYPES[a.dtype]
    kw = dict(device=dev, dtype=dt)
    torch.manual_seed(0)
    h = torch.randn(a.batch, a.seq, a.dim, **kw)
    modes = [("residual", lambda: Residual(a, **kw), None),
             ("mHC", lambda: MHC(a, None, **kw), None)]
    modes += [(f"mHC recompute={v}", lambda v=v: MHC(a, v, **kw), v) for v in _recompute_values(a)]
    rows = []
    for compiled in ([False] if a.no_compile else [False, True]):
        for name, build, rc in modes:
            torch.manual_seed(0)
            model = build()
            group = model.stack.recompute if isinstance(model, MHC) else None
            run = torch.compile(model, fullgraph=True) if compiled else model
            try:
                r = measure(run, h, a)
            except Exception as exc:   # noqa: BLE001 - reported in the table
                r = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append({"mode": name, "compiled": compiled, "group": group, **r})
            del model, run
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for compiled in {r["compiled"] for r in rows}:
        base = next(r for r in rows if r["compiled"] == compiled and r["mode"] == "residual")
        for r in rows:
            if r["compiled"] == compiled and "ms" in r and "ms" in base:
                r["time_over_residual"] = r["ms"] / base["ms"] - 1
                r["memory_over_residual_bytes"] = r["memory_bytes"] - base["memory_bytes"]
    print(f"{'mode':<24} {'compiled':<8} {'ms':>9} {'vs residual':>11} {'memory MiB':>11} "
          f"{'over residual MiB':>18}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<24} {str(r['compiled']):<8} {r['error']}")
            continue
        print(f"{r['mode']:<24} {str(r['compiled']):<8} {r['ms']:>9.3f} "
              f"{r.get('time_over_residual', 0) * 100:>+10.1f}% {r['memory_bytes'] / 2**20:>11.1f} "
              f"{r.get('memory_over_residual_bytes', 0) / 2**20:>18.1f}")
    _results.write("model", "cuda" if dev.type == "cuda" else "cpu", {"rows": rows}, a.json, argv,
                   device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   args=vars(a), torch=torch.__version__, mhc_multi=mhc_multi.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
