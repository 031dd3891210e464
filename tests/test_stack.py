"""MHCStack and its selective recompute: the same values bit for bit, less memory after the
forward, one rebuild per layer, each block run once. (DDP, FSDP2 and torch.compile with
recompute: test_ddp.py, test_fsdp.py, test_compile.py.)"""
import gc
import math
import weakref

import pytest

torch = pytest.importorskip("torch")

from mhc_multi import MHCPre, MHCStack, mhc_post, random_inputs
from mhc_multi import recompute as rc
from mhc_multi.layer import group_size

from test_accuracy import AVAILABLE, _backend_param, _device

BACKENDS = [_backend_param("numba"), _backend_param("numpy"), _backend_param("triton")]
CPU = "numba" if AVAILABLE["numba"].available else "numpy"   # the fast CPU backend here


class CountingLinear(torch.nn.Linear):
    """A Linear block that counts its forward calls."""

    def __init__(self, D, **kw):
        super().__init__(D, D, **kw)
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        return super().forward(h)


def _stack(n, D, layers, recompute, backend, seed, dtype=torch.float32, device="cpu",
           sinkhorn_iters=20):
    torch.manual_seed(seed)
    blocks = [CountingLinear(D, dtype=dtype, device=device) for _ in range(layers)]
    stack = MHCStack(blocks, n, D, backend=backend, recompute=recompute,
                     sinkhorn_iters=sinkhorn_iters, device=device)
    with torch.no_grad():   # alpha well away from its initial 0.01: the gates depend on x
        for layer in stack.layers:
            layer.alpha.uniform_(0.5, 1.5)
            layer.phi.mul_(4.0)
    return stack


def _run(stack, x):
    """Output, input gradient and every parameter gradient of a loss that weighs each output."""
    x = x.clone().requires_grad_()
    out = stack(x)
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float32, device=out.device)
    (out.float() * w.reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in stack.named_parameters()}


# 5 layers: groups of 1; 2 + 2 + 1; 3 + 2; auto (n = 3: 2); 5 (the interpreter: two of them)
CASES = [pytest.param(b.values[0], r, marks=b.marks, id=f"{b.values[0]}-{r}")
         for b in BACKENDS for r in ([2, 5] if b.values[0] == "triton" else [1, 2, 3, "auto", 5])]


@pytest.mark.parametrize("x_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("backend,recompute", CASES)
def test_recompute_is_bitwise_the_same(backend, recompute, x_dtype, seed):
    """Gradients with recompute equal those without it bit for bit, for every group size, and
    each block runs exactly once."""
    n, D, layers = 3, 40, 5
    dev = _device(backend)
    x = random_inputs((2, 7, n, D), x_dtype, seed=seed, device=dev)[0]
    dt = x.dtype
    ref = _run(_stack(n, D, layers, None, backend, seed, dt, dev), x)
    stack = _stack(n, D, layers, recompute, backend, seed, dt, dev)
    got = _run(stack, x)
    assert [layer.block.calls for layer in stack.layers] == [1] * layers
    assert torch.equal(got[0], ref[0]), f"seed={seed}: outputs differ"
    assert torch.equal(got[1], ref[1]), f"seed={seed}: dx differs"
    for k, g in ref[2].items():
        assert torch.equal(got[2][k], g), f"seed={seed}: d{k} differs"


def _held_after_forward(stack, x):
    """Bytes of the distinct non-parameter storages that autograd holds for the backward after
    the forward, the output of the forward, and weak references to each layer's output."""
    params = {p.untyped_storage().data_ptr() for p in stack.parameters()}
    held = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()
        return t

    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(weakref.ref(o)))
             for layer in stack.layers]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stack(x)
    for h in hooks:
        h.remove()
    gc.collect()
    return sum(held.values()), out, [r() is not None for r in outs]


