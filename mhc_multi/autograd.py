"""Differentiable torch entry points: ``mhc_pre``, ``mhc_post`` and the ``MHCPre`` module.

The operators are ``torch.library`` custom ops over the front end, with fake (meta)
implementations and registered autograd: the forward saves what the backward needs (the
inputs and the forward's intermediates ``inv_rms, h_mix, h_pre, h_post``) and the backward
calls the selected backend's backward. Being custom ops, they compile under
``torch.compile(fullgraph=True)`` without graph breaks. In eager mode on plain tensors a call
is recorded through an ``autograd.Function`` over the same front end instead (``_eager``), and
without grad it calls the front end directly (``_untracked``): the same results, with less host
time.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import api, checks, registry


# ---------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile (no graph breaks), with fake implementations for tracing

def dx_slot(x: Tensor) -> Tensor:
    """A tensor of x's shape and dtype that holds no data (one zero, expanded): the pre op
    outputs it so that a later consumer of x, the post operator in ``MHCLayer``, can hand its
    gradient of x to the pre backward as this output's gradient, to be added to dx in the
    kernel (one pass, one rounding) rather than by autograd after both have written theirs."""
    return x.new_zeros(1).expand(x.shape)


@torch.library.custom_op("mhc_multi::pre_forward", mutates_args=())
def _pre_forward_op(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, gamma: Optional[Tensor],
                    backend: str, norm_eps: float, hc_eps: float, sinkhorn_iters: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = api._forward(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters)
    return (*out, dx_slot(x))


def _gate_dtype(phi: Tensor) -> torch.dtype:
    """Gates and intermediates: fp64 with fp64 parameters, else fp32 (checks.compute_dtype)."""
    return torch.float64 if phi.dtype == torch.float64 else torch.float32


def _pre_forward_fake(x, phi):
    """Empty outputs of the pre op: ``(h_in, h_post, h_res, inv_rms, h_mix, h_pre, slot)``."""
    B, S, n, D = x.shape
    def p(*shape):
        return phi.new_empty(shape, dtype=_gate_dtype(phi))
    return (x.new_empty(B, S, D), p(B, S, n), p(B, S, n, n), p(B, S), p(B, S, n * n + 2 * n),
            p(B, S, n), dx_slot(x))


@_pre_forward_op.register_fake
def _(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters):
    return _pre_forward_fake(x, phi)


@torch.library.custom_op("mhc_multi::pre_backward", mutates_args=())
def _pre_backward_op(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, inv_rms: Tensor,
                     h_mix: Tensor, h_pre: Tensor, h_post: Tensor, dh_in: Tensor,
                     dh_post: Tensor, dh_res: Tensor, gamma: Optional[Tensor], backend: str,
                     norm_eps: float, hc_eps: float, sinkhorn_iters: int,
                     dx_add: Optional[Tensor] = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = api._backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
                      gamma, backend, norm_eps, hc_eps, sinkhorn_iters, dx_add)
    # a custom op returns tensors only: no gamma -> an empty dgamma, turned back into None
    return g.dx, g.dphi, g.dalpha, g.dbias, g.dgamma if gamma is not None else phi.new_empty(0)


@_pre_backward_op.register_fake
def _(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma, *_):
    dgamma = torch.empty_like(gamma) if gamma is not None else phi.new_empty(0)
    return (torch.empty_like(x), torch.empty_like(phi), torch.empty_like(alpha),
            torch.empty_like(bias), dgamma)


def _pre_setup_context(ctx, inputs, output):
    x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps, sinkhorn_iters = inputs
    _, h_post, _, inv_rms, h_mix, h_pre, _ = output
    ctx.save_for_backward(x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post)
    ctx.opts = (backend, norm_eps, hc_eps, sinkhorn_iters)


def pre_gradients(x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
                  dh_res, dslot, opts, op=True):
    """``(dx, dphi, dalpha, dbias, dgamma or None)`` of the pre operator; a gradient that autograd
    passes as None (an output nobody used) counts as zeros. ``dslot``: the gradient of the
    :func:`dx_slot` output (added to dx in the kernel), or None. ``opts``: (backend, norm_eps,
    hc_eps, sinkhorn_iters). ``op``: through the custom op (traced, subclasses), else the front
    end directly (_eager)."""
    B, S, n, D = x.shape
    dh_in = x.new_zeros(B, S, D) if dh_in is None else dh_in
    dh_post = torch.zeros_like(h_post) if dh_post is None else dh_post
    dh_res = h_post.new_zeros(B, S, n, n) if dh_res is None else dh_res
    args = (x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma,
            *opts, dslot)
    dx, dphi, dalpha, dbias, dgamma = (_pre_backward_op if op else api._backward)(*args)
    return dx, dphi, dalpha, dbias, dgamma if gamma is not None else None


def _saved_pre_gradients(ctx, dh_in, dh_post, dh_res, dslot, op=True):
    """:func:`pre_gradients` from what :func:`_pre_setup_context` saved."""
    x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post = ctx.saved_tensors
    return pre_gradients(x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post, dh_in,
                         dh_post, dh_res, dslot, ctx.opts, op)


def _pre_backward(ctx, dh_in, dh_post, dh_res, _inv_rms, _h_mix, _h_pre, dslot):
    # inv_rms, h_mix and h_pre are saved for the backward, not differentiable outputs:
    # mhc_pre does not hand them out
    return (*_saved_pre_gradients(ctx, dh_in, dh_post, dh_res, dslot), None, None, None, None)


_pre_forward_op.register_autograd(_pre_backward, setup_context=_pre_setup_context)


def _untracked(*tensors) -> bool:
    """Whether a call on ``tensors`` may skip its custom op and run the front end directly: no
    graph records it (grad mode off, as under ``torch.no_grad`` or ``torch.inference_mode``),
    nothing traces it and every tensor is a plain one (_eager). The op would call the same
    front end: the results are the same, without the dispatcher's host time."""
    return not torch.is_grad_enabled() and _eager(*tensors)


