"""The front end: check every argument once, convert, pick a backend, run it, convert back.

Backends receive validated, contiguous arrays flattened to ``T = B*S`` tokens in their own
container (numpy arrays or torch tensors; see ``registry``) and never re-validate.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
import sys
import warnings
import weakref
from typing import Any, NamedTuple

import numpy as np

from . import registry
from .errors import BackendUnavailableError

__all__ = ["ForwardOutput", "Gradients", "PostGradients", "forward", "backward",
           "post_forward", "post_backward", "MAX_SINKHORN_ITERS"]

#: the most Sinkhorn-Knopp iterations accepted (the paper uses 20; SK has long converged
#: where it will, and each iteration costs forward and backward O(n^2) work per token)
MAX_SINKHORN_ITERS = 1000


class ForwardOutput(NamedTuple):
    h_in: Any     # [B, S, D]     x's dtype
    h_post: Any   # [B, S, n]     gate dtype: fp64 with fp64 parameters, else fp32
    h_res: Any    # [B, S, n, n]  gate dtype (logits, or SK_k(logits) with sinkhorn_iters=k)
    inv_rms: Any  # [B, S]
    h_mix: Any    # [B, S, F]     raw projections, before inv_rms
    h_pre: Any    # [B, S, n]


class Gradients(NamedTuple):
    dx: Any       # [B, S, n, D]  x's dtype
    dphi: Any     # [F, n*D]      phi's dtype (each gradient takes its parameter's dtype)
    dalpha: Any   # [3]           alpha's dtype
    dbias: Any    # [F]           bias's dtype
    dgamma: Any   # [n, D] gamma's dtype, or None when gamma is None


class PostGradients(NamedTuple):
    dx: Any       # [B, S, n, D]  activation dtype
    df_out: Any   # [B, S, D]     activation dtype
    dh_post: Any  # [B, S, n]     gates' dtype
    dh_res: Any   # [B, S, n, n]  gates' dtype


# ---------------------------------------------------------------------------------------------
# containers and dtypes

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


def _cast_like(a, ref):
    """``a`` in ``ref``'s dtype (itself, with no dispatch, when it already is)."""
    if a.dtype == ref.dtype:
        return a
    if _is_tensor(a):
        return a.to(ref.dtype)
    return a.astype(ref.dtype)


def _cast_to(a, name: str):
    """``a`` in the dtype named ``name`` ("fp32" or "fp64"; itself when it already is)."""
    if a is None or dtype_name(a) == name:
        return a
    if _is_tensor(a):
        torch = _torch()
        return a.to(torch.float64 if name == "fp64" else torch.float32)
    return a.astype(np.float64 if name == "fp64" else np.float32)


_warned_grad = False


