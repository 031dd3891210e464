#!/usr/bin/env python
"""The whole mHC step, pre -> block -> post, forward and forward+backward, side by side.

The step is ``MHCLayer(block)`` on x [B,S,n,D] with Sinkhorn (k = 20) and fp32 parameters; the
block is a per-channel scale ``f = h_in * w`` so that nearly all the traffic is mHC's. Each
implementation runs the same step on the same tensors:

* ``mhc_multi``: ``MHCLayer`` (autograd through the package's custom ops);
* ``torch compile``: the same step in plain PyTorch (``torch_reference.forward`` for pre, einsum
  for post, autograd for the backward) under ``torch.compile``;
* ``torch eager``: the same without compile (``--eager``);
* ``liger (bf16 phi)``: Liger-Kernel's ``LigerMHC`` around a copy of the block, with its own
  parameters (bf16 phi, its fast setting), where ``liger_kernel`` is importable, else n/a.

Forward+backward is ``torch.autograd.grad`` of the output with respect to x and every parameter.
The floor is the bytes the step must move, each tensor counted once (``floor_bytes``), over the
copy bandwidth measured in the same run. Writes every row to JSON (``--json``, default
``$OUT/step.json``, else ``bench/results/step-<device>.json``).

    python bench/step.py                                  # CUDA: (4,4096,4,4096), (4,8192,4,7168)
    python bench/step.py --shapes 2,4096,1,4096 --ns 1,2,3,4,5,6,7,8
    python bench/step.py --kernels --shapes 4,4096,4,4096 # where the step's time goes, per kernel
    python bench/step.py --device cpu --quick             # smoke test
    # against another version in the same run: install it apart, then
    pip install --no-deps --no-build-isolation --target /tmp/base <its checkout>
    python bench/step.py --baseline /tmp/base             # its rows: "mhc_multi (baseline)"
    # launch variants of the Triton backend (set_config keys), rows "mhc_multi [name]":
    python bench/step.py --no-compile --variants '{"split4": {"fwd_split": 4}}'
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import mhc_multi  # noqa: E402
import _results  # noqa: E402
import torch_reference as tref  # noqa: E402
from bench import copy_bandwidth  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
K = 20


class Scale(torch.nn.Module):
    """The block: ``f = h_in * w`` (per channel)."""

    def __init__(self, D, **kw):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(D, **kw) + 0.01 * torch.randn(D, **kw))

    def forward(self, h):
        return h * self.w


class PlainStep(torch.nn.Module):
    """The step in plain PyTorch, with the same parameters as an ``MHCLayer``."""

    def __init__(self, layer: mhc_multi.MHCLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        p = self.layer.pre
        h_in, h_post, h_res, *_ = tref.forward(x, p.phi, p.alpha, p.bias, p.gamma,
                                               sinkhorn_iters=K)
        f = self.layer.block(h_in)
        x_next = torch.einsum("bsij,bsjd->bsid", h_res, x.to(h_res.dtype)) \
            + h_post[..., None] * f[:, :, None, :].to(h_post.dtype)
        return x_next.to(x.dtype)


def floor_bytes(B, S, n, D, x_bytes, backward: bool) -> int:
    """Bytes the step must move, each tensor once. Forward: x, phi (read); h_in (written by pre,
    read by the block), f (written by the block, read by post), x_next (written). Backward
    adds dx_next (read), df and dh_in (one pass each), dx (written), dphi (written)."""
    T, F = B * S, n * n + 2 * n
    stream, row, phi = T * n * D * x_bytes, T * D * x_bytes, F * n * D * 4
    fwd = stream + phi + row + row + stream
    return fwd + (stream + row + row + stream + phi if backward else 0)


def design_bytes(B, S, n, D, x_bytes) -> dict:
    """What each of our kernels moves as designed (inputs read once, outputs written once per
    kernel; the per-token gates and partials, a few MB, left out): the step's passes over x."""
    T = B * S
    X, H = T * n * D * x_bytes, T * D * x_bytes
    return {"_pre_fwd_part_kernel": X, "_pre_fwd_fin_kernel": X + H, "_post_fwd_kernel": 2 * X + H,
            "_post_bwd_kernel": 3 * X + 2 * H, "_pre_bwd_row_kernel": X + H,
            "_pre_bwd_col_kernel": 3 * X + H}


