"""``mhc-multi``: the backend table and the float64 audit.

    mhc-multi backends
    mhc-multi check [--shape B,S,n,D] [--dtype bf16|fp16|fp32|fp64]
                    [--param-dtype bf16|fp16|fp32|fp64] [--backends a,b]
                    [--seed N] [--sinkhorn K] [--post] [--no-gamma]
"""
from __future__ import annotations

import argparse
import random
import sys

from .errors import BackendUnavailableError
from .registry import BACKENDS, available_backends


def _backends_table() -> str:
    rows = [f"{'backend':<8} {'available':<9}  reason"]
    for b in available_backends():
        rows.append(f"{b.name:<8} {'yes' if b.available else 'no':<9}  {b.reason or ''}")
    return "\n".join(rows)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"expected B,S,n,D (four integers), got {text!r}")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mhc-multi", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="which backends can run here, and why not")
    chk = sub.add_parser("check", help="audit every available backend against float64")
    chk.add_argument("--shape", type=_shape, default=(2, 33, 4, 200), help="B,S,n,D")
    chk.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "fp64"), default=None,
                     help="x's dtype (default bf16 with torch, fp32 without)")
    chk.add_argument("--param-dtype", choices=("bf16", "fp16", "fp32", "fp64"), default=None,
                     help="phi, alpha, bias, gamma (default fp64 for fp64 x, else fp32)")
    chk.add_argument("--backends", default=None, help="comma-separated (default: all available)")
    chk.add_argument("--seed", type=int, default=None, help="default: a fresh random seed")
    chk.add_argument("--sinkhorn", type=int, default=0, metavar="K", help="sinkhorn_iters")
    chk.add_argument("--post", action="store_true", help="also check the post operator")
    chk.add_argument("--no-gamma", action="store_true", help="gamma=None")
    args = parser.parse_args(argv)

    if args.command == "backends":
        print(_backends_table())
        return 0

    from .crosscheck import crosscheck, random_inputs
    try:
        import torch  # noqa: F401
        container = "torch"
    except ImportError:
        container = "numpy"
    dtype = args.dtype or ("bf16" if container == "torch" else "fp32")
    seed = random.randrange(2**31) if args.seed is None else args.seed
    if args.backends:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in names if b not in BACKENDS]
        if unknown:
            parser.error(f"--backends: unknown {unknown}; valid: {', '.join(BACKENDS)}")
    else:
        names = [b.name for b in available_backends() if b.available]
        # triton only runs here on CUDA tensors or the (slow) interpreter: check it on a GPU
        if "triton" in names:
            import os
            try:
                import torch
                on_gpu = torch.cuda.is_available()
            except ImportError:
                on_gpu = False
            if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
                names.remove("triton")
    device = "cuda" if "triton" in names and container == "torch" and _cuda() else "cpu"
    param_dtype = args.param_dtype or ("fp64" if dtype == "fp64" else "fp32")
    try:
        inputs = random_inputs(args.shape, dtype, param_dtype=param_dtype,
                               gamma=not args.no_gamma, seed=seed, container=container,
                               device=device)
        report = crosscheck(*inputs, backends=names, seed=seed, sinkhorn_iters=args.sinkhorn,
                            post=args.post)
    except (ValueError, TypeError, BackendUnavailableError) as exc:  # the front end's message
        chk.error(str(exc))
    print(report)
    return 0 if report.ok else 1


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
