"""Launch grids of the Triton backend inside CUDA's limits at any number of tokens.

CUDA runs at most 2^31 - 1 programs along grid axis 0 and 65535 along axes 1 and 2 (the
device's maxGridSize).  The grid of every launch of backends/triton/ comes from a pure
function of ints and the launch rule (backends/triton/grids.py), the one the launcher calls, so
these tests evaluate the real code path without a GPU: the CUDA launch rule
(``_make_config`` with a CUDA device type), 132 multiprocessors (H200), several counts of
resident programs per SM, at T = 2^20 and 2^24 tokens (and one past them), for every
set_config variant that changes a grid.  They assert the properties each launch must keep
(every axis in 1..limit; every token block, D chunk and stream covered), not today's values.

``test_two_gpus_device_guard`` needs two CUDA GPUs and skips elsewhere.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from mhc_multi.backends import triton as tg  # noqa: E402
from mhc_multi.backends.triton import _util, config, grids  # noqa: E402

AXIS0, AXIS12 = 2**31 - 1, 65535   # CUDA's limits, written out here (not the module's copy)
CUDA = torch.device("cuda")          # only its type is read: nothing below touches a GPU
SMS = 132                            # H200
RESIDENT = (None, 1, 3, 4, 8, 32)    # compiled programs per SM (_resident; None: unknown)
TS = (2**20, 2**20 + 1, 2**24, 2**24 + 1)   # + 1: a last block of one token for every block
DS = (1, 100, 4096, 7168)
NS = (1, 4, 5, 8)
DTYPES = ("bf16", "fp16", "fp32")

# set_config variants that change a grid: the forward's split (0: fused; "auto": the rule;
# -1: ~4 programs per SM; a number, also more than the D chunks), the h_in pass's order,
# where the Sinkhorn backward runs, the persistent grids' waves and the column splits
VARIANTS = {
    "rule": {},
    "fused": dict(fwd_split=0),
    "split_auto": dict(fwd_split="auto"),
    "split_sm4": dict(fwd_split=-1),
    "split3": dict(fwd_split=3),
    "split_huge": dict(fwd_split=10**6),
    "rev": dict(fwd_split=2, hin_order="rev"),
    "dlast": dict(fwd_split=4, fwd_ilv=True, hin_order="dlast", hin_ev="evict_first"),
    "plain": dict(fwd_split=1, hin_order="plain"),
    "sk_sep": dict(sk_bwd="sep"),
    "sk_fused": dict(sk_bwd="fused"),
    "waves": dict(row_waves=3, col_occ=None, col_waves=4),
    "col_splits_huge": dict(col_splits=10**6),
}


def _cdiv(a, b):
    return -(-a // b)


def _within(grid, what):
    assert 1 <= len(grid) <= 3, (what, grid)
    assert all(isinstance(g, int) for g in grid), (what, grid)
    assert 1 <= grid[0] <= AXIS0, f"{what}: grid {grid}, axis 0 outside 1..{AXIS0}"
    for ax, g in enumerate(grid[1:], 1):
        assert 1 <= g <= AXIS12, f"{what}: grid {grid}, axis {ax} outside 1..{AXIS12}"


def _check_all(T, n, D, dname, sms, resident, cfg, post_f, post_b):
    """Every launch of a forward + backward (+ post) at (T, n, D): within the limits, and
    covering what it must."""
    where = f"T={T} n={n} D={D} {dname} resident={resident}"
    F = n * n + 2 * n
    F_pad = max(16, _util._next_pow2(F))
    ND = n * D
    # forward: phi*g pieces, then the fused kernel or the split forward's two passes
    grid, block = grids._prep_phi_grid(ND, F_pad, True)
    _within(grid, f"prep_phi {where}")
    assert grid[0] * block >= ND and grid[1] == F_pad, (where, grid, block)
    S = config._fwd_splits(cfg, T, D, CUDA, F_pad, dname, sms=sms)
    if S == 0:
        grid = grids._fwd_grid(T, cfg)
        _within(grid, f"pre_fwd {where}")
        assert grid[0] * cfg["fwd_bt"] >= T, (where, grid)
    else:
        # no share without a chunk
        assert 1 <= S <= _cdiv(D, config._split_bd(cfg, T)), (where, S)
        config._l2_reuse(cfg, S, F_pad, CUDA)
        grid1, grid2, hbt, hbd = grids._split_grids(T, D, S, cfg)
        _within(grid1, f"pre_fwd_part S={S} {where}")
        bt = config._split_bt(cfg, T)
        assert bt <= cfg["fwd_split_bt"] and grid1[0] * bt >= T and grid1[1] == S, (where, grid1)
        _within(grid2, f"pre_fwd_fin {where}")
        # one program per (token block, D chunk): the kernel unfolds pid by the D chunks
        assert grid2[0] == _cdiv(T, hbt) * _cdiv(D, hbd) and hbd >= 1, (where, grid2, hbt, hbd)
    # backward: Sinkhorn (separate kernel), row kernel, column kernel, reduction
    mode = config._sk_bwd_mode(cfg, T, sms, True)
    assert mode in ("sep", "fused"), mode
    if mode == "sep":
        grid = grids._sk_grid(T, cfg)
        _within(grid, f"sk_bwd {where}")
        assert grid[0] * cfg["sk_bt"] >= T, (where, grid)
    bt, bd = config._row_tiles(cfg, T, D, sms)
    # the few-token tiles only where row_bt blocks would leave multiprocessors idle
    few = _cdiv(T, cfg["row_bt"]) < sms
    assert bt == (cfg["row_few_bt"] if few else cfg["row_bt"]) and bd >= 16, (where, bt, bd)
    grid = grids._row_grid(T, bt, cfg, sms, resident)
    _within(grid, f"pre_bwd_row {where}")
    assert grid == (grid[0],) and grid[0] <= _cdiv(T, bt), (where, grid)  # persistent
    grid, tok = grids._col_grid(T, n, D, cfg, sms, resident)
    _within(grid, f"pre_bwd_col {where}")
    # every (stream, D chunk) on the leading axes (folded onto axis 0 past 65535 chunks); the
    # token splits on the last, each a whole number of token blocks, none empty
    assert int(np.prod(grid[:-1])) == n * _cdiv(D, cfg["col_bd"]), (where, grid)
    splits = grid[-1]
    assert tok % cfg["col_bt"] == 0 and splits * tok >= T > (splits - 1) * tok, (where, grid, tok)
    grid, block = grids._reduce_grid(ND, F, F_pad, True)
    _within(grid, f"reduce_partials {where}")
    assert grid[0] * block >= ND and grid[0] >= F + 3, (where, grid, block)
    # the post operator
    grid = grids._post_fwd_grid(T, D, post_f)
    _within(grid, f"post_fwd {where}")
    assert grid[0] == _cdiv(T, post_f["pf_bt"]) * _cdiv(D, post_f["pf_bd"]), (where, grid)
    grid, bt = grids._post_bwd_grid(T, n, post_b)
    _within(grid, f"post_bwd {where}")
    assert grid[0] * bt >= T and bt * _util._next_pow2(n) >= 16, (where, grid, bt)


@pytest.fixture
def variant(request):
    tg.set_config(**VARIANTS[request.param])
    yield request.param
    tg.set_config()


@pytest.mark.parametrize("variant", list(VARIANTS), indirect=True)
@pytest.mark.parametrize("n", NS, ids=[f"n{n}" for n in NS])
@pytest.mark.parametrize("dname", DTYPES)
def test_grids_within_cuda_limits(dname, n, variant):
    """T = 2^20, 2^24 (and one token more), D = 1, 100, 4096, 7168, every resident count."""
    for D in DS:
        cfg = config._make_config(n, D, dname, CUDA)
        post_f = config._post_config(n, D, CUDA)
        post_b = config._post_config(n, D, CUDA, dname == "fp32")
        for T in TS:
            for res in RESIDENT:
                _check_all(T, n, D, dname, SMS, res, cfg, post_f, post_b)


# The extremes, at shapes whose x fits in an H200's 141 GB: T = MAX_TOKENS at a few elements per
# token (one program per token on axis 0 where n >= 5 makes the post forward's block one
# token), and D = 2^22 + 3 at a few tokens (D chunks past 65535 at 64 columns per chunk).
EXTREMES = [(tg.MAX_TOKENS, 1, 1, "bf16"), (tg.MAX_TOKENS, 1, 16, "fp16"),
            (tg.MAX_TOKENS, 8, 4, "bf16"), (tg.MAX_TOKENS, 4, 2, "fp32"),
            (1, 8, 2**22 + 3, "bf16"), (1025, 5, 2**22 + 3, "fp32"),
            (4097, 1, 2**22 + 3, "fp16")]


@pytest.mark.parametrize("variant", ["rule", "split_sm4", "rev", "dlast", "plain",
                                     "col_splits_huge"], indirect=True)
@pytest.mark.parametrize("T,n,D,dname", EXTREMES,
                         ids=[f"{c[3]}-n{c[1]}-D{c[2]}-T{c[0]}" for c in EXTREMES])
def test_grids_at_the_extremes(T, n, D, dname, variant):
    assert T * n * D * {"bf16": 2, "fp16": 2, "fp32": 4}[dname] <= 141 * 10**9
    cfg = config._make_config(n, D, dname, CUDA)
    for res in RESIDENT:
        _check_all(T, n, D, dname, SMS, res, cfg, config._post_config(n, D, CUDA),
                   config._post_config(n, D, CUDA, dname == "fp32"))


def test_max_tokens_leaves_room_for_token_blocks():
    """The kernels number tokens in int32 up to T + BLOCK_T - 1 (the last block's rows, the
    token loops' counters): MAX_TOKENS leaves room for the rules' token blocks, and one
    program per token fits on axis 0."""
    blocks = []
    for n in range(1, 9):
        for dname in DTYPES:
            cfg = config._make_config(n, 4096, dname, CUDA)
            blocks += [cfg[k] for k in ("fwd_bt", "fwd_split_bt", "hin_bt", "hin_few_bt",
                                        "sk_bt", "row_bt", "col_bt")]
            pb = config._post_config(n, 4096, CUDA)
            blocks += [pb["pf_bt"], max(16, _util._next_pow2(grids._post_bwd_grid(1, n, pb)[1]))]
    assert tg.MAX_TOKENS + max(blocks) - 1 <= 2**31 - 1 and tg.MAX_TOKENS <= AXIS0


# ---------------------------------------------------------------------------------------------
# Device guard: Triton launches on the current CUDA device; the backend's entry points make
# x's device current for the call (and only then).

def _two_gpus() -> bool:
    return (not tg._interpret() and torch.cuda.is_available() and torch.cuda.device_count() >= 2
            and tg.availability() is None)


def _np(t):
    """A tensor as numpy_ref takes it (bf16 as uint16 words)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# (B, S, n, D, x dtype, sinkhorn_iters): the fused forward at short T; the split forward in its
# L2 regime (bf16, n = 4, T >= 2048: 4 shares, D chunks last first); fp32 x (split forward at
# every T) with Sinkhorn (k = 20) and the separate Sinkhorn backward (T >= 48 * SMs)
GUARD_CASES = [(2, 37, 4, 130, "bf16", 0), (1, 2200, 4, 520, "bf16", 0),
               (2, 3500, 6, 100, "fp32", 20)]
KERNELS = [getattr(tg, name) for name in dir(tg) if name.endswith("_kernel")]


def _guard_inputs(B, S, n, D, dname, seed):
    """CPU inputs of the pre and post operators, forward and backward."""
    g = torch.Generator().manual_seed(seed)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dname]
    F = n * n + 2 * n
    return dict(
        x=torch.randn(B, S, n, D, generator=g).to(dt),
        phi=torch.randn(F, n * D, generator=g) / (n * D) ** 0.5,
        alpha=torch.randn(3, generator=g), bias=0.1 * torch.randn(F, generator=g),
        gamma=1 + 0.1 * torch.randn(n, D, generator=g),
        dh_in=torch.randn(B, S, D, generator=g).to(dt),
        dh_post=torch.randn(B, S, n, generator=g), dh_res=torch.randn(B, S, n, n, generator=g),
        f_out=torch.randn(B, S, D, generator=g).to(dt),
        dx_next=torch.randn(B, S, n, D, generator=g).to(dt))


