"""The Triton backend's kernels against the float64 oracle, on the CPU through Triton's interpreter.

Why the module sets TRITON_INTERPRET itself: Triton reads the variable when a kernel is first
launched (and some versions when ``triton`` is first imported), so it has to be set before
anything imports triton.  A conftest would impose it on every test file; skipping unless the
caller exported it would make CI silently skip these tests.  So: on a machine without CUDA this
module sets ``TRITON_INTERPRET=1`` at the top, before importing torch or triton, and if triton was
already imported by an earlier test module in the same process without the variable (which we
cannot undo), the module is skipped with a message that says to run it on its own:

    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_backend.py

On a machine with CUDA (and the variable unset) the same tests run on the GPU.
"""
from __future__ import annotations

import os
import sys

_HAS_CUDA_HINT = os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")
if not _HAS_CUDA_HINT and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from mhc_multi.backends import numpy_ref, triton_gpu  # noqa: E402
from mhc_multi.tolerances import tolerance  # noqa: E402

_why = triton_gpu.availability()
if _why is not None:
    pytest.skip(f"triton backend unavailable: {_why}; run this file in its own process with "
                "TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if triton_gpu._interpret() else "cuda"
NORM_EPS, HC_EPS = 1e-6, 1e-6
TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FWD = ("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre")
BWD = ("dx", "dphi", "dalpha", "dbias", "dgamma")


def _np(t):
    """torch -> numpy as numpy_ref takes it (bf16 as its uint16 bit patterns)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _inputs(T, n, D, dname, with_gamma, seed):
    g = torch.Generator().manual_seed(seed)
    F = n * n + 2 * n
    x = torch.randn(T, n, D, generator=g).to(TORCH_DT[dname])
    phi = torch.randn(F, n * D, generator=g) / (n * D) ** 0.5
    alpha = torch.randn(3, generator=g)
    bias = 0.1 * torch.randn(F, generator=g)
    gamma = (1 + 0.1 * torch.randn(n, D, generator=g)) if with_gamma else None
    dh_in = torch.randn(T, D, generator=g).to(TORCH_DT[dname])
    dh_post = torch.randn(T, n, generator=g)
    dh_res = torch.randn(T, n, n, generator=g)
    dev = lambda a: None if a is None else a.to(DEVICE)  # noqa: E731
    return tuple(dev(a) for a in (x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res))


def _rel(got, ref64):
    got = got.detach().cpu().double().numpy()
    assert np.isfinite(got).all(), "non-finite (unwritten?) elements"
    den = np.linalg.norm(ref64.ravel())
    return float(np.linalg.norm((got - ref64).ravel()) / (den if den > 0 else 1.0))


def _check(name, got, ref64, dname, seed):
    assert tuple(got.shape) == ref64.shape, (name, got.shape, ref64.shape)
    err = _rel(got, ref64)
    bound = tolerance(name, dname)
    print(f"{name:8s} err={err:.2e} bound={bound:.0e} seed={seed}")
    assert err <= bound, f"{name}: rel err {err:.3e} > {bound:.0e} (seed {seed})"


# (T, n, D, dtype, gamma): n in {1, 3, 4, 5, 6, 8}, odd D, T not a multiple of any block size;
# n = 5 at n*D >= 4096 takes one dm piece for w, n = 8 two gate-column blocks
CASES = [
    (37, 4, 130, "bf16", True),
    (3, 5, 821, "bf16", True),
    (19, 4, 130, "fp16", True),
    (21, 4, 130, "fp32", False),
    (5, 3, 7, "bf16", False),
    (9, 3, 7, "fp32", True),
    (3, 1, 1, "bf16", True),
    (4, 1, 1, "fp16", False),
    (6, 8, 33, "bf16", True),
    (17, 8, 9, "fp32", True),
    (5, 6, 50, "fp16", True),   # fp16, n >= 5, n*D >= 256: two dm pieces for P
]


@pytest.mark.parametrize("T,n,D,dname,with_gamma", CASES,
                         ids=[f"triton-{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}-{'g' if c[4] else 'nog'}"
                              for c in CASES])
def test_forward_backward_vs_float64(T, n, D, dname, with_gamma):
    seed = int.from_bytes(os.urandom(4), "little")
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(T, n, D, dname, with_gamma, seed)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    out = triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
    gnp = None if gamma is None else _np(gamma)
    ref = numpy_ref.forward64(_np(x), _np(phi), _np(alpha), _np(bias), gnp, **kw)
    assert out[0].dtype == x.dtype and all(o.dtype == torch.float32 for o in out[1:])
    for name, o, r in zip(FWD, out, ref):
        _check(name, o, r, dname, seed)
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = out
    bout = triton_gpu.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                               dh_post, dh_res, gamma, **kw)
    bref = numpy_ref.backward64(_np(x), _np(phi), _np(alpha), _np(bias), _np(inv_rms),
                                _np(h_mix), _np(h_pre), _np(h_post), _np(dh_in), _np(dh_post),
                                _np(dh_res), gnp, **kw)
    assert bout[0].dtype == x.dtype
    for name, o, r in zip(BWD, bout, bref):
        if r is None:
            assert o is None, f"{name} should be None without gamma"
            continue
        _check(name, o, r, dname, seed)
    # bitwise repeatability: no atomics, fixed reduction order
    out2 = triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
    bout2 = triton_gpu.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                dh_post, dh_res, gamma, **kw)
    for a, b in zip(out + bout, out2 + bout2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_empty_batch():
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(0, 3, 7, "bf16", True, 0)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
    assert h_in.shape == (0, 7) and h_res.shape == (0, 3, 3) and h_mix.shape == (0, 15)
    dx, dphi, dalpha, dbias, dgamma = triton_gpu.backward(
        x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma, **kw)
    assert dx.shape == (0, 3, 7)
    for g in (dphi, dalpha, dbias, dgamma):
        assert torch.count_nonzero(g) == 0


def test_column_splits_fill_the_waves():
    """_col_splits: with 4 resident programs per SM on 132 SMs (528 slots), the fewest token
    splits >= 2 whose waves are >= 90 % full, the H200's best at the three realistic shapes
    (n * D/64 = 256, 160, 448 column programs); at most 16 (few column programs: n = 1);
    capped by the token blocks; overrides win."""
    cfg = dict(col_occ=4, col_waves=4)
    assert [triton_gpu._col_splits(cfg, p, 512, 132) for p in (256, 160, 448)] == [2, 3, 7]
    assert triton_gpu._col_splits(cfg, 32, 512, 132) == 15        # n = 1, D = 4096: 480 of 528
    assert triton_gpu._col_splits(cfg, 20, 512, 132) == 16        # none >= 90 %: the fullest
    assert triton_gpu._col_splits(cfg, 32, 10, 132) == 10         # capped by 10 token blocks
    assert triton_gpu._col_splits(cfg, 256, 1, 132) == 1          # one token block
    assert triton_gpu._col_splits(cfg, 160, 2, 132) == 2          # cap: 3 wanted, 2 blocks
    assert triton_gpu._col_splits(dict(cfg, col_splits=5), 256, 512, 132) == 5
    assert triton_gpu._col_splits(dict(cfg, col_splits=5), 256, 3, 132) == 3
    assert triton_gpu._col_splits(dict(col_waves=4), 256, 512, 132) == 3   # no col_occ: waves
    assert triton_gpu._col_splits(dict(col_occ="auto", col_waves=4), 256, 512, 132, 4) == 2
    assert triton_gpu._col_splits(dict(col_occ="auto", col_waves=4), 256, 512, 132, 3) == 3


def test_gate_column_blocks_cover_f():
    """_f_blocks: the one or two blocks of gate columns the column kernel and pass 1 of the
    split forward run cover all F columns, stay inside the padded F_PAD rows of their scratch,
    are dot-sized powers of two, and split only where that saves rows (at n = 8 of n <= 8)."""
    split = []
    for F in list(range(1, 200)) + [n * n + 2 * n for n in range(1, 9)]:
        F_pad = max(16, triton_gpu._next_pow2(F))
        fa, fb = triton_gpu._f_blocks(F, F_pad)
        assert fa >= 16 and fa & (fa - 1) == 0, (F, fa, fb)
        if fb == 0:
            assert fa == F_pad, (F, fa)
        else:
            assert fb >= 16 and fb & (fb - 1) == 0 and fa < F <= fa + fb < F_pad, (F, fa, fb)
            split.append(F)
    assert [n for n in range(1, 9) if n * n + 2 * n in split] == [8]


def test_programs_per_multiprocessor():
    """_fit_per_sm, the occupancy rules the persistent grids are sized by, at the H200's
    limits: the row kernel's 64 and 80 registers x 8 warps (4 and 3 programs; at 80 a grid of
    4 per SM ran a second wave, 0.29 instead of 0.17 ms), the column kernel's 127 and 129
    registers x 4 warps (the 256-register allocation unit), and the shared-memory, thread and
    32-block limits."""
    fit = triton_gpu._fit_per_sm
    assert (fit(64, 8, 1024), fit(80, 8, 1024)) == (4, 3)
    assert (fit(127, 4, 38912), fit(129, 4, 38912)) == (4, 3)
    assert fit(40, 4, 114688) == 2            # two 112 KB blocks (+1 KB each) in 228 KB
    assert fit(32, 16, 0) == 4                # 2048 threads
    assert fit(16, 1, 0) == 32                # the block limit


def test_batch_size_does_not_recompile():
    """T is a runtime argument: new batch sizes reuse the compiled forward kernel."""
    if triton_gpu._interpret():
        pytest.skip("the interpreter compiles nothing")
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    cache = triton_gpu._pre_fwd_kernel.device_caches[torch.cuda.current_device()][0]
    sizes = []
    for T in (65, 97, 1999):   # all past FEW_RES and below the split forward's T
        x, phi, alpha, bias, gamma, *_ = _inputs(T, 4, 64, "bf16", True, T)
        triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
        sizes.append(len(cache))   # other tests may have compiled other variants before
    assert sizes[0] >= 1 and sizes[1:] == sizes[:1] * 2, sizes
    # the split forward, whose number of D shares per token block follows T (4, 2, 1 at n = 4
    # on the H200; up to one per D chunk at n = 8): one compiled variant of each kernel per
    # L2 regime (_l2_reuse: at >= 4 shares and n <= 6, interleaved shares and eviction hints)
    caches = [k.device_caches[torch.cuda.current_device()][0]
              for k in (triton_gpu._pre_fwd_part_kernel, triton_gpu._pre_fwd_fin_kernel)]
    for n, D, Ts in ((4, 512, (5003, 16384, 2048, 3000)), (8, 1000, (5, 9001, 40000))):
        sizes = []
        for T in Ts:
            x, phi, alpha, bias, gamma, *_ = _inputs(T, n, D, "bf16", True, T)
            triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
            sizes.append([len(c) for c in caches])
        if n == 4:   # S = 2, 1 (one variant), then S = 4, 4 (the L2 variant: one more)
            assert sizes[1] == sizes[0] and sizes[3] == sizes[2], sizes
            assert all(b <= a + 1 for a, b in zip(sizes[0], sizes[2])), sizes
        else:
            assert min(sizes[0]) >= 1 and sizes[1:] == sizes[:1] * (len(Ts) - 1), (n, sizes)


# Sinkhorn-Knopp inside the fused kernels (CONTRACT.md, "Sinkhorn-Knopp projection")
SK_CASES = [(13, 4, 130, "bf16", True, 1), (5, 3, 7, "fp16", False, 3), (19, 4, 7, "fp32", True, 20),
            (3, 1, 130, "bf16", True, 20), (7, 3, 130, "fp32", False, 20)]


@pytest.mark.parametrize("T,n,D,dname,with_gamma,k", SK_CASES,
                         ids=[f"sk{c[5]}-{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}" for c in SK_CASES])
def test_sinkhorn_vs_float64(T, n, D, dname, with_gamma, k):
    assert triton_gpu.SUPPORTS_SINKHORN is True
    seed = int.from_bytes(os.urandom(4), "little")
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(T, n, D, dname, with_gamma, seed)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
    out = triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
    gnp = None if gamma is None else _np(gamma)
    ref = numpy_ref.forward64(_np(x), _np(phi), _np(alpha), _np(bias), gnp, **kw)
    for name, o, r in zip(FWD, out, ref):
        _check(name, o, r, dname, seed)
    # the backward is judged on the reference's intermediates (as crosscheck does)
    mids = [torch.from_numpy(np.ascontiguousarray(a)).float().to(DEVICE) for a in ref[3:]]
    inv_rms, h_mix, h_pre = mids
    h_post = torch.from_numpy(ref[1]).float().to(DEVICE)
    bout = triton_gpu.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                               dh_post, dh_res, gamma, **kw)
    bref = numpy_ref.backward64(_np(x), _np(phi), _np(alpha), _np(bias), _np(inv_rms),
                                _np(h_mix), _np(h_pre), _np(h_post), _np(dh_in), _np(dh_post),
                                _np(dh_res), gnp, **kw)
    for name, o, r in zip(BWD, bout, bref):
        if r is not None:
            _check(name, o, r, dname, seed)
    bout2 = triton_gpu.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                dh_post, dh_res, gamma, **kw)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(bout, bout2))


def test_sinkhorn_margins_k20():
    """k = 20 on realistic logits: rows and columns of h_res sum to 1 within 1e-5."""
    from mhc_multi.tolerances import SINKHORN_MARGIN_TOLERANCE
    x, phi, alpha, bias, gamma, *_ = _inputs(21, 4, 64, "bf16", True, 5)
    h_res = triton_gpu.forward(x, phi, alpha, bias, gamma, norm_eps=NORM_EPS, hc_eps=HC_EPS,
                               sinkhorn_iters=20)[2].double()
    assert (h_res.sum(-1) - 1).abs().max() <= SINKHORN_MARGIN_TOLERANCE
    assert (h_res.sum(-2) - 1).abs().max() <= SINKHORN_MARGIN_TOLERANCE


def test_sinkhorn_zero_is_the_plain_path():
    """sinkhorn_iters=0 gives the logits, bit for bit the default call."""
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(9, 3, 7, "bf16", True, 7)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    a = triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
    b = triton_gpu.forward(x, phi, alpha, bias, gamma, sinkhorn_iters=0, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    c = triton_gpu.forward(x, phi, alpha, bias, gamma, sinkhorn_iters=1, **kw)
    assert not torch.equal(a[2], c[2]) and torch.equal(a[4], c[4])


# ---------------------------------------------------------------------------------------------
# The post operator: x_next = h_res @ x + h_post * f_out (CONTRACT.md, "The post operator")

POST_CASES = [(5, 3, 7, "bf16"), (7, 4, 130, "fp16"), (9, 1, 130, "fp32"), (6, 4, 7, "bf16"),
              (3, 3, 130, "fp32")]


@pytest.mark.parametrize("T,n,D,dname", POST_CASES,
                         ids=[f"post-{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}" for c in POST_CASES])
def test_post_vs_float64(T, n, D, dname, monkeypatch):
    from mhc_multi.backends import _common
    monkeypatch.setattr(_common, "POISON", True)
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    dt = TORCH_DT[dname]
    x = torch.randn(T, n, D, generator=g).to(dt)
    f = torch.randn(T, D, generator=g).to(dt)
    hp = 2 * torch.rand(T, n, generator=g)
    hr = torch.randn(T, n, n, generator=g)
    gn = torch.randn(T, n, D, generator=g).to(dt)
    x, f, hp, hr, gn = (a.to(DEVICE) for a in (x, f, hp, hr, gn))
    out = triton_gpu.post_forward(x, f, hp, hr)
    ref = numpy_ref.post_forward64(_np(x), _np(f), _np(hp), _np(hr))
    assert out.dtype == dt
    _check("x_next", out, ref, dname, seed)
    got = triton_gpu.post_backward(x, f, hp, hr, gn)
    refs = numpy_ref.post_backward64(_np(x), _np(f), _np(hp), _np(hr), _np(gn))
    assert got[0].dtype == dt and got[1].dtype == dt
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, o, r in zip(("dx", "df_out", "dh_post", "dh_res"), got, refs):
        _check(name, o, r, dname, seed)
    out2 = triton_gpu.post_forward(x, f, hp, hr)
    got2 = triton_gpu.post_backward(x, f, hp, hr, gn)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(got, got2))


def test_post_through_front_end():
    import mhc_multi
    inputs = mhc_multi.random_inputs((1, 5, 3, 7), "bf16", seed=3, device=DEVICE)
    report = mhc_multi.crosscheck(*inputs, backends=["triton"], seed=3, post=True)
    assert report.ok, str(report)
    assert any(r.output == "x_next" for r in report.rows)


# ---------------------------------------------------------------------------------------------
# Switchable variants (set_config): the split forward (fwd_split, its h_in pass in either
# token order) and the separate Sinkhorn backward kernel (sk_bwd="sep"), against float64 and
# bitwise repeatable.

VARIANTS = [dict(fwd_split=2), dict(fwd_split=3, hin_order="plain"), dict(fwd_split=-1),
            dict(sk_bwd="sep"), dict(fwd_split=2, sk_bwd="sep"),
            dict(fwd_split=4, fwd_ilv=True, hin_order="dlast", hin_ev="evict_first")]
VAR_CASES = [(37, 4, 130, "bf16", True, 0), (19, 4, 130, "fp16", False, 20),
             (9, 3, 7, "fp32", True, 3), (3, 1, 1, "bf16", True, 20), (6, 8, 33, "bf16", True, 1)]


@pytest.fixture
def variant_config(request):
    triton_gpu.set_config(**request.param)
    yield request.param
    triton_gpu.set_config()


@pytest.mark.parametrize("variant_config", VARIANTS, indirect=True,
                         ids=["-".join(f"{k}{v}" for k, v in c.items()) for c in VARIANTS])
@pytest.mark.parametrize("T,n,D,dname,with_gamma,k", VAR_CASES,
                         ids=[f"var-sk{c[5]}-{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}" for c in VAR_CASES])
def test_variants_vs_float64(T, n, D, dname, with_gamma, k, variant_config):
    seed = int.from_bytes(os.urandom(4), "little")
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(T, n, D, dname, with_gamma, seed)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
    out = triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
    gnp = None if gamma is None else _np(gamma)
    ref = numpy_ref.forward64(_np(x), _np(phi), _np(alpha), _np(bias), gnp, **kw)
    for name, o, r in zip(FWD, out, ref):
        _check(name, o, r, dname, seed)
    inv_rms, h_mix, h_pre = [torch.from_numpy(np.ascontiguousarray(a)).float().to(DEVICE)
                             for a in ref[3:]]
    h_post = torch.from_numpy(ref[1]).float().to(DEVICE)
    bout = triton_gpu.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                               dh_post, dh_res, gamma, **kw)
    bref = numpy_ref.backward64(_np(x), _np(phi), _np(alpha), _np(bias), _np(inv_rms),
                                _np(h_mix), _np(h_pre), _np(h_post), _np(dh_in), _np(dh_post),
                                _np(dh_res), gnp, **kw)
    for name, o, r in zip(BWD, bout, bref):
        if r is not None:
            _check(name, o, r, dname, seed)
    out2 = triton_gpu.forward(x, phi, alpha, bias, gamma, **kw)
    bout2 = triton_gpu.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                dh_post, dh_res, gamma, **kw)
    assert all(torch.equal(a, b) for a, b in zip(out, out2))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(bout, bout2))
