"""H200 check of the Triton short-row float64 path (backends/_common.SMALL_ND): the dx error of
fp32 x at n*D <= 16 with small tokens and large phi (tests/test_accuracy.py::test_short_rows_cancel
on the GPU), plus plain draws at shapes on both sides of the threshold. Prints a table; writes
bench/results/short_rows-<gpu>.json (or $OUT/ when set)."""
import json
import os
import time

import torch

from mhc_multi import crosscheck, random_inputs
from mhc_multi.tolerances import tolerance

CASES = [((1, 1, 1, 1), 0.02, 10), ((1, 1, 2, 3), 0.02, 10), ((1, 3, 8, 2), 0.02, 10),
         ((1, 1, 1, 1), 1, 1), ((2, 3, 1, 1), 1, 1), ((1, 5, 4, 4), 1, 1), ((1, 5, 1, 17), 1, 1),
         ((1, 37, 2, 130), 1, 1)]


def main(draws=16):
    dev = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: TRITON_INTERPRET=1
    rows = []
    t0 = time.time()
    for shape, xs, ps in CASES:
        worst, fails = 0.0, 0
        for s in range(draws):
            x, phi, *rest = random_inputs(shape, "fp32", gamma=bool(s % 2), seed=s, device=dev)
            rep = crosscheck(x * xs, phi * ps, *rest, backends=["triton"], seed=s)
            worst = max(worst, rep.error("triton", "dx"))
            fails += not rep.ok
        rows.append(dict(shape=shape, x_scale=xs, phi_scale=ps, dx_worst=worst, fails=fails,
                         draws=draws))
        print(f"{str(shape):<16} x*{xs:<5} phi*{ps:<3} dx worst {worst:.2e} "
              f"(bound {tolerance('dx', 'fp32'):.0e})  failed {fails}/{draws}", flush=True)
    print(f"{time.time() - t0:.1f} s")
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    name = torch.cuda.get_device_name().split()[-1].lower() if dev == "cuda" else "interp"
    with open(os.path.join(out, f"short_rows-{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    import sys
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
