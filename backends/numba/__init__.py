"""Numba CPU backend: fused, parallel, deterministic forward and backward of the mHC pre
operator (with the optional Sinkhorn-Knopp projection) and of the post operator.

Interface: see ``backends/numpy_ref.py`` (x [T, n, D] with ``np.uint16`` meaning bfloat16 bits,
parameters fp32 or fp64, outputs in the contract's dtypes). Design notes: ``docs/numba.md``.

* One pass per block of tokens: the block's activations are read from memory once, decoded
  (bf16/fp16 bits -> fp32 in registers) into a small per-thread scratch buffer that stays in
  L2, and everything else (sum of squares, the ``F`` projections, gates, ``h_in``; in the
  backward ``dh_pre``, gate derivatives, ``w = dm @ phi``, ``dx`` and the parameter-gradient
  contributions) is computed from that buffer. No temporary of size ``T x n*D`` exists.
* Tokens are split into a fixed number of chunks that depends on ``T`` only (never on the thread
  count); each chunk owns its partial parameter-gradient buffers, which are reduced afterwards in
  chunk order in float64. Results are therefore bitwise identical for any thread count and from
  run to run.
* Arithmetic is fp32 for 16/32-bit activations with fp32 parameters and fp64 as soon as either
  side is fp64; per-token scalars (gates, their derivatives, ``dalpha``/``dbias``) are fp64.
  16-bit outputs are rounded once, to nearest even, from the fp32 result.

Modules: ``pre_forward`` and ``pre_backward`` (the pre operator), ``post`` (the post operator),
``sinkhorn`` (SK_k and its backward, per token), ``_kernels`` (numba import, tiling constants,
chunking, 16-bit codecs, element load / store). Importing works without numba:
``availability()`` then gives the reason.
"""
from __future__ import annotations

from ._kernels import IMPORT_ERROR as _IMPORT_ERROR
from .post import post_backward, post_forward
from .pre_backward import backward
from .pre_forward import forward

ARRAY_KIND = "numpy"
SUPPORTS_SINKHORN = True

__all__ = ["ARRAY_KIND", "SUPPORTS_SINKHORN", "availability", "forward", "backward",
           "post_forward", "post_backward"]


def availability() -> str | None:
    """None when this backend can run here, else the reason it cannot."""
    return _IMPORT_ERROR