def kernel_rows(shape, fwd, fwd_bwd, x_bytes, bandwidth, iters=10) -> list[dict]:
    """Per-kernel device time (µs per step, torch.profiler over ``iters`` steps) of our step,
    forward and forward+backward, with each of our kernels' design bytes and the fraction of
    the copy bandwidth it reaches; torch's kernels (the block, autograd) by their names."""
    from _gpu import kernel_stats   # imports the Triton backend: only where it is used
    design = design_bytes(*shape, x_bytes)
    rows = []
    for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for name, (ms, calls) in kernel_stats(fn, iters).items():
            r = dict(shape=shape, pass_=pass_, kernel=name[:70], us=ms * 1e3, calls=calls)
            b = design.get(name)
            if b:
                r.update(design_bytes=b, of_copy=b / (ms * 1e-3) / bandwidth)
            rows.append(r)
    return sorted(rows, key=lambda r: (r["pass_"], -r["us"]))


def _liger(layer, n, D, dt):
    """Liger-Kernel's ``LigerMHC`` around a copy of the same block, or the reason there is none.

    Its parametrisation differs (three scalar alphas, phi as [nD, F] in bf16, its fast setting),
    so it runs the same step on the same x with its own parameters: its row gives a time, not a
    difference from ours."""
    try:
        from liger_kernel.transformers.mhc import LigerMHC
    except ImportError as exc:
        return None, f"liger_kernel.transformers.mhc not importable ({exc.__class__.__name__})"
    import copy
    return LigerMHC(copy.deepcopy(layer.block), hc=n, c=D, tmax=K, phi_dtype=torch.bfloat16,
                    allow_fp32=dt == torch.float32), None


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return cpu


def bench_shape(shape, a, device, timer, bandwidth, kernels=None) -> list[dict]:
    B, S, n, D = shape
    dt = DTYPES[a.dtype]
    torch.manual_seed(0)
    layer = mhc_multi.MHCLayer(Scale(D, device=device, dtype=dt), n, D, sinkhorn_iters=K,
                               device=device)
    with torch.no_grad():   # gates that depend on x
        layer.pre.alpha.fill_(0.5)
    x = mhc_multi.random_inputs(shape, a.dtype, seed=0, device=device)[0].requires_grad_()
    dy = torch.randn_like(x)
    impls = {"mhc_multi": layer}
    variants = {f"mhc_multi [{k}]": v for k, v in a.variants.items()}
    impls.update(dict.fromkeys(variants, layer))
    plain = PlainStep(layer)
    if not a.no_compile and not a.only_ours:
        impls["torch compile"] = torch.compile(plain)
    if a.eager and not a.only_ours:
        impls["torch eager"] = plain
    if not a.only_ours:
        liger, why = _liger(layer, n, D, dt)
        if liger is not None:
            impls["liger (bf16 phi)"] = liger
    rows = []
    ref = None
    for name, model in impls.items():
        mparams = list(model.parameters())
        def fwd():
            with torch.no_grad():
                return model(x)

        def fwd_bwd():
            return torch.autograd.grad(model(x), [x, *mparams], dy)
        if name in variants:   # the Triton backend's rule with these overrides, then restored
            from mhc_multi.backends import triton as tg
            tg.set_config(**variants[name])
        try:
            if kernels is not None and name == "mhc_multi":
                kernels += kernel_rows(shape, fwd, fwd_bwd, x.element_size(), bandwidth)
            grads = fwd_bwd()
            if ref is None:
                ref = grads
            diff = None if name.startswith("liger") else max(
                float((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30))
                for g, r in zip(grads, ref))
            for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                ms = timer(fn)
                floor_ms = floor_bytes(B, S, n, D, x.element_size(), pass_ != "fwd") \
                    / bandwidth * 1e3
                rows.append(dict(shape=shape, impl=name, pass_=pass_, ms=ms, floor_ms=floor_ms,
                                 x_floor=ms / floor_ms, rel_diff_vs_first=diff))
        except Exception as exc:   # noqa: BLE001 - reported in the table
            rows.append(dict(shape=shape, impl=name, pass_="-",
                             error=f"{type(exc).__name__}: {exc}"[:160]))
        finally:
            if name in variants:
                tg.set_config()
    if not a.only_ours and why:
        rows.append(dict(shape=shape, impl="liger", pass_="-", error=why))
    return rows


