"""NumPy float64 reference backend: the oracle every other backend is judged against.

One line per equation of ``CONTRACT.md``. Everything is computed in float64 whatever the
input dtype; results are cast once, at the end, to the contract's output dtypes.
``forward64`` / ``backward64`` hand the uncast float64 values to ``crosscheck``.

Backend interface (shared by every module in ``mhc_multi.backends``), on inputs the front end
has already validated, flattened to ``T = B*S`` tokens and made contiguous:

    x [T, n, D]  activations; ``np.uint16`` means bfloat16 bit patterns
    phi [F, n*D], alpha [3], bias [F], gamma [n, D] or None       (fp32 or fp64, all alike)
    inv_rms [T], h_mix [T, F], h_pre [T, n], h_post [T, n]        (phi's dtype)
    dh_in [T, D] (x's dtype), dh_post [T, n], dh_res [T, n, n]    (phi's dtype)

    forward(...)  -> (h_in, h_post, h_res, inv_rms, h_mix, h_pre)
    backward(...) -> (dx, dphi, dalpha, dbias, dgamma)            dgamma is None without gamma

A backend that sets ``LEADING_TOKEN_DIMS = True`` (the Triton one) takes the token dims as the
caller shaped them instead: x [*L, n, D] and every per-token array [*L, ...] (the front end
hands L = (B, S)), and returns its per-token results with the same leading dims.
"""
from __future__ import annotations

import numpy as np

ARRAY_KIND = "numpy"  # this backend computes on numpy arrays (CPU)
SUPPORTS_SINKHORN = True


def availability() -> str | None:
    """None when this backend can run here, else the reason it cannot."""
    return None


# ---------------------------------------------------------------------------------------------
# bfloat16 <-> float64 (numpy has no bfloat16: x travels as its raw 16-bit words)

