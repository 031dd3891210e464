"""Mutation tests of the checker: the three bugs of seed/BUGFIX_LOG.md, planted in a copy of
the reference backend, must each be flagged by ``crosscheck`` (and the clean copy must pass)."""
import types

import numpy as np
import pytest

from mhc_multi import crosscheck, random_inputs, registry
from mhc_multi.backends import numpy_ref

pytest.importorskip("torch")


def _planted_backward(bug):
    """numpy_ref.backward with one seed bug planted."""

    def backward(x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res,
                 gamma, **kw):
        dx, dphi, dalpha, dbias, dgamma = numpy_ref.backward64(
            x, phi, alpha, bias, inv_rms, h_mix, h_pre, h_post, dh_in, dh_post, dh_res, gamma, **kw)
        T, n, D = x.shape
        if bug == "dbias_res_doubled":     # Bug 1: each program accumulated dbias_res twice
            dbias[2 * n:] *= 2
        elif bug == "res_missing_inv_rms":  # Bug 2: dm_res without the inv_rms factor in w
            v = numpy_ref._to64(x).reshape(T, n * D)
            g = np.ones(n * D) if gamma is None else numpy_ref._to64(gamma).reshape(n * D)
            r = numpy_ref._to64(inv_rms)
            e_res = numpy_ref._to64(alpha)[2] * numpy_ref._to64(dh_res).reshape(T, n * n)
            extra = ((1 - r)[:, None] * e_res) @ numpy_ref._to64(phi)[2 * n:]  # e_res - r e_res
            dx = dx + (extra * g).reshape(T, n, D)
            dphi[2 * n:] += (((1 - r)[:, None] * e_res).T @ (v * g))
            if dgamma is not None:
                dgamma = dgamma + np.sum(v * extra, axis=0).reshape(n, D)
        elif bug == "streams_left_zero":    # Bug 3: the grid covered stream 0 only
            dx[:, 1:, :] = 0
        cast = numpy_ref._cast
        return (cast(dx, x.dtype), cast(dphi, phi.dtype), cast(dalpha, phi.dtype),
                cast(dbias, phi.dtype), None if dgamma is None else cast(dgamma, phi.dtype))

    return backward


@pytest.fixture(params=["clean", "dbias_res_doubled", "res_missing_inv_rms", "streams_left_zero"])
def planted(request):
    bug = request.param
    mod = types.SimpleNamespace(
        __name__=f"planted_{bug}", ARRAY_KIND="numpy", SUPPORTS_SINKHORN=False,
        availability=lambda: None, forward=numpy_ref.forward,
        backward=numpy_ref.backward if bug == "clean" else _planted_backward(bug))
    registry.register(mod.__name__, mod)
    yield bug, mod.__name__
    registry.unregister(mod.__name__)


# which gradients each bug corrupts (the rest must stay within bounds)
FLAGGED = {"clean": set(), "dbias_res_doubled": {"dbias"},
           "res_missing_inv_rms": {"dx", "dphi", "dgamma"}, "streams_left_zero": {"dx"}}


@pytest.mark.parametrize("x_dtype", ["bf16", "fp32"])
def test_crosscheck_flags_each_seed_bug(planted, x_dtype, seed):
    bug, name = planted
    inputs = random_inputs((2, 5, 4, 48), x_dtype, seed=seed)
    report = crosscheck(*inputs, backends=[name], seed=seed)
    print(report)
    failed = {r.output for r in report.failures}
    assert failed == FLAGGED[bug], f"seed={seed}: {bug} flagged {failed}\n{report}"
    assert report.ok == (bug == "clean")