def _warn_if_grad(fn: str, *tensors) -> None:
    """forward / backward take and return plain values: say so once when an input requires
    grad (the result will not be connected to the autograd graph)."""
    global _warned_grad
    if _warned_grad or _torch() is None or not _torch().is_grad_enabled():
        return
    if any(getattr(t, "requires_grad", False) for t in tensors):
        _warned_grad = True
        warnings.warn(f"mhc_multi.{fn} takes and returns plain values: its outputs are not "
                      "connected to the autograd graph. Use mhc_multi.mhc_pre or the "
                      "mhc_multi.MHCPre module to differentiate through the operator.",
                      UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# plans: what validation and the choice of backend decided, cached per signature

#: signature -> plan. A signature holds what the checks and the choice of backend depend on:
#: each argument's type, shape, dtype and device, the scalar options with their types, the
#: backend asked for and the environment variables "auto" reads. Bad input raises while its plan
#: is built and is never cached, so every error is the same as without the cache.
_PLANS: dict = {}
_MAX_PLANS = 256


def _sig(a):
    """One argument's part of a signature."""
    if a is None:
        return None
    return (type(a), getattr(a, "shape", None), getattr(a, "dtype", None),
            getattr(a, "device", None))


def _planned(key: tuple, build):
    """The plan of ``key``, built (and kept) by ``build()`` on first use."""
    try:
        plan = _PLANS.get(key)
    except TypeError:   # an unhashable option: no plan to keep; build() checks it
        return build()
    if plan is None:
        plan = build()
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _env() -> tuple:
    """What a plan depends on besides the arguments: the registry and the environment."""
    return (registry.generation, os.environ.get(registry.ENV_VAR),
            os.environ.get("TRITON_INTERPRET"))


# ---------------------------------------------------------------------------------------------
# choosing a backend and moving data to and from it

def _select(args: _Args, total_tokens: int, *, needs: str | None = None):
    """(name, module) of the backend to run; the numpy reference when there are no tokens."""
    on_cuda = args.kind == "torch" and args.device.type == "cuda"
    name, mod = registry.resolve(args.backend, on_cuda=on_cuda, needs=needs)
    if mod.ARRAY_KIND == "torch" and not on_cuda:
        if _torch() is None:
            raise BackendUnavailableError(f"backend {name!r} needs torch, which is not imported")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(
                f"backend {name!r} runs on CUDA tensors; got CPU data. Set TRITON_INTERPRET=1 to "
                "run its kernels on the CPU interpreter, or use backend='numba' / 'numpy'")
    hint = "" if name == "numpy" else " (backend='numba' or 'numpy' take it, on the CPU)"
    x_dtypes = getattr(mod, "X_DTYPES", None)
    if x_dtypes is not None and args.x_dtype not in x_dtypes:
        raise TypeError(f"x: backend {name!r} expects dtype in {list(x_dtypes)}, got "
                        f"{args.x_dtype}{hint}")
    p_dtypes = getattr(mod, "PARAM_DTYPES", None)   # the dtypes it computes parameters in
    if p_dtypes is not None and args.compute_dtype not in p_dtypes:
        raise TypeError(f"phi: backend {name!r} computes parameters in {list(p_dtypes)} "
                        f"(16-bit ones upcast to fp32), got {args.param_dtype}{hint}")
    max_tokens = getattr(mod, "MAX_TOKENS", None)
    if max_tokens is not None and total_tokens > max_tokens:
        raise ValueError(f"x: backend {name!r} takes at most {max_tokens} tokens B*S, got "
                         f"{total_tokens} (shape {args.x_shape})")
    if total_tokens == 0:  # nothing to compute: the reference returns the empty results exactly
        return registry.resolve("numpy", on_cuda=False)
    return name, mod


class _DLPack:
    """A DLPack capsule as ``np.from_dlpack`` takes it (a CPU tensor's, from ``to_dlpack``)."""
    __slots__ = ("capsule",)

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, stream=None, **_):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)   # kDLCPU


def _to_backend(a, kind: str, on_cpu: bool = False):
    """An argument as the backend's contiguous container (bf16 -> uint16 words for numpy).

    A CPU tensor is viewed through DLPack, which leaves its storage resizable:
    ``Tensor.numpy()`` would make it non-resizable for good, and FSDP2 frees its gathered
    parameters with ``storage.resize_(0)``. The array holds the tensor alive. ``on_cpu``: the
    caller knows that a tensor is on the CPU (validated: on x's device)."""
    if a is None:
        return None
    if kind == "numpy":
        if _is_tensor(a):
            torch = _torch()
            if type(a) is torch.nn.Parameter:   # not isinstance: its metaclass check is slow
                return _param_view(a, on_cpu)
            t = a.detach() if a.requires_grad else a
            if not on_cpu and t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            bf16 = t.dtype == torch.bfloat16
            if bf16:
                t = t.view(torch.int16)
            a = np.from_dlpack(_DLPack(torch.utils.dlpack.to_dlpack(t)))
            return a.view(np.uint16) if bf16 else a
        return np.ascontiguousarray(a)
    torch = _torch()
    if _is_tensor(a):
        if not a.requires_grad and a.is_contiguous():   # as it is: no new tensor object
            return a
        return a.detach().contiguous()
    return torch.from_numpy(np.ascontiguousarray(a))


#: id(Parameter) -> ((its memory address, shape, strides, dtype), numpy view): a module hands the
#: same Parameter object to every call, and a contiguous one's view shares its memory, so it
#: follows in-place updates and is built once. An entry serves while the Parameter lives (a
#: finalizer drops it) and sits over the same memory with the same layout (FSDP2 frees and
#: re-gathers parameters: a new address builds a new view).
_PARAM_VIEWS: dict = {}


def _param_view(p, on_cpu: bool):
    """``_to_backend(p, "numpy")`` of a Parameter, from _PARAM_VIEWS where it holds."""
    key, where = id(p), (p.data_ptr(), p.shape, p.stride(), p.dtype)
    hit = _PARAM_VIEWS.get(key)
    if hit is not None and hit[0] == where:
        return hit[1]
    arr = _to_backend(p.detach(), "numpy", on_cpu)
    if p.device.type == "cpu" and p.is_contiguous():
        if hit is None:
            weakref.finalize(p, _PARAM_VIEWS.pop, key, None)
        _PARAM_VIEWS[key] = (where, arr)
    return arr