def _to64(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint16:  # bfloat16 bits -> the float32 with the same top half
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(a, dtype=np.float64)


def _cast(a64: np.ndarray, like: np.dtype) -> np.ndarray:
    """Round float64 values once to ``like``; bfloat16 bits round to nearest even, exactly."""
    if like != np.uint16:
        return a64.astype(like)
    # fp64 -> fp32 rounded to odd, then fp32 -> bf16 to nearest even: round-to-odd in the first
    # step makes the double rounding equal to one direct rounding.
    f32 = a64.astype(np.float32)
    bits = f32.view(np.uint32)
    back = f32.astype(np.float64)
    bits = np.where(np.abs(back) > np.abs(a64), bits - np.uint32(1), bits)   # toward zero
    bits = bits | (back != a64).astype(np.uint32)                          # sticky odd bit
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return np.where(np.isnan(a64), np.uint32(0x7FC0), rounded).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp projection of the n x n logits (CONTRACT.md, "Sinkhorn-Knopp projection")

def _sinkhorn(logits: np.ndarray, iters: int) -> tuple[np.ndarray, list]:
    """SK_k over the last two axes; also returns what the backward pass replays."""
    P = np.exp(logits - logits.max(axis=(-2, -1), keepdims=True))
    tape = []
    for _ in range(iters):
        r = P.sum(-1, keepdims=True); tape.append(("row", P, r)); P = P / r
        c = P.sum(-2, keepdims=True); tape.append(("col", P, c)); P = P / c
    return P, tape


def _sinkhorn_vjp(logits: np.ndarray, iters: int, dP: np.ndarray) -> np.ndarray:
    """d(logits) from d(SK_k(logits)), replaying the k iterations recomputed from the logits."""
    P, tape = _sinkhorn(logits, iters)
    for kind, Pin, s in reversed(tape):        # Q = Pin / s, s = sum of Pin along the axis
        axis = -1 if kind == "row" else -2
        Q = Pin / s
        dP = (dP - (dP * Q).sum(axis, keepdims=True)) / s
    P0 = np.exp(logits - logits.max(axis=(-2, -1), keepdims=True))
    return dP * P0                               # through exp; the max shift has zero gradient


# ---------------------------------------------------------------------------------------------

def forward64(x, phi, alpha, bias, gamma, *, norm_eps, hc_eps, sinkhorn_iters=0):
    """The forward pass in float64: (h_in, h_post, h_res, inv_rms, h_mix, h_pre)."""
    T, n, D = x.shape
    v = _to64(x).reshape(T, n * D)
    phi, alpha, bias = _to64(phi), _to64(alpha), _to64(bias)
    g = np.ones(n * D) if gamma is None else _to64(gamma).reshape(n * D)

    r = 1.0 / np.sqrt(np.mean(v * v, axis=1) + norm_eps)                      # inv_rms
    m = (v * g) @ phi.T                                                        # h_mix
    u = r[:, None] * m
    with np.errstate(over="ignore"):   # exp(-z) = inf for z < -709: the gate is exactly 0
        h_pre = 1.0 / (1.0 + np.exp(-(alpha[0] * u[:, :n] + bias[:n]))) + hc_eps
        h_post = 2.0 / (1.0 + np.exp(-(alpha[1] * u[:, n:2 * n] + bias[n:2 * n])))
    h_res = (alpha[2] * u[:, 2 * n:] + bias[2 * n:]).reshape(T, n, n)
    if sinkhorn_iters:
        h_res = _sinkhorn(h_res, sinkhorn_iters)[0]
    h_in = np.einsum("ti,tid->td", h_pre, v.reshape(T, n, D))
    return h_in, h_post, h_res, r, m, h_pre


#: float64's unit roundoff
U64 = 2.0 ** -53


def backward64(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
               gamma, *, norm_eps, hc_eps, sinkhorn_iters=0, dx_add=None, dx_rounding=False):
    """The backward pass in float64: (dx, dphi, dalpha, dbias, dgamma); ``dx_add`` [T,n,D]
    (another gradient of x, such as the post operator's) is added to dx.

    With ``dx_rounding=True`` a sixth value follows: a bound [T,n,D] on the rounding error of
    a float64 evaluation of dx's formula, ``(F + 8) u64`` times the sum of the magnitudes it
    adds (its F-term dot products taken term by term: ``|g| (|dm| @ |phi|)``,
    ``r^3/nD (|e| . |m|) |v|``, ``|h_pre dh_in|``, ``|dx_add|``), F for the dot products and 8
    for the roundings around them. dx's first two terms cancel where a row is short (at
    n*D = 1 to ``eps r^2`` of their size), and there this bound, not ||dx||, is how far two
    float64 evaluations in different orders can drift apart (``tolerances.reference_slack``).
    """
    T, n, D = x.shape
    v = _to64(x).reshape(T, n * D)
    phi, alpha, bias = _to64(phi), _to64(alpha), _to64(bias)
    g = np.ones(n * D) if gamma is None else _to64(gamma).reshape(n * D)
    r, m, h_pre, h_post = _to64(inv_rms), _to64(h_mix), _to64(h_pre), _to64(h_post)
    dh_in, dh_post, dh_res = _to64(dh_in), _to64(dh_post), _to64(dh_res)
    u = r[:, None] * m

    if sinkhorn_iters:  # dh_res is w.r.t. the projected matrix: pull it back to the logits
        logits = (alpha[2] * u[:, 2 * n:] + bias[2 * n:]).reshape(T, n, n)
        dh_res = _sinkhorn_vjp(logits, sinkhorn_iters, dh_res)

    dh_pre = np.einsum("td,tid->ti", dh_in, v.reshape(T, n, D))
    s = h_pre - hc_eps
    dp = dh_pre * s * (1.0 - s)
    dq = dh_post * h_post * (1.0 - h_post / 2.0)
    dR = dh_res.reshape(T, n * n)
    e = np.concatenate([alpha[0] * dp, alpha[1] * dq, alpha[2] * dR], axis=1)
    dm = r[:, None] * e
    w = dm @ phi                                                               # dvecX_mm
    dr = np.sum(e * m, axis=1)
    hd = (h_pre[:, :, None] * dh_in[:, None, :]).reshape(T, n * D)
    dv = w * g - (dr * r ** 3 / (n * D))[:, None] * v + hd
    if dx_add is not None:
        dv = dv + _to64(dx_add).reshape(T, n * D)
    if dx_rounding:
        size = (np.abs(g) * (np.abs(dm) @ np.abs(phi))
                + (np.sum(np.abs(e * m), axis=1) * r ** 3 / (n * D))[:, None] * np.abs(v)
                + np.abs(hd))
        if dx_add is not None:
            size = size + np.abs(_to64(dx_add).reshape(T, n * D))
        dx_err = (phi.shape[0] + 8) * U64 * size

    dalpha = np.array([np.sum(dp * u[:, :n]), np.sum(dq * u[:, n:2 * n]), np.sum(dR * u[:, 2 * n:])])
    dbias = np.concatenate([dp.sum(0), dq.sum(0), dR.sum(0)])
    dphi = dm.T @ (v * g)
    dgamma = None if gamma is None else np.sum(v * w, axis=0).reshape(n, D)
    grads = (dv.reshape(T, n, D), dphi, dalpha, dbias, dgamma)
    return grads + (dx_err.reshape(T, n, D),) if dx_rounding else grads


# ---------------------------------------------------------------------------------------------
# The backend functions: float64 math, one cast at the end to the contract's dtypes.

def forward(x, phi, alpha, bias, gamma, *, norm_eps, hc_eps, sinkhorn_iters=0):
    h_in, *rest = forward64(x, phi, alpha, bias, gamma, norm_eps=norm_eps, hc_eps=hc_eps,
                            sinkhorn_iters=sinkhorn_iters)
    return (_cast(h_in, x.dtype),) + tuple(_cast(a, phi.dtype) for a in rest)


def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
             *, norm_eps, hc_eps, sinkhorn_iters=0, dx_add=None):
    dx, *rest = backward64(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                           dh_res, gamma, norm_eps=norm_eps, hc_eps=hc_eps,
                           sinkhorn_iters=sinkhorn_iters, dx_add=dx_add)
    return (_cast(dx, x.dtype),) + tuple(None if a is None else _cast(a, phi.dtype) for a in rest)