@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("numpy")])
def test_recompute_holds_at_most_half_the_memory(backend, seed):
    """8 layers, n = 4, Linear blocks, fp32: after the forward, recompute=8 holds at most half
    of what recompute=None holds, and only the group's first stream of all the layer inputs
    (the output is the caller's)."""
    n, D, layers = 4, 256, 8
    x = random_inputs((2, 16, n, D), "fp32", seed=seed)[0].requires_grad_()
    stream = x.numel() * x.element_size()
    keep, out_k, alive_k = _held_after_forward(_stack(n, D, layers, None, backend, seed), x)
    rec, out_r, alive_r = _held_after_forward(_stack(n, D, layers, 8, backend, seed), x)
    print(f"held after the forward: recompute=None {keep / 2**20:.2f} MiB, recompute=8 "
          f"{rec / 2**20:.2f} MiB ({rec / keep:.2f}); one stream {stream / 2**20:.3f} MiB")
    assert rec <= 0.5 * keep, (rec, keep)
    assert keep - rec == (layers - 1) * stream       # the same but 7 of the 8 input streams
    assert alive_k == [True] * layers                # each layer's output is the next's input
    assert alive_r == [False] * (layers - 1) + [True]  # only the last (returned) is alive
    del out_k, out_r


@pytest.mark.parametrize("layers,recompute", [(8, 8), (7, 3), (6, 2)])
def test_one_rebuild_per_layer(layers, recompute, monkeypatch, seed):
    """The backward rebuilds each layer's stream once (post backward and pre backward share it),
    from its group's first stream: layer a + j with a chain of j post steps; and keeps nothing
    afterwards."""
    backend = CPU
    replays = []
    real = rc.replay
    monkeypatch.setattr(rc, "replay", lambda chain, b: replays.append(len(chain)) or real(chain, b))
    stack = _stack(2, 24, layers, recompute, backend, seed)
    _run(stack, random_inputs((1, 5, 2, 24), "fp32", seed=seed)[0])
    sizes = [min(recompute, layers - a) for a in range(0, layers, recompute)]
    assert sorted(replays) == sorted(1 + 3 * j for s in sizes for j in range(1, s))
    assert rc._CACHE._stream is None and not rc._CACHE._chain


def test_replay_without_the_cache_is_the_same(monkeypatch, seed):
    """A backward whose saved tensors come back as copies (offloading hooks) misses the cache
    and replays per layer: still the same gradients bit for bit."""
    backend = CPU
    x = random_inputs((1, 6, 4, 32), "fp32", seed=seed)[0]
    ref = _run(_stack(4, 32, 4, None, backend, seed), x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t.clone()):
        got = _run(_stack(4, 32, 4, 4, backend, seed), x)
    for a, b in zip(got[:2], ref[:2]):
        assert torch.equal(a, b)
    for k, g in ref[2].items():
        assert torch.equal(got[2][k], g), k


def test_no_grad_and_inference_mode(seed):
    """Without grad nothing is saved: the same output as the plain loop, under no_grad and
    inference_mode."""
    backend = CPU
    x = random_inputs((1, 4, 4, 16), "fp32", seed=seed)[0]
    plain = _stack(4, 16, 3, None, backend, seed)
    stack = _stack(4, 16, 3, 3, backend, seed)
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(stack(x), ref)
    with torch.inference_mode():
        assert torch.equal(stack(x), ref)


@pytest.mark.parametrize("n,layers", [(4, 1), (4, 2), (4, 8), (4, 32), (1, 8), (8, 60)])
def test_auto_is_the_papers_group_size(n, layers):
    """recompute="auto": L_r* = sqrt(n L / (n + 2)), rounded, at least 1."""
    want = max(1, round(math.sqrt(n * layers / (n + 2))))
    assert group_size("auto", n, layers) == want
    stack = MHCStack([torch.nn.Identity() for _ in range(layers)], n, 8, recompute="auto",
                     backend="numpy", sinkhorn_iters=0)
    assert stack.recompute == want and f"recompute={want}" in repr(stack)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "all", True])
def test_bad_recompute_is_refused(bad):
    with pytest.raises(ValueError, match=r"recompute: expected None, 'auto' or an int >= 1"):
        MHCStack([torch.nn.Identity()], 2, 8, recompute=bad, backend="numpy")


def test_meta_device_init(seed):
    """Built on the meta device, materialised and reset: the layers' documented values."""
    from mhc_multi.autograd import default_bias
    with torch.device("meta"):
        stack = MHCStack([torch.nn.Linear(16, 16) for _ in range(3)], 4, 16, recompute=2)
    stack.to_empty(device="cpu")
    torch.manual_seed(seed)
    stack.reset_parameters()
    for layer in stack.layers:
        assert torch.equal(layer.alpha, torch.full((3,), 0.01))
        assert torch.equal(layer.bias, default_bias(4, 20).float())
        assert torch.isfinite(layer.block.weight).all() and layer.block.weight.std() > 0