def _run_front_end(host, dev, k):
    """(forward outputs, gradients, x_next, post gradients) of the front end's triton calls
    on copies of ``host`` on ``dev``, whatever device is current."""
    import mhc_multi
    a = {key: v.to(dev) for key, v in host.items()}
    out = mhc_multi.forward(a["x"], a["phi"], a["alpha"], a["bias"], a["gamma"],
                            backend="triton", sinkhorn_iters=k)
    grads = mhc_multi.backward(a["x"], a["phi"], a["alpha"], a["bias"], out.inv_rms,
                               out.h_mix, out.h_pre, out.h_post, a["dh_in"], a["dh_post"],
                               a["dh_res"], a["gamma"], backend="triton", sinkhorn_iters=k)
    x_next = mhc_multi.post_forward(a["x"], a["f_out"], out.h_post, out.h_res, backend="triton")
    post = mhc_multi.post_backward(a["x"], a["f_out"], out.h_post, out.h_res, a["dx_next"],
                                   backend="triton")
    torch.cuda.synchronize(dev)
    return list(out), [t for t in grads if t is not None], x_next, list(post)


def _compiled_on(index):
    """Compiled variants of the module's kernels on device ``index`` (None where this Triton
    keeps its caches otherwise)."""
    try:
        return [len(kern.device_caches[index][0]) if index in kern.device_caches else 0
                for kern in KERNELS]
    except (AttributeError, TypeError, IndexError, KeyError):
        return None