_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*tensors) -> bool:
    """Whether a recorded call may go through :class:`_PreFunction` / :class:`_PostFunction`
    instead of its custom op: nothing traces it (not compiling) and every tensor is a plain one
    (a FakeTensor, a DTensor or another subclass goes through the op, whose fake implementation
    or dispatch it needs). The functions call the same front end forward and backward as the
    ops; they spare each call the dispatcher's Python wrappers (through the ops, an MHCLayer
    forward+backward took 1.56 ms of host time on an H100 machine at (1,64,4,4096), its four
    operators called directly 0.47: docs/performance.md, "Where the remaining time goes")."""
    return (not torch.compiler.is_compiling()
            and all(a is None or type(a) in _PLAIN for a in tensors))


def eager_pre_forward(ctx, args, opts, setup, inputs):
    """The forward of an eager pre function (:class:`_PreFunction`, recompute's
    ``_PreReplayedFunction``): the front end's forward of ``args`` (x, phi, alpha, bias, gamma)
    under ``opts`` and the slot, saved by the matching op's ``setup`` (its setup_context) as
    the op saves them from ``inputs``; returns ``(h_in, h_post, h_res, slot)``."""
    out = (*api._forward(*args, *opts), dx_slot(args[0]))
    setup(ctx, inputs, out)
    ctx.set_materialize_grads(False)   # an unused output's gradient stays None
    h_in, h_post, h_res, *_, slot = out
    return h_in, h_post, h_res, slot


class _PreFunction(torch.autograd.Function):
    """The pre operator's autograd in eager mode (_eager): forward ``(h_in, h_post, h_res,
    slot)``, backward through :func:`pre_gradients`, as the custom op's registered autograd."""

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, gamma, opts):
        args = (x, phi, alpha, bias, gamma)
        return eager_pre_forward(ctx, args, opts, _pre_setup_context, (*args, *opts))

    @staticmethod
    def backward(ctx, dh_in, dh_post, dh_res, dslot):
        # with create_graph (grad mode on here) through the op, whose missing autograd formula
        # makes a second derivative raise rather than silently treat x as a constant
        return (*_saved_pre_gradients(ctx, dh_in, dh_post, dh_res, dslot,
                                      op=torch.is_grad_enabled()), None)


