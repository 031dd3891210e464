"""The front end: check every argument once, convert, pick a backend, run it, convert back.

Backends receive validated, contiguous arrays flattened to ``T = B*S`` tokens in their own
container (numpy arrays or torch tensors; see ``registry``) and never re-validate.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

from . import registry
from .checks import MAX_SINKHORN_ITERS, _FLOATS, _Args, _check_post, _torch, validate_pre
from .convert import _cast_like, _Mover
from .errors import BackendUnavailableError

__all__ = ["ForwardOutput", "Gradients", "PostGradients", "forward", "backward",
           "post_forward", "post_backward", "MAX_SINKHORN_ITERS"]

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
    try:
        return (type(a), a.shape, a.dtype, a.device)   # a tensor
    except AttributeError:
        return (type(a), getattr(a, "shape", None), getattr(a, "dtype", None))


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


#: the environment variables a plan depends on, as keys of the process environment's own
#: mapping (``os.environ._data``, encoded keys): reading it there skips os.environ's encoding
#: of the key and decoding of the value, about 0.8 us per variable and call
_ENV_NAMES = (registry.ENV_VAR, "TRITON_INTERPRET")
try:
    _ENV_DATA = os.environ._data
    _ENV_KEYS = tuple(os.environ.encodekey(k) for k in _ENV_NAMES)
except AttributeError:   # pragma: no cover - another os.environ implementation
    _ENV_DATA, _ENV_KEYS = os.environ, _ENV_NAMES


def _env() -> tuple:
    """What a plan depends on besides the arguments: the registry and the environment (the
    raw values: a plan only compares them)."""
    return (registry.generation, _ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1]))


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


def _leading(mod) -> bool:
    """Whether the backend takes the token dims as the caller shaped them (LEADING_TOKEN_DIMS:
    x [B, S, n, D] and the per-token arrays [B, S, ...] in, results with the same leading
    dims out) instead of flattened to T = B*S."""
    return bool(getattr(mod, "LEADING_TOKEN_DIMS", False))


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
    """``(args, (B, S, n, D), norm_eps, hc_eps, k, backend module, its _Mover)`` for the pre
    operator."""
    args, dims, norm_eps, hc_eps, k = validate_pre(
        x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters)
    _, mod = _select(args, dims[0] * dims[1], needs="sinkhorn" if k else None)
    return args, dims, norm_eps, hc_eps, k, mod, _Mover(args, mod.ARRAY_KIND, _leading(mod))


def _forward(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters):
    opts = (backend, norm_eps, hc_eps, sinkhorn_iters)
    args, (B, S, n, D), norm_eps, hc_eps, k, mod, mv = _planned(
        _pre_key("fwd", x, phi, alpha, bias, gamma, *opts),
        lambda: _pre_plan(x, phi, alpha, bias, gamma, *opts))
    T, F, cast, into, back = B * S, n * n + 2 * n, mv.cast, mv.into, mv.back
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = mod.forward(
        x=into(x, (T, n, D)), phi=into(cast(phi)), alpha=into(cast(alpha)),
        bias=into(cast(bias)), gamma=into(cast(gamma)),
        norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=k)
    return ForwardOutput(back(h_in, (B, S, D)), back(h_post, (B, S, n)),
                         back(h_res, (B, S, n, n)), back(inv_rms, (B, S)),
                         back(h_mix, (B, S, F)), back(h_pre, (B, S, n)))


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

    args, (B, S, n, D), norm_eps, hc_eps, k, mod, mv = _planned(
        _pre_key("bwd", x, phi, alpha, bias, gamma, *opts) + tuple(_sig(a) for a in grads),
        plan)
    T, F, cast, into, back = B * S, n * n + 2 * n, mv.cast, mv.into, mv.back
    kw = {} if dx_add is None else {"dx_add": into(_cast_like(dx_add, x), (T, n, D))}
    dx, *dparams = mod.backward(
        x=into(x, (T, n, D)), phi=into(cast(phi)), alpha=into(cast(alpha)),
        bias=into(cast(bias)), inv_rms=into(cast(inv_rms), (T,)),
        h_mix=into(cast(h_mix), (T, F)), h_pre=into(cast(h_pre), (T, n)),
        h_post=into(cast(h_post), (T, n)), dh_in=into(_cast_like(dh_in, x), (T, D)),
        dh_post=into(cast(dh_post), (T, n)), dh_res=into(cast(dh_res), (T, n, n)),
        gamma=into(cast(gamma)), norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=k,
        **kw)
    own = [None if g is None else _cast_like(back(g), p)   # rounded once
           for g, p in zip(dparams, (phi, alpha, bias, gamma))]
    return Gradients(back(dx, (B, S, n, D)), *own)


# ---------------------------------------------------------------------------------------------
# the post operator: x_next = H_res x + H_post f_out

def _post_plan(x, f_out, h_post, h_res, dx_next, backend):
    """``(args, (B, S, n, D), backend module, its _Mover)`` for the post operator
    (``dx_next``: backward)."""
    args = _Args(x, backend)
    B, S, n, D = _check_post(args, x, f_out, h_post, h_res)
    if dx_next is not None:
        args.check("dx_next", dx_next, (B, S, n, D), _FLOATS)
    _, mod = _select(args, B * S, needs="post")
    return args, (B, S, n, D), mod, _Mover(args, mod.ARRAY_KIND, _leading(mod))


def post_forward(x, f_out, h_post, h_res, *, backend: str = "auto"):
    """``x_next[b,s,i,:] = sum_j h_res[b,s,i,j] x[b,s,j,:] + h_post[b,s,i] f_out[b,s,:]``.

    ``x [B,S,n,D]`` and ``f_out [B,S,D]`` are activations (f_out is cast to x's dtype);
    ``h_post [B,S,n]`` and ``h_res [B,S,n,n]`` are gates (h_res is cast to h_post's dtype;
    16-bit gates are computed in fp32). Returns ``x_next [B,S,n,D]`` in x's dtype. Plain
    values, like :func:`forward`; :func:`mhc_multi.mhc_post` is the differentiable form.
    """
    args, (B, S, n, D), mod, mv = _planned(
        ("post_fwd", backend, _env(), *(_sig(a) for a in (x, f_out, h_post, h_res))),
        lambda: _post_plan(x, f_out, h_post, h_res, None, backend))
    T, cast, into = B * S, mv.cast, mv.into
    out = mod.post_forward(x=into(x, (T, n, D)), f_out=into(_cast_like(f_out, x), (T, D)),
                           h_post=into(cast(h_post), (T, n)),
                           h_res=into(cast(h_res), (T, n, n)))
    return mv.back(out, (B, S, n, D))


def post_backward(x, f_out, h_post, h_res, dx_next, *, backend: str = "auto") -> PostGradients:
    """Gradients of :func:`post_forward` given ``dx_next [B,S,n,D]`` (cast to x's dtype).

    Returns :class:`PostGradients` ``(dx, df_out, dh_post, dh_res)``: ``dx`` and ``df_out`` in
    x's dtype, ``dh_post`` and ``dh_res`` in h_post's dtype (rounded once from fp32 when it
    is 16-bit).
    """
    args, (B, S, n, D), mod, mv = _planned(
        ("post_bwd", backend, _env(), *(_sig(a) for a in (x, f_out, h_post, h_res, dx_next))),
        lambda: _post_plan(x, f_out, h_post, h_res, dx_next, backend))
    T, cast, into, back = B * S, mv.cast, mv.into, mv.back
    dx, df_out, dhp, dhr = mod.post_backward(
        x=into(x, (T, n, D)), f_out=into(_cast_like(f_out, x), (T, D)),
        h_post=into(cast(h_post), (T, n)), h_res=into(cast(h_res), (T, n, n)),
        dx_next=into(_cast_like(dx_next, x), (T, n, D)))
    return PostGradients(back(dx, (B, S, n, D)), back(df_out, (B, S, D)),
                         _cast_like(back(dhp, (B, S, n)), h_post),
                         _cast_like(back(dhr, (B, S, n, n)), h_post))
