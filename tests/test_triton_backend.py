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

import inspect
import os
import sys
from types import SimpleNamespace

_HAS_CUDA_HINT = os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")
if not _HAS_CUDA_HINT and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from mhc_multi.backends import numpy_ref  # noqa: E402
from mhc_multi.backends import triton as triton_backend  # noqa: E402
from mhc_multi.backends.triton import _util, config, grids, pre_forward  # noqa: E402
from mhc_multi.crosscheck import random_inputs, relative_error  # noqa: E402
from mhc_multi.tolerances import tolerance  # noqa: E402

_why = triton_backend.availability()
if _why is not None:
    pytest.skip(f"triton backend unavailable: {_why}; run this file in its own process with "
                "TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if triton_backend._interpret() else "cuda"
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
    """The backend's flattened inputs: mhc_multi.random_inputs (realistic scales, per-token RMS
    not 1) and unit-normal cotangents, on DEVICE."""
    x, phi, alpha, bias, gamma = random_inputs((1, T, n, D), dname, gamma=with_gamma, seed=seed,
                                               device=DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    dh_in = torch.randn(T, D, generator=g).to(TORCH_DT[dname])
    dh_post = torch.randn(T, n, generator=g)
    dh_res = torch.randn(T, n, n, generator=g)
    dev = lambda a: a.to(DEVICE)  # noqa: E731
    return (x.reshape(T, n, D), phi, alpha, bias, gamma, dev(dh_in), dev(dh_post), dev(dh_res))


def _check(name, got, ref64, dname, seed):
    assert tuple(got.shape) == ref64.shape, (name, got.shape, ref64.shape)
    err = relative_error(got, ref64)   # inf where an element is NaN (unwritten)
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
    out = triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
    gnp = None if gamma is None else _np(gamma)
    ref = numpy_ref.forward64(_np(x), _np(phi), _np(alpha), _np(bias), gnp, **kw)
    assert out[0].dtype == x.dtype and all(o.dtype == torch.float32 for o in out[1:])
    for name, o, r in zip(FWD, out, ref):
        _check(name, o, r, dname, seed)
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = out
    bout = triton_backend.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
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
    out2 = triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
    bout2 = triton_backend.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                    dh_post, dh_res, gamma, **kw)
    for a, b in zip(out + bout, out2 + bout2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_leading_token_dims_give_the_flat_results(monkeypatch):
    """LEADING_TOKEN_DIMS: x [B, S, n, D] with per-token arrays [B, S, ...] (as the front end
    hands them) gives every result with those leading dims and the bits of the flat [T, ...]
    call (outputs poisoned: an element unwritten in either layout fails)."""
    from mhc_multi.backends import _common
    monkeypatch.setattr(_common, "POISON", True)
    B, S, n, D, k = 2, 3, 3, 7, 3
    T = B * S
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(T, n, D, "bf16", True, 5)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
    lead = lambda a: a.reshape(B, S, *a.shape[1:])  # noqa: E731
    flat = triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
    out = triton_backend.forward(lead(x), phi, alpha, bias, gamma, **kw)
    _, h_post, h_res, inv_rms, h_mix, h_pre = flat
    grads = (inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res)
    bflat = triton_backend.backward(x, phi, alpha, bias, *grads, gamma, dx_add=x, **kw)
    bout = triton_backend.backward(lead(x), phi, alpha, bias, *map(lead, grads), gamma,
                                   dx_add=lead(x), **kw)
    f = flat[0]
    pflat = (triton_backend.post_forward(x, f, h_post, h_res),
             *triton_backend.post_backward(x, f, h_post, h_res, x))
    pout = (triton_backend.post_forward(lead(x), lead(f), lead(h_post), lead(h_res)),
            *triton_backend.post_backward(lead(x), lead(f), lead(h_post), lead(h_res), lead(x)))
    per_token = list(zip(flat, out)) + [(bflat[0], bout[0])] + list(zip(pflat, pout))
    for a, b in per_token:
        assert tuple(b.shape) == (B, S) + tuple(a.shape[1:])
        assert not torch.isnan(a).any() and torch.equal(lead(a), b)
    for a, b in zip(bflat[1:], bout[1:]):   # parameter gradients: no token dims
        assert torch.equal(a, b)


def test_empty_batch():
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(0, 3, 7, "bf16", True, 0)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = triton_backend.forward(
        x, phi, alpha, bias, gamma, **kw)
    assert h_in.shape == (0, 7) and h_res.shape == (0, 3, 3) and h_mix.shape == (0, 15)
    dx, dphi, dalpha, dbias, dgamma = triton_backend.backward(
        x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma, **kw)
    assert dx.shape == (0, 3, 7)
    for g in (dphi, dalpha, dbias, dgamma):
        assert torch.count_nonzero(g) == 0


def _fill(programs: int, splits: int, slots: int) -> float:
    """How full the waves of programs * splits programs are on ``slots`` resident slots."""
    total = programs * splits
    return total / (-(-total // slots) * slots)


@pytest.mark.parametrize("occ", [1, 3, 4, 8])
def test_column_splits_fill_the_waves(occ):
    """_col_splits: every program walks its split's tokens, so a partly filled last wave is time
    lost. The rule's properties, over column-program counts from n = 1 to n = 8 at many D and
    token-block counts: at least 1 and at most the token blocks and 16; where some count in
    2..16 fills the waves to >= 90 %, the result does and is the fewest that does; otherwise it
    is the fullest; an override wins (capped by the token blocks)."""
    sms, slots = 132, 132 * occ
    cfg = dict(col_occ=occ, col_waves=4)
    for programs in (8, 20, 32, 64, 96, 160, 256, 448, 512, 1024, 2048):
        for nblk in (1, 2, 3, 10, 16, 17, 512, 2**20):
            s = config._col_splits(cfg, programs, nblk, sms)
            assert 1 <= s <= min(nblk, 16), (programs, nblk, s)
            cands = range(min(2, nblk), min(16, nblk) + 1)
            good = [c for c in cands if _fill(programs, c, slots) >= 0.9]
            if good:
                assert s == good[0], (programs, nblk, s, good)
            elif nblk > 1:
                best = max(_fill(programs, c, slots) for c in cands)
                assert abs(_fill(programs, s, slots) - best) < 1e-9, (programs, nblk, s)
            assert config._col_splits(dict(cfg, col_splits=5), programs, nblk, sms) == min(5, nblk)


def test_column_tiles_with_dx_add():
    """_col_cfg: a column kernel that adds dx_add takes the add tile where the rule has one
    (CUDA, bf16 at n = 4: _CUDA_COL_ADD), its D tile clamped for short rows like col_bd; every
    other row, and every column kernel without dx_add, keeps col_bt x col_bd; a set_config
    override of the add tile wins."""
    cuda = torch.device("cuda")
    cfg = config._make_config(4, 4096, "bf16", cuda)
    add = config._col_cfg(cfg, True)
    assert (add["col_bt"], add["col_bd"]) == config._CUDA_COL_ADD["bf16", 32]
    assert (add["col_bt"], add["col_bd"]) != (cfg["col_bt"], cfg["col_bd"])
    assert {k: v for k, v in add.items() if k not in ("col_bt", "col_bd")} == \
        {k: v for k, v in cfg.items() if k not in ("col_bt", "col_bd")}
    assert config._col_cfg(cfg, False) is cfg
    for n, dname in ((1, "bf16"), (3, "bf16"), (8, "bf16"), (4, "fp16"), (4, "fp32")):
        other = config._make_config(n, 4096, dname, cuda)
        assert config._col_cfg(other, True) is other, (n, dname)
    short = config._col_cfg(config._make_config(4, 20, "bf16", cuda), True)
    assert short["col_bd"] == 32
    interp = config._make_config(4, 4096, "bf16", torch.device("cpu"))
    assert config._col_cfg(interp, True) is interp
    with config.config_override(col_add_bt=64, col_add_bd=128):
        over = config._col_cfg(config._make_config(4, 4096, "bf16", cuda), True)
        assert (over["col_bt"], over["col_bd"]) == (64, 128)


def test_gate_column_blocks_cover_f():
    """_f_blocks: the one or two blocks of gate columns the column kernel and pass 1 of the
    split forward run cover all F columns, stay inside the padded F_PAD rows of their scratch,
    are dot-sized powers of two, and split only where that saves rows (at n = 8 of n <= 8)."""
    split = []
    for F in list(range(1, 200)) + [n * n + 2 * n for n in range(1, 9)]:
        F_pad = max(16, _util._next_pow2(F))
        fa, fb = config._f_blocks(F, F_pad)
        assert fa >= 16 and fa & (fa - 1) == 0, (F, fa, fb)
        if fb == 0:
            assert fa == F_pad, (F, fa)
        else:
            assert fb >= 16 and fb & (fb - 1) == 0 and fa < F <= fa + fb < F_pad, (F, fa, fb)
            split.append(F)
    assert [n for n in range(1, 9) if n * n + 2 * n in split] == [8]


def test_set_config_refuses_unknown_keys_and_override_restores():
    """set_config names an unknown key and lists the valid ones; config_override layers its
    keys over the current overrides and restores them afterwards, also after an exception."""
    with pytest.raises(ValueError, match="unknown key 'col_split'.*col_splits"):
        triton_backend.set_config(col_split=3)
    assert config._CONFIG_OVERRIDES == {}
    triton_backend.set_config(fwd_split=2)
    try:
        with pytest.raises(RuntimeError):
            with triton_backend.config_override(col_splits=3):
                assert config._CONFIG_OVERRIDES == {"fwd_split": 2, "col_splits": 3}
                assert config._config(4, 70, "bf16", torch.device("cpu"))["col_splits"] == 3
                raise RuntimeError
        assert config._CONFIG_OVERRIDES == {"fwd_split": 2}
        assert "col_splits" not in config._config(4, 70, "bf16", torch.device("cpu"))
    finally:
        triton_backend.set_config()


def test_programs_per_multiprocessor():
    """_fit_per_sm, the occupancy rules the persistent grids are sized by, at the H200's
    limits: the row kernel's 64 and 80 registers x 8 warps (4 and 3 programs; at 80 a grid of
    4 per SM ran a second wave, 0.29 instead of 0.17 ms), the column kernel's 127 and 129
    registers x 4 warps (the 256-register allocation unit), and the shared-memory, thread and
    32-block limits."""
    fit = config._fit_per_sm
    assert (fit(64, 8, 1024), fit(80, 8, 1024)) == (4, 3)
    assert (fit(127, 4, 38912), fit(129, 4, 38912)) == (4, 3)
    assert fit(40, 4, 114688) == 2            # two 112 KB blocks (+1 KB each) in 228 KB
    assert fit(32, 16, 0) == 4                # 2048 threads
    assert fit(16, 1, 0) == 32                # the block limit


def test_batch_size_does_not_recompile():
    """T is a runtime argument: new batch sizes reuse the compiled forward kernel."""
    if triton_backend._interpret():
        pytest.skip("the interpreter compiles nothing")
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    cache = pre_forward._pre_fwd_kernel.device_caches[torch.cuda.current_device()][0]
    sizes = []
    with config.config_override(fwd_split=0):   # the fused kernel (the rule's from T = 2048)
        for T in (65, 97, 1999):   # all past FEW_RES
            x, phi, alpha, bias, gamma, *_ = _inputs(T, 4, 64, "bf16", True, T)
            triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
            sizes.append(len(cache))   # other tests may have compiled other variants before
    assert sizes[0] >= 1 and sizes[1:] == sizes[:1] * 2, sizes
    # the split forward, whose number of D shares per token block follows T (4, 2, 1 at n = 4
    # on the H200; up to one per D chunk at n = 8): one compiled variant of each kernel per
    # L2 regime (_l2_reuse: at >= 4 shares and n <= 6, interleaved shares and eviction hints).
    # Every T here is past one pass-1 token block (config._split_bt, _fwd_prep), where the
    # block's size and who makes phi*g's pieces are fixed.
    caches = [k.device_caches[torch.cuda.current_device()][0]
              for k in (pre_forward._pre_fwd_part_kernel, pre_forward._pre_fwd_fin_kernel)]
    for n, D, Ts in ((4, 512, (5003, 16384, 2048, 3000)), (8, 1000, (65, 9001, 40000))):
        sizes = []
        for T in Ts:
            x, phi, alpha, bias, gamma, *_ = _inputs(T, n, D, "bf16", True, T)
            triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
            sizes.append([len(c) for c in caches])
        if n == 4:   # S = 2, 1 (one variant), then S = 4, 4 (the L2 variant: one more)
            assert sizes[1] == sizes[0] and sizes[3] == sizes[2], sizes
            assert all(b <= a + 1 for a, b in zip(sizes[0], sizes[2])), sizes
        else:
            assert min(sizes[0]) >= 1 and sizes[1:] == sizes[:1] * (len(Ts) - 1), (n, sizes)


class _FakeParam:
    """A JIT function's parameter as _util._Launch reads it."""
    def __init__(self, name, constexpr=False, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default


class _FakeCompiled:
    """A compiled kernel: records what its own launcher is handed."""
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, len(args))

    def run(self, *args):
        self.runs.append(args)


class _FakeJit:
    """A JIT function: ``fn[grid](...)`` records the call and returns its compiled kernel."""
    def __init__(self, params):
        self.params, self.calls, self.ck = params, [], _FakeCompiled()

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.calls.append((grid, args, kw))
            return self.ck
        return call


class _Hooks:
    def __init__(self, calls):
        self.calls = calls


def test_direct_launch_keys_on_what_triton_specializes(monkeypatch):
    """_Launch hands the compiled kernel all of fn's arguments in order (constexprs from the
    plan, defaults, runtime arguments by name) and goes back through fn[grid] whenever what
    Triton specializes on changes: a tensor's dtype or 16-byte alignment, an int's value, an
    argument turning None; a float does not.  On the CPU with fakes: the GPU runs the real
    thing in every other test."""
    monkeypatch.setattr(_util, "_INTERPRET", False)
    monkeypatch.setattr(_util, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(_util, "_stream", lambda: "stream")
    hooks = SimpleNamespace(launch_enter_hook=_Hooks([]), launch_exit_hook=_Hooks([]))
    monkeypatch.setattr(_util, "_KNOBS", hooks)
    P = _FakeParam
    fn = _FakeJit([P("x_ptr"), P("y_ptr"), P("T"), P("eps"), P("N", True), P("B", True, 8),
                   P("g_ptr", default=None), P("H", True, False)])
    launch = _util._Launch(fn, (3,), dict(N=4, H=True, num_warps=4))
    x, y = torch.zeros(16), torch.zeros(16)

    def jit_calls_after(*args, **dyn):
        before = len(fn.ck.runs)
        launch(*args, **dyn)
        return len(fn.calls), len(fn.ck.runs) - before

    assert jit_calls_after(x, y, 5, 0.5, g_ptr=x) == (1, 0)   # compiles (or finds) it
    assert jit_calls_after(x, y, 5, 0.5, g_ptr=x) == (1, 1)
    assert fn.ck.runs[-1] == (3, 1, 1, "stream", "function", "packed", None, None, None,
                              x, y, 5, 0.5, 4, 8, x, True)
    assert jit_calls_after(x, y, 5, 0.25, g_ptr=x) == (1, 1)      # floats: not specialized
    assert jit_calls_after(x, y, 6, 0.5, g_ptr=x) == (2, 0)       # an int's value
    assert jit_calls_after(x, y[1:], 5, 0.5, g_ptr=x) == (3, 0)   # 4 bytes off 16
    assert jit_calls_after(x, y.double(), 5, 0.5, g_ptr=x) == (4, 0)   # a dtype
    assert jit_calls_after(x, y, 5, 0.5) == (5, 0)                # g_ptr None
    assert jit_calls_after(x, y, 5, 0.5) == (6, 0)                # ... every time
    assert jit_calls_after(x, y, 5, 0.5, g_ptr=x) == (6, 1)       # each key kept
    assert fn.calls[0] == ((3, 1, 1), (x, y, 5, 0.5), dict(g_ptr=x, N=4, H=True, num_warps=4))
    hooks.launch_enter_hook.calls.append(print)   # a launch hook: Triton's metadata and hooks
    assert jit_calls_after(x, y, 5, 0.5, g_ptr=x) == (6, 1)
    assert fn.ck.runs[-1][6:9] == (("metadata", (3, 1, 1), "stream", 8),
                                   hooks.launch_enter_hook, hooks.launch_exit_hook)
    monkeypatch.setattr(_util, "DIRECT_LAUNCH", False)
    assert jit_calls_after(x, y, 5, 0.5, g_ptr=x) == (7, 0)
    # a kernel whose first call had None where later ones pass a tensor
    none_first = _util._Launch(fn, (3,), dict(N=4, H=True, num_warps=4))
    monkeypatch.setattr(_util, "DIRECT_LAUNCH", True)
    none_first(x, y, 5, 0.5)
    none_first(x, y, 5, 0.5)
    assert len(fn.calls) == 8 and fn.ck.runs[-1][-2] is None   # direct, g_ptr None
    none_first(x, y, 5, 0.5, g_ptr=x)
    assert len(fn.calls) == 9                                   # through the JIT


def _every_output(x, phi, alpha, bias, gamma, k, dx_add):
    """Every output of the pre and post operators, forward and backward, through the API."""
    import mhc_multi
    kw = dict(backend="triton", sinkhorn_iters=k)
    o = mhc_multi.forward(x, phi, alpha, bias, gamma, **kw)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(1)
    dh_in, dh_post, dh_res = (torch.randn(o.h_in.shape, device=x.device, generator=gen)
                              .to(o.h_in.dtype), torch.randn(o.h_post.shape, device=x.device,
                                                             generator=gen),
                              torch.randn(o.h_res.shape, device=x.device, generator=gen))
    g = mhc_multi.backward(x, phi, alpha, bias, o.inv_rms, o.h_mix, o.h_pre, o.h_post, dh_in,
                           dh_post, dh_res, gamma, dx_add=dx_add, **kw)
    x_next = mhc_multi.post_forward(x, o.h_in, o.h_post, o.h_res, backend="triton")
    pg = mhc_multi.post_backward(x, o.h_in, o.h_post, o.h_res, x_next, backend="triton")
    return [t for t in (*o, *g, x_next, *pg) if t is not None]


@pytest.mark.parametrize("shape,dname,k,with_gamma,with_add", [
    ((1, 1, 4, 4096), "bf16", 20, True, False),   # split forward (PDL), one-token row kernel
    ((1, 64, 4, 4096), "bf16", 20, True, True),
    ((2, 3000, 4, 512), "bf16", 0, False, True),   # the fused forward
    ((1, 5, 8, 1000), "bf16", 20, True, False),
    ((3, 7, 3, 300), "fp32", 0, True, False),
    ((1, 40, 2, 256), "fp16", 5, False, True)])
def test_direct_launch_matches_jit_launch_bitwise(shape, dname, k, with_gamma, with_add,
                                                  monkeypatch):
    """Every output of every kernel launched directly (_Launch, from its second call with a
    key on) is bit for bit the output of the same launch through fn[grid], with no element
    left unwritten (outputs poisoned)."""
    if triton_backend._interpret():
        pytest.skip("the interpreter always launches through fn[grid]")
    from mhc_multi.backends import _common
    monkeypatch.setattr(_common, "POISON", True)
    x, phi, alpha, bias, gamma = random_inputs(shape, dname, seed=3, device="cuda")
    gamma = gamma if with_gamma else None
    dx_add = torch.randn_like(x) if with_add else None
    monkeypatch.setattr(_util, "DIRECT_LAUNCH", False)
    want = [t.clone() for t in _every_output(x, phi, alpha, bias, gamma, k, dx_add)]
    monkeypatch.setattr(_util, "DIRECT_LAUNCH", True)
    for _ in range(2):   # a new key's first call goes through fn[grid]; the second is direct
        got = _every_output(x, phi, alpha, bias, gamma, k, dx_add)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(want, got)):
        assert not torch.isnan(b.float()).any(), i
        assert torch.equal(a, b), i


# Sinkhorn-Knopp inside the fused kernels (CONTRACT.md, "Sinkhorn-Knopp projection")
SK_CASES = [(13, 4, 130, "bf16", True, 1), (5, 3, 7, "fp16", False, 3), (19, 4, 7, "fp32", True, 20),
            (3, 1, 130, "bf16", True, 20), (7, 3, 130, "fp32", False, 20)]


@pytest.mark.parametrize("T,n,D,dname,with_gamma,k", SK_CASES,
                         ids=[f"sk{c[5]}-{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}" for c in SK_CASES])
def test_sinkhorn_vs_float64(T, n, D, dname, with_gamma, k):
    assert triton_backend.SUPPORTS_SINKHORN is True
    seed = int.from_bytes(os.urandom(4), "little")
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(T, n, D, dname, with_gamma, seed)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
    out = triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
    gnp = None if gamma is None else _np(gamma)
    ref = numpy_ref.forward64(_np(x), _np(phi), _np(alpha), _np(bias), gnp, **kw)
    for name, o, r in zip(FWD, out, ref):
        _check(name, o, r, dname, seed)
    # the backward is judged on the reference's intermediates (as crosscheck does)
    mids = [torch.from_numpy(np.ascontiguousarray(a)).float().to(DEVICE) for a in ref[3:]]
    inv_rms, h_mix, h_pre = mids
    h_post = torch.from_numpy(ref[1]).float().to(DEVICE)
    bout = triton_backend.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                   dh_post, dh_res, gamma, **kw)
    bref = numpy_ref.backward64(_np(x), _np(phi), _np(alpha), _np(bias), _np(inv_rms),
                                _np(h_mix), _np(h_pre), _np(h_post), _np(dh_in), _np(dh_post),
                                _np(dh_res), gnp, **kw)
    for name, o, r in zip(BWD, bout, bref):
        if r is not None:
            _check(name, o, r, dname, seed)
    bout2 = triton_backend.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                    dh_post, dh_res, gamma, **kw)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(bout, bout2))


def test_sinkhorn_margins_k20():
    """k = 20 on realistic logits: rows and columns of h_res sum to 1 within 1e-5."""
    from mhc_multi.tolerances import SINKHORN_MARGIN_TOLERANCE
    x, phi, alpha, bias, gamma, *_ = _inputs(21, 4, 64, "bf16", True, 5)
    h_res = triton_backend.forward(x, phi, alpha, bias, gamma, norm_eps=NORM_EPS, hc_eps=HC_EPS,
                                   sinkhorn_iters=20)[2].double()
    assert (h_res.sum(-1) - 1).abs().max() <= SINKHORN_MARGIN_TOLERANCE
    assert (h_res.sum(-2) - 1).abs().max() <= SINKHORN_MARGIN_TOLERANCE


def test_sinkhorn_zero_is_the_plain_path():
    """sinkhorn_iters=0 gives the logits, bit for bit the default call."""
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(9, 3, 7, "bf16", True, 7)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS)
    a = triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
    b = triton_backend.forward(x, phi, alpha, bias, gamma, sinkhorn_iters=0, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    c = triton_backend.forward(x, phi, alpha, bias, gamma, sinkhorn_iters=1, **kw)
    assert not torch.equal(a[2], c[2]) and torch.equal(a[4], c[4])


# ---------------------------------------------------------------------------------------------
# The post operator: x_next = h_res @ x + h_post * f_out (CONTRACT.md, "The post operator")

POST_CASES = [(5, 3, 7, "bf16"), (7, 4, 130, "fp16"), (9, 1, 130, "fp32"), (6, 4, 7, "bf16"),
              (3, 3, 130, "fp32"), (5, 6, 1000, "bf16"), (3, 8, 40, "fp32")]


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
    out = triton_backend.post_forward(x, f, hp, hr)
    ref = numpy_ref.post_forward64(_np(x), _np(f), _np(hp), _np(hr))
    assert out.dtype == dt
    _check("x_next", out, ref, dname, seed)
    got = triton_backend.post_backward(x, f, hp, hr, gn)
    refs = numpy_ref.post_backward64(_np(x), _np(f), _np(hp), _np(hr), _np(gn))
    assert got[0].dtype == dt and got[1].dtype == dt
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, o, r in zip(("dx", "df_out", "dh_post", "dh_res"), got, refs):
        _check(name, o, r, dname, seed)
    out2 = triton_backend.post_forward(x, f, hp, hr)
    got2 = triton_backend.post_backward(x, f, hp, hr, gn)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(got, got2))