# ---------------------------------------------------------------------------------------------
# The post operator (CONTRACT.md, "The post operator"): x [T,n,D], f_out [T,D], h_post [T,n],
# h_res [T,n,n], dx_next [T,n,D].

def post_forward64(x, f_out, h_post, h_res):
    x, f, hp, hr = _to64(x), _to64(f_out), _to64(h_post), _to64(h_res)
    return np.einsum("tij,tjd->tid", hr, x) + hp[:, :, None] * f[:, None, :]


def post_backward64(x, f_out, h_post, h_res, dx_next):
    x, f, hp, hr, g = _to64(x), _to64(f_out), _to64(h_post), _to64(h_res), _to64(dx_next)
    dx = np.einsum("tij,tid->tjd", hr, g)
    df_out = np.einsum("ti,tid->td", hp, g)
    dh_post = np.einsum("tid,td->ti", g, f)
    dh_res = np.einsum("tid,tjd->tij", g, x)
    return dx, df_out, dh_post, dh_res


def post_forward(x, f_out, h_post, h_res):
    return _cast(post_forward64(x, f_out, h_post, h_res), x.dtype)


def post_backward(x, f_out, h_post, h_res, dx_next):
    dx, df_out, dh_post, dh_res = post_backward64(x, f_out, h_post, h_res, dx_next)
    return _cast(dx, x.dtype), _cast(df_out, x.dtype), _cast(dh_post, h_post.dtype), \
        _cast(dh_res, h_post.dtype)
