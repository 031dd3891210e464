"""Selective recompute of the residual streams (the paper's §4.3), as custom ops (and, in eager
mode on plain tensors, as autograd.Functions over the same code, as ``mhc_multi.autograd``).

Within a group of consecutive layers only the group's first stream ``x_a`` [B,S,n,D] is kept
for the backward. Every later stream of the group is a chain of post operators,
``x_{j+1} = post(x_j, f_j, h_post_j, h_res_j)``, whose other inputs (the block outputs ``f_j``
[B,S,D] and the gates) the post operators save anyway. So the layer ``l > a`` runs its pre and
post through ``pre_forward_replayed`` / ``post_forward_replayed``: the same forward as
``mhc_multi::pre_forward`` / ``post_forward``, but they save the chain
``[x_a, f_a, h_post_a, h_res_a, ..., f_{l-1}, h_post_{l-1}, h_res_{l-1}]`` instead of ``x_l``,
and their backward rebuilds ``x_l`` from it with the post kernels alone.
No parameter takes part in the rebuild, so FSDP2 may have freed the gathered parameters of the
earlier layers. The same deterministic kernels on the same inputs give ``x_l`` bit for bit, so
the gradients equal those without recompute bit for bit.

Each layer rebuilds its own stream, from the group's first: layer ``a + j`` with j post
forwards (``L_r (L_r - 1) / 2`` per group of ``L_r``), so that besides the kept first streams at
most one rebuilt stream (and the one in the making) is alive at a time. The layer's post
backward rebuilds it (``post_backward_replayed``, which uses it inside the op) and leaves it in
a one-entry cache; the same layer's pre backward takes it out (``take_stream``), which hands
it over: nothing else holds it then. The cache only saves work: its entry serves only the chain
it was built from (the same tensors' memory and layout, held while the entry is there), and a
miss rebuilds.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from . import api, autograd
from .autograd import _pre_forward_fake, dx_slot, post_grads, post_input_gradients, pre_gradients

_STEP = 3   # chain tensors per layer: f_out, h_post, h_res


def replay(chain: list[Tensor], backend: str) -> Tensor:
    """The stream the chain leads to, ``x_l`` (post forwards only, each intermediate stream
    dropped as soon as the next exists)."""
    x = chain[0]
    for j in range(1, len(chain), _STEP):
        x = api.post_forward(x, *chain[j:j + _STEP], backend=backend)
    return x


class _Cache:
    """One rebuilt stream, from a layer's post backward to the same layer's pre backward.

    It holds the chain (the saved tensors it was rebuilt from) with the stream, so that no other
    tensor can take their memory meanwhile and a tensor over the same memory with the same
    layout is the same value (saved-tensor hooks hand out a new tensor object at every unpack).
    A backward that stops between the two leaves its stream here until the next rebuild."""

    def __init__(self):
        self._lock = threading.Lock()
        self._chain: list[Tensor] = []
        self._stream: Tensor | None = None

    def rebuild(self, chain: list[Tensor], backend: str) -> Tensor:
        """The stream at the end of ``chain``, rebuilt and kept for :meth:`take`."""
        x = replay(chain, backend)
        with self._lock:
            self._chain, self._stream = list(chain), x
        return x

    def take(self, chain: list[Tensor], backend: str) -> Tensor:
        """The stream at the end of ``chain``, a tensor that nothing else holds: the kept one
        where it was rebuilt from this chain (the entry is emptied), else rebuilt."""
        with self._lock:
            if self._stream is not None and len(chain) == len(self._chain) \
                    and all(_same(a, b) for a, b in zip(chain, self._chain)):
                x, self._stream, self._chain = self._stream, None, []
                return x
        return replay(chain, backend)


def _same(a: Tensor, b: Tensor) -> bool:
    """The same values: the same memory, seen the same way (b is held, so its memory is b's)."""
    return (a.data_ptr() == b.data_ptr() and a.device == b.device and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride())


_CACHE = _Cache()


@torch.library.custom_op("mhc_multi::take_stream", mutates_args=())
def _take_op(chain: list[Tensor], backend: str, after: Tensor) -> Tensor:
    """The stream the chain leads to (the layer's post backward left it in the cache, or it is
    rebuilt here). ``after`` is not read: it orders the replay after that gradient exists."""
    return _CACHE.take(chain, backend)


@_take_op.register_fake
def _(chain, backend, after):
    return torch.empty_like(chain[0])


# ---------------------------------------------------------------------------------------------
# the pre operator without its input stream saved

@torch.library.custom_op("mhc_multi::pre_forward_replayed", mutates_args=())
def _pre_forward_replayed_op(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor,
                             gamma: Tensor | None, chain: list[Tensor], backend: str,
                             norm_eps: float, hc_eps: float, sinkhorn_iters: int
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = api._forward(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters)
    return (*out, dx_slot(x))


@_pre_forward_replayed_op.register_fake
def _(x, phi, alpha, bias, gamma, chain, backend, norm_eps, hc_eps, sinkhorn_iters):
    return _pre_forward_fake(x, phi)


def _pre_setup(ctx, inputs, output):
    x, phi, alpha, bias, gamma, chain, *opts = inputs
    _, h_post, _, inv_rms, h_mix, h_pre, _ = output
    ctx.save_for_backward(phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post, *chain)
    ctx.opts, ctx.chain_len = tuple(opts), len(chain)


def _replayed_pre_gradients(ctx, dh_in, dh_post, dh_res, dslot, op=True):
    """``(dx, dphi, dalpha, dbias, dgamma or None)`` from what :func:`_pre_setup` saved, x taken
    from the cache or rebuilt: through the ops (``_take_op`` is ordered after this backward's
    incoming gradients, which a traced graph needs), or (``op=False``, eager) directly."""
    phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post, *chain = ctx.saved_tensors
    if op:
        after = next((g for g in (dh_in, dh_post, dh_res, dslot) if g is not None), h_post)
        x = _take_op(chain, ctx.opts[0], after)
    else:
        x = _CACHE.take(chain, ctx.opts[0])
    return pre_gradients(x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post,
                         dh_in, dh_post, dh_res, dslot, ctx.opts, op)


def _pre_backward(ctx, dh_in, dh_post, dh_res, _inv_rms, _h_mix, _h_pre, dslot):
    return (*_replayed_pre_gradients(ctx, dh_in, dh_post, dh_res, dslot),
            [None] * ctx.chain_len, None, None, None, None)


_pre_forward_replayed_op.register_autograd(_pre_backward, setup_context=_pre_setup)


class _PreReplayedFunction(torch.autograd.Function):
    """``pre_forward_replayed``'s autograd in eager mode (``autograd._eager``): forward ``(h_in,
    h_post, h_res, slot)``, backward as the op's registered one."""

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, gamma, chain, opts):
        args = (x, phi, alpha, bias, gamma)
        return autograd.eager_pre_forward(ctx, args, opts, _pre_setup, (*args, chain, *opts))

    @staticmethod
    def backward(ctx, dh_in, dh_post, dh_res, dslot):
        # with create_graph through the ops, so that a second derivative raises (autograd.py)
        return (*_replayed_pre_gradients(ctx, dh_in, dh_post, dh_res, dslot,
                                         op=torch.is_grad_enabled()), None, None)


# ---------------------------------------------------------------------------------------------
# the post operator without its input stream saved

@torch.library.custom_op("mhc_multi::post_forward_replayed", mutates_args=())
def _post_forward_replayed_op(x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor,
                              slot: Tensor | None, chain: list[Tensor], backend: str) -> Tensor:
    return api.post_forward(x, f_out, h_post, h_res, backend=backend)


@_post_forward_replayed_op.register_fake
def _(x, f_out, h_post, h_res, slot, chain, backend):
    return torch.empty_like(x)


def _post_setup(ctx, inputs, output):
    x, f_out, h_post, h_res, slot, chain, backend = inputs
    ctx.save_for_backward(f_out, h_post, h_res, *chain)
    ctx.backend, ctx.slot, ctx.chain_len = backend, slot is not None, len(chain)


@torch.library.custom_op("mhc_multi::post_backward_replayed", mutates_args=())
def _post_backward_replayed_op(chain: list[Tensor], f_out: Tensor, h_post: Tensor, h_res: Tensor,
                               dx_next: Tensor, backend: str
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The post backward on the rebuilt stream, which stays in the cache for the pre backward
    (it is never an output here, so nothing outside the cache holds it)."""
    return post_grads(_CACHE.rebuild(chain, backend), f_out, h_post, h_res, dx_next, backend)


@_post_backward_replayed_op.register_fake
def _(chain, f_out, h_post, h_res, dx_next, backend):
    return (torch.empty_like(chain[0]), torch.empty_like(f_out), torch.empty_like(h_post),
            torch.empty_like(h_res))


def _replayed_post_gradients(ctx, dx_next, op=True):
    """The post gradients in its inputs' order ``(x, f_out, h_post, h_res, slot)`` from what
    :func:`_post_setup` saved, on the rebuilt stream: through the backward op, or (``op=False``,
    eager) directly."""
    f_out, h_post, h_res, *chain = ctx.saved_tensors
    if op:
        grads = _post_backward_replayed_op(chain, f_out, h_post, h_res, dx_next, ctx.backend)
    else:
        grads = post_grads(_CACHE.rebuild(chain, ctx.backend), f_out, h_post, h_res, dx_next,
                           ctx.backend)
    return post_input_gradients(*grads, ctx.slot)


def _post_backward(ctx, dx_next):
    return (*_replayed_post_gradients(ctx, dx_next), [None] * ctx.chain_len, None)


_post_forward_replayed_op.register_autograd(_post_backward, setup_context=_post_setup)


class _PostReplayedFunction(torch.autograd.Function):
    """``post_forward_replayed``'s autograd in eager mode (``autograd._eager``)."""

    @staticmethod
    def forward(ctx, x, f_out, h_post, h_res, slot, chain, backend):
        out = api.post_forward(x, f_out, h_post, h_res, backend=backend)
        _post_setup(ctx, (x, f_out, h_post, h_res, slot, chain, backend), out)
        return out

    @staticmethod
    def backward(ctx, dx_next):
        return (*_replayed_post_gradients(ctx, dx_next, op=torch.is_grad_enabled()), None, None)


class StreamChain:
    """What a group of layers keeps of its residual stream: the group's first stream, then per
    layer the block output and the gates that the post operator combined them with.

    :class:`mhc_multi.MHCStack` hands one to each layer's forward. It is deliberately not a
    container of tensors, so that hooks which cast a module's tensor inputs (FSDP2's
    ``cast_forward_inputs``) leave the fp32 gates as the forward used them.
    """

    def __init__(self, anchor: Tensor):
        self.tensors = [anchor]

    @property
    def is_anchor(self) -> bool:
        """True while the chain holds only the group's first stream."""
        return len(self.tensors) == 1

    def extend(self, f_out: Tensor, h_post: Tensor, h_res: Tensor) -> None:
        self.tensors = self.tensors + [f_out, h_post, h_res]


def pre_replayed(x, phi, alpha, bias, gamma, chain: StreamChain, *, backend, norm_eps, hc_eps,
                 sinkhorn_iters):
    """``(h_in, h_post, h_res, slot)`` as :func:`mhc_multi.autograd.pre_with_slot` gives them,
    with x rebuilt from ``chain`` in the backward."""
    if autograd._eager(x, phi, alpha, bias, gamma, *chain.tensors):
        return _PreReplayedFunction.apply(x, phi, alpha, bias, gamma, chain.tensors,
                                          (backend, norm_eps, hc_eps, sinkhorn_iters))
    h_in, h_post, h_res, _, _, _, slot = _pre_forward_replayed_op(
        x, phi, alpha, bias, gamma, chain.tensors, backend, norm_eps, hc_eps, sinkhorn_iters)
    return h_in, h_post, h_res, slot


def post_replayed(x, f_out, h_post, h_res, slot, chain: StreamChain, *, backend):
    """:func:`mhc_multi.mhc_post` with ``slot``, with x rebuilt from ``chain`` in the backward."""
    if autograd._eager(x, f_out, h_post, h_res, slot, *chain.tensors):
        return _PostReplayedFunction.apply(x, f_out, h_post, h_res, slot, chain.tensors, backend)
    return _post_forward_replayed_op(x, f_out, h_post, h_res, slot, chain.tensors, backend)
