"""PyTorch eager transcription of CONTRACT.md: the baseline ``bench.py`` and ``gpu_suite.py``
compare backends to.

This is the code a user would write without this package: the forward and the explicit
backward formulas of CONTRACT.md, one line per equation, on ``[B, S, n, D]`` tensors, computed
in phi's dtype (fp32 by default: ``x`` is upcast once) and rounded once to x's dtype at the
end. The benches also time ``torch.compile`` of these same functions.

Signatures mirror ``mhc_multi.forward`` / ``mhc_multi.backward`` (same positional order), so
the benchmark feeds every implementation the same tensors.
"""
from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp projection of the n x n logits (CONTRACT.md, "Sinkhorn-Knopp projection")

def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """SK_k over the last two axes."""
    P = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        P = P / P.sum(-1, keepdim=True)
        P = P / P.sum(-2, keepdim=True)
    return P


def sinkhorn_vjp(logits: torch.Tensor, iters: int, dP: torch.Tensor) -> torch.Tensor:
    """d(logits) from d(SK_k(logits)): recompute the k iterations, then replay them backwards."""
    P0 = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    P, tape = P0, []
    for _ in range(iters):
        for axis in (-1, -2):                     # row normalisation, then column
            s = P.sum(axis, keepdim=True)
            tape.append((axis, P, s))
            P = P / s
    for axis, Pin, s in reversed(tape):           # Q = Pin / s, s = sum of Pin along axis
        dP = (dP - (dP * (Pin / s)).sum(axis, keepdim=True)) / s
    return dP * P0                                # through exp; the max shift has zero gradient


# ---------------------------------------------------------------------------------------------
# the pre operator

def forward(x, phi, alpha, bias, gamma=None, norm_eps: float = 1e-6, hc_eps: float = 1e-6,
            sinkhorn_iters: int = 0):
    """(h_in, h_post, h_res, inv_rms, h_mix, h_pre) of CONTRACT.md for x [B, S, n, D]."""
    B, S, n, D = x.shape
    xf = x.to(phi.dtype)                                                   # upcast once
    v = xf.reshape(B, S, n * D)
    vg = v if gamma is None else v * gamma.reshape(n * D)
    r = torch.rsqrt(v.square().mean(-1) + norm_eps)                        # inv_rms [B,S]
    m = vg @ phi.T                                                         # h_mix   [B,S,F]
    u = r[..., None] * m
    h_pre = torch.sigmoid(alpha[0] * u[..., :n] + bias[:n]) + hc_eps
    h_post = 2.0 * torch.sigmoid(alpha[1] * u[..., n:2 * n] + bias[n:2 * n])
    h_res = (alpha[2] * u[..., 2 * n:] + bias[2 * n:]).reshape(B, S, n, n)
    if sinkhorn_iters:
        h_res = sinkhorn(h_res, sinkhorn_iters)
    h_in = torch.einsum("bsi,bsid->bsd", h_pre, xf).to(x.dtype)
    return h_in, h_post, h_res, r, m, h_pre


def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
             gamma=None, norm_eps: float = 1e-6, hc_eps: float = 1e-6, sinkhorn_iters: int = 0):
    """(dx, dphi, dalpha, dbias, dgamma) of CONTRACT.md's explicit backward formulas."""
    B, S, n, D = x.shape
    N, F = n * D, n * n + 2 * n
    xf = x.to(phi.dtype)
    v = xf.reshape(B, S, N)
    g = None if gamma is None else gamma.reshape(N)
    vg = v if g is None else v * g
    r, m = inv_rms, h_mix
    u = r[..., None] * m
    if sinkhorn_iters:  # dh_res is w.r.t. the projected matrix: pull it back to the logits
        logits = (alpha[2] * u[..., 2 * n:] + bias[2 * n:]).reshape(B, S, n, n)
        dh_res = sinkhorn_vjp(logits, sinkhorn_iters, dh_res)
    dhi = dh_in.to(phi.dtype)

    dh_pre = torch.einsum("bsd,bsid->bsi", dhi, xf)
    s = h_pre - hc_eps
    dp = dh_pre * s * (1.0 - s)
    dq = dh_post * h_post * (1.0 - h_post / 2.0)
    dR = dh_res.reshape(B, S, n * n)
    e = torch.cat([alpha[0] * dp, alpha[1] * dq, alpha[2] * dR], dim=-1)
    dm = r[..., None] * e
    w = dm @ phi                                                           # dvecX_mm [B,S,N]
    dr = (e * m).sum(-1)
    dv = ((w if g is None else w * g) - (dr * r ** 3 / N)[..., None] * v
          + (h_pre[..., None] * dhi[..., None, :]).reshape(B, S, N))
    dx = dv.reshape(B, S, n, D).to(x.dtype)

    dalpha = torch.stack([(dp * u[..., :n]).sum(), (dq * u[..., n:2 * n]).sum(),
                          (dR * u[..., 2 * n:]).sum()])
    dbias = torch.cat([dp.sum((0, 1)), dq.sum((0, 1)), dR.sum((0, 1))])
    dphi = dm.reshape(-1, F).T @ vg.reshape(-1, N)
    dgamma = None if gamma is None else (v * w).sum((0, 1)).reshape(n, D)
    return dx, dphi, dalpha, dbias, dgamma


# ---------------------------------------------------------------------------------------------
# the post operator: x_next = H_res x + H_post f_out (einsum, computed in the gates' dtype)

def post_forward(x, f_out, h_post, h_res):
    ct = h_post.dtype
    x_next = (torch.einsum("bsij,bsjd->bsid", h_res.to(ct), x.to(ct))
              + h_post[..., None] * f_out.to(ct)[..., None, :])
    return x_next.to(x.dtype)


def post_backward(x, f_out, h_post, h_res, dx_next):
    ct = h_post.dtype
    g, xf, f = dx_next.to(ct), x.to(ct), f_out.to(ct)
    dx = torch.einsum("bsij,bsid->bsjd", h_res.to(ct), g).to(x.dtype)
    df_out = torch.einsum("bsi,bsid->bsd", h_post, g).to(x.dtype)
    dh_post = torch.einsum("bsid,bsd->bsi", g, f)
    dh_res = torch.einsum("bsid,bsjd->bsij", g, xf)
    return dx, df_out, dh_post, dh_res