def mhc_pre(x, phi, alpha, bias, gamma=None, *, backend: str = "auto", norm_eps: float = 1e-6,
            hc_eps: float = 1e-6, sinkhorn_iters: int = 0):
    """Differentiable pre operator: ``(h_in, h_post, h_res)`` (see :func:`mhc_multi.forward`).

    Gradients flow to ``x, phi, alpha, bias`` and ``gamma`` through the backend's backward.
    Works under ``torch.compile(fullgraph=True)``: the operator is a ``torch.library`` custom
    op (``mhc_multi::pre_forward``) with a fake implementation and registered autograd.
    """
    for name, a in (("x", x), ("phi", phi), ("alpha", alpha), ("bias", bias), ("gamma", gamma)):
        if a is not None and not isinstance(a, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor (mhc_pre is differentiable through "
                            f"torch; mhc_multi.forward takes numpy arrays), got {type(a).__name__}")
    registry.check_name(backend)
    norm_eps, hc_eps = checks.check_eps(norm_eps, hc_eps)
    k = checks.check_iters(sinkhorn_iters)
    h_in, h_post, h_res, _ = pre_with_slot(x, phi, alpha, bias, gamma, backend=backend,
                                           norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=k)
    return h_in, h_post, h_res


def pre_with_slot(x, phi, alpha, bias, gamma, *, backend, norm_eps, hc_eps, sinkhorn_iters):
    """``(h_in, h_post, h_res, slot)``: :func:`mhc_pre` (arguments already checked) and its
    :func:`dx_slot`, for a consumer of x that passes its gradient of x through the slot (None
    where no graph records the call: no gradient will flow)."""
    if _untracked(x, phi, alpha, bias, gamma):
        out = api._forward(x, phi, alpha, bias, gamma, backend, norm_eps, hc_eps,
                           sinkhorn_iters)
        return out.h_in, out.h_post, out.h_res, None
    if _eager(x, phi, alpha, bias, gamma):
        return _PreFunction.apply(x, phi, alpha, bias, gamma,
                                  (backend, norm_eps, hc_eps, sinkhorn_iters))
    h_in, h_post, h_res, _, _, _, slot = _pre_forward_op(x, phi, alpha, bias, gamma, backend,
                                                         norm_eps, hc_eps, sinkhorn_iters)
    return h_in, h_post, h_res, slot


@torch.library.custom_op("mhc_multi::post_forward", mutates_args=())
def _post_forward_op(x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor,
                     slot: Optional[Tensor], backend: str) -> Tensor:
    return api.post_forward(x, f_out, h_post, h_res, backend=backend)


@_post_forward_op.register_fake
def _(x, f_out, h_post, h_res, slot, backend):
    return torch.empty_like(x)


@torch.library.custom_op("mhc_multi::post_backward", mutates_args=())
def _post_backward_op(x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor, dx_next: Tensor,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return post_grads(x, f_out, h_post, h_res, dx_next, backend)


def post_grads(x, f_out, h_post, h_res, dx_next, backend: str):
    """``(dx, df_out, dh_post, dh_res)`` of the post operator, each in its input's dtype."""
    g = api.post_backward(x, f_out, h_post, h_res, dx_next, backend=backend)
    return g.dx, g.df_out.to(f_out.dtype), g.dh_post, g.dh_res.to(h_res.dtype)


@_post_backward_op.register_fake
def _(x, f_out, h_post, h_res, dx_next, backend):
    return (torch.empty_like(x), torch.empty_like(f_out), torch.empty_like(h_post),
            torch.empty_like(h_res))


def _post_setup_context(ctx, inputs, output):
    x, f_out, h_post, h_res, slot, backend = inputs
    ctx.save_for_backward(x, f_out, h_post, h_res)
    ctx.backend, ctx.slot = backend, slot is not None


def post_input_gradients(dx, df_out, dh_post, dh_res, slot: bool):
    """The post op's gradients in its inputs' order ``(x, f_out, h_post, h_res, slot)``: with a
    slot, x's gradient goes to the slot (the pre backward adds it to its dx), not to x."""
    return (None, df_out, dh_post, dh_res, dx) if slot else (dx, df_out, dh_post, dh_res, None)


def _post_backward(ctx, dx_next, op=True):
    """The post op's gradients from what :func:`_post_setup_context` saved: through the
    backward op, or (``op=False``, _PostFunction) the front end directly."""
    x, f_out, h_post, h_res = ctx.saved_tensors
    grads = (_post_backward_op if op else post_grads)(x, f_out, h_post, h_res, dx_next,
                                                      ctx.backend)
    return (*post_input_gradients(*grads, ctx.slot), None)


_post_forward_op.register_autograd(_post_backward, setup_context=_post_setup_context)


class _PostFunction(torch.autograd.Function):
    """The post operator's autograd in eager mode (_eager), as the custom op's registered
    autograd: with a slot, x's gradient goes to the slot."""

    @staticmethod
    def forward(ctx, x, f_out, h_post, h_res, slot, backend):
        out = api.post_forward(x, f_out, h_post, h_res, backend=backend)
        _post_setup_context(ctx, (x, f_out, h_post, h_res, slot, backend), out)
        return out

    @staticmethod
    def backward(ctx, dx_next):
        return _post_backward(ctx, dx_next, op=torch.is_grad_enabled())   # as _PreFunction


def mhc_post(x, f_out, h_post, h_res, *, backend: str = "auto", slot=None):
    """Differentiable post operator: ``x_next = h_res @ x + h_post * f_out`` per token
    (custom op ``mhc_multi::post_forward``, see :func:`mhc_multi.post_forward`).

    ``slot``: the fourth output of ``MHCPre(...)(x, dx_slot=True)`` for this x; the gradient of
    x then reaches the pre backward through it and is added to dx in its kernel, and none flows
    to x from here. Without it (the default) x gets its gradient as from any other op."""
    if _untracked(x, f_out, h_post, h_res, slot):
        return api.post_forward(x, f_out, h_post, h_res, backend=backend)
    if _eager(x, f_out, h_post, h_res, slot):
        return _PostFunction.apply(x, f_out, h_post, h_res, slot, backend)
    return _post_forward_op(x, f_out, h_post, h_res, slot, backend)


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


def _assign(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` (rounded once to param's dtype), also for a sharded DTensor
    parameter: ``value`` is the whole tensor, of which each rank keeps its shard."""
    if param.device.type == "meta":
        return
    if type(param.data).__name__ == "DTensor":   # torch.distributed.tensor, imported only here
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


class MHCPre(torch.nn.Module):
    """The mHC pre operator as a module owning ``phi, alpha, bias`` and (optionally) ``gamma``.

    Initialisation (:meth:`reset_parameters`; the paper's recipe: start as a plain residual
    stream, learn to mix): ``phi ~ N(0, 1/(n*D))`` so each projection is O(1) for unit-RMS
    inputs; ``alpha = 0.01`` for all three gates, so the data-dependent part starts small and
    the biases dominate; ``bias`` from :func:`default_bias` (mean of streams in, output to every
    stream, identity mixing); ``gamma = 1``. Values are drawn in fp32 (phi) or float64 (bias)
    and rounded once to ``dtype``.

    The parameters may be bf16, fp16, fp32 or fp64 (``dtype=``, ``.bfloat16()``, or FSDP2's
    ``MixedPrecisionPolicy``): 16-bit ones are computed in fp32, the gates come out in fp32 and
    the gradients in each parameter's dtype. Under ``torch.device("meta")`` the module is built
    without memory; ``to_empty(device=...)`` then ``reset_parameters()`` initialise it.

    ``forward(x [B,S,n,D]) -> (h_in [B,S,D], h_post [B,S,n], h_res [B,S,n,n])``.
    """

    def __init__(self, n: int, D: int, *, use_gamma: bool = True, sinkhorn_iters: int = 0,
                 backend: str = "auto", norm_eps: float = 1e-6, hc_eps: float = 1e-6,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not 1 <= n <= 8 or D < 1:
            raise ValueError(f"MHCPre: expected n in 1..8 and D >= 1, got n={n}, D={D}")
        registry.check_name(backend)
        norm_eps, hc_eps = checks.check_eps(norm_eps, hc_eps)
        sinkhorn_iters = checks.check_iters(sinkhorn_iters)
        F = n * n + 2 * n
        kw = dict(dtype=dtype, device=device)
        self.n, self.D = n, D
        self.backend, self.norm_eps, self.hc_eps = backend, norm_eps, hc_eps
        self.sinkhorn_iters = sinkhorn_iters
        self.phi = torch.nn.Parameter(torch.empty(F, n * D, **kw))
        self.alpha = torch.nn.Parameter(torch.empty(3, **kw))
        self.bias = torch.nn.Parameter(torch.empty(F, **kw))
        if use_gamma:
            self.gamma = torch.nn.Parameter(torch.empty(n, D, **kw))
        else:
            self.register_parameter("gamma", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The documented initialisation, in place: on meta tensors nothing is drawn; on
        sharded (DTensor) parameters, as FSDP2 holds them, each takes its shard of the values
        drawn on rank 0, so the gathered parameters equal a single process's."""
        n, D = self.n, self.D
        dev = self.phi.device
        _assign(self.phi, torch.randn(self.phi.shape, dtype=torch.float32, device=dev)
                / math.sqrt(n * D))
        _assign(self.alpha, torch.full((3,), 0.01, dtype=torch.float64, device=dev))
        _assign(self.bias, default_bias(n, self.sinkhorn_iters).to(dev))
        if self.gamma is not None:
            _assign(self.gamma, torch.ones(self.gamma.shape, dtype=torch.float64, device=dev))

    def forward(self, x, dx_slot: bool = False):
        """``(h_in, h_post, h_res)``; with ``dx_slot=True`` also the slot to pass to
        :func:`mhc_post` for the same x (dx summed in the pre backward's kernel)."""
        if dx_slot:
            return pre_with_slot(x, self.phi, self.alpha, self.bias, self.gamma,
                                 backend=self.backend, norm_eps=self.norm_eps,
                                 hc_eps=self.hc_eps, sinkhorn_iters=self.sinkhorn_iters)
        return mhc_pre(x, self.phi, self.alpha, self.bias, self.gamma, backend=self.backend,
                       norm_eps=self.norm_eps, hc_eps=self.hc_eps,
                       sinkhorn_iters=self.sinkhorn_iters)

    def extra_repr(self) -> str:
        return (f"n={self.n}, D={self.D}, gamma={self.gamma is not None}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, norm_eps={self.norm_eps:g}, "
                f"hc_eps={self.hc_eps:g}, backend={self.backend!r}")
