"""The front end: argument checks, containers, dtypes, backend choice, edge cases."""
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mhc_multi
from mhc_multi import (BackendUnavailableError, MHCPre, backward, crosscheck, forward, mhc_pre,
                       random_inputs, registry)
from mhc_multi.backends import numpy_ref
from conftest import assert_close

SHAPE = (2, 3, 4, 40)


@pytest.fixture
def spy():
    """A backend that records whether it ran: every bad input must be refused before it."""
    calls = []
    mod = types.SimpleNamespace(
        __name__="spy", ARRAY_KIND="numpy", SUPPORTS_SINKHORN=True, availability=lambda: None,
        forward=lambda *a, **k: calls.append("forward") or numpy_ref.forward(*a, **k),
        backward=lambda *a, **k: calls.append("backward") or numpy_ref.backward(*a, **k))
    registry.register("spy", mod)
    yield calls
    registry.unregister("spy")


def _inputs(seed, dtype="fp32", **kw):
    return random_inputs(SHAPE, dtype, seed=seed, **kw)


def _bwd_args(x, phi, alpha, bias, g):
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    B, S, n, D = x.shape
    return dict(inv_rms=out.inv_rms, h_mix=out.h_mix, h_pre=out.h_pre, h_post=out.h_post,
                dh_in=torch.randn(B, S, D, dtype=x.dtype), dh_post=torch.randn(B, S, n),
                dh_res=torch.randn(B, S, n, n), dx_add=torch.randn(B, S, n, D, dtype=x.dtype))


