"""torch.compile(fullgraph=True) of a model built from MHCLayers: no graph breaks, same results."""
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_close
from example import MHCModel


@pytest.mark.parametrize("sinkhorn_iters,recompute", [(0, None), (20, None), (20, 3)],
                         ids=["k0", "k20", "k20-recompute3"])
def test_compile_fullgraph_matches_eager(sinkhorn_iters, recompute, seed):
    """recompute: the compiled model keeps one stream of 3 layers and replays the rest; the eager
    one keeps every stream."""
    torch.manual_seed(seed)
    # float64 throughout: the mHC ops are then judged at the table's fp64 bound, and the
    # blocks' reassociation under inductor stays far below it
    model = MHCModel(24, 4, 2 if recompute is None else 3, sinkhorn_iters=sinkhorn_iters).double()
    h = torch.randn(2, 5, 24, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    model.stack.recompute = None

    out_eager = model(h)
    out_eager.square().mean().backward()
    eager_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    model.stack.recompute = recompute
    out_comp = compiled(h)           # fullgraph=True: a graph break would raise here
    out_comp.square().mean().backward()
    assert_close(out_comp.detach().numpy(), out_eager.detach().numpy(), "x_next", "fp64",
                 where=f"seed={seed}")
    for k, p in model.named_parameters():
        name = k.rsplit(".", 1)[-1]
        out_name = "d" + name if name in ("phi", "alpha", "bias", "gamma") else "dphi"
        assert_close(p.grad.numpy(), eager_grads[k].numpy(), out_name, "fp64",
                     where=f"seed={seed} {k}")


def test_custom_ops_have_fake_implementations():
    """The ops trace with fake tensors (what torch.compile and torch.export rely on)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mhc_multi import mhc_post, mhc_pre, random_inputs

    x, phi, alpha, bias, g = random_inputs((2, 3, 4, 16), "bf16")
    with FakeTensorMode() as mode:
        fx, fphi, falpha, fbias, fg = (mode.from_tensor(t) for t in (x, phi, alpha, bias, g))
        h_in, h_post, h_res = mhc_pre(fx, fphi, falpha, fbias, fg)
        x_next = mhc_post(fx, h_in, h_post, h_res)
    assert h_in.shape == (2, 3, 16) and h_in.dtype == torch.bfloat16
    assert h_res.shape == (2, 3, 4, 4) and h_res.dtype == torch.float32
    assert x_next.shape == x.shape and x_next.dtype == x.dtype
    torch.library.opcheck(torch.ops.mhc_multi.pre_forward.default,
                          (x, phi, alpha, bias, g, "numpy", 1e-6, 1e-6, 0))