def _from_backend(a, args: _Args, shape: tuple | None = None):
    """A backend result in the caller's container and device, reshaped to ``shape``."""
    if a is None:
        return None
    if args.kind == "numpy":
        if _is_tensor(a):
            a = a.cpu().numpy()
        return a if shape is None else a.reshape(shape)
    torch = _torch()
    if isinstance(a, np.ndarray):   # reshaped first: a numpy view is cheaper than a torch one
        if shape is not None:
            a, shape = a.reshape(shape), None
        a = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == np.uint16
             else torch.from_numpy(a))
    if not args.on_cpu and a.device != args.device:
        a = a.to(args.device)
    return a if shape is None else a.reshape(shape)


def _run(args: _Args, mod, fn: str, inputs: dict, **kw):
    """``mod.fn(**inputs, **kw)`` with each input (a value, or ``(value, shape)``) in the
    backend's container, reshaped there (a view: the conversion made it contiguous)."""
    kind, conv, on_cpu = mod.ARRAY_KIND, {}, args.on_cpu
    for k, v in inputs.items():
        v, shape = v if isinstance(v, tuple) else (v, None)
        a = _to_backend(v, kind, on_cpu)
        conv[k] = a if shape is None or a is None else a.reshape(shape)
    return getattr(mod, fn)(**conv, **kw)


# ---------------------------------------------------------------------------------------------
# the pre operator

def forward(x, phi, alpha, bias, gamma=None, *, backend: str = "auto", norm_eps: float = 1e-6,
            hc_eps: float = 1e-6, sinkhorn_iters: int = 0) -> ForwardOutput:
    """Forward pass of the mHC pre operator (docs/contract.md) on plain values.

    This is the functional form: it takes and returns plain tensors or arrays and is not
    recorded by autograd (it warns once when an input requires grad). To differentiate
    through the operator use :func:`mhc_multi.mhc_pre` or the :class:`mhc_multi.MHCPre` module.

    Args:
        x: ``[B, S, n, D]`` streams; bf16/fp16/fp32/fp64 torch tensor or fp16/fp32/fp64 array.
        phi: ``[n*n + 2n, n*D]`` projection. alpha ``[3]``, bias ``[n*n + 2n]`` and gamma
            ``[n, D]`` (or None for all ones). Each of bf16/fp16/fp32 (read, then computed
            in fp32), or all fp64.
        backend: ``"auto"`` (CUDA -> triton, CPU -> numba, else numpy; $MHC_MULTI_BACKEND
            overrides it), ``"triton"``, ``"numba"`` or ``"numpy"``.
        norm_eps, hc_eps: the RMS-norm epsilon (> 0) and the h_pre offset (>= 0).
        sinkhorn_iters: k in 1..MAX_SINKHORN_ITERS returns ``h_res = SK_k(logits)``; 0 returns
            the logits.

    Returns:
        :class:`ForwardOutput` ``(h_in, h_post, h_res, inv_rms, h_mix, h_pre)`` in x's
        container and device; ``h_in`` in x's dtype, the rest in fp64 with fp64 parameters,
        else fp32 (16-bit parameters give fp32 gates: the post operator consumes them).
    """
    _warn_if_grad("forward", x, phi, alpha, bias, gamma)
    return _forward(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters)


def _pre_key(op, x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters):
    return (op, backend, type(norm_eps), norm_eps, type(hc_eps), hc_eps, type(sinkhorn_iters),
            sinkhorn_iters, _env(), _sig(x), _sig(phi), _sig(alpha), _sig(bias), _sig(gamma))


def _pre_plan(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters):
    """``(args, (B, S, n, D), norm_eps, hc_eps, k, backend module)`` for the pre operator."""
    args, dims, norm_eps, hc_eps, k = validate_pre(
        x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters)
    _, mod = _select(args, dims[0] * dims[1], needs="sinkhorn" if k else None)
    return args, dims, norm_eps, hc_eps, k, mod


