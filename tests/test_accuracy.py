"""Every available backend against the float64 reference, through the front end.

Outputs are poisoned (``backends/_common.POISON``): backends allocate them as NaN, so an
element a kernel never writes cannot pass.
"""
import functools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

torch = pytest.importorskip("torch")

from mhc_multi import available_backends, crosscheck, forward, random_inputs
from mhc_multi.tolerances import tolerance
from mhc_multi.backends import _common

AVAILABLE = {b.name: b for b in available_backends()}
FAST = [b for b in ("numba",) if AVAILABLE[b].available]
# the Triton kernels run here only on a GPU or on the (slow) CPU interpreter
TRITON = AVAILABLE["triton"].available and (torch.cuda.is_available()
                                            or os.environ.get("TRITON_INTERPRET") == "1")


def _backend_param(name):
    reason = AVAILABLE[name].reason or "needs a GPU or TRITON_INTERPRET=1"
    ok = AVAILABLE[name].available and (name != "triton" or TRITON)
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {reason}"))


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def _device(backend):
    """Where a backend's inputs live: the GPU for triton when there is one, else the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _check(backend, shape, x_dtype, gamma, seed, sinkhorn_iters=0, post=False,
           param_dtype=None):
    if param_dtype is None:
        param_dtype = "fp64" if x_dtype == "fp64" else "fp32"
    device = _device(backend)
    inputs = random_inputs(shape, x_dtype, param_dtype=param_dtype, gamma=gamma, seed=seed,
                           device=device)
    report = crosscheck(*inputs, backends=[backend], seed=seed, sinkhorn_iters=sinkhorn_iters,
                        post=post)
    print(report)
    assert report.ok, f"seed={seed}\n{report}"


SHAPES = [(1, 1, 1, 1), (2, 3, 1, 7), (1, 37, 2, 130), (3, 1, 3, 1000), (2, 65, 4, 96),
          (1, 9, 5, 33), (2, 5, 6, 17), (1, 3, 7, 250), (1, 70, 8, 61)]
DTYPES = ["bf16", "fp16", "fp32", "fp64"]


@pytest.mark.parametrize("gamma", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}n{}D{}".format(*s))
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("numpy")])
def test_cpu_backend_accuracy(backend, shape, x_dtype, gamma, poison, seed):
    _check(backend, shape, x_dtype, gamma, seed)


# the interpreter is slow: fewer, smaller shapes, but every n class and odd D
TRITON_SHAPES = [(1, 1, 1, 1), (2, 3, 1, 7), (1, 19, 3, 130), (1, 5, 4, 96), (1, 3, 8, 33)]


@pytest.mark.parametrize("gamma", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("x_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "B{}S{}n{}D{}".format(*s))
@pytest.mark.parametrize("backend", [_backend_param("triton")])
def test_triton_accuracy(backend, shape, x_dtype, gamma, poison, seed):
    _check(backend, shape, x_dtype, gamma, seed)


@pytest.mark.parametrize("backend", [_backend_param("numba")])
def test_realistic_shape(backend, poison, seed):
    """A realistic shape on the CPU backend: (2, 2048, 4, 4096), bf16 x, fp32 parameters."""
    _check(backend, (2, 2048, 4, 4096), "bf16", True, seed)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 2, 3)], ids=lambda s: "B{}S{}n{}D{}".format(*s))
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("triton")])
def test_short_rows_cancel(backend, shape, poison, seed):
    """Short rows: in dx = r*u - x*r^3<u,x>/nD the two parts cancel (n*D = 1: to eps*r^2 of
    their size). With small tokens (x/50, inv_rms ~ 50) and large phi (x10) the parts are large
    next to dx, and a backend that builds them in fp32 misses the fp32 bound on dx at
    (1,1,1,1) in about a third of the draws (backends/_common.SMALL_ND); 16 draws per run."""
    device = _device(backend)
    for s in range(seed, seed + 16):
        x, phi, *rest = random_inputs(shape, "fp32", gamma=bool(s % 2), seed=s, device=device)
        report = crosscheck(x * 0.02, phi * 10, *rest, backends=[backend], seed=s)
        assert report.ok, f"seed={s}\n{report}"


@pytest.mark.parametrize("backend", [_backend_param("numba")])
def test_fp64_short_rows_cancel(backend, poison, seed):
    """At n*D = 1 dx's first two terms cancel to eps*r^2 of their size in any precision, so two
    float64 evaluations (the reference's and the backend's) drift apart by their own rounding,
    u64 times the size of the terms, not of dx. With phi*1000 the terms are ~1e3 times dx and
    about 37 % of the draws exceed 1e-12 by dx's norm alone; crosscheck adds the reference's
    rounding bound (tolerances.reference_slack) and every draw passes. 16 draws per run."""
    for s in range(seed, seed + 16):
        x, phi, *rest = random_inputs((1, 1, 1, 1), "fp64", param_dtype="fp64",
                                      gamma=bool(s % 2), seed=s)
        report = crosscheck(x * 4, phi * 1000, *rest, backends=[backend], seed=s)
        assert report.ok, f"seed={s}\n{report}"


@pytest.mark.parametrize("shape", [(2, 3, 1, 7), (1, 9, 5, 33), (1, 3, 8, 250)],
                         ids=lambda s: "B{}S{}n{}D{}".format(*s))
def test_reference_slack_small_without_cancellation(shape, seed):
    """Where rows are not short nothing cancels, and the reference's rounding adds a few percent
    to dx's fp64 bound (measured: at most 10 % at n = 8), always less than the bound itself."""
    report = crosscheck(*random_inputs(shape, "fp64", param_dtype="fp64", seed=seed),
                        backends=["numpy"], seed=seed)
    row = next(r for r in report.rows if r.output == "dx")
    bound = tolerance("dx", "fp64")
    assert bound < row.tolerance < 2 * bound, report


