"""The post operator on the CPU: x_next = h_res @ x + h_post * f_out per token, and its
backward. Math: ``docs/contract.md``, "The post operator"; design: ``docs/numba.md``.

Tokens are independent (no cross-token sums): prange runs over fixed chunks of tokens, and each
token is walked in column tiles of PT; a tile of x / dx_next / f_out is decoded once into
per-thread fp32 (fp64) scratch in L1 and every output of the tile is computed from it.
"""
from __future__ import annotations

import numpy as np

from .._common import FEW_POST, empty
from ._kernels import LOCK, PT, chunking, compute_dtype, numba, storage

if numba is not None:
    from numba import njit, prange

    from ._kernels import FASTMATH, _ld, _st

    @njit(cache=True, fastmath=FASTMATH, nogil=True)
    def _store_tile(out, t, ku0, acc, Lu):
        """out[t, ku0 : ku0 + Lu] = acc[:Lu], rounded once to out's encoding (one call site per
        encoding keeps the 16-bit encoders inlined once: smaller kernels, faster compiles)."""
        for k in range(Lu):
            _st(out, t, ku0 + k, acc[k])

    # x_next[i, :] = sum_j h_res[i, j] * x[j, :] + h_post[i] * f_out, rounded once.
    # Arguments: x [T, nD], f [T, D] (storage kind), hp [T, n], hr [T, n*n] compute dtype;
    # output out [T, nD] (x's storage kind).

    @njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
    def _post_fwd_kernel(x, f, hp, hr, n, D, csize, out):
        T = x.shape[0]
        nchunks = (T + csize - 1) // csize
        Du = np.uint64(D)
        for c in prange(nchunks):
            t0 = c * csize
            t1 = min(T, t0 + csize)
            xt = np.empty((n, PT), hp.dtype)
            ft = np.empty(PT, hp.dtype)
            acc = np.empty(PT, hp.dtype)
            for t in range(t0, t1):
                for d0 in range(0, D, PT):
                    Lu = np.uint64(min(PT, D - d0))
                    du0 = np.uint64(d0)
                    for k in range(Lu):
                        ft[k] = _ld(f, t, du0 + k)
                    for j in range(n):
                        ku0 = np.uint64(j) * Du + du0
                        for k in range(Lu):
                            xt[j, k] = _ld(x, t, ku0 + k)
                    for i in range(n):
                        a = hp[t, i]
                        for k in range(Lu):
                            acc[k] = a * ft[k]
                        for j in range(n):
                            b = hr[t, i * n + j]
                            for k in range(Lu):
                                acc[k] += b * xt[j, k]
                        _store_tile(out, t, np.uint64(i) * Du + du0, acc, Lu)

    # g = dx_next:  dx[j] = sum_i h_res[i, j] * g[i];  df_out = sum_i h_post[i] * g[i]
    # (both rounded once);  dh_post[i] = dot(g[i], f_out);  dh_res[i, j] = dot(g[i], x[j])
    # (a tile's dot in the compute dtype, summed over tiles in fp64).
    # Arguments: x, g [T, nD], f [T, D] (storage kind), hp [T, n], hr [T, n*n] compute dtype,
    # zero = 0 in the compute dtype; outputs dx [T, nD], df [T, D] (storage kind), dhp [T, n],
    # dhr [T, n*n] (h_post's dtype).

    @njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
    def _post_bwd_kernel(x, f, hp, hr, g, n, D, csize, zero, dx, df, dhp, dhr):
        T = x.shape[0]
        nchunks = (T + csize - 1) // csize
        Du = np.uint64(D)
        for c in prange(nchunks):
            t0 = c * csize
            t1 = min(T, t0 + csize)
            xt = np.empty((n, PT), hp.dtype)
            gt = np.empty((n, PT), hp.dtype)
            ft = np.empty(PT, hp.dtype)
            acc = np.empty(PT, hp.dtype)
            sp = np.empty(n, np.float64)
            sr = np.empty(n * n, np.float64)
            for t in range(t0, t1):
                sp[:] = 0.0
                sr[:] = 0.0
                for d0 in range(0, D, PT):
                    Lu = np.uint64(min(PT, D - d0))
                    du0 = np.uint64(d0)
                    for k in range(Lu):
                        ft[k] = _ld(f, t, du0 + k)
                    for j in range(n):
                        ku0 = np.uint64(j) * Du + du0
                        for k in range(Lu):
                            xt[j, k] = _ld(x, t, ku0 + k)
                            gt[j, k] = _ld(g, t, ku0 + k)
                    # df_out = sum_i h_post[i] dx_next[i]
                    a = hp[t, 0]
                    for k in range(Lu):
                        acc[k] = a * gt[0, k]
                    for i in range(1, n):
                        a = hp[t, i]
                        for k in range(Lu):
                            acc[k] += a * gt[i, k]
                    _store_tile(df, t, du0, acc, Lu)
                    # dx[j] = sum_i h_res[i, j] dx_next[i]
                    for j in range(n):
                        a = hr[t, j]
                        for k in range(Lu):
                            acc[k] = a * gt[0, k]
                        for i in range(1, n):
                            a = hr[t, i * n + j]
                            for k in range(Lu):
                                acc[k] += a * gt[i, k]
                        _store_tile(dx, t, np.uint64(j) * Du + du0, acc, Lu)
                    # dh_post[i] = <dx_next[i], f>, dh_res[i, j] = <dx_next[i], x[j]>: a tile's
                    # dot in the compute dtype, summed over tiles in fp64
                    for i in range(n):
                        s = zero
                        for k in range(Lu):
                            s += gt[i, k] * ft[k]
                        sp[i] += s
                        for j in range(n):
                            s = zero
                            for k in range(Lu):
                                s += gt[i, k] * xt[j, k]
                            sr[i * n + j] += s
                for i in range(n):
                    dhp[t, i] = sp[i]
                for q in range(n * n):
                    dhr[t, q] = sr[q]


