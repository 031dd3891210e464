"""The gradient of x through the whole mHC step: MHCLayer sums the post operator's dx into the pre
backward's kernel (one pass, one rounding); hand-made pre -> block -> post graphs, with or
without the slot, with x used elsewhere too or detached for post, get the float64 oracle's
gradients (tests/autograd_oracle.py, which shares no code with the package)."""
import pytest

torch = pytest.importorskip("torch")

import mhc_multi
from mhc_multi import MHCLayer, mhc_post, random_inputs
from mhc_multi.autograd import MHCPre

import autograd_oracle as oracle
from conftest import assert_close
from test_accuracy import _backend_param, _device

BACKENDS = [_backend_param("numba"), _backend_param("numpy"), _backend_param("triton")]
K = 3   # Sinkhorn iterations


class _Cast(torch.nn.Module):
    """A float64 block between activations of another dtype and device, rounding its input and
    output to that dtype (in the oracle, both ways of the gradient too) as a real step does."""

    def __init__(self, block, dtype, device="cpu"):
        super().__init__()
        self.block, self.dtype, self.device = block, dtype, device

    def forward(self, h):
        return self.block(h.to(self.dtype).double().cpu()).to(device=self.device,
                                                              dtype=self.dtype)


def _layer(n, D, backend, seed, x):
    torch.manual_seed(seed)
    block64 = torch.nn.Linear(D, D, dtype=torch.float64)
    layer = MHCLayer(_Cast(block64, x.dtype, x.device), n, D, sinkhorn_iters=K, backend=backend)
    with torch.no_grad():   # realistic scales (alpha = 0.01 at initialisation hides a lot)
        layer.pre.alpha.uniform_(0.5, 1.5)
        layer.pre.bias.normal_(0, 0.5)
        layer.pre.gamma.normal_(1, 0.1)
    return layer.to(x.device)


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("x_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_dx_is_summed_in_the_kernel(backend, x_dtype, seed):
    """MHCLayer's dx (and with fp32 x its parameter gradients) against float64 autograd of the
    same step, and its dx bit for bit the pre backward's with post's dx as ``dx_add``: one
    fused sum, not autograd adding two rounded gradients."""
    n, D = (3, 40) if backend == "triton" else (4, 96)
    x = random_inputs((2, 9, n, D), x_dtype, seed=seed, device=_device(backend))[0]
    x.requires_grad_()
    layer = _layer(n, D, backend, seed, x)
    w = _weights(x.shape, seed)
    (layer(x).double().cpu() * w).sum().backward()

    p64 = {k: getattr(layer, k).detach().cpu().double().requires_grad_()
           for k in ("phi", "alpha", "bias", "gamma")}
    x64 = x.detach().cpu().double().requires_grad_()
    h_in, h_post, h_res, *_ = oracle.pre_forward(x64.reshape(-1, n, D), p64["phi"], p64["alpha"],
                                                 p64["bias"], p64["gamma"], sinkhorn_iters=K)
    f = _Cast(layer.block.block, x.dtype)(h_in).double()
    x_next = oracle.post_forward(x64.reshape(-1, n, D), f, h_post, h_res)
    (x_next.reshape(x.shape).to(x.dtype).double() * w).sum().backward()
    where = f"{backend} x={x_dtype} seed={seed}"
    assert x.grad.dtype == x.dtype
    assert_close(x.grad, x64.grad.numpy(), "dx", x_dtype, where=where)
    if x_dtype == "fp32":   # 16-bit x: h_in and f_out round where the oracle may not
        for name in ("phi", "alpha", "bias", "gamma"):
            assert_close(getattr(layer, name).grad, p64[name].grad.numpy(), "d" + name,
                         x_dtype, where=f"{where} d{name}")

    # the same dx from the functional API: post's dx handed to the pre backward as dx_add
    pre, xd = layer.pre, x.detach()
    prm = [t.detach() for t in (pre.phi, pre.alpha, pre.bias, pre.gamma)]
    out = mhc_multi.forward(xd, *prm, backend=backend, sinkhorn_iters=K)
    h = out.h_in.requires_grad_()
    f_out = layer.block(h)
    dx_next = w.to(device=x.device, dtype=x.dtype)
    post = mhc_multi.post_backward(xd, f_out.detach(), out.h_post, out.h_res, dx_next,
                                   backend=backend)
    dh_in, = torch.autograd.grad(f_out, h, post.df_out)
    grads = mhc_multi.backward(xd, *prm[:3], out.inv_rms, out.h_mix, out.h_pre, out.h_post,
                               dh_in, post.dh_post, post.dh_res, prm[3], backend=backend,
                               sinkhorn_iters=K, dx_add=post.dx)
    assert torch.equal(x.grad, grads.dx), f"{where}: dx is not the one fused sum"


@pytest.mark.parametrize("case", ["slot", "plain", "x_used_elsewhere", "post_gets_detached_x"])
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("numpy")])
def test_hand_made_steps(backend, case, seed):
    """pre -> block -> post by hand: with the slot, without it, with x also feeding another op,
    and with post given x.detach() (x then gets only the pre operator's gradient); fp32 x."""
    n, D = 4, 64
    torch.manual_seed(seed)
    pre = MHCPre(n, D, sinkhorn_iters=K, backend=backend)
    with torch.no_grad():
        pre.alpha.uniform_(0.5, 1.5)
        pre.bias.normal_(0, 0.5)
    block = torch.nn.Linear(D, D)
    x = random_inputs((2, 5, n, D), "fp32", seed=seed)[0].requires_grad_()
    w = _weights(x.shape, seed).float()

    def step(x, pre_fn, post_fn, block):
        h_in, h_post, h_res, *slot = pre_fn(x)
        x_post = x.detach() if case == "post_gets_detached_x" else x
        out = post_fn(x_post, block(h_in), h_post, h_res, *slot)
        extra = (x.sin() * 0.5).sum() if case == "x_used_elsewhere" else 0
        return (out * w).sum() + extra

    if case == "slot":
        loss = step(x, lambda x: pre(x, dx_slot=True),
                    lambda x, f, hp, hr, s: mhc_post(x, f, hp, hr, backend=backend, slot=s), block)
    else:
        loss = step(x, pre, lambda x, f, hp, hr: mhc_post(x, f, hp, hr, backend=backend), block)
    loss.backward()

    x64 = x.detach().double().requires_grad_()
    p = {k: getattr(pre, k).detach().double().requires_grad_() for k in
         ("phi", "alpha", "bias", "gamma")}
    block64 = torch.nn.Linear(D, D, dtype=torch.float64)
    block64.load_state_dict(block.state_dict())

    def pre64(x):
        h_in, h_post, h_res, *_ = oracle.pre_forward(x.reshape(-1, n, D), p["phi"], p["alpha"],
                                                     p["bias"], p["gamma"], sinkhorn_iters=K)
        return h_in.reshape(2, 5, D), h_post, h_res

    def post64(x, f, hp, hr):
        return oracle.post_forward(x.reshape(-1, n, D), f.reshape(-1, D), hp, hr).reshape(x.shape)

    w = w.double()
    step(x64, pre64, post64, block64).backward()
    assert_close(x.grad, x64.grad.numpy(), "dx", "fp32", where=f"{case} seed={seed}")
    for k in p:
        assert_close(getattr(pre, k).grad, p[k].grad.numpy(), "d" + k, "fp32",
                     where=f"{case} seed={seed} d{k}")
