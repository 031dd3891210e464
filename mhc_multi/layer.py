"""``MHCLayer``: one full mHC step around any block, and the stream expand/merge helpers."""
from __future__ import annotations

import torch

from .autograd import MHCPre, mhc_post


class MHCLayer(torch.nn.Module):
    """Wrap a block ``F: [B,S,D] -> [B,S,D]`` into the mHC step on ``n`` streams.

    ``x [B,S,n,D]`` -> pre (``h_in, h_post, h_res``) -> ``f = block(h_in)`` ->
    post: ``x_next[i] = sum_j h_res[i,j] x[j] + h_post[i] f`` -> ``[B,S,n,D]``.

    The layer's own parameters are ``phi, alpha, bias, gamma`` (as in :class:`MHCPre`,
    initialised as documented there: at the start the step is close to a plain residual
    connection on every stream); the block's are under ``block``. The parameters may be 16-bit
    (``.bfloat16()``, FSDP2's mixed precision): see :class:`MHCPre`. ``sinkhorn_iters`` (default
    20, the paper's) projects ``h_res`` onto doubly stochastic matrices.
    """

    def __init__(self, block: torch.nn.Module, n: int, D: int, *, sinkhorn_iters: int = 20,
                 backend: str = "auto", use_gamma: bool = True, norm_eps: float = 1e-6,
                 hc_eps: float = 1e-6, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.block = block
        self.pre = MHCPre(n, D, use_gamma=use_gamma, sinkhorn_iters=sinkhorn_iters,
                          backend=backend, norm_eps=norm_eps, hc_eps=hc_eps, dtype=dtype,
                          device=device)
        self.backend = backend

    # the parameters under the names of MHCPre's, on the layer itself
    phi = property(lambda self: self.pre.phi)
    alpha = property(lambda self: self.pre.alpha)
    bias = property(lambda self: self.pre.bias)
    gamma = property(lambda self: self.pre.gamma)

    def reset_parameters(self) -> None:
        """The documented initialisation: the block's parameters (its ``reset_parameters``, or
        where it has none, that of each submodule that has one, as ``torch.nn`` layers do), then
        the pre operator's (:meth:`MHCPre.reset_parameters`). That is the order in which
        ``MHCLayer(Block(...), n, D)`` draws them, so that after meta-device construction,
        ``to_empty()`` and this, a seeded layer equals one built directly."""
        _reset(self.block)
        self.pre.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_in, h_post, h_res = self.pre(x)
        f_out = self.block(h_in)
        return mhc_post(x, f_out, h_post, h_res, backend=self.backend)


def _reset(module: torch.nn.Module) -> None:
    """``module.reset_parameters()``, or where it has none, the same for each child, in order."""
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
        return
    for child in module.children():
        _reset(child)


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """``[B,S,D] -> [B,S,n,D]``: every stream starts as a copy of the hidden state."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


def merge_streams(x: torch.Tensor) -> torch.Tensor:
    """``[B,S,n,D] -> [B,S,D]``: the streams summed, as hyper-connections read out the model."""
    return x.sum(dim=-2)