# The CUDA rule's post forward tiles (_post_config): [1, 8, 1024] at n > 4, more tokens where D
# is short; run here with the interpreter too (the tile is a set_config override there).
CUDA_POST_TILES = [(3, 6, 1000, "bf16"), (5, 8, 40, "fp32"), (4, 5, 200, "fp16"),
                   (9, 4, 40, "bf16")]


@pytest.mark.parametrize("T,n,D,dname", CUDA_POST_TILES,
                         ids=[f"cuda-tile-{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}" for c in CUDA_POST_TILES])
def test_post_cuda_tiles_vs_float64(T, n, D, dname, monkeypatch):
    cfg = config._post_config(n, D, torch.device("cuda"))
    npad = _util._next_pow2(n)
    assert cfg["pf_bt"] * npad * cfg["pf_bd"] == (8192 if npad > 4 else 4096), cfg
    with config.config_override(post_pf_bt=cfg["pf_bt"], post_pf_bd=cfg["pf_bd"]):
        test_post_vs_float64(T, n, D, dname, monkeypatch)


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
            dict(fwd_split=4, fwd_ilv=True, hin_order="dlast", hin_ev="evict_first"),
            dict(fwd_split=-1, hin_sb=4), dict(few_res=0)]
VAR_CASES = [(37, 4, 130, "bf16", True, 0), (19, 4, 130, "fp16", False, 20),
             (9, 3, 7, "fp32", True, 3), (3, 1, 1, "bf16", True, 20), (6, 8, 33, "bf16", True, 1)]