@pytest.mark.parametrize("x_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 3, 50)], ids=lambda s: "B{}S{}n{}D{}".format(*s))
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("triton")])
def test_cancelling_h_res(backend, shape, x_dtype, poison, seed):
    """h_res = a_res*r*m + bias with the bias chosen to cancel 95% of a_res*r*m: the relative
    error of a_res*r*m is multiplied by 20 in h_res, and with few entries nothing averages it
    out. An m short of fp32 precision (Triton's plain 2-piece forward, set_config(few_res=0):
    up to 8.6e-5 here) misses the bound; fp32 arithmetic (a few ulps over r, m and the
    products) meets it 4x over at these short rows. A 99 % cancellation would multiply those
    ulps by 100, which puts fp32 arithmetic at the bound itself (docs/tolerances.md)."""
    device = _device(backend)
    x, phi, alpha, bias, g = random_inputs(shape, x_dtype, seed=seed, device=device)
    n = shape[2]
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    u_res = out.inv_rms[0, 0].double() * out.h_mix[0, 0, 2 * n:].double()   # the token's r*m
    bias = bias.clone()
    bias[2 * n:] = (-0.95 * alpha[2].double() * u_res).to(bias)
    report = crosscheck(x, phi, alpha, bias, g, backends=[backend], seed=seed)
    assert report.ok, f"seed={seed}\n{report}"


@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("triton")])
def test_cancelling_post(backend, poison, seed):
    """An element of x_next = h_res x + h_post f_out (or of df_out = sum_i h_post[i] dx_next[i])
    is a sum of a few terms; with one element (two for df_out) nothing averages their
    cancellation out. f_out (dx_next[1]) is set to cancel 99.9 % of the rest, which multiplies
    fp32 arithmetic's few ulps by 1000, past the fp32 bound; at these sizes the backends sum in
    float64 (backends/_common.FEW_POST). 16 draws per run, fp32 x."""
    from mhc_multi import post_backward, post_forward
    from mhc_multi.backends import numpy_ref
    from mhc_multi.crosscheck import relative_error
    dev = _device(backend)
    for s in range(seed, seed + 16):
        gen = torch.Generator().manual_seed(s)
        x, g0 = torch.randn(1, 1, 2, 1, generator=gen), torch.randn(1, 1, 1, generator=gen)
        h_post = 2 * torch.sigmoid(torch.randn(1, 1, 2, generator=gen))
        h_res = torch.randn(1, 1, 2, 2, generator=gen)
        # forward at (1,1,1,1): f_out cancels 99.9 % of h_res x
        xf, hp, hr = x[:, :, :1], h_post[:, :, :1], h_res[:, :, :1, :1]
        f_out = (-0.999 * hr[..., 0, 0] * xf[..., 0, 0] / hp[..., 0])[..., None]   # [1, 1, 1]
        args = [t.to(dev) for t in (xf, f_out, hp, hr)]
        got = post_forward(*args, backend=backend)
        ref = numpy_ref.post_forward64(*(t.double().numpy().reshape((1,) + t.shape[2:])
                                         for t in (xf, f_out, hp, hr)))
        err = relative_error(got.cpu().reshape(ref.shape), ref)
        assert err <= tolerance("x_next", "fp32"), f"seed={s}: x_next rel. error {err:.2e}"
        # backward at (1,1,2,1): dx_next[1] cancels 99.9 % of h_post[0] dx_next[0] in df_out
        g1 = -0.999 * h_post[..., 0] * g0[..., 0] / h_post[..., 1]
        dx_next = torch.stack([g0[..., 0], g1], dim=-1)[..., None]
        f_out = torch.randn(1, 1, 1, generator=gen)
        args = [t.to(dev) for t in (x, f_out, h_post, h_res, dx_next)]
        got = post_backward(*args, backend=backend)
        ref = numpy_ref.post_backward64(*(t.double().numpy().reshape((1,) + t.shape[2:])
                                          for t in (x, f_out, h_post, h_res, dx_next)))
        err = relative_error(got[1].cpu().reshape(ref[1].shape), ref[1])
        assert err <= tolerance("df_out", "fp32"), f"seed={s}: df_out rel. error {err:.2e}"


