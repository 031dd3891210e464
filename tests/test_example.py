"""The end-to-end example trains: the mHC model's loss falls."""
import pytest

pytest.importorskip("torch")

from example import main


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_example_loss_falls(dtype, capsys):
    """The example's models train, in fp32 and as model.bfloat16() (16-bit parameters)."""
    curves = main(["--steps", "40", "--layers", "2", "--dtype", dtype])
    for label, losses in curves.items():
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, f"{label}: loss {first:.3f} -> {last:.3f}"