def test_few_res_switch_picks_the_forward_pieces():
    """Below FEW_RES h_res entries the forward's plan takes 3 pieces of phi*g with separate
    dots; set_config(few_res=0) gives the plain path's pieces at any T."""
    dev = torch.device(DEVICE)
    plain = pre_forward.fwd_pieces("bf16", False)[1]
    assert pre_forward._plan_forward(1, 4, 64, "bf16", dev, 0, True).npb == 3 != plain
    with triton_backend.config_override(few_res=0):
        assert pre_forward._plan_forward(1, 4, 64, "bf16", dev, 0, True).npb == plain


@pytest.fixture
def variant_config(request):
    triton_backend.set_config(**request.param)
    yield request.param
    triton_backend.set_config()


@pytest.mark.parametrize("variant_config", VARIANTS, indirect=True,
                         ids=["-".join(f"{k}{v}" for k, v in c.items()) for c in VARIANTS])
@pytest.mark.parametrize("T,n,D,dname,with_gamma,k", VAR_CASES,
                         ids=[f"var-sk{c[5]}-{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}" for c in VAR_CASES])
def test_variants_vs_float64(T, n, D, dname, with_gamma, k, variant_config):
    _fwd_bwd_vs_float64(T, n, D, dname, with_gamma, k)


# Few tokens (T = 1 .. 64): on CUDA the rule splits the forward's row over programs (split-K,
# config._fwd_splits) in its few-token tiles (config._few_tiles: 32-column shares, a fin
# kernel of one token per program summing the shares as tiles) and gives the backward's row
# kernel one token per program (config._row_tiles); the interpreter runs those paths here
# with the same settings.
FEW_T = [(T, n, ("bf16", "fp16", "fp32")[(T + n) % 3]) for T in (1, 8, 64)
         for n in range(1, 9)]


