"""``MHCLayer``: one full mHC step around any block; ``MHCStack``: a sequence of them, with
selective recompute; and the stream expand/merge helpers."""
from __future__ import annotations

import math

import torch

from .autograd import MHCPre, mhc_post
from .recompute import StreamChain, post_replayed, pre_replayed


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

    def forward(self, x: torch.Tensor, chain: StreamChain | None = None) -> torch.Tensor:
        """``x_next [B,S,n,D]``. ``chain`` (:class:`MHCStack` with ``recompute``): the stream of
        the layer's group so far; unless x is the group's first stream, the backward rebuilds x
        from it instead of keeping x. The layer then adds its block output and gates to it."""
        # the post operator's gradient of x reaches the pre backward through the slot and is
        # added to dx in its kernel
        if chain is None or chain.is_anchor:
            h_in, h_post, h_res, slot = self.pre(x, dx_slot=True)
            f_out = self.block(h_in)
            x_next = mhc_post(x, f_out, h_post, h_res, backend=self.backend, slot=slot)
        else:
            p = self.pre
            h_in, h_post, h_res, slot = pre_replayed(
                x, p.phi, p.alpha, p.bias, p.gamma, chain, backend=p.backend,
                norm_eps=p.norm_eps, hc_eps=p.hc_eps, sinkhorn_iters=p.sinkhorn_iters)
            f_out = self.block(h_in)
            x_next = post_replayed(x, f_out, h_post, h_res, slot, chain, backend=self.backend)
        if chain is not None:
            chain.extend(f_out, h_post, h_res)
        return x_next


class MHCStack(torch.nn.Module):
    """The mHC step around each of ``blocks`` in order: ``[B,S,n,D] -> [B,S,n,D]``.

    Its layers are :class:`MHCLayer` s (``stack.layers[i]``, with the block as
    ``stack.layers[i].block``), built with the keyword arguments given here.

    ``recompute`` trades the backward's memory for a little work (the paper's selective
    recompute, arXiv:2512.24880 §4.3):

    * ``None``: every layer keeps its input stream ``[B,S,n,D]`` for the backward, as
      :class:`MHCLayer` alone does;
    * an int ``L_r >= 1``: only the stream at the start of each group of ``L_r`` layers is kept
      (with the block outputs ``[B,S,D]`` and the gates, which the post operator keeps anyway);
      the backward rebuilds each layer's input stream from them with the post kernels alone,
      never running a block again: layer ``j`` of a group (from 0) costs ``j`` post forwards
      (``L_r (L_r - 1) / 2`` per group), and at most one rebuilt stream is alive at a time;
    * ``"auto"``: the paper's ``L_r* = sqrt(n L / (n + 2))`` for ``L`` layers, rounded.

    Gradients are the same bit for bit with or without recompute (the same deterministic kernels
    on the same values). Each block runs once per forward; what it saves is its own business (it
    may use ``torch.utils.checkpoint``). Without grad (``torch.no_grad``, inference mode) nothing
    is saved and ``recompute`` changes nothing.
    """

    def __init__(self, blocks, n: int, D: int, *, sinkhorn_iters: int = 20,
                 backend: str = "auto", recompute: int | str | None = None, **layer_kw):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            MHCLayer(block, n, D, sinkhorn_iters=sinkhorn_iters, backend=backend, **layer_kw)
            for block in blocks)
        self.n, self.D = n, D
        self.recompute = group_size(recompute, n, len(self.layers))

    def reset_parameters(self) -> None:
        """Each layer's :meth:`MHCLayer.reset_parameters`, in order."""
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute is None or not torch.is_grad_enabled():
            for layer in self.layers:
                x = layer(x)
            return x
        chain = None
        for i, layer in enumerate(self.layers):
            if i % self.recompute == 0:
                chain = StreamChain(x)
            x = layer(x, chain)
        return x

    def extra_repr(self) -> str:
        return f"n={self.n}, D={self.D}, recompute={self.recompute}"


def group_size(recompute, n: int, layers: int) -> int | None:
    """The layers per recompute group: None, an int >= 1, or ``"auto"`` for the paper's
    ``L_r* = sqrt(n L / (n + 2))`` (rounded, at least 1)."""
    if recompute is None:
        return None
    if recompute == "auto":
        return max(1, round(math.sqrt(n * layers / (n + 2))))
    if isinstance(recompute, bool) or not isinstance(recompute, int) or recompute < 1:
        raise ValueError(f"recompute: expected None, 'auto' or an int >= 1, got {recompute!r}")
    return recompute


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
