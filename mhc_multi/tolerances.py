"""The accuracy table of CONTRACT.md, as code: the one place every tolerance comes from.

Errors are relative Frobenius norms ``||got - ref|| / ||ref||`` against a float64 evaluation
of the contract (with 16-bit parameters: evaluated on the same rounded parameter values).
Outputs in the activation dtype (``h_in``, ``dx``, and the post operator's ``x_next``,
``df_out``) are bounded by the rounding of that dtype: 1.5x (bf16) and 2x (fp16) its unit
roundoff, so one final rounding fits and any intermediate 16-bit rounding does not. The
gradients of 16-bit parameters (and of 16-bit gates) are rounded once to their own dtype and
take the same bound for it. Everything else (gates, intermediates, fp32 parameter gradients)
is fp32-class: 2e-5, or 1e-12 when both the activations and the parameters are fp64.
"""
from __future__ import annotations

import numpy as np

DTYPE_NAMES = ("bf16", "fp16", "fp32", "fp64")

#: outputs that take the activation (x) dtype
ACTIVATION_OUTPUTS = frozenset({"h_in", "dx", "x_next", "df_out"})

#: outputs that take a parameter's (or, for the post operator, a gate's) own dtype
PARAM_GRADIENTS = frozenset({"dphi", "dalpha", "dbias", "dgamma", "dh_post", "dh_res"})

#: bound for an output rounded once to a dtype: activation outputs by x's dtype, and the
#: gradients of 16-bit parameters by the parameter's dtype
ACTIVATION_TOLERANCE = {"bf16": 6e-3, "fp16": 1e-3, "fp32": 1e-5, "fp64": 1e-12}

#: bound for every other output: fp32-class unless x and the parameters are both fp64
PARAM_TOLERANCE = {"fp32": 2e-5, "fp64": 1e-12}


#: with sinkhorn_iters = 20 on realistic logits, |row sum - 1| and |column sum - 1| of h_res
SINKHORN_MARGIN_TOLERANCE = 1e-5


def tolerance(output: str, x_dtype: str, param_dtype: str | None = None) -> float:
    """The bound on the relative error of ``output`` (a contract name such as ``"dphi"``).

    ``x_dtype`` and ``param_dtype`` are names from :data:`DTYPE_NAMES`; ``param_dtype`` is the
    dtype of the parameter whose gradient ``output`` is (or phi's, for the other outputs) and
    defaults to fp64 for fp64 activations and to fp32 otherwise. 16-bit parameters are
    computed in fp32: their gradients take their own dtype's bound, every other output the
    fp32-class one.
    """
    for name, d in (("x_dtype", x_dtype), ("param_dtype", param_dtype)):
        if d is not None and d not in DTYPE_NAMES:
            raise ValueError(f"{name}: expected one of {DTYPE_NAMES}, got {d!r}")
    if output in ACTIVATION_OUTPUTS:
        return ACTIVATION_TOLERANCE[x_dtype]
    if param_dtype is None:
        param_dtype = "fp64" if x_dtype == "fp64" else "fp32"
    if param_dtype in ("bf16", "fp16"):
        return ACTIVATION_TOLERANCE[param_dtype] if output in PARAM_GRADIENTS else \
            PARAM_TOLERANCE["fp32"]
    both_fp64 = x_dtype == "fp64" and param_dtype == "fp64"
    return PARAM_TOLERANCE["fp64" if both_fp64 else "fp32"]


def reference_slack(rounding_bound, ref64) -> float:
    """What to add to an output's bound because the reference is itself a float64 evaluation.

    ``rounding_bound`` bounds the rounding error of a float64 evaluation of the output element
    by element (``numpy_ref.backward64(..., dx_rounding=True)`` gives it for dx). Two float64
    evaluations (the reference and an fp64 backend, or two transcriptions of the formula) may
    each be off by it, so the slack is ``2 ||rounding_bound|| / ||ref||``. It matters only
    where the output is the small difference of large terms: dx of a short row (n*D = 1: its
    first two terms cancel to ``eps r^2`` of their size), where no float64 evaluation is
    within 1e-12 of another. Where nothing cancels it is ``2 (F + 8) u64`` times a factor of
    order one, a few percent of the fp64 bound (measured: at most 10 % of 1e-12 at n = 8,
    docs/tolerances.md), and nothing against a 16-bit or fp32 bound.
    """
    norm = float(np.linalg.norm(np.ravel(ref64)))
    slack = 2.0 * float(np.linalg.norm(np.ravel(rounding_bound)))
    return slack / norm if norm > 0 else slack

