"""Launch configuration: tiles, warps, stages and splits, by rule, and the launch grids.

Tuning is data: ``_make_config`` reads one table keyed on (x dtype, F_PAD class) with a clamp for
short rows (D <= 64); the rule never looks at T (no recompilation per batch size).  The T- and
device-dependent choices (the column kernel's token splits, the split forward's shares and L2
order, programs per SM) are small functions below; the grids built from them are in grids.py.
The bf16 pieces (a correctness choice) come from precision.py.  Measurements behind the values:
docs/performance.md (H200); design: docs/triton.md.
"""
from __future__ import annotations

import contextlib
import math

from ._util import _HAS_PDL, _cdiv, _f_pad, _interpret, _next_pow2, torch
from .precision import pieces

#: CUDA's grid limits: programs along axis 0, and along axes 1 and 2 (_checked).
_MAX_GRID0 = 2**31 - 1
_MAX_GRID12 = 65535

_CONFIG_OVERRIDES: dict = {}
_SM_COUNT: dict = {}
_CONFIG_CACHE: dict = {}   # (n, D, dtype name, device type) -> the launch rule's dict
_RESIDENT: dict = {}       # compiled kernel variant -> programs per multiprocessor (_resident)
_PLANS: dict = {}          # a launch's signature -> its grids and constexprs (_plan)
_MAX_PLANS = 1024

# ---------------------------------------------------------------------------------------------
# The launch rule.  Prefixes: fwd (fused forward), fwd_split (split forward, pass 1), hin (its
# h_in pass), sk (_sk_bwd_kernel), row / col (backward row and column kernels).

#: The interpreter (CPU tensors): small blocks keep it quick; the same for every shape.
_INTERP_CONFIG = dict(fwd_bt=16, fwd_bd=16, fwd_warps=4, row_bt=16, row_bd=32, row_warps=4,
                      col_bt=16, col_bd=16, col_warps=4, col_waves=2, row_waves=2,
                      fwd_split_bt=16, fwd_split_bd=16, fwd_split_warps=4, hin_bt=4,
                      hin_bd=32, sk_bt=16, sk_warps=4)

#: CUDA: the values every shape shares ...
_CUDA_COMMON = dict(fwd_bt=64, fwd_bd2=128, fwd_warps=4,
                    fwd_split_bt=64, fwd_split_few_bt=16, fwd_split_few_bd=32,
                    fwd_split_warps=4, fwd_split_stages=3,
                    hin_bt=8, hin_bd=512, hin_few_bt=1, hin_few_bd=1024, hin_few_sb=128,
                    sk_bt=64, sk_warps=4,
                    row_warps=8, row_stages=2, row_waves="auto", row_few_bt=1,
                    row_few_bd=2048,
                    col_warps=4, col_waves=4)

#: ... and those that differ by (x dtype, F_PAD): F_PAD 16 is n <= 3, 32 n = 4, 64 n = 5..7,
#: 128 n = 8.  n >= 5 takes smaller tiles to fit shared memory; 16-bit x at n <= 4 takes
#: 8-token row blocks (fewer registers: 4 programs per SM); bf16 x at n <= 4 [16 x 128] column
#: tiles whose splits fill waves of the programs that fit (col_occ "auto", _col_splits); fp32 x
#: 32-column D chunks in the forward.  None: the key is left out.
_CUDA_COLUMNS = ("fwd_bd", "fwd_stages", "fwd_split_bd", "row_bt", "row_bd",
                 "col_bt", "col_bd", "col_stages", "col_occ")
