"""CUDA-graph capture of the Triton backend through the front end (needs a CUDA GPU).

A server replays one captured decode step for every token: forward, backward and the post
operator must capture (no host sync, no allocation outside the graph's pool, no host-side
decision that depends on values) and a replay on new input values must give what a plain call
gives on them, bit for bit.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import mhc_multi  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [(1, 1, 4, 4096, "bf16"), (2, 4, 4, 1000, "fp16"), (1, 64, 8, 256, "fp32"),
         (1, 3, 1, 64, "bf16")]
IDS = [f"{c[4]}-n{c[2]}-T{c[0] * c[1]}-D{c[3]}" for c in CASES]


def _captured(fn, static_inputs):
    """(graph, outputs of the captured call) after warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(*static_inputs)
    return graph, outs


def _flat(outs):
    return [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]


def _replay_matches(fn, inputs, fresh_inputs):
    """Capture ``fn`` on copies of ``inputs``, copy ``fresh_inputs`` into them, replay: the
    graph's outputs must equal a plain call on ``fresh_inputs`` bit for bit (and differ from a
    call on ``inputs``, so that a graph that replays stale values cannot pass)."""
    static_inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in inputs]
    before = _flat(fn(*inputs))
    graph, outs = _captured(fn, static_inputs)
    for s, f in zip(static_inputs, fresh_inputs):
        if isinstance(s, torch.Tensor):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    want = fn(*fresh_inputs)
    got, want = _flat(outs), _flat(want)
    assert len(got) == len(want) and got
    for g, w in zip(got, want):
        assert torch.equal(g, w), "a replay on new values differs from a plain call"
    assert any(not torch.equal(g, b) for g, b in zip(got, before)), "the new values change nothing"


def _draw(shape, dname, seed):
    """(x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res) on the GPU."""
    B, S, n, D = shape
    x, phi, alpha, bias, gamma = mhc_multi.random_inputs(shape, dname, seed=seed, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    dh_in = torch.randn((B, S, D), generator=g, device="cuda").to(x.dtype)
    dh_post = torch.randn((B, S, n), generator=g, device="cuda")
    dh_res = torch.randn((B, S, n, n), generator=g, device="cuda")
    return x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res


@pytest.mark.parametrize("B,S,n,D,dname", CASES, ids=IDS)
def test_capture_forward_backward_post(B, S, n, D, dname):
    k = 20
    a, b = _draw((B, S, n, D), dname, 1), _draw((B, S, n, D), dname, 2)

    def fwd(x, phi, alpha, bias, gamma):
        return tuple(mhc_multi.forward(x, phi, alpha, bias, gamma, backend="triton",
                                       sinkhorn_iters=k))

    _replay_matches(fwd, list(a[:5]), list(b[:5]))
    outs_a = mhc_multi.forward(*a[:5], backend="triton", sinkhorn_iters=k)
    outs_b = mhc_multi.forward(*b[:5], backend="triton", sinkhorn_iters=k)

    def bwd(x, phi, alpha, bias, gamma, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post,
            dh_res):
        return tuple(mhc_multi.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post,
                                        dh_in, dh_post, dh_res, gamma, backend="triton",
                                        sinkhorn_iters=k))

    def bwd_inputs(d, o):
        return [*d[:5], o.inv_rms.clone(), o.h_mix.clone(), o.h_pre.clone(), o.h_post.clone(),
                *d[5:]]

    _replay_matches(bwd, bwd_inputs(a, outs_a), bwd_inputs(b, outs_b))

    def post_fwd(x, f, h_post, h_res):
        return mhc_multi.post_forward(x, f, h_post, h_res, backend="triton")

    def post_bwd(x, f, h_post, h_res, dx_next):
        return tuple(mhc_multi.post_backward(x, f, h_post, h_res, dx_next, backend="triton"))

    def post_inputs(d, o, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        dx_next = torch.randn(d[0].shape, generator=g, device="cuda").to(d[0].dtype)
        return [d[0], o.h_in.clone(), o.h_post.clone(), o.h_res.clone(), dx_next]

    pa, pb = post_inputs(a, outs_a, 3), post_inputs(b, outs_b, 4)
    _replay_matches(post_fwd, pa[:4], pb[:4])
    _replay_matches(post_bwd, pa, pb)


def test_capture_layer_forward_step():
    """The whole forward step (pre -> block -> post) of an MHCLayer under no_grad."""
    n, D = 4, 512
    torch.manual_seed(0)
    layer = mhc_multi.MHCLayer(torch.nn.Linear(D, D, device="cuda", dtype=torch.bfloat16), n, D,
                               device="cuda")
    xa = mhc_multi.random_inputs((1, 1, n, D), "bf16", seed=5, device="cuda")[0]
    xb = mhc_multi.random_inputs((1, 1, n, D), "bf16", seed=6, device="cuda")[0]

    def step(x):
        with torch.no_grad():
            return layer(x)

    _replay_matches(step, [xa], [xb])


@pytest.mark.parametrize("B,S,n,D,dname", CASES[:2], ids=IDS[:2])
def test_calls_do_not_sync_the_host(B, S, n, D, dname):
    """A call of a signature seen before (its plans built, its kernels compiled) never waits
    for the GPU: forward, backward, the post operator and a layer's training step through
    autograd run with torch's sync debug mode raising on any synchronizing operation (an
    .item(), a device-to-host copy, a synchronize), and give the bits of the first call."""
    k = 20
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _draw((B, S, n, D), dname, 7)
    layer = mhc_multi.MHCLayer(torch.nn.Linear(D, D, device="cuda", dtype=x.dtype), n, D,
                               sinkhorn_iters=k, device="cuda")
    xg = x.clone().requires_grad_()

    def calls():
        o = mhc_multi.forward(x, phi, alpha, bias, gamma, backend="triton", sinkhorn_iters=k)
        g = mhc_multi.backward(x, phi, alpha, bias, o.inv_rms, o.h_mix, o.h_pre, o.h_post,
                               dh_in, dh_post, dh_res, gamma, backend="triton",
                               sinkhorn_iters=k)
        y = mhc_multi.post_forward(x, o.h_in, o.h_post, o.h_res, backend="triton")
        p = mhc_multi.post_backward(x, o.h_in, o.h_post, o.h_res, y, backend="triton")
        xg.grad = None
        layer(xg).float().square().sum().backward()
        return [*o, *g, y, *p, xg.grad]

    first = calls()   # builds the plans and compiles (the first call may ask the driver)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for a, b in zip(_flat(tuple(first)), _flat(tuple(again))):
        assert torch.equal(a, b), "a call under the sync debug mode gives other bits"