@pytest.mark.parametrize("T,n,dname", FEW_T, ids=[f"T{c[0]}-n{c[1]}-{c[2]}" for c in FEW_T])
def test_few_tokens_split_k_vs_float64(T, n, dname):
    F_pad = _util._f_pad(n)
    cuda_cfg = config._make_config(n, 4096, dname, torch.device("cuda"))
    assert config._fwd_splits(cuda_cfg, T, 4096, torch.device("cuda"), F_pad, dname,
                              sms=132) > 1, "the CUDA rule splits the row at few tokens"
    assert config._row_tiles(cuda_cfg, T, 4096, 132)[0] == cuda_cfg["row_few_bt"], \
        "the CUDA rule gives the backward's row kernel one program per token at few tokens"
    assert config._few_tiles(cuda_cfg, T), "the CUDA rule's split forward takes few-token tiles"
    D = 40 if DEVICE == "cpu" else 1000   # several D chunks of the device's split forward
    # the interpreter's rule has no few-token tiles: these are the CUDA rule's, in D chunks of
    # 16 (several per row) and, at odd n, the fin kernel summing 2 shares per step (the last
    # step part masked); the interpreter's pass-1 token block (16) leaves T = 64 to its tiles
    few = {} if DEVICE != "cpu" else dict(
        row_few_bt=cuda_cfg["row_few_bt"], row_few_bd=16, fwd_split_few_bd=16,
        hin_few_bt=cuda_cfg["hin_few_bt"], hin_few_bd=cuda_cfg["hin_few_bd"],
        hin_few_sb=2 if n % 2 else cuda_cfg["hin_few_sb"])
    with config.config_override(fwd_split=-1, **few):
        dev = torch.device(DEVICE)
        cfg = config._config(n, D, dname, dev)
        assert config._fwd_splits(cfg, T, D, dev, F_pad, dname) > 1
        assert config._few_tiles(cfg, T) == (T <= cfg["fwd_split_bt"])
        if T < 64:
            assert config._row_tiles(cfg, T, D, config._sm_count(dev))[0] == 1
        _fwd_bwd_vs_float64(T, n, D, dname, T % 2 == 0, 20)


