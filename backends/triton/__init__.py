"""Triton backend: the mHC pre and post operators, forward and backward (CONTRACT.md), on CUDA
tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` runs the same kernels on Triton's CPU
interpreter.  Same interface as ``numpy_ref`` (see its docstring); design in docs/triton.md.

Modules:
    pre_forward   the fused and the split forward; forward()
    gates         inv_rms and the gates from the raw projections, their stores
    pre_backward  row, column and reduce kernels; backward()
    sinkhorn      Sinkhorn-Knopp forward iterations, VJP and _sk_bwd_kernel
    post          the post operator's kernels; post_forward(), post_backward()
    precision     bf16-piece dots (fp32 accuracy on tensor cores), the pieces per product,
                  _prep_phi_kernel (phi*g in pieces)
    config        the launch rule (tiles, warps, stages, splits), set_config, config_override
    grids         launch grids: pure functions, checked by tests/test_grids.py
    _util         host helpers; the one place triton and torch are imported

Importing this package never fails where triton (or torch) is missing: availability() says why
it cannot run, and the kernel modules then define no kernels.
"""
from __future__ import annotations

from ._util import TRITON_ERROR, _interpret, torch, triton
from .config import config_override, set_config
from .post import post_backward, post_forward
from .pre_backward import backward
from .pre_forward import forward

ARRAY_KIND = "torch"
#: forward/backward/post take x as [*L, n, D] and the per-token arrays as [*L, ...] for any
#: token dims L (the front end's [B, S]) and return results with the same leading dims: the
#: kernels see flat [T, ...] memory, so no reshape costs a plain call a view per tensor.
LEADING_TOKEN_DIMS = True
SUPPORTS_SINKHORN = True
X_DTYPES = ("bf16", "fp16", "fp32")  # the front end refuses others before we run
PARAM_DTYPES = ("fp32",)
#: The most tokens T = B*S the kernels take (the front end refuses more).  They number tokens
#: in int32 (rows = block * BLOCK_T + arange(BLOCK_T), the token loops' counters), which reach
#: T + BLOCK_T - 1 in the last block; 2^16 below 2^31 leaves room for any token block up to
#: 2^16 (the rules' largest is 64).  Offsets of token * row length are int64 (rows64).
MAX_TOKENS = 2**31 - 2**16

__all__ = ["ARRAY_KIND", "LEADING_TOKEN_DIMS", "SUPPORTS_SINKHORN", "X_DTYPES", "PARAM_DTYPES",
           "MAX_TOKENS", "availability", "forward", "backward", "post_forward", "post_backward",
           "set_config", "config_override"]


def availability() -> str | None:
    """None when this backend can run here, else the reason it cannot."""
    if torch is None:
        return "torch is not installed"
    if triton is None:
        return f"triton is not installed ({TRITON_ERROR})"
    if _interpret():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
    return None