def _check_vs_float64(host, results, k, dname, seed):
    """Every output within the contract's bound of the float64 reference (the backward at the
    Triton forward's intermediates)."""
    from mhc_multi.backends import numpy_ref
    from mhc_multi.crosscheck import relative_error
    from mhc_multi.tolerances import tolerance

    out, grads, x_next, post = results
    B, S = host["x"].shape[:2]
    T = B * S
    h = {key: _np(v).reshape(T, *v.shape[2:]) for key, v in host.items() if v.dim() >= 3}
    phi, alpha, bias, gamma = (_np(host[key]) for key in ("phi", "alpha", "bias", "gamma"))
    kw = dict(norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=k)
    h_in, h_post, h_res, inv_rms, h_mix, h_pre = out
    mids = [_np(t).reshape(T, *t.shape[2:]) for t in (inv_rms, h_mix, h_pre, h_post, h_res)]
    ref = numpy_ref.forward64(h["x"], phi, alpha, bias, gamma, **kw)
    bref = numpy_ref.backward64(h["x"], phi, alpha, bias, *mids[:4], h["dh_in"], h["dh_post"],
                                h["dh_res"], gamma, **kw)
    pref = numpy_ref.post_forward64(h["x"], h["f_out"], mids[3], mids[4])
    pbref = numpy_ref.post_backward64(h["x"], h["f_out"], mids[3], mids[4], h["dx_next"])
    names = (("h_in", "h_post", "h_res", "inv_rms", "h_mix", "h_pre"),
             ("dx", "dphi", "dalpha", "dbias", "dgamma"), ("x_next",),
             ("dx", "df_out", "dh_post", "dh_res"))
    for group, gots, refs in zip(names, (out, grads, [x_next], post),
                                 (ref, bref, [pref], pbref)):
        assert len(gots) == len(refs) == len(group), (group, len(gots), len(refs))
        for name, got, r in zip(group, gots, refs):
            r = np.asarray(r, dtype=np.float64)
            err = relative_error(got.reshape(r.shape), r)
            bound = tolerance(name, dname)
            print(f"{name:8s} rel. error {err:.2e} (bound {bound:.0e})")
            assert err <= bound, f"{name}: rel. error {err:.3e} > {bound:.0e} (seed {seed})"