_CUDA_TABLE = {
    #                 fwd_bd fwd_st split_bd row_bt row_bd col_bt col_bd col_st col_occ
    ("bf16", 16):     (128,   3,     128,     8,     256,   16,    128,   3,     "auto"),
    ("bf16", 32):     (128,   4,     128,     8,     256,   16,    128,   3,     "auto"),
    ("bf16", 64):     (32,    2,     64,      16,    128,   64,    64,    2,     None),
    ("bf16", 128):    (32,    2,     64,      16,    128,   32,    64,    2,     None),
    ("fp16", 16):     (128,   3,     128,     8,     256,   32,    64,    3,     None),
    ("fp16", 32):     (128,   4,     128,     8,     256,   32,    64,    3,     None),
    ("fp16", 64):     (32,    2,     64,      16,    128,   64,    64,    2,     None),
    ("fp16", 128):    (32,    2,     64,      16,    128,   32,    64,    2,     None),
    ("fp32", 16):     (32,    3,     32,      16,    256,   16,    64,    3,     None),
    ("fp32", 32):     (32,    4,     32,      16,    256,   16,    64,    3,     None),
    ("fp32", 64):     (32,    2,     32,      16,    128,   32,    64,    2,     None),
    ("fp32", 128):    (32,    2,     32,      16,    128,   32,    64,    2,     None),
}
#: The column kernel's tiles (col_add_bt, col_add_bd) where it also adds another gradient of x
#: (dx_add: post's dx, in the step's backward), by (x dtype, F_PAD); elsewhere col_bt, col_bd.
#: At bf16 n = 4 a [32 x 64] tile beats [16 x 128] with dx_add (H100: 0.653 ms against 0.771 at
#: (4,4096,4,4096), 2.31 against 2.77 at (4,8192,4,7168)) and loses without it (0.524 against
#: 0.493), as it does at n <= 3 either way (docs/triton.md, "Splits and tiles").
_CUDA_COL_ADD = {("bf16", 32): (32, 64)}
#: Short rows (D <= 64): these D tiles are clamped to max(16, pow2(D)).
_D_CLAMPED = ("fwd_bd", "fwd_bd2", "col_bd", "col_add_bd", "row_bd")

#: Keys that set_config takes besides the rule's own: variants and switches (see set_config).
_SWITCHES = ("fwd_split", "fwd_prep", "fwd_pdl", "fwd_ilv", "hin_order", "hin_ev", "hin_sb",
             "sk_bwd", "col_splits", "col_fblocks", "fwd_fblocks", "w_pieces", "p_pieces",
             "few_res")
#: The post operator's keys, set with a ``post_`` prefix (_post_config).
_POST_KEYS = ("pf_bt", "pf_bd", "pf_stages", "pb_bt", "pb_bd", "pb_warps", "pb_stages", "warps")
VALID_KEYS = frozenset(_CUDA_COMMON) | frozenset(_CUDA_COLUMNS) | frozenset(_INTERP_CONFIG) \
    | frozenset(_SWITCHES) | frozenset("post_" + k for k in _POST_KEYS) \
    | frozenset(("col_add_bt", "col_add_bd"))


def _make_config(n: int, D: int, dtype_name: str, device) -> dict:
    """The launch rule's dict for rows of n streams of D, x of ``dtype_name``, on ``device``:
    the table's row, the short-row clamp, the bf16 pieces of the backward's products
    (precision.pieces), then the set_config overrides."""
    F_pad = _f_pad(n)
    if device.type != "cuda":
        cfg = dict(_INTERP_CONFIG)
    else:
        key = (dtype_name, min(F_pad, 128))
        cfg = dict(_CUDA_COMMON, **{k: v for k, v in zip(_CUDA_COLUMNS, _CUDA_TABLE[key])
                                    if v is not None})
        if key in _CUDA_COL_ADD:
            cfg["col_add_bt"], cfg["col_add_bd"] = _CUDA_COL_ADD[key]
        if D <= 64:
            p2 = max(16, _next_pow2(D))
            cfg.update({k: min(cfg[k], p2) for k in _D_CLAMPED if k in cfg})
    _, cfg["w_pieces"], cfg["p_pieces"] = pieces(dtype_name, n, D)
    cfg.update(_CONFIG_OVERRIDES)
    return cfg


def _col_cfg(cfg: dict, has_add: bool) -> dict:
    """``cfg`` for a column kernel that adds dx_add (``has_add``): its tiles col_bt, col_bd are
    then ``col_add_bt``, ``col_add_bd`` where the rule has those (_CUDA_COL_ADD)."""
    if has_add and "col_add_bt" in cfg:
        return dict(cfg, col_bt=cfg["col_add_bt"], col_bd=cfg.get("col_add_bd", cfg["col_bd"]))
    return cfg


def _config(n: int, D: int, dtype_name: str, device) -> dict:
    """_make_config, cached (read-only; set_config clears the cache)."""
    key = (n, D, dtype_name, device.type)
    cfg = _CONFIG_CACHE.get(key)
    if cfg is None:
        cfg = _CONFIG_CACHE[key] = _make_config(n, D, dtype_name, device)
    return cfg


