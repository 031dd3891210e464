"""The float64 audit: run backends on the same inputs, compare everything with the reference.

``crosscheck`` judges each backend's forward outputs against ``numpy_ref.forward64`` and its
backward against ``numpy_ref.backward64`` fed the *same* intermediates (the reference's,
rounded to phi's dtype), so a backward is judged as the function the contract defines, not
through differences of the forward. Bounds come from :mod:`mhc_multi.tolerances`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from . import api, checks, registry
from .checks import _is_tensor, dtype_name
from .convert import _to_backend
from .backends import numpy_ref
from .tolerances import reference_slack, tolerance

PRE_OUTPUTS = ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre")
PRE_GRADIENTS = ("dx", "dphi", "dalpha", "dbias", "dgamma")
POST_NAMES = ("x_next", "post.dx", "post.df_out", "post.dh_post", "post.dh_res")


class CheckRow(NamedTuple):
    backend: str
    output: str
    error: float      # relative Frobenius error against float64
    tolerance: float
    ok: bool


class Report:
    """Rows of (backend, output, error, tolerance, ok); ``ok`` is True when every row passes."""

    def __init__(self, rows: list[CheckRow], shape, x_dtype: str, param_dtype: str, seed):
        self.rows, self.shape, self.x_dtype, self.param_dtype, self.seed = (
            rows, tuple(shape), x_dtype, param_dtype, seed)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if not r.ok]

    def error(self, backend: str, output: str) -> float:
        return next(r.error for r in self.rows if r.backend == backend and r.output == output)

    def __str__(self) -> str:
        head = (f"shape (B,S,n,D)={self.shape}  x={self.x_dtype}  params={self.param_dtype}  "
                f"seed={self.seed}")
        lines = [head, f"{'backend':<10} {'output':<14} {'rel. error':>10} {'bound':>9}  result"]
        for r in self.rows:
            lines.append(f"{r.backend:<10} {r.output:<14} {r.error:>10.2e} {r.tolerance:>9.1e}  "
                         f"{'ok' if r.ok else 'FAIL'}")
        lines.append("all ok" if self.ok else f"{len(self.failures)} FAILED")
        return "\n".join(lines)


def _as64(a) -> np.ndarray:
    if _is_tensor(a):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def relative_error(got, ref64: np.ndarray) -> float:
    """``||got - ref|| / ||ref||`` in float64 (absolute when ref is all zeros; inf on NaN)."""
    g = _as64(got)
    if g.shape != ref64.shape:
        return math.inf
    diff = np.linalg.norm((g - ref64).ravel())
    norm = np.linalg.norm(ref64.ravel())
    err = diff / norm if norm > 0 else diff
    return float(err) if np.isfinite(err) else math.inf


def _like(a64: np.ndarray, ref, dtype_of):
    """float64 values in ``ref``'s container/device, in the dtype of ``dtype_of`` (an array or
    tensor), or the one it names ("fp32" / "fp64")."""
    if _is_tensor(ref):
        import torch
        dt = ({"fp32": torch.float32, "fp64": torch.float64}[dtype_of]
              if isinstance(dtype_of, str) else dtype_of.dtype)
        return torch.from_numpy(a64).to(device=ref.device, dtype=dt)
    return a64.astype({"fp32": np.float32, "fp64": np.float64}[dtype_of]
                      if isinstance(dtype_of, str) else dtype_of.dtype)


def random_inputs(shape, x_dtype: str = "bf16", *, param_dtype: str = "fp32", gamma: bool = True,
                  seed: int = 0, container: str = "torch", device: str = "cpu"):
    """Inputs at the contract's realistic scales: ``(x, phi, alpha, bias, gamma)``.

    x ~ N(0, 1) times a per-token scale drawn log-uniformly in [1/4, 4], so that ``inv_rms``
    differs from 1 (with unit-RMS tokens a missing ``inv_rms`` factor would hide);
    phi ~ N(0, 1/(nD)); |alpha| in [0.5, 1.5] with random signs; bias ~ N(0, 0.1);
    gamma ~ 1 + N(0, 0.1).
    """
    B, S, n, D = shape
    F = n * n + 2 * n
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.25), np.log(4.0), size=(B, S, 1, 1)))
    x64 = rng.standard_normal((B, S, n, D)) * scale
    phi = rng.standard_normal((F, n * D)) / math.sqrt(n * D)
    alpha = rng.uniform(0.5, 1.5, 3) * rng.choice([-1.0, 1.0], 3)
    bias = 0.1 * rng.standard_normal(F)
    g = 1.0 + 0.1 * rng.standard_normal((n, D)) if gamma else None
    return _convert((x64, phi, alpha, bias, g), x_dtype, param_dtype, container, device)


def _convert(arrays, x_dtype, param_dtype, container, device):
    x64, *params = arrays
    if container == "numpy":
        if x_dtype == "bf16":
            raise ValueError("x_dtype: numpy has no bfloat16; use container='torch'")
        np_dt = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}
        return (x64.astype(np_dt[x_dtype]),
                *(None if p is None else p.astype(np_dt[param_dtype]) for p in params))
    import torch
    t_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64}
    return (torch.from_numpy(x64).to(device=device, dtype=t_dt[x_dtype]),
            *(None if p is None else torch.from_numpy(p).to(device=device, dtype=t_dt[param_dtype])
              for p in params))


def crosscheck(x, phi, alpha, bias, gamma=None, *, backends: Sequence[str] | None = None,
               seed: int = 0, norm_eps: float = 1e-6, hc_eps: float = 1e-6,
               sinkhorn_iters: int = 0, post: bool = False) -> Report:
    """Run ``backends`` (default: every available one) on the same inputs and compare each
    forward output, each gradient (and with ``post=True`` the post operator) with float64.

    ``backends`` is a list of names or one name. Cotangents ``dh_in, dh_post, dh_res`` (and
    ``f_out, dx_next``) are drawn from ``seed``. The inputs are checked as ``forward`` checks
    them, before anything runs. Returns a :class:`Report`; ``report.ok`` tells whether
    everything is within its bound.
    """
    if backends is None:
        backends = [b.name for b in registry.available_backends() if b.available]
    elif isinstance(backends, str):
        backends = [backends]
    for name in backends:
        registry.check_name(name)
    _, (B, S, n, D), norm_eps, hc_eps, k = checks.validate_pre(
        x, phi, alpha, bias, gamma, "numpy", norm_eps, hc_eps, sinkhorn_iters)
    xd, pd = dtype_name(x), dtype_name(phi)
    gd = checks.compute_dtype(pd)   # the gates' and intermediates' dtype
    # each parameter gradient is judged by its own parameter's dtype, the rest by phi's
    own = {"dphi": pd, "dalpha": dtype_name(alpha), "dbias": dtype_name(bias),
           "dgamma": None if gamma is None else dtype_name(gamma)}
    kw = dict(norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=k)

    as_np = [_to_backend(a, "numpy") for a in (x, phi, alpha, bias, gamma)]
    x_np = as_np[0].reshape(B * S, n, D)
    ref = numpy_ref.forward64(x_np, *as_np[1:], **kw)
    shapes = ((B, S, D), (B, S, n), (B, S, n, n), (B, S), (B, S, n * n + 2 * n), (B, S, n))
    ref_fwd = dict(zip(PRE_OUTPUTS, (r.reshape(s) for r, s in zip(ref, shapes))))

    rng = np.random.default_rng(seed + 1)
    d_in = rng.standard_normal((B, S, D))
    d_post = rng.standard_normal((B, S, n))
    d_res = rng.standard_normal((B, S, n, n))
    dh_in = _like(d_in, x, x)  # the cotangent of h_in comes in x's dtype
    mids = {k: _like(ref_fwd[k], x, gd) for k in ("inv_rms", "h_mix", "h_pre", "h_post")}
    dh_post, dh_res = _like(d_post, x, gd), _like(d_res, x, gd)
    # the reference backward sees exactly what the backends see (rounded inputs, upcast)
    ref_bwd = numpy_ref.backward64(
        x_np, *as_np[1:4], *(_to_backend(mids[k], "numpy").reshape((B * S,) + mids[k].shape[2:])
                             for k in ("inv_rms", "h_mix", "h_pre", "h_post")),
        _to_backend(dh_in, "numpy").reshape(B * S, D), _to_backend(dh_post, "numpy").reshape(B * S, n),
        _to_backend(dh_res, "numpy").reshape(B * S, n, n), as_np[4], dx_rounding=True, **kw)
    ref_grads = dict(zip(PRE_GRADIENTS, ref_bwd))
    ref_grads["dx"] = ref_grads["dx"].reshape(B, S, n, D)
    # where a short row's dx cancels, the reference's own rounding widens dx's bound
    slack = {"dx": reference_slack(ref_bwd[-1], ref_grads["dx"])}

    rows: list[CheckRow] = []

    def add(name, output, got, ref64, tol_name=None):
        if ref64 is None:
            return
        err = relative_error(got, ref64)
        tol = tolerance(tol_name or output, xd, own.get(output, pd)) + slack.get(output, 0.0)
        rows.append(CheckRow(name, output, err, tol, err <= tol))

    for name in backends:
        out = api.forward(x, phi, alpha, bias, gamma, backend=name, **kw)
        for k in PRE_OUTPUTS:
            add(name, k, getattr(out, k), ref_fwd[k])
        grads = api.backward(x, phi, alpha, bias, mids["inv_rms"], mids["h_mix"], mids["h_pre"],
                             mids["h_post"], dh_in, dh_post, dh_res, gamma, backend=name, **kw)
        for k in PRE_GRADIENTS:
            add(name, k, getattr(grads, k), ref_grads[k])
        if post:
            rows.extend(_check_post(name, x, mids["h_post"], _like(ref_fwd["h_res"], x, gd),
                                    rng, xd, gd))
    return Report(rows, (B, S, n, D), xd, pd, seed)


def _check_post(name, x, h_post, h_res, rng, xd, pd) -> list[CheckRow]:
    B, S, n, D = x.shape
    f_out = _like(rng.standard_normal((B, S, D)), x, x)
    dx_next = _like(rng.standard_normal((B, S, n, D)), x, x)
    np_args = [_to_backend(a, "numpy") for a in (x, f_out, h_post, h_res, dx_next)]
    flat = [a.reshape((B * S,) + a.shape[2:]) for a in np_args]
    ref = (numpy_ref.post_forward64(*flat[:4]).reshape(B, S, n, D),
           *(r.reshape(s) for r, s in zip(numpy_ref.post_backward64(*flat),
                                          ((B, S, n, D), (B, S, D), (B, S, n), (B, S, n, n)))))
    got = (api.post_forward(x, f_out, h_post, h_res, backend=name),
           *api.post_backward(x, f_out, h_post, h_res, dx_next, backend=name))
    rows = []
    for output, g, r in zip(POST_NAMES, got, ref):
        tol = tolerance(output.split(".")[-1], xd, pd)
        err = relative_error(g, r)
        rows.append(CheckRow(name, output, err, tol, err <= tol))
    return rows
