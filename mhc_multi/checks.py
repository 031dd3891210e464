"""The front end's checks: every argument's container, device, shape and dtype, the eps and
``sinkhorn_iters`` options, each against x, raised with the argument's name before any backend
runs (api.py calls them once per signature)."""
from __future__ import annotations

import math
import numbers
import operator
import sys

import numpy as np

from . import registry

#: the most Sinkhorn-Knopp iterations accepted (the paper uses 20; SK has long converged
#: where it will, and each iteration costs forward and backward O(n^2) work per token)
MAX_SINKHORN_ITERS = 1000


def _torch():
    return sys.modules.get("torch")  # torch is only needed when the caller already uses it


_TENSOR = None   # torch.Tensor, once torch has been imported (by the caller)


def _is_tensor(a) -> bool:
    global _TENSOR
    if _TENSOR is None:
        torch = _torch()
        if torch is None:
            return False
        _TENSOR = torch.Tensor
    return isinstance(a, _TENSOR)


_NP_NAMES = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}
_TORCH_NAMES: dict = {}   # torch dtype -> name, filled on first use


def dtype_name(a) -> str | None:
    """'bf16' | 'fp16' | 'fp32' | 'fp64' for a float array or tensor, else None."""
    if _is_tensor(a):
        if not _TORCH_NAMES:
            torch = _torch()
            _TORCH_NAMES.update({torch.bfloat16: "bf16", torch.float16: "fp16",
                                 torch.float32: "fp32", torch.float64: "fp64"})
        return _TORCH_NAMES.get(a.dtype)
    return _NP_NAMES.get(np.dtype(a.dtype))


def _describe_dtype(a) -> str:
    return str(a.dtype).replace("torch.", "")


class _Args:
    """Validates arguments against x: same container, same device, expected shape and dtype."""

    def __init__(self, x, backend: str):
        registry.check_name(backend)
        if _is_tensor(x):
            if x.device.type == "meta":
                raise ValueError("x: expected a tensor with data (cpu or cuda), got device meta")
            self.kind, self.device = "torch", x.device
            self.on_cpu = x.device.type == "cpu"
        elif isinstance(x, np.ndarray):
            self.kind, self.device, self.on_cpu = "numpy", None, True
        else:
            raise TypeError(f"x: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
        self.backend = backend
        # dtype names, set as x and the parameters are checked: param_dtype is phi's (or the
        # gates' for the post operator), compute_dtype what the backend receives them in
        self.x_dtype = self.param_dtype = self.compute_dtype = None

    def container(self, name: str, a) -> None:
        if self.kind == "torch":
            if not _is_tensor(a):
                raise TypeError(f"{name}: expected a torch.Tensor like x, got {type(a).__name__}")
            if a.device != self.device:
                raise ValueError(f"{name}: expected device {self.device} (x's device), got {a.device}")
        elif not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray like x, got {type(a).__name__}")

    def check(self, name: str, a, shape: tuple, allowed: tuple[str, ...], meaning: str = ""):
        """Container, device, shape and dtype of one argument."""
        self.container(name, a)
        if tuple(a.shape) != tuple(shape):
            what = f" ({meaning})" if meaning else ""
            raise ValueError(f"{name}: expected shape {tuple(shape)}{what}, got {tuple(a.shape)}")
        if dtype_name(a) not in allowed:
            raise TypeError(f"{name}: expected dtype in {list(allowed)}, got {_describe_dtype(a)}")


_FLOATS = ("bf16", "fp16", "fp32", "fp64")
_X_DTYPES_TORCH = _FLOATS
_X_DTYPES_NUMPY = ("fp16", "fp32", "fp64")  # numpy has no bfloat16: pass bf16 as a torch tensor
#: parameters and gates other than fp64 are computed in fp32 (16-bit ones read, then upcast)
_SINGLE = ("bf16", "fp16", "fp32")


def compute_dtype(dtype: str) -> str:
    """The dtype parameters (or gates) of dtype name ``dtype`` are computed in: fp64 stays
    fp64, everything else is fp32. Gates and intermediates come out in it."""
    return "fp64" if dtype == "fp64" else "fp32"


def _check_x(args: _Args, x) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise ValueError(f"x: expected 4 dimensions [B, S, n, D], got shape {tuple(x.shape)}")
    B, S, n, D = (int(s) for s in x.shape)
    if not 1 <= n <= 8:
        raise ValueError(f"x: expected n = x.shape[2] in 1..8, got shape {tuple(x.shape)}")
    if D < 1:
        raise ValueError(f"x: expected D = x.shape[3] >= 1, got shape {tuple(x.shape)}")
    allowed = _X_DTYPES_TORCH if args.kind == "torch" else _X_DTYPES_NUMPY
    if dtype_name(x) not in allowed:
        raise TypeError(f"x: expected dtype in {list(allowed)}, got {_describe_dtype(x)}")
    args.x_dtype = dtype_name(x)
    args.x_shape = (B, S, n, D)
    return B, S, n, D


def _float_dtypes(args: _Args, among: tuple[str, ...]) -> tuple[str, ...]:
    return among if args.kind == "torch" else tuple(d for d in among if d != "bf16")


def _check_params(args: _Args, n: int, D: int, phi, alpha, bias, gamma) -> None:
    """phi, alpha, bias, gamma: each of bf16/fp16/fp32 (computed in fp32), or all fp64."""
    F = n * n + 2 * n
    args.check("phi", phi, (F, n * D), _float_dtypes(args, _FLOATS),
               "F = n*n + 2n rows, n*D columns")
    fp64 = dtype_name(phi) == "fp64"
    like = ("fp64",) if fp64 else _float_dtypes(args, _SINGLE)
    why = "; fp64 like phi" if fp64 else "; 16-bit or fp32, as phi is"
    args.check("alpha", alpha, (3,), like, "a_pre, a_post, a_res" + why)
    args.check("bias", bias, (F,), like, "F = n*n + 2n" + why)
    if gamma is not None:
        args.check("gamma", gamma, (n, D), like, "n, D" + why)
    args.param_dtype = dtype_name(phi)
    args.compute_dtype = compute_dtype(args.param_dtype)


def check_eps(norm_eps, hc_eps) -> tuple[float, float]:
    """``(norm_eps, hc_eps)`` as floats: real numbers (numpy scalars too, not bools), finite,
    norm_eps > 0 and hc_eps >= 0; TypeError for another kind, ValueError out of range."""
    out = []
    for name, val, positive in (("norm_eps", norm_eps, True), ("hc_eps", hc_eps, False)):
        if isinstance(val, (bool, np.bool_)) or not isinstance(val, numbers.Real):
            raise TypeError(f"{name}: expected a real number, got {type(val).__name__} {val!r}")
        v = float(val)
        if not math.isfinite(v) or (v <= 0 if positive else v < 0):
            raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, "
                             f"got {val!r}")
        out.append(v)
    return out[0], out[1]