def _forward(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters):
    opts = (backend, norm_eps, hc_eps, sinkhorn_iters)
    args, (B, S, n, D), norm_eps, hc_eps, k, mod = _planned(
        _pre_key("fwd", x, phi, alpha, bias, gamma, *opts),
        lambda: _pre_plan(x, phi, alpha, bias, gamma, *opts))
    T, F, c = B * S, n * n + 2 * n, args.compute_dtype
    out = _run(args, mod, "forward",
               dict(x=(x, (T, n, D)), phi=_cast_to(phi, c), alpha=_cast_to(alpha, c),
                    bias=_cast_to(bias, c), gamma=_cast_to(gamma, c)),
               norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=k)
    shapes = ((B, S, D), (B, S, n), (B, S, n, n), (B, S), (B, S, F), (B, S, n))
    return ForwardOutput(*(_from_backend(a, args, s) for a, s in zip(out, shapes)))


def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
             gamma=None, *, backend: str = "auto", norm_eps: float = 1e-6, hc_eps: float = 1e-6,
             sinkhorn_iters: int = 0, dx_add=None) -> Gradients:
    """Backward pass of the mHC pre operator (docs/contract.md) on plain values.

    The functional form, like :func:`forward`: plain values in, plain values out, nothing
    recorded by autograd (use :func:`mhc_multi.mhc_pre` / :class:`mhc_multi.MHCPre` for that).

    Takes the forward's intermediates ``inv_rms [B,S], h_mix [B,S,F], h_pre, h_post [B,S,n]``
    and the gradients ``dh_in [B,S,D], dh_post [B,S,n], dh_res [B,S,n,n]`` (with
    ``sinkhorn_iters=k``, ``dh_res`` is with respect to the projected matrix). Floating
    gradients and intermediates of another dtype are cast: ``dh_in`` to x's dtype, the rest to
    the gates' dtype (fp32, or fp64 with fp64 parameters).

    ``dx_add [B,S,n,D]`` (optional, cast to x's dtype): another gradient of x, such as the post
    operator's ``dx``; the backend adds it to dx before dx's one rounding, in the same pass,
    instead of a separate add of two rounded gradients.

    Returns:
        :class:`Gradients` ``(dx, dphi, dalpha, dbias, dgamma)``; ``dx`` in x's dtype, each
        parameter gradient in its parameter's dtype (16-bit ones rounded once from the fp32
        sums); ``dgamma`` is None when ``gamma`` is None.
    """
    _warn_if_grad("backward", x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post, dh_in,
                  dh_post, dh_res)
    return _backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
                     gamma, backend, norm_eps, hc_eps, sinkhorn_iters, dx_add)


def _per_token(B, S, n, D, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res):
    """(name, value, expected shape) of the backward's per-token arguments."""
    return (("inv_rms", inv_rms, (B, S)), ("h_mix", h_mix, (B, S, n * n + 2 * n)),
            ("h_pre", h_pre, (B, S, n)), ("h_post", h_post, (B, S, n)),
            ("dh_in", dh_in, (B, S, D)), ("dh_post", dh_post, (B, S, n)),
            ("dh_res", dh_res, (B, S, n, n)))


def _backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
              backend, norm_eps, hc_eps, sinkhorn_iters, dx_add=None):
    opts = (backend, norm_eps, hc_eps, sinkhorn_iters)
    grads = (inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, dx_add)

    def plan():
        p = _pre_plan(x, phi, alpha, bias, gamma, *opts)
        args, (B, S, n, D) = p[:2]
        for name, a, shape in _per_token(B, S, n, D, *grads[:-1]):
            args.check(name, a, shape, _FLOATS)
        if dx_add is not None:
            args.check("dx_add", dx_add, (B, S, n, D), _FLOATS, "a gradient of x")
        return p

    args, (B, S, n, D), norm_eps, hc_eps, k, mod = _planned(
        _pre_key("bwd", x, phi, alpha, bias, gamma, *opts) + tuple(_sig(a) for a in grads),
        plan)
    per_token = _per_token(B, S, n, D, *grads[:-1])
    T, c = B * S, args.compute_dtype
    inputs = {name: (_cast_to(a, c), (T,) + shape[2:])
              for name, a, shape in per_token if name != "dh_in"}
    inputs.update(x=(x, (T, n, D)), phi=_cast_to(phi, c), alpha=_cast_to(alpha, c),
                  bias=_cast_to(bias, c), dh_in=(_cast_like(dh_in, x), (T, D)),
                  gamma=_cast_to(gamma, c))
    if dx_add is not None:
        inputs["dx_add"] = (_cast_like(dx_add, x), (T, n, D))
    out = _run(args, mod, "backward", inputs, norm_eps=norm_eps, hc_eps=hc_eps,
               sinkhorn_iters=k)
    dx, *dparams = out
    own = [None if g is None else _cast_like(_from_backend(g, args), p)   # rounded once
           for g, p in zip(dparams, (phi, alpha, bias, gamma))]
    return Gradients(_from_backend(dx, args, (B, S, n, D)), *own)