def _count_ops(monkeypatch, calls):
    """Record each call of the pre and post custom ops, recompute's replayed ones too (by
    name), in ``calls``."""
    from mhc_multi import autograd
    for mod, names in ((autograd, ("_pre_forward_op", "_post_forward_op")),
                       (rc, ("_pre_forward_replayed_op", "_post_forward_replayed_op"))):
        for name in names:
            op = getattr(mod, name)
            monkeypatch.setattr(mod, name,
                                lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_untracked_calls_skip_the_custom_ops(mode, monkeypatch, seed):
    """Where no graph records a call (no_grad, inference_mode) the stack's layers run the
    front end directly instead of through the custom ops: the same bits, and the ops are not
    called."""
    from mhc_multi import autograd
    x = random_inputs((1, 3, 4, 16), "fp32", seed=seed)[0]
    stack = _stack(4, 16, 2, None, CPU, seed)
    untracked = torch.no_grad if mode == "no_grad" else torch.inference_mode
    calls = []
    _count_ops(monkeypatch, calls)
    with monkeypatch.context() as m, untracked():
        m.setattr(autograd, "_untracked", lambda *a: False)   # through the ops
        m.setattr(autograd, "_eager", lambda *a: False)
        want = stack(x)
    assert calls == ["_pre_forward_op", "_post_forward_op"] * 2
    calls.clear()
    with untracked():
        got = stack(x)
    assert calls == [] and torch.equal(got, want)


@pytest.mark.parametrize("recompute", [None, 3])
def test_eager_calls_skip_the_custom_ops(recompute, monkeypatch, seed):
    """With grad on, in eager mode on plain tensors, the layers record their calls through
    autograd.Functions (_PreFunction, _PostFunction; with recompute, the replayed layers'
    _PreReplayedFunction, _PostReplayedFunction) rather than the custom ops: the same outputs
    and gradients of x and every parameter, bit for bit, post's dx reaching the pre backward
    through the slot either way, and the ops are not called."""
    from mhc_multi import autograd
    x = random_inputs((2, 3, 4, 16), "fp32", seed=seed)[0].requires_grad_()
    stack = _stack(4, 16, 4, recompute, CPU, seed)
    params = list(stack.parameters())
    dy = torch.randn_like(x)
    calls = []
    _count_ops(monkeypatch, calls)
    with monkeypatch.context() as m:
        m.setattr(autograd, "_eager", lambda *a: False)   # through the ops
        want = stack(x)
        want_grads = torch.autograd.grad(want, [x, *params], dy)
    plain, replayed = ["_pre_forward_op", "_post_forward_op"], \
        ["_pre_forward_replayed_op", "_post_forward_replayed_op"]
    # 4 layers; with recompute=3 the groups are layers 0-2 and 3, whose first layers keep x
    assert calls == (plain * 4 if recompute is None else plain + replayed * 2 + plain)
    calls.clear()
    got = stack(x)
    got_grads = torch.autograd.grad(got, [x, *params], dy)
    assert calls == [] and torch.equal(got, want)
    assert len(got_grads) == len(want_grads) == 1 + len(params)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ops", [False, True], ids=["eager", "ops"])
def test_second_derivatives_raise(ops, monkeypatch, seed):
    """The kernels give first derivatives only: differentiating a gradient of the pre or the
    post operator again raises, through the autograd.Functions as through the custom ops,
    rather than returning a silent zero."""
    from mhc_multi import autograd
    if ops:
        monkeypatch.setattr(autograd, "_eager", lambda *a: False)
    pre = MHCPre(2, 8, backend=CPU, dtype=torch.float64)
    x = random_inputs((1, 3, 2, 8), "fp64", seed=seed)[0].requires_grad_()
    h_in, h_post, h_res = pre(x)
    f = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    for out in (h_in.sum() + h_post.sum(), mhc_post(x, f, h_post.detach(), h_res.detach()).sum()):
        g, = torch.autograd.grad(out, x, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            torch.autograd.grad(g.sum(), x)
    # with recompute, the second layer's operators are the replayed ones: differentiate
    # through them alone (its phi enters nothing else)
    stack = _stack(2, 8, 2, 2, CPU, seed, dtype=torch.float64)
    phi = stack.layers[1].phi
    g, = torch.autograd.grad(stack(x).sum(), phi, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(g.sum(), phi)