@functools.lru_cache(maxsize=None)
def _cancelling_dgamma_inputs(x_dtype):
    """(inputs (x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res), seed): the first draw at
    (1,5,1,1) whose float64 dgamma = sum_f phi_f P_f (three terms) cancels 800x."""
    from mhc_multi import backward
    for s in range(5000):
        x, phi, alpha, bias, g = random_inputs((1, 5, 1, 1), x_dtype, seed=s)
        gen = torch.Generator().manual_seed(s)
        dh = (torch.randn(1, 5, 1, generator=gen).to(x.dtype),
              torch.randn(1, 5, 1, generator=gen), torch.randn(1, 5, 1, 1, generator=gen))
        f64 = [t.double() for t in (x, phi, alpha, bias, g, *dh)]   # the float64 reference
        out = forward(*f64[:5], backend="numpy")
        ref = backward(*f64[:4], out.inv_rms, out.h_mix, out.h_pre, out.h_post, *f64[5:],
                       f64[4], backend="numpy")
        terms = f64[1][:, 0] * ref.dphi[:, 0] / f64[4][0, 0]
        if terms.abs().max() >= 800 * terms.sum().abs():
            return (x, phi, alpha, bias, g, *dh), s
    pytest.fail("no inputs with an 800x cancelling dgamma among 5000 seeds")


@pytest.mark.parametrize("x_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("triton")])
def test_short_row_cancelling_dgamma(backend, x_dtype, poison):
    """A short row's dgamma = sum_f phi_f P_f can cancel (n = D = 1: three terms; about one
    (1,5,1,1) draw in 75 cancels 100x): an fp32 P, or an fp32 product in dh_pre, then misses
    the fp32 bound.  The backends build short rows' P in float64 (Triton: _dx_exact; Numba:
    the float64 kernel).  The forward intermediates are given in float64, so the backward's
    own arithmetic is what is judged."""
    from mhc_multi import backward
    from mhc_multi.crosscheck import relative_error
    inputs, s = _cancelling_dgamma_inputs(x_dtype)
    dev = _device(backend)
    x, phi, alpha, bias, g, dh_in, dh_post, dh_res = [t.to(dev) for t in inputs]
    out = forward(*(t.double() for t in (x, phi, alpha, bias, g)), backend="numpy")
    inter = [t.float() for t in (out.inv_rms, out.h_mix, out.h_pre, out.h_post)]
    got = backward(x, phi, alpha, bias, *inter, dh_in, dh_post, dh_res, g, backend=backend)
    # the reference on the same fp32 intermediates
    ref = backward(*(t.double() for t in (x, phi, alpha, bias)), *(t.double() for t in inter),
                   dh_in.double(), dh_post.double(), dh_res.double(), g.double(),
                   backend="numpy").dgamma
    err = relative_error(got.dgamma.cpu(), ref.cpu().numpy())
    assert err <= tolerance("dgamma", x_dtype), f"seed={s}: dgamma rel err {err:.2e}"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 3), S=st.integers(1, 9), n=st.integers(1, 8), D=st.integers(1, 300),
       x_dtype=st.sampled_from(DTYPES), gamma=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_every_backend(B, S, n, D, x_dtype, gamma, seed):
    backends = ["numpy"] + FAST
    for backend in backends:
        _check(backend, (B, S, n, D), x_dtype, gamma, seed)


