"""16-bit parameters (``MHCLayer(...).to(torch.bfloat16)``, ``.half()``, FSDP2's mixed precision)
train: at every step the layer's forward and backward are checked against the float64
reference evaluated on the same (rounded) parameter values, with the table's 16-bit row, and
the gradients come back in the parameters' dtype."""
import copy

import pytest

torch = pytest.importorskip("torch")

from mhc_multi import MHCLayer, available_backends
from conftest import assert_close

AVAILABLE = {b.name: b for b in available_backends()}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STEPS = 3


def _backends():
    import os
    triton_ok = AVAILABLE["triton"].available and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    for name, ok in (("numba", AVAILABLE["numba"].available), ("numpy", True),
                     ("triton", triton_ok)):
        yield pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name} cannot run"))


@pytest.mark.parametrize("x_dtype", ["same", "fp32"])
@pytest.mark.parametrize("param_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", list(_backends()))
def test_16bit_layer_trains_within_the_table(backend, param_dtype, x_dtype, seed):
    x_dtype = param_dtype if x_dtype == "same" else x_dtype
    n, D = (4, 48) if backend != "triton" else (3, 20)   # the interpreter is slow
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    layer = MHCLayer(torch.nn.Identity(), n, D, sinkhorn_iters=20, backend=backend)
    with torch.no_grad():   # realistic scales (the initialisation's alpha = 0.01 hides a lot)
        layer.pre.alpha.uniform_(0.5, 1.5)
        layer.pre.bias.normal_(0, 0.5)
        layer.pre.gamma.normal_(1, 0.1)
    layer = layer.to(device=device, dtype=DTYPES[param_dtype])
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for step in range(STEPS):
        ref = copy.deepcopy(layer).double().cpu()   # the same parameter values, exactly
        ref.backend = ref.pre.backend = "numpy"
        x = (torch.randn(2, 17, n, D) * torch.rand(2, 17, 1, 1).add(0.25)).to(DTYPES[x_dtype])
        x = x.to(device).requires_grad_()
        x64 = x.detach().cpu().double().requires_grad_()
        target = torch.randn(2, 17, n, D, dtype=torch.float64)
        y, y64 = layer(x), ref(x64)
        loss = torch.nn.functional.mse_loss(y.double().cpu(), target)
        loss.backward()
        torch.nn.functional.mse_loss(y64, target).backward()
        losses.append(loss.item())
        where = f"{backend} params={param_dtype} x={x_dtype} step={step} seed={seed}"
        assert y.dtype == x.dtype and x.grad.dtype == x.dtype
        assert_close(y.detach(), y64.detach().numpy(), "x_next", x_dtype, param_dtype,
                     where=where)
        assert_close(x.grad, x64.grad.numpy(), "dx", x_dtype, param_dtype, where=where)
        for (name, p), p64 in zip(layer.named_parameters(), ref.parameters()):
            assert p.grad.dtype == p.dtype == DTYPES[param_dtype], name
            out = "d" + name.rsplit(".", 1)[-1]
            assert_close(p.grad, p64.grad.numpy(), out, x_dtype, param_dtype,
                         where=f"{where} {name}")
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
