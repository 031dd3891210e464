"""Run the Triton backend's forward or backward a few times at one shape: a target for a
profiler such as Nsight Compute, e.g.

    ncu --clock-control none --kernel-name regex:_pre_bwd --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats python3 bench/run_once.py bwd 4 4096 4 4096
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import tg, make_inputs, backward_args, NORM_EPS, HC_EPS  # noqa: E402


def main():
    kind = sys.argv[1]
    B, S, n, D = (int(v) for v in sys.argv[2:6])
    reps = int(sys.argv[6]) if len(sys.argv) > 6 else 3
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = make_inputs(B, S, n, D, torch.bfloat16,
                                                                 seed=1)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    fo = tg.forward(x, phi, alpha, bias, g, **kw)
    for _ in range(reps):
        if kind == "fwd":
            tg.forward(x, phi, alpha, bias, g, **kw)
        else:
            tg.backward(*backward_args(fo, x, phi, alpha, bias, g, dh_in, dh_post, dh_res),
                        **kw)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
