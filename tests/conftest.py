"""Shared test set-up: fresh random seeds (printed on failure) and one tolerance helper.

Without a GPU the Triton kernels run on the CPU interpreter; TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module loads.
"""
import os
import random

try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # the numpy-only tests still run
    torch, _cuda = None, False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from mhc_multi.crosscheck import relative_error
from mhc_multi.tolerances import tolerance


@pytest.fixture
def seed(request):
    """A fresh seed per test, shown in the report of a failing test."""
    s = random.randrange(2**31)
    request.node.user_properties.append(("seed", s))
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"random seed of this test: {seeds[0]}"))


def assert_close(got, ref64, output: str, x_dtype: str, param_dtype: str | None = None,
                 *, where: str = ""):
    """Relative Frobenius error of ``got`` against float64 ``ref64`` within the table's bound."""
    err = relative_error(got, np.asarray(ref64, dtype=np.float64))
    tol = tolerance(output, x_dtype, param_dtype)
    print(f"{where} {output}: rel. error {err:.2e} (bound {tol:.0e})")
    assert err <= tol, f"{where} {output}: rel. error {err:.3e} > bound {tol:.0e}"
    return err