# ---------------------------------------------------------------------------------------------
# the post operator: x_next = H_res x + H_post f_out

def _check_post(args: _Args, x, f_out, h_post, h_res):
    B, S, n, D = _check_x(args, x)
    args.check("f_out", f_out, (B, S, D), _FLOATS)
    args.check("h_post", h_post, (B, S, n), _float_dtypes(args, _FLOATS),
               "gates: 16-bit or fp32 (computed in fp32), or fp64")
    args.check("h_res", h_res, (B, S, n, n), _FLOATS)
    args.param_dtype = dtype_name(h_post)
    args.compute_dtype = compute_dtype(args.param_dtype)
    return B, S, n, D


def _post_plan(x, f_out, h_post, h_res, dx_next, backend):
    """``(args, (B, S, n, D), backend module)`` for the post operator (``dx_next``: backward)."""
    args = _Args(x, backend)
    B, S, n, D = _check_post(args, x, f_out, h_post, h_res)
    if dx_next is not None:
        args.check("dx_next", dx_next, (B, S, n, D), _FLOATS)
    _, mod = _select(args, B * S, needs="post")
    return args, (B, S, n, D), mod


def post_forward(x, f_out, h_post, h_res, *, backend: str = "auto"):
    """``x_next[b,s,i,:] = sum_j h_res[b,s,i,j] x[b,s,j,:] + h_post[b,s,i] f_out[b,s,:]``.

    ``x [B,S,n,D]`` and ``f_out [B,S,D]`` are activations (f_out is cast to x's dtype);
    ``h_post [B,S,n]`` and ``h_res [B,S,n,n]`` are gates (h_res is cast to h_post's dtype;
    16-bit gates are computed in fp32). Returns ``x_next [B,S,n,D]`` in x's dtype. Plain
    values, like :func:`forward`; :func:`mhc_multi.mhc_post` is the differentiable form.
    """
    args, (B, S, n, D), mod = _planned(
        ("post_fwd", backend, _env(), *(_sig(a) for a in (x, f_out, h_post, h_res))),
        lambda: _post_plan(x, f_out, h_post, h_res, None, backend))
    T, c = B * S, args.compute_dtype
    out = _run(args, mod, "post_forward",
               dict(x=(x, (T, n, D)), f_out=(_cast_like(f_out, x), (T, D)),
                    h_post=(_cast_to(h_post, c), (T, n)), h_res=(_cast_to(h_res, c), (T, n, n))))
    return _from_backend(out, args, (B, S, n, D))


def post_backward(x, f_out, h_post, h_res, dx_next, *, backend: str = "auto") -> PostGradients:
    """Gradients of :func:`post_forward` given ``dx_next [B,S,n,D]`` (cast to x's dtype).

    Returns :class:`PostGradients` ``(dx, df_out, dh_post, dh_res)``: ``dx`` and ``df_out`` in
    x's dtype, ``dh_post`` and ``dh_res`` in h_post's dtype (rounded once from fp32 when it
    is 16-bit).
    """
    args, (B, S, n, D), mod = _planned(
        ("post_bwd", backend, _env(), *(_sig(a) for a in (x, f_out, h_post, h_res, dx_next))),
        lambda: _post_plan(x, f_out, h_post, h_res, dx_next, backend))
    T, c = B * S, args.compute_dtype
    out = _run(args, mod, "post_backward",
               dict(x=(x, (T, n, D)), f_out=(_cast_like(f_out, x), (T, D)),
                    h_post=(_cast_to(h_post, c), (T, n)), h_res=(_cast_to(h_res, c), (T, n, n)),
                    dx_next=(_cast_like(dx_next, x), (T, n, D))))
    dx, df_out, dhp, dhr = (_from_backend(a, args, s) for a, s in
                            zip(out, ((B, S, n, D), (B, S, D), (B, S, n), (B, S, n, n))))
    return PostGradients(dx, df_out, _cast_like(dhp, h_post), _cast_like(dhr, h_post))
