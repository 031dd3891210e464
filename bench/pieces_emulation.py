"""Emulate the Triton backward's bf16 pieces on the CPU, in float64, to choose them.

    python3 bench/pieces_emulation.py [--w 2,1] [--p 2,1] [--draws 150] [--shapes B,S,n,D ...]

The column kernel computes ``w = dm @ phi`` (feeds dx) and ``P = dm^T @ x`` (dphi, dgamma) from
bf16 pieces (docs/triton.md, "Precision"): ``a0 = bf16(a)``, ``a1 = bf16(a - a0)``, ...; the
product is the sum of the piece products ``a_i @ b_j`` with ``i + j < max(pieces)``, each exact
and accumulated in fp32 on the tensor cores (here in float64: the accumulation error is ~1e-7,
far below what the pieces decide).  For fresh inputs at CONTRACT.md's scales
(``mhc_multi.crosscheck.random_inputs``), this prints the worst relative error of dx (rounded
to x's dtype once), dphi and dgamma against ``backends/numpy_ref.backward64`` over ``--draws``
draws per shape, next to the bounds of ``mhc_multi.tolerances``.  The fifth session's numbers
(docs/performance.md) came from this script at T <= 8, n*D = 64..400.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.numpy_ref import backward64, forward64  # noqa: E402
from mhc_multi.crosscheck import random_inputs  # noqa: E402
from mhc_multi.tolerances import tolerance  # noqa: E402

EPS = 1e-6
SHAPES = [(1, 1, 4, 64), (1, 2, 1, 256), (1, 1, 8, 32), (1, 4, 4, 64), (1, 2, 2, 128),
          (1, 1, 2, 200), (1, 37, 4, 130)]


def _bf16(a):
    return a.to(torch.bfloat16).to(torch.float64)


def _pieces(a, k):
    a = a.to(torch.float32).to(torch.float64)
    out = []
    for _ in range(k):
        out.append(_bf16(a))
        a = a - out[-1]
    return out


def _product(A, B, na, nb):
    a, b, top = _pieces(A, na), _pieces(B, nb), max(na, nb)
    return sum(a[i] @ b[j] for i in range(na) for j in range(nb) if i + j < top)


def _rel(got, ref):
    return float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))


def one_draw(shape, seed, w, p, x_dtype="bf16"):
    """(dx, dphi, dgamma) relative errors of one draw with pieces ``w`` and ``p``."""
    x, phi, alpha, bias, gamma = random_inputs(shape, x_dtype, seed=seed)
    B, S, n, D = shape
    T = B * S
    xn = x.reshape(T, n, D).double().numpy()
    ph, al, bi, g = (a.double().numpy() for a in (phi, alpha, bias, gamma))
    _, h_post, _, r, m, h_pre = forward64(xn, ph, al, bi, g, norm_eps=EPS, hc_eps=EPS)
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731 -- what fp32 stores hold
    r, m, h_pre, h_post = f32(r), f32(m), f32(h_pre), f32(h_post)
    rng = np.random.default_rng(seed + 1)
    dh_in = torch.from_numpy(rng.standard_normal((T, D))).to(x.dtype).double().numpy()
    dh_post, dh_res = rng.standard_normal((T, n)), rng.standard_normal((T, n, n))
    ref = backward64(xn, ph, al, bi, r, m, h_pre, h_post, dh_in, dh_post, dh_res, g,
                     norm_eps=EPS, hc_eps=EPS)
    # the row kernel's dm (fp32) and coef, then the column kernel's products from pieces
    s = h_pre - EPS
    dhp = np.einsum("td,tid->ti", dh_in, xn)
    e = np.concatenate([al[0] * dhp * s * (1 - s), al[1] * dh_post * h_post * (1 - h_post / 2),
                        al[2] * dh_res.reshape(T, -1)], axis=1)
    dm = torch.from_numpy(f32(r[:, None] * e))
    coef = torch.from_numpy(np.sum(e * m, axis=1) * r ** 3 / (n * D))
    v = torch.from_numpy(xn.reshape(T, n * D))
    gg = torch.from_numpy(g.reshape(-1))
    dx = (_product(dm, torch.from_numpy(ph), *w) * gg - coef[:, None] * v
          + torch.from_numpy((h_pre[:, :, None] * dh_in[:, None, :]).reshape(T, -1)))
    dx = dx.float().to(x.dtype).double()
    P = _product(dm.T.contiguous(), v, *p)
    return (_rel(dx, torch.from_numpy(ref[0].reshape(T, -1))),
            _rel(P * gg, torch.from_numpy(ref[1])),
            _rel((torch.from_numpy(ph) * P).sum(0), torch.from_numpy(ref[4].reshape(-1))))


def main():
    ap = argparse.ArgumentParser()
    pair = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    ap.add_argument("--w", type=pair, default=(2, 1), help="pieces of (dm, phi) for w")
    ap.add_argument("--p", type=pair, default=(2, 1), help="pieces of (dm, x) for P")
    ap.add_argument("--x-dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--draws", type=int, default=150)
    ap.add_argument("--shapes", nargs="*", type=pair, default=SHAPES)
    args = ap.parse_args()
    bounds = [tolerance(o, args.x_dtype) for o in ("dx", "dphi", "dgamma")]
    print(f"w {args.w}, P {args.p}, x {args.x_dtype}, {args.draws} draws per shape; worst "
          f"relative error (bounds: dx {bounds[0]:.0e}, dphi and dgamma {bounds[1]:.0e})")
    for shape in args.shapes:
        worst = [0.0, 0.0, 0.0]
        for _ in range(args.draws):
            errs = one_draw(shape, random.randrange(2 ** 31), args.w, args.p, args.x_dtype)
            worst = [max(a, b) for a, b in zip(worst, errs)]
        print(f"{str(shape):18s} n*D {shape[2] * shape[3]:5d}  dx {worst[0]:.1e}  "
              f"dphi {worst[1]:.1e}  dgamma {worst[2]:.1e}", flush=True)


if __name__ == "__main__":
    main()
