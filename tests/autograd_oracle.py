"""An independent float64 derivation: torch autograd through a transcription of the forward.

It shares no code with ``backends/numpy_ref.py``: the reference's hand-written backward is
checked against the gradients autograd finds on its own.
"""
import torch


def sinkhorn(logits, iters):
    P = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        P = P / P.sum(-1, keepdim=True)
        P = P / P.sum(-2, keepdim=True)
    return P


def pre_forward(x, phi, alpha, bias, gamma, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=0):
    """x [T, n, D] float64 -> (h_in, h_post, h_res, inv_rms, h_mix, h_pre), as in CONTRACT.md."""
    T, n, D = x.shape
    v = x.reshape(T, n * D)
    g = torch.ones(n * D, dtype=x.dtype) if gamma is None else gamma.reshape(n * D)
    inv_rms = torch.rsqrt(v.pow(2).mean(dim=1) + norm_eps)
    h_mix = (v * g) @ phi.t()
    u = inv_rms[:, None] * h_mix
    h_pre = torch.sigmoid(alpha[0] * u[:, :n] + bias[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(alpha[1] * u[:, n:2 * n] + bias[n:2 * n])
    h_res = (alpha[2] * u[:, 2 * n:] + bias[2 * n:]).reshape(T, n, n)
    if sinkhorn_iters:
        h_res = sinkhorn(h_res, sinkhorn_iters)
    h_in = (h_pre[:, :, None] * x).sum(dim=1)
    return h_in, h_post, h_res, inv_rms, h_mix, h_pre


def pre_vjp(x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res, **kw):
    """Autograd's (dx, dphi, dalpha, dbias, dgamma) for cotangents of (h_in, h_post, h_res)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, phi, alpha, bias)]
    g = None if gamma is None else gamma.detach().clone().requires_grad_(True)
    h_in, h_post, h_res, *_ = pre_forward(*leaves, g, **kw)
    wrt = leaves + ([g] if g is not None else [])
    grads = torch.autograd.grad((h_in, h_post, h_res), wrt, (dh_in, dh_post, dh_res))
    return tuple(grads) + ((None,) if g is None else ())


def post_forward(x, f_out, h_post, h_res):
    return torch.einsum("tij,tjd->tid", h_res, x) + h_post[:, :, None] * f_out[:, None, :]
