#!/usr/bin/env python
"""On the GPU: torch.compile(fullgraph=True) of an MHCLayer model (triton backend) against
eager, and the end-to-end example on CUDA. Prints a table; writes JSON with --json.

    python bench/gpu_issue6.py --json $OUT/issue6.json
"""
import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from example import MHCStack, main as example_main  # noqa: E402
from mhc_multi.crosscheck import relative_error  # noqa: E402
from mhc_multi.tolerances import tolerance  # noqa: E402


def compile_check(device, seed=0, D=256, sinkhorn_iters=20):
    torch.manual_seed(seed)
    model = MHCStack(D, 4, 2, backend="auto", sinkhorn_iters=sinkhorn_iters).to(device)
    h = torch.randn(4, 128, D, device=device)
    ref = model(h)
    ref.square().mean().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(h)
    out.square().mean().backward()
    rows = [("x_next (model output)", relative_error(out, ref.detach().double().cpu().numpy()),
             tolerance("x_next", "fp32"))]
    for k, p in model.named_parameters():
        name = k.rsplit(".", 1)[-1]
        out_name = "d" + name if name in ("phi", "alpha", "bias", "gamma") else "dphi"
        rows.append((k, relative_error(p.grad, ref_grads[k].double().cpu().numpy()),
                     tolerance(out_name, "fp32")))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    result = {"device": where, "date": time.strftime("%Y-%m-%d")}
    for k in (0, 20):
        rows = compile_check(a.device, sinkhorn_iters=k)
        print(f"\ntorch.compile(fullgraph=True) vs eager on {where}, backend auto, fp32, "
              f"sinkhorn_iters={k}")
        print(f"{'tensor':<34} {'rel. error':>10} {'bound':>7}")
        for name, err, tol in rows:
            print(f"{name:<34} {err:>10.2e} {tol:>7.0e}  {'ok' if err <= tol else 'FAIL'}")
        result[f"compile_k{k}"] = rows
    t0 = time.perf_counter()
    curves = example_main(["--device", a.device, "--steps", str(a.steps)])
    result["example_s"] = time.perf_counter() - t0
    result["example_loss"] = {k: (v[0], v[-1]) for k, v in curves.items()}
    print(f"example on {where}: {result['example_s']:.1f} s", result["example_loss"])
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