# Sinkhorn (k in {1, 3, 20}) and the post operator, through the front end, every backend
SK_SHAPES = [(1, 3, 1, 7), (2, 5, 3, 130), (1, 17, 4, 96), (1, 4, 8, 33)]


@pytest.mark.parametrize("x_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("sinkhorn_iters", [1, 3, 20], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("shape", SK_SHAPES, ids=lambda s: "B{}S{}n{}D{}".format(*s))
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("numpy"),
                                     _backend_param("triton")])
def test_sinkhorn_and_post_accuracy(backend, shape, sinkhorn_iters, x_dtype, poison, seed):
    _check(backend, shape, x_dtype, True, seed, sinkhorn_iters=sinkhorn_iters, post=True)


# 16-bit parameters: against float64 on the same rounded values, each parameter gradient
# within its own dtype's bound, the rest as for fp32 parameters (crosscheck)
P16_SHAPES = [(1, 1, 1, 1), (2, 9, 3, 130), (1, 37, 4, 96), (1, 4, 8, 33)]


@pytest.mark.parametrize("x_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("param_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", P16_SHAPES, ids=lambda s: "B{}S{}n{}D{}".format(*s))
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("numpy"),
                                     _backend_param("triton")])
def test_16bit_parameters_accuracy(backend, shape, param_dtype, x_dtype, poison, seed):
    _check(backend, shape, x_dtype, True, seed, sinkhorn_iters=3 if shape[2] == 4 else 0,
           post=True, param_dtype=param_dtype)


@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("triton")])
def test_sinkhorn_zero_is_the_plain_contract(backend, seed):
    """k = 0 is the contract without Sinkhorn, bit for bit (the default path)."""
    import mhc_multi
    inputs = random_inputs((2, 7, 4, 40), "bf16", seed=seed, device=_device(backend))
    a = mhc_multi.forward(*inputs, backend=backend)
    b = mhc_multi.forward(*inputs, backend=backend, sinkhorn_iters=0)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("x_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "B{}S{}n{}D{}".format(*s))
@pytest.mark.parametrize("backend", [_backend_param("numba"), _backend_param("numpy"),
                                     _backend_param("triton")])
def test_dx_add_is_added_once(backend, shape, x_dtype, poison, seed):
    """backward(..., dx_add=a): dx + a within dx's bound of the float64 sum (a missing or a
    doubled add is off by |a|, as large as dx), short rows (float64 dx) included."""
    from mhc_multi import backward
    from mhc_multi.backends import numpy_ref
    from mhc_multi.crosscheck import relative_error
    B, S, n, D = shape
    T = B * S
    device = _device(backend)
    x, phi, alpha, bias, g = random_inputs(shape, x_dtype, seed=seed, device=device)
    out = forward(x, phi, alpha, bias, g, backend="numpy")
    rng = np.random.default_rng(seed + 1)

    def rand(*s, dtype=torch.float32):
        return torch.from_numpy(rng.standard_normal(s)).to(device=device, dtype=dtype)

    dh_in, dh_post, dh_res = rand(B, S, D, dtype=x.dtype), rand(B, S, n), rand(B, S, n, n)
    add = rand(B, S, n, D, dtype=x.dtype)
    got = backward(x, phi, alpha, bias, out.inv_rms, out.h_mix, out.h_pre, out.h_post, dh_in,
                   dh_post, dh_res, g, backend=backend, dx_add=add)

    def c(t, *s):
        return t.detach().cpu().double().numpy().reshape(s or t.shape)

    ref = numpy_ref.backward64(
        c(x, T, n, D), c(phi), c(alpha), c(bias), c(out.inv_rms, T), c(out.h_mix, T, n * n + 2 * n),
        c(out.h_pre, T, n), c(out.h_post, T, n), c(dh_in, T, D), c(dh_post, T, n),
        c(dh_res, T, n * n), c(g), norm_eps=1e-6, hc_eps=1e-6, dx_add=c(add, T, n, D))
    err = relative_error(got.dx, ref[0].reshape(shape))
    assert err <= tolerance("dx", x_dtype), f"seed={seed}: dx + dx_add off by {err:.2e}"