def test_few_token_tiles_only_within_one_pass1_block():
    """The CUDA rule's few-token tiles (config._few_tiles) hold while T fits one pass-1 token
    block and stop at the next token; set_config(hin_sb=) sets the fin kernel's shares per
    step at every T, the few-token tiles' included; the interpreter's rule has none."""
    cuda = torch.device("cuda")
    cfg = config._make_config(4, 4096, "bf16", cuda)
    bt = cfg["fwd_split_bt"]
    few_sb = cfg["hin_few_sb"]
    for T in (1, bt, bt + 1, 4096):
        few = T <= bt
        assert config._few_tiles(cfg, T) == few, T
        assert config._split_bd(cfg, T) == cfg["fwd_split_few_bd" if few else "fwd_split_bd"]
        assert config._hin_tiles(cfg, T) == ((cfg["hin_few_bt"], cfg["hin_few_bd"], few_sb)
                                             if few else (cfg["hin_bt"], cfg["hin_bd"], 0)), T
        _, grid2, hbt, hbd = grids._split_grids(T, 4096, 8, cfg)
        assert (hbt, hbd) == config._hin_tiles(cfg, T)[:2], T
        assert grid2[0] == _util._cdiv(T, hbt) * _util._cdiv(4096, hbd), (T, grid2)
    with config.config_override(hin_sb=few_sb // 2):
        cfg = config._make_config(4, 4096, "bf16", cuda)
        assert [config._hin_tiles(cfg, T)[2] for T in (1, 4096)] == [few_sb // 2] * 2
    interp = config._make_config(4, 4096, "bf16", torch.device("cpu"))
    assert not config._few_tiles(interp, 1)


def _fwd_bwd_vs_float64(T, n, D, dname, with_gamma, k):
    """Forward and backward against float64 (numpy_ref), and bitwise repeatable."""
    seed = int.from_bytes(os.urandom(4), "little")
    x, phi, alpha, bias, gamma, dh_in, dh_post, dh_res = _inputs(T, n, D, dname, with_gamma, seed)
    kw = dict(norm_eps=NORM_EPS, hc_eps=HC_EPS, sinkhorn_iters=k)
    out = triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
    gnp = None if gamma is None else _np(gamma)
    ref = numpy_ref.forward64(_np(x), _np(phi), _np(alpha), _np(bias), gnp, **kw)
    for name, o, r in zip(FWD, out, ref):
        _check(name, o, r, dname, seed)
    inv_rms, h_mix, h_pre = [torch.from_numpy(np.ascontiguousarray(a)).float().to(DEVICE)
                             for a in ref[3:]]
    h_post = torch.from_numpy(ref[1]).float().to(DEVICE)
    bout = triton_backend.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                   dh_post, dh_res, gamma, **kw)
    bref = numpy_ref.backward64(_np(x), _np(phi), _np(alpha), _np(bias), _np(inv_rms),
                                _np(h_mix), _np(h_pre), _np(h_post), _np(dh_in), _np(dh_post),
                                _np(dh_res), gnp, **kw)
    for name, o, r in zip(BWD, bout, bref):
        if r is not None:
            _check(name, o, r, dname, seed)
    out2 = triton_backend.forward(x, phi, alpha, bias, gamma, **kw)
    bout2 = triton_backend.backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in,
                                    dh_post, dh_res, gamma, **kw)
    assert all(torch.equal(a, b) for a, b in zip(out, out2))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(bout, bout2))


