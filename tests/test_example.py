"""The end-to-end example trains: the mHC model's loss falls."""
import pytest

pytest.importorskip("torch")

from example import main


def test_example_loss_falls(capsys):
    curves = main(["--steps", "40", "--layers", "2"])
    for label, losses in curves.items():
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, f"{label}: loss {first:.3f} -> {last:.3f}"