def _post_dtype(x, h_post):
    """The post kernels' compute dtype: float64 for a few elements (_common.FEW_POST)."""
    T, n, D = x.shape
    return np.float64 if T * n * D <= FEW_POST else compute_dtype(x.dtype, h_post.dtype)


def post_forward(x, f_out, h_post, h_res):
    """x_next [T,n,D] (x's encoding) = h_res @ x + h_post * f_out, per token."""
    T, n, D = x.shape
    cd = _post_dtype(x, h_post)
    x_next = empty((T, n, D), x.dtype)
    if T == 0:
        return x_next
    csize, _ = chunking(T)
    hp = np.ascontiguousarray(h_post, dtype=cd)
    hr = np.ascontiguousarray(h_res, dtype=cd).reshape(T, n * n)
    with LOCK:
        _post_fwd_kernel(storage(x).reshape(T, n * D), storage(f_out), hp, hr, n, D, csize,
                         storage(x_next).reshape(T, n * D))
    return x_next


def post_backward(x, f_out, h_post, h_res, dx_next):
    """(dx [T,n,D], df_out [T,D] in x's encoding; dh_post [T,n], dh_res [T,n,n] in h_post's)"""
    T, n, D = x.shape
    pd = h_post.dtype
    cd = _post_dtype(x, h_post)
    dx = empty((T, n, D), x.dtype)
    df_out = empty((T, D), x.dtype)
    dh_post = empty((T, n), pd)
    dh_res = empty((T, n, n), pd)
    if T == 0:
        return dx, df_out, dh_post, dh_res
    csize, _ = chunking(T)
    hp = np.ascontiguousarray(h_post, dtype=cd)
    hr = np.ascontiguousarray(h_res, dtype=cd).reshape(T, n * n)
    with LOCK:
        _post_bwd_kernel(storage(x).reshape(T, n * D), storage(f_out), hp, hr,
                         storage(dx_next).reshape(T, n * D), n, D, csize, cd(0),
                         storage(dx).reshape(T, n * D), storage(df_out), dh_post,
                         dh_res.reshape(T, n * n))
    return dx, df_out, dh_post, dh_res
