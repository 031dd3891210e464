"""Host-side helpers shared by the Triton backend's modules (no kernels here).

``triton``, ``tl`` and ``torch`` are imported once, here; where triton is missing they are None
and the kernel modules define no kernels, so importing the package never fails.
"""
from __future__ import annotations

import functools
import os

try:  # importing this backend must never fail where triton is missing
    import triton
    import triton.language as tl
    TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_ERROR = exc

try:
    import torch
except Exception:  # pragma: no cover
    torch = None


#: Whether the kernels run on Triton's CPU interpreter: TRITON_INTERPRET when this package is
#: imported, which is when ``triton.jit`` makes each kernel an interpreted or a compiled one.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpret() -> bool:
    """Whether the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv is a JIT function: ~7 us per call from the host)."""
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _f_pad(n: int) -> int:
    """F_PAD: the gate columns F = n*n + 2n padded to a power of two, at least 16 (the
    tensor cores' smallest dot dimension)."""
    return max(16, _next_pow2(n * n + 2 * n))


def _dtype_name(dt) -> str:
    """The contract's name of a torch dtype the kernels take ("bf16", "fp16", "fp32")."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]


def _f32(a):
    """``a`` as a contiguous fp32 tensor (returned as is when it already is one: no dispatch,
    as this runs several times per launch)."""
    if a.dtype is torch.float32 and a.is_contiguous():
        return a
    return a.to(torch.float32).contiguous()


def _on_x_device(fn):
    """``fn`` run with x's CUDA device current.  Triton launches (and _resident compiles) on
    the current device and its current stream, so tensors on cuda:1 while cuda:0 is current
    would go to the wrong GPU.  The device is switched only when it differs (otherwise the
    cost is one current_device() call); nothing changes on the CPU (the interpreter)."""
    @functools.wraps(fn)
    def run(*args, **kw):
        dev = (args[0] if args else kw["x"]).device
        if dev.type != "cuda" or dev.index == torch.cuda.current_device():
            return fn(*args, **kw)
        with torch.cuda.device(dev.index):
            return fn(*args, **kw)
    return run