def baseline_rows(a) -> list[dict]:
    """The baseline's mhc_multi rows: this script, run with the baseline first on the path."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "base.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only-ours", "--json", str(out),
               "--device", a.device, "--dtype", a.dtype, "--shapes",
               *(",".join(map(str, s)) for s in a.shape_list)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [a.baseline, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        subprocess.run(cmd, env=env, check=True, cwd=tmp)
        rows = json.loads(out.read_text())["rows"]
    for r in rows:
        r["impl"] = "mhc_multi (baseline)"
        r["shape"] = tuple(r["shape"])
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", default=None, help="B,S,n,D ...")
    p.add_argument("--ns", default=None, help="also every n in this list at the first shape")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--eager", action="store_true", help="also plain PyTorch without compile")
    p.add_argument("--quick", action="store_true", help="smoke test: (1,16,4,64), no compile")
    p.add_argument("--json", default=None)
    p.add_argument("--baseline", default=None,
                   help="a directory with another mhc_multi installed (pip --target): its step "
                        "is timed in a subprocess of this run, on the same shapes")
    p.add_argument("--kernels", action="store_true",
                   help="also each kernel's device time in our step (torch.profiler), against "
                        "its design bytes (CUDA)")
    p.add_argument("--variants", default="{}", type=json.loads,
                   help='JSON {"name": {set_config keys}}: our step again under each of these '
                        "launch variants of the Triton backend, in the same run")
    p.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.no_compile = a.shapes or ["1,16,4,64"], True
    if not a.shapes:
        a.shapes = (["4,4096,4,4096", "4,8192,4,7168"] if a.device.startswith("cuda")
                    else ["1,1024,4,1024"])
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes]
    if a.ns:
        B, S, _, D = shapes[0]
        shapes += [(B, S, int(n), D) for n in a.ns.split(",") if (B, S, int(n), D) not in shapes]
    a.shape_list = shapes
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    bandwidth, _ = copy_bandwidth(device, a.quick)
    timer = _timer(device)
    rows = []
    kernels = [] if a.kernels and device.type == "cuda" else None
    for shape in a.shape_list:
        rows += bench_shape(shape, a, device, timer, bandwidth, kernels)
    if a.baseline:
        rows += baseline_rows(a)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {a.dtype} x, fp32 parameters, k = {K}")
    print(f"{'shape':<20} {'impl':<14} {'pass':<8} {'ms':>9} {'floor ms':>9} {'x floor':>8} "
          f"{'vs mhc_multi':>12}")
    for r in rows:
        if "error" in r:
            print(f"{str(r['shape']):<20} {r['impl']:<14} n/a: {r['error']}")
            continue
        ours = next((q for q in rows if q["shape"] == r["shape"] and q["impl"] == "mhc_multi"
                     and q["pass_"] == r["pass_"] and "ms" in q), None)
        ratio = f"{r['ms'] / ours['ms']:.2f}x" if ours else "-"
        print(f"{str(r['shape']):<20} {r['impl']:<14} {r['pass_']:<8} {r['ms']:>9.3f} "
              f"{r['floor_ms']:>9.3f} {r['x_floor']:>8.2f} {ratio:>12}")
    for k in kernels or ():
        extra = (f"{k['design_bytes'] / 1e6:>8.0f} MB {k['of_copy']:>5.2f} of copy"
                 if "design_bytes" in k else "")
        print(f"{str(k['shape']):<20} {k['pass_']:<8} {k['us']:>8.1f} µs x{k['calls']} "
              f"{k['kernel'][:44]:<44} {extra}")
    _results.write("step", device.type, {"rows": rows, "kernels": kernels or []}, a.json, argv,
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   copy_bytes_per_s=bandwidth, torch=torch.__version__,
                   mhc_multi=mhc_multi.__version__,
                   mhc_multi_path=str(Path(mhc_multi.__file__).parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
