"""Import and CLI behaviour: the package works without numba, triton (and torch)."""
import json
import subprocess
import sys
import textwrap

import pytest

from mhc_multi.cli import main

BLOCK = textwrap.dedent("""
    import sys
    class Block:  # make these packages unimportable
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"{{name}} is blocked for this test")
    sys.meta_path.insert(0, Block())
""")


def _run(code: str, blocked) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=set(blocked)) + code],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("blocked", [("numba", "triton"), ("numba", "triton", "torch")],
                         ids=["no-numba-triton", "no-numba-triton-torch"])
def test_numpy_backend_without_numba_and_triton(blocked):
    code = textwrap.dedent("""
        import json, mhc_multi
        from mhc_multi import random_inputs, crosscheck
        inputs = random_inputs((2, 3, 4, 10), "fp32", seed=1, container="numpy")
        out = mhc_multi.forward(*inputs)          # auto: numba is missing -> numpy
        rep = crosscheck(*inputs, backends=["numpy"])
        print(json.dumps({b.name: b.reason for b in mhc_multi.available_backends()}
                         | {"ok": rep.ok, "h_in": type(out.h_in).__name__}))
    """)
    res = _run(code, blocked)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["ok"] and info["h_in"] == "ndarray" and info["numpy"] is None
    assert "numba" in info["numba"], info
    assert ("torch" if "torch" in blocked else "triton") in info["triton"], info


def test_explicit_missing_backend_names_the_reason():
    code = textwrap.dedent("""
        import mhc_multi
        from mhc_multi import random_inputs
        try:
            mhc_multi.forward(*random_inputs((1, 2, 2, 8), "fp32", container="numpy"),
                              backend="numba")
        except mhc_multi.BackendUnavailableError as e:
            print("raised:", e)
    """)
    res = _run(code, ["numba"])
    assert res.returncode == 0, res.stderr
    assert "raised:" in res.stdout and "numba" in res.stdout


def test_backends_is_not_a_top_level_package():
    res = subprocess.run([sys.executable, "-c", "import backends"], capture_output=True,
                         cwd="/", text=True)
    assert res.returncode != 0


def test_cli_backends_table(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "numba", "numpy"):
        assert name in out


@pytest.mark.parametrize("dtype", ["bf16", "fp64"])
def test_cli_check_passes_on_the_reference(dtype, capsys, seed):
    pytest.importorskip("torch")
    assert main(["check", "--shape", "1,3,3,17", "--dtype", dtype, "--backends", "numpy",
                 "--seed", str(seed)]) == 0
    out = capsys.readouterr().out
    assert "all ok" in out and "dgamma" in out


def test_cli_check_exits_1_on_failure(capsys, monkeypatch, seed):
    """A backend that gets dx wrong makes `mhc-multi check` exit with status 1."""
    pytest.importorskip("torch")
    import types
    from mhc_multi import registry
    from mhc_multi.backends import numpy_ref

    def bad_backward(*a, **k):
        dx, *rest = numpy_ref.backward(*a, **k)
        return (dx * 0, *rest)

    mod = types.SimpleNamespace(__name__="bad", ARRAY_KIND="numpy", SUPPORTS_SINKHORN=False,
                                availability=lambda: None, forward=numpy_ref.forward,
                                backward=bad_backward)
    registry.register("bad", mod)
    try:
        assert main(["check", "--shape", "1,2,2,8", "--backends", "bad", "--seed", str(seed)]) == 1
    finally:
        registry.unregister("bad")
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--shape", "1,2,9,3"], "x: expected n = x.shape[2] in 1..8"),
    (["--sinkhorn", "2000"], "sinkhorn_iters: expected an int in 0..1000"),
])
def test_cli_check_reports_bad_arguments_as_usage_errors(argv, message, capsys):
    """The front end's message, as an argparse error (exit status 2), not a traceback."""
    with pytest.raises(SystemExit) as info:
        main(["check", "--backends", "numpy", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
