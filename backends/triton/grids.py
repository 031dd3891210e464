"""Launch grids: pure functions of ints (T, n, D), the launch rule's dict and the device's
counts (multiprocessors, resident programs), which the launchers call and tests/test_grids.py
checks without a GPU.

CUDA runs at most 2^31 - 1 programs along grid axis 0 and 65535 along axes 1 and 2, so the token
blocks, the one count that grows with T, are always on axis 0, and the D chunks go there with
them (the kernel unfolds its program id so that the programs run in the order a 2-D grid, axis 0
fastest, gave them: same work per program, same bits).  Axes 1 and 2 hold only counts bounded
apart from T: the split forward's shares S and the column kernel's token splits (each clamped
to 65535), phi's padded gate rows (<= 128), and the column kernel's D chunks (folded onto axis
0 with the streams past 65535, _col_fold).
"""
from __future__ import annotations

from ._util import _cdiv, _next_pow2
from .config import _MAX_GRID0, _MAX_GRID12, _col_splits, _hin_tiles, _split_bt


def _checked(grid: tuple) -> tuple:
    """``grid``, asserted inside CUDA's limits (a few comparisons: it runs per launch)."""
    assert (0 < grid[0] <= _MAX_GRID0 and (len(grid) < 2 or 0 < grid[1] <= _MAX_GRID12)
            and (len(grid) < 3 or 0 < grid[2] <= _MAX_GRID12)), \
        f"launch grid {grid} outside CUDA's limits"
    return grid


def _prep_phi_grid(ND: int, F_pad: int, cuda: bool) -> tuple[tuple, int]:
    """(grid (phi column chunks, F_PAD rows), BLOCK) of _prep_phi_kernel."""
    block = 1024 if cuda else 256
    return _checked((_cdiv(ND, block), F_pad)), block


def _fwd_grid(T: int, cfg) -> tuple:
    """The fused forward's grid: one program per token block."""
    return _checked((_cdiv(T, cfg["fwd_bt"]),))


def _split_grids(T: int, D: int, S: int, cfg) -> tuple[tuple, tuple, int, int]:
    """The split forward's grids and h_in blocks: (pass 1's grid (token blocks of
    config._split_bt, S shares),
    the h_in pass's (token blocks * D chunks,), its BLOCK_T, its BLOCK_D (config._hin_tiles)).
    The h_in pass has one grid axis in every ORDER; the kernel unfolds the program id
    (_pre_fwd_fin_kernel)."""
    hbt, hbd, _ = _hin_tiles(cfg, T)
    hbd = min(hbd, max(16, _next_pow2(D)))
    return (_checked((_cdiv(T, _split_bt(cfg, T)), S)),
            _checked((_cdiv(T, hbt) * _cdiv(D, hbd),)), hbt, hbd)


def _sk_grid(T: int, cfg) -> tuple:
    """_sk_bwd_kernel's grid: one program per token block."""
    return _checked((_cdiv(T, cfg["sk_bt"]),))


def _row_grid(T: int, bt: int, cfg, sms: int, resident: int | None = None) -> tuple:
    """The persistent row kernel's grid for token blocks of ``bt`` (config._row_tiles): one
    program per slot (``row_waves`` per SM; "auto": ``resident``, the compiled kernel's
    programs per SM from _resident, else 4), at most one per token block.  Each program walks
    the blocks pid, pid + programs, ..."""
    waves = cfg["row_waves"]
    if waves == "auto":
        waves = resident or 4
    return _checked((max(1, min(_cdiv(T, bt), sms * waves)),))


def _col_fold(D: int, cfg) -> bool:
    """The column kernel's streams and D chunks on one grid axis (the kernel applies the same
    rule to its constexprs D, BLOCK_D): only past 65535 D chunks (D > 4M at 64 columns), as
    the 3-D grid (n, D chunks, splits) runs slightly faster on the H200."""
    return _cdiv(D, cfg["col_bd"]) > _MAX_GRID12


def _col_grid(T: int, n: int, D: int, cfg, sms: int, resident: int | None = None
              ) -> tuple[tuple, int]:
    """(grid (n, D chunks, token splits) or, with _col_fold, (n * D chunks, token splits);
    tokens per split) of the column kernel: the splits by _col_splits (``col_occ`` "auto":
    ``resident`` programs per SM, else 4), each a whole number of token blocks, none empty."""
    bt = cfg["col_bt"]
    nch = _cdiv(D, cfg["col_bd"])
    nblk = _cdiv(T, bt)
    occ = cfg.get("col_occ")
    if occ == "auto":
        occ = resident or 4
    tok = _cdiv(nblk, _col_splits(cfg, n * nch, nblk, sms, occ)) * bt
    splits = _cdiv(T, tok)
    return _checked((n * nch, splits) if _col_fold(D, cfg) else (n, nch, splits)), tok


def _reduce_grid(ND: int, F: int, F_pad: int, cuda: bool) -> tuple[tuple, int]:
    """(grid, BLOCK) of _reduce_partials_kernel: ND / BLOCK column programs, at least F + 3
    (one per row of the row kernel's partials)."""
    block = max(16, min(64, 2048 // F_pad)) if cuda else 64
    return _checked((max(_cdiv(ND, block), F + 3),)), block


def _post_fwd_grid(T: int, D: int, cfg) -> tuple:
    """_post_fwd_kernel's grid: token blocks * D chunks on one axis, token blocks fastest."""
    return _checked((_cdiv(T, cfg["pf_bt"]) * _cdiv(D, cfg["pf_bd"]),))


def _post_bwd_grid(T: int, n: int, cfg) -> tuple[tuple, int]:
    """(grid, BLOCK_T) of _post_bwd_kernel: token blocks of >= 16 rows (token, stream) per
    dot."""
    bt = max(cfg["pb_bt"], 16 // _next_pow2(n))
    return _checked((_cdiv(T, bt),)), bt
