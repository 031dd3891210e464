"""Sinkhorn-Knopp on one token's n x n logits, and its exact backward (fp64, row-major, in
local arrays); called per token by the pre operator's kernels. Math: ``docs/contract.md``,
"Sinkhorn-Knopp projection"; design: ``docs/numba.md``.
"""
from __future__ import annotations

import numpy as np

from ._kernels import numba

if numba is not None:
    from numba import njit

    # SK_k(L): P0 = exp(L - max L); then k times: rows /= row sums, columns /= column sums.

    @njit(cache=True, nogil=True)
    def _sk_forward(p, n, k):
        """p <- SK_k(p): exp(p - max), then k times rows / row sums, columns / column sums
        (fp64; one reciprocal per row / column, then multiplies)."""
        nn = n * n
        mx = p[0]
        for q in range(1, nn):
            mx = max(mx, p[q])
        for q in range(nn):
            p[q] = np.exp(p[q] - mx)
        for _ in range(k):
            for i in range(n):
                s = 0.0
                for j in range(n):
                    s += p[i * n + j]
                inv = 1.0 / s
                for j in range(n):
                    p[i * n + j] *= inv
            for j in range(n):
                s = 0.0
                for i in range(n):
                    s += p[i * n + j]
                inv = 1.0 / s
                for i in range(n):
                    p[i * n + j] *= inv

    @njit(cache=True, nogil=True)
    def _sk_vjp(lg, dp, n, k, p0, su, sv, srs, scs):
        """dp <- d(logits) from dp = d(SK_k(logits)), exactly through the k iterations.

        Every step of SK scales rows or columns, so after any step the matrix is
        ``P0[i,j] * u[i] * v[j]``: the replay keeps only the k x n scalings ``su`` (rows, after
        the row step of each iteration), ``sv`` (columns, after the column step) and the sums
        ``srs``/``scs`` that were divided by. Then, in reverse, with Q the step's output and
        s its sums: ``dp <- (dp - sum_axis(dp * Q)) / s``; finally ``dp * P0`` (through exp;
        the max shift has zero gradient).
        """
        nn = n * n
        mx = lg[0]
        for q in range(1, nn):
            mx = max(mx, lg[q])
        for q in range(nn):
            p0[q] = np.exp(lg[q] - mx)
        for it in range(k):
            for i in range(n):
                uo = su[it - 1, i] if it > 0 else 1.0
                s = 0.0
                for j in range(n):
                    vo = sv[it - 1, j] if it > 0 else 1.0
                    s += p0[i * n + j] * uo * vo
                srs[it, i] = s
                su[it, i] = uo / s
            for j in range(n):
                vo = sv[it - 1, j] if it > 0 else 1.0
                s = 0.0
                for i in range(n):
                    s += p0[i * n + j] * su[it, i] * vo
                scs[it, j] = s
                sv[it, j] = vo / s
        for it in range(k - 1, -1, -1):
            for j in range(n):  # column step: Q = P0 * su[it] * sv[it]
                vj = sv[it, j]
                a = 0.0
                for i in range(n):
                    a += dp[i * n + j] * (p0[i * n + j] * su[it, i] * vj)
                inv = 1.0 / scs[it, j]
                for i in range(n):
                    dp[i * n + j] = (dp[i * n + j] - a) * inv
            for i in range(n):  # row step: Q = P0 * su[it] * sv[it - 1]
                ui = su[it, i]
                a = 0.0
                for j in range(n):
                    vo = sv[it - 1, j] if it > 0 else 1.0
                    a += dp[i * n + j] * (p0[i * n + j] * ui * vo)
                inv = 1.0 / srs[it, i]
                for j in range(n):
                    dp[i * n + j] = (dp[i * n + j] - a) * inv
        for q in range(nn):
            dp[q] *= p0[q]