def check_iters(sinkhorn_iters) -> int:
    """``sinkhorn_iters`` as an int in ``0..MAX_SINKHORN_ITERS`` (numpy and 0-d torch integers
    accepted, bools not); TypeError for another kind, ValueError out of range."""
    k = sinkhorn_iters
    try:
        if isinstance(k, (bool, np.bool_)):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"sinkhorn_iters: expected an int, got {type(sinkhorn_iters).__name__} "
                        f"{sinkhorn_iters!r}") from None
    if not 0 <= k <= MAX_SINKHORN_ITERS:
        raise ValueError(f"sinkhorn_iters: expected an int in 0..{MAX_SINKHORN_ITERS}, got {k}")
    return k


def validate_pre(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters):
    """The checks every pre-operator entry point runs first: ``(args, (B, S, n, D), norm_eps,
    hc_eps, k)`` with the scalars normalised, or the error naming the bad argument."""
    args = _Args(x, backend)
    dims = _check_x(args, x)
    _check_params(args, dims[2], dims[3], phi, alpha, bias, gamma)
    return (args, dims, *check_eps(norm_eps, hc_eps), check_iters(sinkhorn_iters))


def _check_post(args: _Args, x, f_out, h_post, h_res):
    B, S, n, D = _check_x(args, x)
    args.check("f_out", f_out, (B, S, D), _FLOATS)
    args.check("h_post", h_post, (B, S, n), _float_dtypes(args, _FLOATS),
               "gates: 16-bit or fp32 (computed in fp32), or fp64")
    args.check("h_res", h_res, (B, S, n, n), _FLOATS)
    args.param_dtype = dtype_name(h_post)
    args.compute_dtype = compute_dtype(args.param_dtype)
    return B, S, n, D
