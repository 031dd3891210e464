"""Shared test set-up: fresh random seeds (printed on failure), one tolerance helper, markers.

Without a GPU the Triton kernels run on the CPU interpreter; TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module loads.

Markers, given here by rule so that every test file stays a plain table of cases:
``interpreter`` for tests that run Triton kernels on the CPU interpreter (any test of the triton
backend when no GPU is present), ``slow`` for tests that spawn processes, train, compile or run
large shapes. ``make test`` runs everything (CI); ``make test-fast`` deselects both.
"""
import os
import random
import socket

try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # the numpy-only tests still run
    torch, _cuda = None, False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from mhc_multi import registry
from mhc_multi.crosscheck import relative_error
from mhc_multi.tolerances import reference_slack, tolerance

# every backend loads now, under the environment set above: the Triton backend reads
# TRITON_INTERPRET once, when it is imported, and a test that unsets it must not be the first
registry.available_backends()


#: test modules (or module::test prefixes) whose tests are slow on 2 cores
SLOW = ("test_fsdp.py", "test_ddp.py", "test_example.py", "test_bench_smoke.py",
        "test_triton_codegen.py", "test_compile.py::test_compile_fullgraph",
        "test_accuracy.py::test_realistic_shape", "test_accuracy.py::test_property_every_backend",
        "test_accuracy.py::test_short_row_cancelling_dgamma",
        "test_reference.py::test_gradcheck")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: spawns processes, trains, compiles or runs large "
                                       "shapes (deselected by make test-fast)")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on the CPU interpreter "
                                       "(deselected by make test-fast)")


def pytest_collection_modifyitems(config, items):
    interpreted = not _cuda
    for item in items:
        where = item.nodeid.split("/")[-1]
        if any(where.startswith(s) for s in SLOW):
            item.add_marker(pytest.mark.slow)
        if interpreted and "triton" in where and not where.startswith("test_grids.py"):
            item.add_marker(pytest.mark.interpreter)


def free_port() -> int:
    """A free TCP port on the loopback, for the 2-process gloo tests (DDP, FSDP2)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                 *, where: str = "", rounding=None):
    """Relative Frobenius error of ``got`` against float64 ``ref64`` within the table's bound,
    widened by ``tolerances.reference_slack(rounding, ref64)`` when ``rounding`` (the float64
    evaluation's own rounding bound, for dx) is given."""
    err = relative_error(got, np.asarray(ref64, dtype=np.float64))
    tol = tolerance(output, x_dtype, param_dtype)
    if rounding is not None:
        tol += reference_slack(rounding, ref64)
    print(f"{where} {output}: rel. error {err:.2e} (bound {tol:.1e})")
    assert err <= tol, f"{where} {output}: rel. error {err:.3e} > bound {tol:.1e}"
    return err