# The split forward's pass 1 makes phi*g's pieces itself at one token block (config._fwd_prep):
# the same arithmetic as _prep_phi_kernel, so the same bits. T = 3 has few h_res entries at
# every n (three phi*g pieces, no CAT dot in either path); n = 8 has two gate-column blocks.
@pytest.mark.parametrize("n,dname,with_gamma", [(1, "fp32", True), (3, "bf16", False),
                                                (4, "bf16", True), (5, "fp16", True),
                                                (8, "bf16", True)])
def test_split_forward_pieces_in_pass1_bitwise(n, dname, with_gamma):
    T, D = 3, (40 if DEVICE == "cpu" else 1000)   # several D chunks, so S > 1
    x, phi, alpha, bias, gamma = _inputs(T, n, D, dname, with_gamma, seed=n)[:5]
    dev = torch.device(DEVICE)
    outs = []
    for prep in (True, False):
        with config.config_override(fwd_split=-1, fwd_prep=prep):
            cfg = config._config(n, D, dname, dev)
            assert config._fwd_splits(cfg, T, D, dev, _util._f_pad(n), dname) > 1
            assert config._fwd_prep(cfg, T) is prep
            outs.append(triton_backend.forward(x, phi, alpha, bias, gamma, norm_eps=NORM_EPS,
                                               hc_eps=HC_EPS))
    for name, a, b in zip(FWD, *outs):
        assert torch.equal(a, b), name
        assert not torch.isnan(a).any(), name