# (what to change, expected exception, the argument the message must name)
def _bad_forward_cases():
    B, S, n, D = SHAPE
    F = n * n + 2 * n
    return {
        "x-3d": (lambda a: a.update(x=a["x"][0]), ValueError, "x"),
        "x-n9": (lambda a: a.update(x=torch.zeros(1, 1, 9, 4)), ValueError, "x"),
        "x-int": (lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x"),
        "x-list": (lambda a: a.update(x=[[1.0]]), TypeError, "x"),
        "phi-shape": (lambda a: a.update(phi=torch.zeros(F, n * D + 1)), ValueError, "phi"),
        "phi-int": (lambda a: a.update(phi=a["phi"].to(torch.int64)), TypeError, "phi"),
        "phi-fp64-alpha-fp32": (lambda a: a.update(phi=a["phi"].double()), TypeError, "alpha"),
        "phi-numpy": (lambda a: a.update(phi=a["phi"].numpy()), TypeError, "phi"),
        "alpha-shape": (lambda a: a.update(alpha=torch.zeros(4)), ValueError, "alpha"),
        "alpha-dtype": (lambda a: a.update(alpha=a["alpha"].double()), TypeError, "alpha"),
        "bias-shape": (lambda a: a.update(bias=torch.zeros(F - 1)), ValueError, "bias"),
        "gamma-shape": (lambda a: a.update(gamma=torch.ones(n, D - 1)), ValueError, "gamma"),
        "gamma-dtype": (lambda a: a.update(gamma=a["gamma"].int()), TypeError, "gamma"),
        "bias-numpy-fp16": (lambda a: a.update(bias=a["bias"].half().numpy()), TypeError, "bias"),
        "device": (lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias"),
        "norm_eps": (lambda a: a.update(norm_eps=0.0), ValueError, "norm_eps"),
        "hc_eps": (lambda a: a.update(hc_eps=float("nan")), ValueError, "hc_eps"),
        "norm_eps-bool": (lambda a: a.update(norm_eps=True), TypeError, "norm_eps"),
        "hc_eps-str": (lambda a: a.update(hc_eps="1e-6"), TypeError, "hc_eps"),
        "sinkhorn": (lambda a: a.update(sinkhorn_iters=-1), ValueError, "sinkhorn_iters"),
        "sinkhorn-huge": (lambda a: a.update(sinkhorn_iters=2**64), ValueError, "sinkhorn_iters"),
        "sinkhorn-float": (lambda a: a.update(sinkhorn_iters=2.5), TypeError, "sinkhorn_iters"),
        "sinkhorn-bool": (lambda a: a.update(sinkhorn_iters=True), TypeError, "sinkhorn_iters"),
        "x-meta": (lambda a: a.update(x=a["x"].to("meta")), ValueError, "x"),
        "backend": (lambda a: a.update(backend="cuda"), ValueError, "backend"),
    }


@pytest.mark.parametrize("case", list(_bad_forward_cases()))
def test_forward_rejects_bad_input(case, spy, seed):
    x, phi, alpha, bias, g = _inputs(seed)
    kwargs = dict(x=x, phi=phi, alpha=alpha, bias=bias, gamma=g, backend="spy")
    mutate, exc, name = _bad_forward_cases()[case]
    mutate(kwargs)
    with pytest.raises(exc) as info:
        forward(**kwargs)
    msg = str(info.value)
    assert msg.startswith(name) and "expected" in msg and "got" in msg, msg
    if case == "backend":
        assert all(b in msg for b in ("'triton'", "'numba'", "'numpy'")), msg
    assert spy == [], "a backend ran on bad input"


@pytest.mark.parametrize("arg,bad,exc", [
    ("inv_rms", lambda t: t[:, :1], ValueError), ("h_mix", lambda t: t[..., 1:], ValueError),
    ("h_pre", lambda t: t.int(), TypeError), ("h_post", lambda t: t[None], ValueError),
    ("dh_in", lambda t: t[..., :-1], ValueError), ("dh_in", lambda t: t.long(), TypeError),
    ("dh_post", lambda t: t.transpose(1, 2), ValueError), ("dh_res", lambda t: t[..., 0], ValueError),
    ("dx_add", lambda t: t[:, :, :1], ValueError), ("dx_add", lambda t: t.int(), TypeError),
    ("dx_add", lambda t: t.to("meta"), ValueError),
])
def test_backward_rejects_bad_input(arg, bad, exc, spy, seed):
    x, phi, alpha, bias, g = _inputs(seed)
    kw = _bwd_args(x, phi, alpha, bias, g)
    kw[arg] = bad(kw[arg])
    with pytest.raises(exc) as info:
        backward(x, phi, alpha, bias, gamma=g, backend="spy", **kw)
    assert str(info.value).startswith(arg), str(info.value)
    assert spy == []


def test_numpy_and_torch_scalars_are_accepted(seed):
    """numpy / 0-d torch scalars for the eps values and k give the same result as Python's."""
    x, phi, alpha, bias, g = _inputs(seed)
    ref = forward(x, phi, alpha, bias, g, backend="numpy", norm_eps=1e-5, sinkhorn_iters=3)
    got = forward(x, phi, alpha, bias, g, backend="numpy", norm_eps=np.float32(1e-5),
                  hc_eps=np.float64(1e-6), sinkhorn_iters=torch.tensor(3))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(sinkhorn_iters=2.5), TypeError, "sinkhorn_iters"),
    (dict(sinkhorn_iters=True), TypeError, "sinkhorn_iters"),
    (dict(norm_eps="1e-3"), TypeError, "norm_eps"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_mhc_pre_and_mhcpre_check_like_forward(kw, exc, name, spy, seed):
    """The autograd entry points refuse what forward refuses, before anything runs (MHCPre at
    construction), instead of coercing (int(2.5) would silently run 2 iterations)."""
    x, phi, alpha, bias, g = _inputs(seed)
    with pytest.raises(exc, match=f"^{name}"):
        mhc_pre(x, phi, alpha, bias, g, **{"backend": "spy", **kw})
    with pytest.raises(exc, match=f"^{name}"):
        MHCPre(SHAPE[2], SHAPE[3], **kw)
    assert spy == []


def test_mhc_pre_rejects_numpy(seed):
    x, phi, alpha, bias, g = _inputs(seed, container="numpy")
    with pytest.raises(TypeError, match="^x: .*torch.Tensor"):
        mhc_pre(x, phi, alpha, bias, g)


def test_crosscheck_checks_its_inputs_first(seed):
    x, phi, alpha, bias, g = _inputs(seed)
    with pytest.raises(ValueError, match="^x: expected 4 dimensions"):
        crosscheck(x[0], phi, alpha, bias, g, backends=["numpy"])
    with pytest.raises(ValueError, match="^phi: expected shape"):
        crosscheck(x, phi[:, 1:], alpha, bias, g, backends=["numpy"])
    one = crosscheck(x, phi, alpha, bias, g, backends="numpy", seed=seed)  # a single name
    assert {r.backend for r in one.rows} == {"numpy"} and one.ok


def test_triton_on_cpu_without_interpreter_is_unavailable(monkeypatch, seed):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, phi, alpha, bias, g = _inputs(seed)
    with pytest.raises(BackendUnavailableError, match="triton"):
        forward(x, phi, alpha, bias, g, backend="triton")


def test_unavailable_backend_raises_with_reason(spy, seed):
    registry._loaded["spy"].availability = lambda: "spy is not installed"
    x, phi, alpha, bias, g = _inputs(seed)
    with pytest.raises(BackendUnavailableError, match="spy is not installed"):
        forward(x, phi, alpha, bias, g, backend="spy")
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_available_backends_reports_each_with_reason():
    infos = mhc_multi.available_backends()
    assert [b.name for b in infos] == ["triton", "numba", "numpy"]
    for b in infos:
        assert b.available == (b.reason is None)
    assert next(b for b in infos if b.name == "numpy").available


def test_auto_choice_and_env_override(monkeypatch, spy, seed):
    x, phi, alpha, bias, g = _inputs(seed)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    want = "numba" if registry._reason("numba") is None else "numpy"
    assert registry.resolve("auto", on_cuda=False)[0] == want
    if registry._reason("triton") is None:
        assert registry.resolve("auto", on_cuda=True)[0] == "triton"
    else:   # CUDA data goes to triton, or raises why it cannot run here
        with pytest.raises(BackendUnavailableError, match="triton"):
            registry.resolve("auto", on_cuda=True)
    monkeypatch.setenv(registry.ENV_VAR, "spy")
    forward(x, phi, alpha, bias, g)                      # "auto" follows the variable
    assert spy == ["forward"]
    forward(x, phi, alpha, bias, g, backend="numpy")     # an explicit name does not
    assert spy == ["forward"]
    monkeypatch.setenv(registry.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="MHC_MULTI_BACKEND"):
        forward(x, phi, alpha, bias, g)


@pytest.mark.parametrize("x_dtype", ["bf16", "fp16", "fp32", "fp64"])
@pytest.mark.parametrize("param_dtype", ["fp32", "fp64"])
def test_output_dtypes_and_containers_torch(x_dtype, param_dtype, seed):
    x, phi, alpha, bias, g = _inputs(seed, x_dtype, param_dtype=param_dtype)
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    assert out.h_in.dtype == x.dtype and isinstance(out.h_in, torch.Tensor)
    for a in out[1:]:
        assert isinstance(a, torch.Tensor) and a.dtype == phi.dtype
    gr = backward(x, phi, alpha, bias, gamma=g, backend="numpy", **_bwd_args(x, phi, alpha, bias, g))
    assert gr.dx.dtype == x.dtype and gr.dx.shape == x.shape
    assert all(a.dtype == phi.dtype for a in gr[1:])
    assert gr.dgamma.shape == g.shape


def test_numpy_in_numpy_out(seed):
    x, phi, alpha, bias, g = random_inputs(SHAPE, "fp16", seed=seed, container="numpy")
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    assert isinstance(out.h_in, np.ndarray) and out.h_in.dtype == np.float16
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in out[1:])
    B, S, n, D = SHAPE
    gr = backward(x, phi, alpha, bias, out.inv_rms, out.h_mix, out.h_pre, out.h_post,
                  np.ones((B, S, D), np.float16), np.ones((B, S, n), np.float32),
                  np.ones((B, S, n, n), np.float32), None, backend="numpy")
    assert isinstance(gr.dx, np.ndarray) and gr.dx.dtype == np.float16 and gr.dgamma is None


def test_inputs_not_modified_and_noncontiguous_ok(seed):
    x, phi, alpha, bias, g = _inputs(seed, "bf16")
    # a non-contiguous x: the streams axis is strided
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xs.is_contiguous()
    kept = [t.clone() for t in (xs, phi, alpha, bias, g)]
    got = forward(xs, phi, alpha, bias, g, backend="numpy")
    want = forward(x, phi, alpha, bias, g, backend="numpy")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    kw = _bwd_args(x, phi, alpha, bias, g)
    kw_kept = {k: v.clone() for k, v in kw.items()}
    backward(xs, phi, alpha, bias, gamma=g, backend="numpy", **kw)
    for a, b in zip((xs, phi, alpha, bias, g), kept):
        assert torch.equal(a, b)
    for k in kw:
        assert torch.equal(kw[k], kw_kept[k])


def test_empty_batch(seed):
    x, phi, alpha, bias, g = random_inputs((2, 0, 3, 10), "bf16", seed=seed)
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    assert out.h_in.shape == (2, 0, 10) and out.h_res.shape == (2, 0, 3, 3)
    gr = backward(x, phi, alpha, bias, out.inv_rms, out.h_mix, out.h_pre, out.h_post,
                  torch.zeros(2, 0, 10, dtype=torch.bfloat16), torch.zeros(2, 0, 3),
                  torch.zeros(2, 0, 3, 3), g, backend="numpy")
    assert gr.dx.shape == x.shape
    for a in gr[1:]:
        assert not a.any()


def test_zero_token_gives_finite_outputs(seed):
    x, phi, alpha, bias, g = _inputs(seed)
    x[0, 1] = 0.0
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    assert all(torch.isfinite(a).all() for a in out)
    gr = backward(x, phi, alpha, bias, gamma=g, backend="numpy", **_bwd_args(x, phi, alpha, bias, g))
    assert all(torch.isfinite(a).all() for a in gr)


def test_mhc_pre_autograd_matches_backward(seed):
    x, phi, alpha, bias, g = _inputs(seed)
    leaves = [t.clone().requires_grad_(True) for t in (x, phi, alpha, bias, g)]
    h_in, h_post, h_res = mhc_multi.mhc_pre(*leaves, backend="numpy")
    dh_in, dh_post, dh_res = torch.randn_like(h_in), torch.randn_like(h_post), torch.randn_like(h_res)
    torch.autograd.backward((h_in, h_post, h_res), (dh_in, dh_post, dh_res))
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    want = backward(x, phi, alpha, bias, out.inv_rms, out.h_mix, out.h_pre, out.h_post, dh_in,
                    dh_post, dh_res, g, backend="numpy")
    for leaf, w in zip(leaves, want):
        assert torch.equal(leaf.grad, w)


def test_mhc_pre_module_initialisation():
    n, D = 4, 32
    m = mhc_multi.MHCPre(n, D, backend="numpy")
    assert {k for k, _ in m.named_parameters()} == {"phi", "alpha", "bias", "gamma"}
    assert torch.equal(m.alpha.detach(), torch.full((3,), 0.01))
    x = torch.randn(2, 3, n, D)
    h_in, h_post, h_res = m(x)
    h_in.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    # the bias alone (alpha = 0): h_in = mean of the streams, h_post = 1, h_res = identity
    with torch.no_grad():
        m.alpha.zero_()
    h_in, h_post, h_res = m(x)
    mean = x.double().mean(2).numpy() * (1 + n * m.hc_eps)
    assert_close(h_in.detach().numpy(), mean, "h_in", "fp32", where="init")
    assert_close(h_post.detach().numpy(), np.ones((2, 3, n)), "h_post", "fp32", where="init")
    assert_close(h_res.detach().numpy(), np.broadcast_to(np.eye(n), (2, 3, n, n)), "h_res",
                 "fp32", where="init")


@pytest.mark.parametrize("x_dtype,param_dtype,name", [("fp64", "fp32", "x"), ("fp32", "fp64", "phi")])
def test_backend_dtype_limits_are_checked_before_it_runs(x_dtype, param_dtype, name, seed):
    """triton computes bf16/fp16/fp32 activations with fp32 parameters; the front end says so."""
    if registry._reason("triton") is not None:
        pytest.skip(f"triton: {registry._reason('triton')}")
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, phi, alpha, bias, g = random_inputs(SHAPE, x_dtype, param_dtype=param_dtype, seed=seed,
                                           device=device)
    with pytest.raises(TypeError) as info:
        forward(x, phi, alpha, bias, g, backend="triton")
    msg = str(info.value)
    assert msg.startswith(name) and "triton" in msg and "backend='numba'" in msg, msg


@pytest.mark.parametrize("x_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("param_dtype", ["bf16", "fp16"])
def test_16bit_parameters_give_fp32_gates_and_own_dtype_gradients(x_dtype, param_dtype, seed):
    """16-bit parameters are computed in fp32: the gates and intermediates come out fp32 (the
    post operator consumes them), each gradient in its own parameter's dtype, rounded once."""
    x, phi, alpha, bias, g = _inputs(seed, x_dtype, param_dtype=param_dtype)
    g = g.float()    # parameters of different single-precision dtypes may be mixed
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    assert out.h_in.dtype == x.dtype and all(a.dtype == torch.float32 for a in out[1:])
    ref = forward(x, phi.float(), alpha.float(), bias.float(), g, backend="numpy")
    for a, b in zip(out, ref):   # the same values as the fp32 parameters they round to
        assert torch.equal(a, b)
    kw = _bwd_args(x, phi, alpha, bias, g)
    gr = backward(x, phi, alpha, bias, gamma=g, backend="numpy", **kw)
    gr32 = backward(x, phi.float(), alpha.float(), bias.float(), gamma=g, backend="numpy", **kw)
    for got, want, p in zip(gr[1:], gr32[1:], (phi, alpha, bias, g)):
        assert got.dtype == p.dtype
        assert torch.equal(got, want.to(p.dtype))   # one rounding of the fp32 result


def test_post_takes_16bit_gates(seed):
    x = torch.randn(2, 3, 4, 40, dtype=torch.bfloat16)
    f_out, h_post, h_res = torch.randn(2, 3, 40), torch.rand(2, 3, 4) * 2, torch.rand(2, 3, 4, 4)
    args = (x, f_out, h_post.bfloat16(), h_res.bfloat16())
    got = mhc_multi.post_forward(*args, backend="numpy")
    assert torch.equal(got, mhc_multi.post_forward(x, f_out, h_post.bfloat16().float(),
                                                   h_res.bfloat16().float(), backend="numpy"))
    gr = mhc_multi.post_backward(*args, torch.randn_like(x), backend="numpy")
    assert gr.dh_post.dtype == gr.dh_res.dtype == torch.bfloat16


def test_functional_forward_warns_once_when_an_input_requires_grad(monkeypatch, seed):
    from mhc_multi import api
    monkeypatch.setattr(api, "_warned_grad", False)
    x, phi, alpha, bias, g = _inputs(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward(x, phi, alpha, bias, g, backend="numpy")          # plain values: silent
        with torch.no_grad():
            forward(x, phi.requires_grad_(), alpha, bias, g, backend="numpy")
    with pytest.warns(UserWarning, match="mhc_pre"):
        forward(x, phi, alpha, bias, g, backend="numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward(x, phi, alpha, bias, g, backend="numpy")          # once
        h = mhc_multi.mhc_pre(x, phi, alpha, bias, g, backend="numpy")[0]   # never from here
    assert h.requires_grad


@pytest.mark.parametrize("use_gamma", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_device_init_then_reset_parameters_is_the_documented_init(use_gamma, dtype, seed):
    """Built under torch.device("meta"), materialised with to_empty() and reset: the same
    parameters, bit for bit, as building the module directly from the same RNG state."""
    n, D, k = 3, 20, 20
    torch.manual_seed(seed)
    direct = mhc_multi.MHCLayer(torch.nn.Linear(D, D, dtype=dtype), n, D, sinkhorn_iters=k,
                                use_gamma=use_gamma, dtype=dtype)
    with torch.device("meta"):
        lazy = mhc_multi.MHCLayer(torch.nn.Linear(D, D, dtype=dtype), n, D, sinkhorn_iters=k,
                                  use_gamma=use_gamma, dtype=dtype)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(seed)
    lazy.reset_parameters()
    assert ([k for k, _ in lazy.named_parameters()] == [k for k, _ in direct.named_parameters()])
    for (name, a), b in zip(direct.named_parameters(), lazy.parameters()):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), name
    # and the documented values themselves
    pre = lazy.pre
    assert torch.equal(pre.alpha, torch.full((3,), 0.01, dtype=dtype))
    assert torch.equal(pre.bias, mhc_multi.autograd.default_bias(n, k).to(dtype))
    assert (pre.gamma is None) == (not use_gamma)
    if use_gamma:
        assert torch.equal(pre.gamma, torch.ones(n, D, dtype=dtype))
    std = pre.phi.float().std().item() * (n * D) ** 0.5
    assert 0.8 < std < 1.2, f"phi std * sqrt(nD) = {std}"
    # MHCLayer.reset_parameters resets the pre operator and a block that has its own reset
    with torch.no_grad():
        lazy.pre.alpha.zero_()
        lazy.block.weight.zero_()
    lazy.reset_parameters()
    assert torch.equal(lazy.pre.alpha, pre.alpha.new_full((3,), 0.01))
    assert lazy.block.weight.abs().sum() > 0


def test_module_repr_and_gamma_slot():
    m = MHCPre(4, 32, use_gamma=False, norm_eps=1e-5, hc_eps=0.0)
    assert "gamma" in m._parameters and m.gamma is None   # registered, as None
    r = repr(m)
    assert "norm_eps=1e-05" in r and "hc_eps=0" in r and "gamma=False" in r, r


def test_cached_plans_keep_every_check(monkeypatch, spy, seed):
    """The front end remembers what it checked per signature (types, shapes, dtypes, devices,
    options): a call that differs in any of them is checked in full, with the same errors, and
    $MHC_MULTI_BACKEND is read again at every call with backend="auto"."""
    import mhc_multi.api as api
    x, phi, alpha, bias, g = _inputs(seed)
    forward(x, phi, alpha, bias, g, backend="numpy")
    forward(x, phi, alpha, bias, g, backend="numpy")          # a plan hit
    assert any(k[0] == "fwd" for k in api._PLANS)
    cases = [(dict(alpha=torch.zeros(4)), ValueError, "alpha"),
             (dict(norm_eps=True), TypeError, "norm_eps"),           # True == 1, but a bool
             (dict(sinkhorn_iters=1.0), TypeError, "sinkhorn_iters"),
             (dict(norm_eps=np.array([1e-6])), TypeError, "norm_eps"),  # unhashable
             (dict(phi=phi.double()), TypeError, "alpha")]
    for change, exc, name in cases:
        kw = dict(x=x, phi=phi, alpha=alpha, bias=bias, gamma=g, backend="numpy", norm_eps=1)
        kw.update(change)
        with pytest.raises(exc) as info:
            forward(**kw)
        assert str(info.value).startswith(name), str(info.value)
    monkeypatch.setenv("MHC_MULTI_BACKEND", "spy")
    forward(x, phi, alpha, bias, g)                            # auto: the variable, now spy
    assert len(spy) == 1


def test_inference_mode(seed):
    """Under torch.inference_mode the modules and the functional forms run and give what they
    give with grad (the ops record nothing there)."""
    x, *_ = _inputs(seed, "bf16")
    n, D = x.shape[2:]
    torch.manual_seed(seed)
    layer = mhc_multi.MHCLayer(torch.nn.Linear(D, D, dtype=torch.bfloat16), n, D,
                               backend="numpy")
    ref = layer(x).detach()
    ref_pre = [t.detach() for t in layer.pre(x)]
    with torch.inference_mode():
        got = layer(x)
        got_pre = layer.pre(x)
        out = forward(x, layer.phi, layer.alpha, layer.bias, layer.gamma, backend="numpy",
                      sinkhorn_iters=20)
    assert torch.equal(got, ref)
    for a, b in zip(got_pre, ref_pre):
        assert torch.equal(a, b)
    assert torch.equal(out.h_in, ref_pre[0]) and torch.equal(out.h_res, ref_pre[2])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_parameter_views_follow_the_parameters(backend, seed):
    """Numpy backends view a module's Parameters once (convert._PARAM_VIEWS): a later call still
    sees in-place updates, a new tensor behind the Parameter, a non-contiguous Parameter's new
    values, and the entry goes when the Parameter does."""
    import gc

    from mhc_multi import convert
    if not next(b.available for b in mhc_multi.available_backends() if b.name == backend):
        pytest.skip(f"{backend} unavailable")
    x, phi, alpha, bias, gamma = mhc_multi.random_inputs((1, 3, 2, 8), "fp32", seed=seed)
    params = [torch.nn.Parameter(t.clone(), requires_grad=False) for t in (phi, alpha, bias, gamma)]

    def run(ps):
        return forward(x, *ps, backend=backend).h_in

    def plain(ps):   # the same values as plain tensors (no view kept)
        return run([p.detach().clone() for p in ps])

    assert torch.equal(run(params), plain(params))
    assert id(params[0]) in convert._PARAM_VIEWS
    with torch.no_grad():
        params[0].mul_(1.5)                       # in place: the same memory
    assert torch.equal(run(params), plain(params))
    assert not torch.equal(run(params), run([phi, alpha, bias, gamma]))
    params[0].data = params[0].data * -1.0        # a new tensor behind the same Parameter
    assert torch.equal(run(params), plain(params))
    square = torch.nn.Parameter(torch.randn(2, 2), requires_grad=False)
    assert np.array_equal(convert._to_backend(square, "numpy", True), square.numpy())
    square.data = square.data.t()                 # the same memory and shape, other strides
    assert np.array_equal(convert._to_backend(square, "numpy", True), square.numpy())
    strided = torch.nn.Parameter(torch.randn(8, 2).t(), requires_grad=False)   # [2, 8], strided
    ps = [params[0], params[1], params[2], strided]
    assert torch.equal(run(ps), plain(ps))
    with torch.no_grad():
        strided.add_(1.0)
    assert torch.equal(run(ps), plain(ps))
    key = id(params[0])
    del ps, params
    gc.collect()
    assert key not in convert._PARAM_VIEWS