@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("B,S,n,D,dname,k", GUARD_CASES,
                         ids=[f"{c[4]}-n{c[2]}-D{c[3]}-T{c[0] * c[1]}-sk{c[5]}"
                              for c in GUARD_CASES])
def test_two_gpus_device_guard(B, S, n, D, dname, k):
    """With cuda:0 current, forward + backward + post on tensors on cuda:1 run on cuda:1
    (outputs there, kernels compiled there, cuda:0 still current afterwards), bitwise equal to
    the same calls on cuda:0 (when both GPUs are the same model), and within the contract's
    bounds of the float64 reference."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    host = _guard_inputs(B, S, n, D, dname, seed)
    prev = torch.cuda.current_device()
    torch.cuda.set_device(0)
    try:
        before = _compiled_on(1)
        on1 = _run_front_end(host, "cuda:1", k)
        assert torch.cuda.current_device() == 0, "the guard must restore the current device"
        res1 = on1[0] + on1[1] + [on1[2]] + on1[3]
        assert all(t.device == torch.device("cuda:1") for t in res1)
        after = _compiled_on(1)
        if before is not None:   # a new (n, D, dtype): new variants, compiled where they run
            assert sum(after) > sum(before), "nothing was compiled for cuda:1"
        on0 = _run_front_end(host, "cuda:0", k)
        res0 = on0[0] + on0[1] + [on0[2]] + on0[3]
        p0, p1 = (torch.cuda.get_device_properties(i) for i in (0, 1))
        if (p0.name, p0.multi_processor_count) == (p1.name, p1.multi_processor_count):
            # same model: same launch rule, same grids, same bits
            for i, (a, b) in enumerate(zip(res0, res1)):
                assert torch.equal(a, b.to("cuda:0")), f"output {i} differs between the GPUs"
    finally:
        torch.cuda.set_device(prev)
    _check_vs_float64(host, on1, k, dname, seed)
