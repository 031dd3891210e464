"""Differentiable torch entry points: ``mhc_pre``, ``mhc_post`` and the ``MHCPre`` module.

Each is a ``torch.autograd.Function`` over the front end: the forward saves what the backward
needs (the inputs and the forward's intermediates, not the gates' pre-activations) and the
backward calls the selected backend's backward.
"""
from __future__ import annotations

import math

import torch

from . import api


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


class _MHCPreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters):
        out = api.forward(x, phi, alpha, bias, gamma, backend=backend, norm_eps=norm_eps,
                          hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)
        ctx.save_for_backward(x, phi, alpha, bias, gamma, out.inv_rms, out.h_mix, out.h_pre,
                              out.h_post)
        ctx.opts = dict(backend=backend, norm_eps=norm_eps, hc_eps=hc_eps,
                        sinkhorn_iters=sinkhorn_iters)
        return out.h_in, out.h_post, out.h_res

    @staticmethod
    def backward(ctx, dh_in, dh_post, dh_res):
        x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post = ctx.saved_tensors
        B, S, n, D = x.shape
        dh_in = dh_in if dh_in is not None else x.new_zeros((B, S, D))
        dh_post = _zeros_if_none(dh_post, h_post)
        dh_res = dh_res if dh_res is not None else h_post.new_zeros((B, S, n, n))
        g = api.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                         dh_res, gamma, **ctx.opts)
        return g.dx, g.dphi, g.dalpha, g.dbias, g.dgamma, None, None, None, None


def mhc_pre(x, phi, alpha, bias, gamma=None, *, backend: str = "auto", norm_eps: float = 1e-6,
            hc_eps: float = 1e-6, sinkhorn_iters: int = 0):
    """Differentiable pre operator: ``(h_in, h_post, h_res)`` (see :func:`mhc_multi.forward`).

    Gradients flow to ``x, phi, alpha, bias`` and ``gamma`` through the backend's backward.
    """
    return _MHCPreFunction.apply(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps,
                                 sinkhorn_iters)


class _MHCPostFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f_out, h_post, h_res, backend):
        ctx.save_for_backward(x, f_out, h_post, h_res)
        ctx.backend = backend
        return api.post_forward(x, f_out, h_post, h_res, backend=backend)

    @staticmethod
    def backward(ctx, dx_next):
        x, f_out, h_post, h_res = ctx.saved_tensors
        g = api.post_backward(x, f_out, h_post, h_res, dx_next, backend=ctx.backend)
        return g.dx, g.df_out.to(f_out.dtype), g.dh_post, g.dh_res.to(h_res.dtype), None


def mhc_post(x, f_out, h_post, h_res, *, backend: str = "auto"):
    """Differentiable post operator: ``x_next = h_res @ x + h_post * f_out`` per token."""
    return _MHCPostFunction.apply(x, f_out, h_post, h_res, backend)


def default_bias(n: int, sinkhorn_iters: int = 0) -> torch.Tensor:
    """The initial bias ``[n*n + 2n]`` (float64) of :class:`MHCPre`; docs/architecture.md says why.

    * pre: ``logit(1/n)``, so ``h_pre ~ 1/n`` and ``h_in`` starts as the mean of the streams
      (for n = 1, ``logit(0.99)``: the single stream passes almost unscaled);
    * post: 0, so ``h_post = 2 sigmoid(0) = 1`` and every stream receives the layer's output;
    * res: the identity. Without Sinkhorn the logits are ``h_res`` itself (``eye(n)``); with it,
      ``4 * eye(n)``, which SK projects onto a matrix close to the identity.
    """
    p = 1.0 / n if n > 1 else 0.99
    pre = torch.full((n,), math.log(p / (1.0 - p)), dtype=torch.float64)
    post = torch.zeros(n, dtype=torch.float64)
    res = torch.eye(n, dtype=torch.float64) * (4.0 if sinkhorn_iters else 1.0)
    return torch.cat([pre, post, res.reshape(-1)])


class MHCPre(torch.nn.Module):
    """The mHC pre operator as a module owning ``phi, alpha, bias`` and (optionally) ``gamma``.

    Initialisation (the paper's recipe: start as a plain residual stream, learn to mix):
    ``phi ~ N(0, 1/(n*D))`` so each projection is O(1) for unit-RMS inputs; ``alpha = 0.01``
    for all three gates, so the data-dependent part starts small and the biases dominate;
    ``bias`` from :func:`default_bias` (mean of streams in, output to every stream, identity
    mixing); ``gamma = 1``.

    ``forward(x [B,S,n,D]) -> (h_in [B,S,D], h_post [B,S,n], h_res [B,S,n,n])``.
    """

    def __init__(self, n: int, D: int, *, use_gamma: bool = True, sinkhorn_iters: int = 0,
                 backend: str = "auto", norm_eps: float = 1e-6, hc_eps: float = 1e-6,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not 1 <= n <= 8 or D < 1:
            raise ValueError(f"MHCPre: expected n in 1..8 and D >= 1, got n={n}, D={D}")
        F = n * n + 2 * n
        kw = dict(dtype=dtype, device=device)
        self.n, self.D = n, D
        self.backend, self.norm_eps, self.hc_eps = backend, norm_eps, hc_eps
        self.sinkhorn_iters = sinkhorn_iters
        self.phi = torch.nn.Parameter(torch.randn(F, n * D, **kw) / math.sqrt(n * D))
        self.alpha = torch.nn.Parameter(torch.full((3,), 0.01, **kw))
        self.bias = torch.nn.Parameter(default_bias(n, sinkhorn_iters).to(**kw))
        self.gamma = torch.nn.Parameter(torch.ones(n, D, **kw)) if use_gamma else None

    def forward(self, x):
        return mhc_pre(x, self.phi, self.alpha, self.bias, self.gamma, backend=self.backend,
                       norm_eps=self.norm_eps, hc_eps=self.hc_eps,
                       sinkhorn_iters=self.sinkhorn_iters)

    def extra_repr(self) -> str:
        return (f"n={self.n}, D={self.D}, gamma={self.gamma is not None}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, backend={self.backend!r}")