def _plan(key: tuple, build):
    """The launch plan of ``key`` (a wrapper's signature: its op, T, n, D, dtypes, device and
    flags), built by ``build()`` on first use: grids and constexprs are pure values of the
    rule, so a call with a seen signature only allocates and launches.  set_config clears it."""
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def _post_config(n: int, D: int, device, fp32: bool = False) -> dict:
    """Post kernels' blocks.  Forward: a [BLOCK_T, pow2(n), BLOCK_D] tile of 4096 elements
    (8192 at n > 4) per program, BLOCK_D 512 (1024 at n > 4), and where D is shorter, more
    tokens.  The 3-D tiles have a cliff: at n > 4 a [1, 8, 512] tile, or 8 warps, ran 6-48x
    slower (docs/triton.md, "The post operator").  Backward: BLOCK_T * pow2(n) = 16 rows per dot
    (the tensor cores' minimum), D in chunks of 256 (512 at n > 4) for 16-bit x; smaller
    chunks, or 8 warps, are several times slower.  fp32 x splits both dot operands into 3
    pieces, in chunks of 128 (correct, not tuned)."""
    npad = _next_pow2(n)
    p2 = max(16, _next_pow2(D))
    if device.type != "cuda":
        cfg = dict(pf_bt=4, pf_bd=32, pb_bt=max(1, 16 // npad), pb_bd=32, warps=4, pb_warps=4)
    else:
        wide = npad > 4
        pf_bd = min(1024 if wide else 512, p2)
        cfg = dict(pf_bt=max(1, (8192 if wide else 4096) // (npad * pf_bd)), pf_bd=pf_bd,
                   warps=4, pf_stages=2, pb_bt=max(1, 16 // npad),
                   pb_bd=128 if fp32 else (512 if wide else 256), pb_warps=4, pb_stages=3)
    cfg.update(pf_bd=min(cfg["pf_bd"], p2), pb_bd=min(cfg["pb_bd"], p2))
    cfg.update({k[5:]: v for k, v in _CONFIG_OVERRIDES.items() if k.startswith("post_")})
    return cfg


def set_config(**kw) -> None:
    """Override launch parameters (for tuning: bench/gpu_quick.py --variants times them,
    bench/gpu_suite.py --config checks one); no arguments restore the rules.  Each call
    replaces all earlier overrides; an unknown key raises ValueError (VALID_KEYS lists them).

    The rule's keys: ``<prefix>_bt``, ``_bd``, ``_warps``, ``_stages`` for the prefixes fwd,
    fwd_split, hin, sk, row, col (and fwd_bd2), ``col_waves``; ``row_waves`` and ``col_occ``
    take "auto" (programs per SM as many as fit, from the compiled kernel, _resident) or a
    number; ``w_pieces`` / ``p_pieces`` the bf16 pieces (A, B) of the backward's two products
    (precision.py); ``few_res`` the h_res entries (T*n*n) below which the forward takes
    fp32-class m (_common.FEW_RES; 0: never); ``col_fblocks=False`` / ``fwd_fblocks=False``
    keep the column kernel's / the split forward's gate columns in one block (_f_blocks);
    ``col_splits`` fixes the column kernel's token splits.  The post operator's keys take a
    ``post_`` prefix (_post_config).

    Variants: ``fwd_split`` ("auto": the rule in _fwd_splits; 0: the fused forward; S >= 1,
    or -1 for ~4 programs per SM: the split forward), with ``fwd_ilv``, ``hin_order`` ("rev",
    "dlast", "plain") and ``hin_ev`` (_l2_reuse); ``sk_bwd`` ("auto", "sep": d(logits) by
    _sk_bwd_kernel before the row kernel; "fused": inside the row kernel; _sk_bwd_mode)."""
    unknown = sorted(set(kw) - VALID_KEYS)
    if unknown:
        raise ValueError(f"set_config: unknown key {', '.join(map(repr, unknown))}; "
                         f"valid keys: {', '.join(sorted(VALID_KEYS))}")
    _CONFIG_OVERRIDES.clear()
    _CONFIG_OVERRIDES.update(kw)
    _CONFIG_CACHE.clear()
    _RESIDENT.clear()
    _PLANS.clear()


@contextlib.contextmanager
def config_override(**kw):
    """``with config_override(col_splits=3): ...``: the current overrides plus ``kw`` inside
    the block, the previous overrides restored after it (also on an exception)."""
    prev = dict(_CONFIG_OVERRIDES)
    set_config(**{**prev, **kw})
    try:
        yield
    finally:
        set_config(**prev)


# ---------------------------------------------------------------------------------------------
# Device counts and T-dependent choices

def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _fit_per_sm(n_regs: int, warps: int, shared: int, regs_sm: int = 65536,
                threads_sm: int = 2048, smem_sm: int = 233472) -> int:
    """Blocks of ``warps`` warps, ``n_regs`` registers per thread and ``shared`` bytes of shared
    memory that one multiprocessor holds at once (the CUDA occupancy rules of sm_80/sm_90:
    registers allocated per warp in units of 256, 1 KB of shared memory reserved per block,
    at most 32 blocks)."""
    regs_warp = _cdiv(max(n_regs, 1) * 32, 256) * 256
    return max(1, min((regs_sm // regs_warp) // warps, smem_sm // (shared + 1024),
                      threads_sm // (32 * warps), 32))


def _resident(kernel, key, device, args, kwargs):
    """Programs of ``kernel`` (launched with ``args``, ``kwargs``) that fit on one
    multiprocessor at once, from its compiled binary and the device's limits; None where
    unknown (the interpreter, or a Triton whose internals differ).  Persistent grids are sized
    by it: at one program more than fits, the last wave runs alone.

    The kernel is compiled here, before its first launch, so the grid and with it the split of
    the sums (hence the bits) is the same from the first call on.  Cached under ``key``, which
    must name the compiled variant (with the launch rule, cleared by set_config, it is a
    function of a few shape and dtype values; cheap to hash on every call)."""
    if device.type != "cuda":
        return None
    if key not in _RESIDENT:
        try:
            ck = kernel.warmup(*args, grid=(1,), **kwargs)
            ck._init_handles()
            p = torch.cuda.get_device_properties(device)
            _RESIDENT[key] = _fit_per_sm(
                ck.n_regs, ck.metadata.num_warps, ck.metadata.shared,
                getattr(p, "regs_per_multiprocessor", 65536),
                getattr(p, "max_threads_per_multi_processor", 2048),
                getattr(p, "shared_memory_per_multiprocessor", 233472))
        except Exception:   # noqa: BLE001 -- the rule's fixed value is used instead
            _RESIDENT[key] = None
    return _RESIDENT[key]


def _col_splits(cfg, programs: int, nblk: int, sms: int, occ: int | None = None) -> int:
    """Token splits of the column kernel, whose grid is (n, D chunks, splits): every program
    walks its split's tokens, so all run equally long and a partly filled last wave of programs
    is time lost.  With ``occ`` (programs resident per multiprocessor: the compiled kernel's,
    from _resident, or ``col_occ`` when that is a number) the rule takes the fewest splits >= 2
    whose waves are >= 90 % full, else the fullest, at most 16 (fewer leave the GPU half idle
    at n = 1, where a split has D/128 programs); without it, ~col_waves programs per
    multiprocessor.  Depends only on (n, D, T, SMs) and the compiled kernel: the split of the
    dphi sums, hence the bits, is fixed per shape."""
    if cfg.get("col_splits"):
        return max(1, min(nblk, int(cfg["col_splits"]), _MAX_GRID12))
    if occ is None and cfg.get("col_occ") != "auto":
        occ = cfg.get("col_occ")
    if not occ:
        return max(1, min(nblk, _cdiv(sms * cfg["col_waves"], programs), _MAX_GRID12))
    slots = sms * occ
    best, best_fill = 1, 0.0
    for s in range(min(2, nblk), min(16, nblk) + 1):
        waves = s * programs / slots
        fill = waves / math.ceil(waves)
        if fill >= 0.9:
            return s
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def _fwd_splits(cfg, T, D, device, F_pad, dname, sms: int | None = None) -> int:
    """0: the fused one-kernel forward; S >= 1: the split forward with S D-shares per token
    block (a runtime value of both kernels: no recompilation as it follows T).

    Rule ("auto", the default), on CUDA (measured on the H200, docs/performance.md):
    * n <= 4 (F_PAD <= 32), 16-bit x, T >= 2048: S = 4 up to SMs/2 token blocks of 64, S = 2
      below 1.5 SMs, else S = 1 (the split's h_in pass, last token blocks first, finds part of
      x in L2).
    * n <= 4, 16-bit x, T < 2048: S for ~4 programs per multiprocessor (-1 below), split-K
      over the row (the fused kernel would have T/64 programs: at T = 1 one program reduces
      the whole nD row).
    * 16-bit x at n >= 5 (F_PAD >= 64), and fp32 x, at every T: the same.  The fused kernel
      re-reads the [F_PAD, BLOCK_D] phi*g tiles, 2-4x its x tile, per token block and has only
      T/64 programs.
    The fused kernel runs where asked for (fwd_split=0), and in the interpreter.
    -1: S = ceil(4 SMs / token blocks), at most one share per D chunk (of _split_bd: 32
    columns at few tokens, so up to D/32 shares) and at most 65535 (the grid's axis 1).
    ``sms``: the device's multiprocessors (default: asked of ``device``)."""
    S = cfg.get("fwd_split", "auto")
    if S == "auto":
        S = 0
        if device.type == "cuda" and (dname == "fp32" or F_pad > 32 or T < 2048):
            S = -1
        elif device.type == "cuda":
            nblk, sms = _cdiv(T, cfg["fwd_bt"]), sms or _sm_count(device)
            S = 4 if 2 * nblk <= sms else (2 if 2 * nblk < 3 * sms else 1)
    S = int(S)
    if S == 0:
        return 0
    nch = _cdiv(D, _split_bd(cfg, T))
    if S < 0:
        S = _cdiv(4 * (sms or _sm_count(device)), _cdiv(T, _split_bt(cfg, T)))
    return max(1, min(S, nch, _MAX_GRID12))


def _fwd_prep(cfg, T: int) -> bool:
    """Whether the split forward's pass 1 makes phi*g's bf16 pieces itself (from phi and g, as
    _prep_phi_kernel would: the same bits) instead of reading them from a _prep_phi launch.
    "auto": when pass 1 has one token block (T <= _split_bt), which then reads phi once
    either way, so the launch and its [pieces, F_PAD, nD] buffer are saved; with more token
    blocks each would make the pieces again.  set_config(fwd_prep=True | False) forces it."""
    mode = cfg.get("fwd_prep", "auto")
    return T <= _split_bt(cfg, T) if mode == "auto" else bool(mode)


def _split_bt(cfg, T: int) -> int:
    """The split forward's pass-1 token block: ``fwd_split_bt``, or where the rule has
    ``fwd_split_few_bt`` (CUDA) and T is smaller, the power of two >= T, at least
    fwd_split_few_bt (16: the dots' smallest M).  A 64-token block at T = 1 computes 63
    masked rows; 16 took 0.8-1.3 us off the forward's 16-18 at T = 1 and 8 on the H100."""
    bt = cfg["fwd_split_bt"]
    few = cfg.get("fwd_split_few_bt")
    return min(bt, max(few, _next_pow2(T))) if few else bt


def _few_tiles(cfg, T: int) -> bool:
    """Whether the split forward takes its few-token tiles: where the rule has them (CUDA:
    ``fwd_split_few_bd``, ``hin_few_bt``, ``hin_few_bd``, ``hin_few_sb``) and T fits one
    pass-1 token block (T <= fwd_split_bt).  Then pass 1 walks 32-column D chunks (4x the
    shares of 128-column ones: each program one short step over the row) and the fin kernel
    takes one token per program in D chunks of 1024, summing its S partials as one tile: on
    the H100 at n = 4, D = 4096, 11.6 against 14.6 us at T = 1, 11.2 against 16.0 at T = 8,
    12.7 against 16.0 at T = 64 (at T = 256, 20.6 against 19.6: the rule's tiles)."""
    return "hin_few_bt" in cfg and T <= cfg["fwd_split_bt"]


def _split_bd(cfg, T: int) -> int:
    """The split forward's pass-1 D chunk: ``fwd_split_few_bd`` at few tokens (_few_tiles),
    else ``fwd_split_bd``."""
    return cfg["fwd_split_few_bd"] if _few_tiles(cfg, T) else cfg["fwd_split_bd"]


def _hin_tiles(cfg, T: int) -> tuple[int, int, int]:
    """The fin kernel's (BLOCK_T, BLOCK_D before the short-row clamp, shares summed per step:
    0 one at a time): ``hin_few_*`` at few tokens (_few_tiles), else ``hin_bt``, ``hin_bd``
    and ``hin_sb`` (0 unless set).  ``hin_sb``, where set, holds at every T."""
    if _few_tiles(cfg, T):
        return cfg["hin_few_bt"], cfg["hin_few_bd"], cfg.get("hin_sb") or cfg["hin_few_sb"]
    return cfg["hin_bt"], cfg["hin_bd"], cfg.get("hin_sb") or 0


def _fwd_pdl(cfg, device) -> str:
    """Whether the split forward's h_in pass starts before pass 1 has finished (programmatic
    dependent launch, sm_90 on): "" no; "end": pass 1's programs let it launch once their
    loads are done, its programs wait (griddepcontrol) before they read pass 1's partials;
    "start": pass 1's programs let it launch as they start.  The h_in pass's launch then
    overlaps pass 1 instead of following it.  "auto": "end" on CUDA devices of compute
    capability 9.0 and up, where this Triton has the instructions.  set_config(fwd_pdl=)
    forces it on CUDA ("" / "end" / "start"); the interpreter has no such launch."""
    mode = cfg.get("fwd_pdl", "auto")
    if device.type != "cuda" or not _HAS_PDL:
        return ""
    if mode != "auto":
        return mode or ""
    return "end" if torch.cuda.get_device_capability(device)[0] >= 9 else ""


def _row_tiles(cfg, T: int, D: int, sms: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) of the backward's row kernel.  With fewer token blocks than
    multiprocessors (T < row_bt * SMs) the row_bt-token blocks leave most of the GPU idle
    and each program walks its row in many short steps, so where the rule has ``row_few_bt``
    (CUDA) the kernel takes blocks of row_few_bt tokens and D chunks of up to row_few_bd: one
    program per token, a few wide steps over its row."""
    bt, bd = cfg["row_bt"], cfg["row_bd"]
    if "row_few_bt" in cfg and _cdiv(T, bt) < sms:
        bt, bd = cfg["row_few_bt"], min(cfg["row_few_bd"], max(16, _next_pow2(D)))
    return bt, bd


def _l2_reuse(cfg, S: int, F_pad: int, device) -> tuple[bool, str, str]:
    """How the split forward's two passes share the L2: (ILV, the h_in pass's order of D
    chunks, its eviction policy for x).

    Rule, on CUDA at S >= 4 shares (short T: x at most a few times the L2) and F_PAD <= 64
    (n <= 6): pass 1's shares interleaved (share s takes D chunks s, s + S, ...: all programs
    move through D together, so the last D chunks are the last read), then the h_in pass in D
    chunks last first ("dlast"), its x loads evict_first (read for the last time: keep what is
    still to come).  Where that loses (n = 8, or S < 4): contiguous shares, token blocks last
    first ("rev": what pass 1 read last is still in L2), no hint.  Measured on the H200
    (docs/performance.md).  Overrides: set_config(fwd_ilv=, hin_order="rev" | "dlast" |
    "plain", hin_ev=)."""
    on = device.type == "cuda" and S >= 4 and F_pad <= 64
    return (bool(cfg.get("fwd_ilv", on)), cfg.get("hin_order", "dlast" if on else "rev"),
            cfg.get("hin_ev", "evict_first" if on else ""))


def _sk_bwd_mode(cfg, T: int, sms: int, cuda: bool) -> str:
    """Where the Sinkhorn backward runs: "sep" (_sk_bwd_kernel) or "fused" (the row kernel).
    "auto": "sep" on CUDA from T = 48 * SMs on (measured on the H200, docs/performance.md)."""
    mode = cfg.get("sk_bwd", "auto")
    if mode == "auto":
        mode = "sep" if cuda and T >= 48 * sms else "fused"
    return mode


def _f_blocks(F: int, F_pad: int) -> tuple[int, int]:
    """The gate-column blocks (FA, FB) of the column kernel and the split forward's pass 1:
    (F_PAD, 0) for one block; else the largest power of two <= F and the power of two >= 16
    that covers the rest, so that the dots multiply fewer zero rows: n = 8 (F = 80) takes
    64 + 16 columns of 128 (bitwise the same m).  Only from 64 on: at n = 5, 6 (32 + 16 of
    64) two blocks take more registers and are slower."""
    fa = 1 << (F.bit_length() - 1)
    fb = max(16, _next_pow2(F - fa))
    if fa == F or fa < 64 or fa + fb >= F_pad:
        return F_pad, 0
    return fa, fb


def _cat(npa: int, npb: int, F_pad: int) -> bool:
    """Both phi*g pieces in one dot (_fwd_step): bf16 x (one x piece, two phi*g pieces) and
    F_PAD <= 32.  At F_PAD = 128 (n = 8) the [BLOCK_T, 256] accumulator spills, so wider F
    keeps two dots."""
    return npa == 1 and npb == 2 and F_pad <= 32


def _launch_kw(cfg, prefix):
    """num_warps (and, on a GPU, num_stages) of the kernels configured under ``prefix``."""
    kw = {"num_warps": cfg[prefix + "_warps"]}
    if not _interpret():
        kw["num_stages"] = cfg.get(prefix + "_stages", 2)
    return kw
